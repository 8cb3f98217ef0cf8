"""The FLUX.1 DiT as used by Kontext dev (same architecture as FLUX.1-dev, different weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import tokens as tok
from .attention import AttentionFn, RopeEmbedder, sdpa
from .layers import (DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, keep_fp16_finite,
                     timestep_embedding)


@dataclass
class FluxParams:
    """Architecture hyper-parameters, named as in the reference implementation."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal the head dim {head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


KONTEXT_DEV = FluxParams()


@dataclass
class ForwardHooks:
    """Per-call extension points of `Flux.forward_tokens` for a host (caching, adapters, ControlNet, its own
    attention kernel). Every field is optional; a field left None costs nothing.

    attn_fn       the attention for this call (signature: attention.AttentionFn), instead of the blocks' own.
    post_input    (img, txt, img_ids, txt_ids) -> the same four, after the input projections, before RoPE.
    double_block  (index, run, img, txt, vec, pe) -> (img, txt) runs double block `index`; `run(img, txt, vec,
                  pe, attn_fn=None)` is the block itself (with this call's attn_fn unless one is given).
    single_block  (index, run, x, vec, pe, n_txt) -> x for single block `index`; x is [text ‖ image] tokens,
                  the first n_txt of them text; `run(x, vec, pe, attn_fn=None)` is the block.
    `pe` is the engine's RoPE (complex rotations, see attention.RopeEmbedder); hooks pass it on unchanged.
    """

    attn_fn: AttentionFn | None = None
    post_input: Callable | None = None
    double_block: Callable | None = None
    single_block: Callable | None = None


class Flux(nn.Module):
    """forward(img, img_ids, txt, txt_ids, timesteps, y, guidance) on packed tokens -> (B, N_img, out_channels).

    `operations` supplies Linear layers (torch.nn by default); `attn_fn` replaces scaled_dot_product_attention.
    """

    def __init__(self, params: FluxParams = KONTEXT_DEV, operations=nn, dtype=None, device=None,
                 attn_fn: AttentionFn = sdpa):
        super().__init__()
        self.params = params
        p = params
        kw = dict(operations=operations, dtype=dtype, device=device)
        self.in_channels = p.in_channels
        self.out_channels = p.out_channels
        self.pe_embedder = RopeEmbedder(p.theta, p.axes_dim)
        self.img_in = operations.Linear(p.in_channels, p.hidden_size, bias=True, dtype=dtype, device=device)
        self.time_in = MLPEmbedder(256, p.hidden_size, **kw)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size, **kw)
        self.guidance_in = MLPEmbedder(256, p.hidden_size, **kw) if p.guidance_embed else nn.Identity()
        self.txt_in = operations.Linear(p.context_in_dim, p.hidden_size, dtype=dtype, device=device)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias, attn_fn=attn_fn, **kw)
            for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, attn_fn=attn_fn, **kw)
            for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, 1, p.out_channels, **kw)

    def set_attention(self, attn_fn: AttentionFn) -> None:
        for block in (*self.double_blocks, *self.single_blocks):
            block.attn_fn = attn_fn

    def embed_vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, dtype) -> Tensor:
        """time + pooled-text (+ guidance) conditioning vector. guidance=None on a guidance-distilled model skips
        the guidance embedding (what hosts call "disable guidance")."""
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None) -> Tensor:
        return self.forward_tokens(img, img_ids, txt, txt_ids, timesteps, y, guidance)

    def forward_tokens(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                       y: Tensor, guidance: Tensor | None = None, hooks: ForwardHooks | None = None) -> Tensor:
        """The DiT on packed tokens. Hosts may override `forward` with their own call convention (ComfyUI's
        adapter does); `forward_latent` always goes through this method. `hooks`: see ForwardHooks."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C) token tensors, got {tuple(img.shape)} and {tuple(txt.shape)}")
        h = hooks or _NO_HOOKS
        attn_fn = h.attn_fn
        img = self.img_in(img)
        vec = self.embed_vector(timesteps, y, guidance, img.dtype)
        txt = self.txt_in(txt.to(img.dtype))
        if h.post_input is not None:
            img, txt, img_ids, txt_ids = h.post_input(img, txt, img_ids, txt_ids)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for i, block in enumerate(self.double_blocks):
            if h.double_block is None:
                img, txt = block(img, txt, vec, pe, attn_fn)
            else:
                img, txt = h.double_block(i, _bound(block, attn_fn), img, txt, vec, pe)
        n_txt = txt.shape[1]
        x = torch.cat((txt, keep_fp16_finite(img)), dim=1)
        for i, block in enumerate(self.single_blocks):
            if h.single_block is None:
                x = block(x, vec, pe, attn_fn)
            else:
                x = h.single_block(i, _bound(block, attn_fn), x, vec, pe, n_txt)
        return self.final_layer(x[:, n_txt:], vec)

    def forward_latent(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor,
                       guidance: Tensor | None = None, references: Sequence[Tensor] = (),
                       layout: str = "offset", hooks: ForwardHooks | None = None) -> Tensor:
        """Velocity for an unpacked target latent (B, 16, H, W) with context latents appended as Kontext tokens."""
        b, _, h, w = x.shape
        img, img_ids, n_target = tok.kontext_tokens(x, references, layout)
        txt_ids = tok.text_ids(b, context.shape[1], device=x.device)
        out = self.forward_tokens(img, img_ids, context, txt_ids, timestep, y, guidance, hooks)
        return tok.unpack(out[:, :n_target], h, w)


_NO_HOOKS = ForwardHooks()


def _bound(block: nn.Module, attn_fn: AttentionFn | None):
    """The block as a hook sees it: called with this forward's attention unless the hook passes another."""
    def run(*args, attn_fn: AttentionFn | None = attn_fn):
        return block(*args, attn_fn=attn_fn)
    return run
