"""Building blocks of the FLUX.1 DiT. Parameter names follow the BFL checkpoint layout exactly.

Every weight layer is created through `operations` (default `torch.nn`) so a host can substitute layers that
cast, stream, dequantize (GGUF) or upcast (fp8) weights. The one loose parameter (the QK-norm scale) is cast
to the activation's device and dtype at use, so partially loaded models work too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionFn, attention, sdpa


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t*time_factor, [cos | sin] halves, float32."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


FP16_MAX = 65504.0


def keep_fp16_finite(x: Tensor) -> Tensor:
    """In fp16 the text stream of FLUX can overflow; clamp ±inf to the fp16 range (NaN to 0) so one overflowing
    activation does not turn the whole output into NaN. A no-op in other dtypes."""
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, operations=nn, dtype=None, device=None):
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        # Ones, as the reference initialises it: a model built for training must not start from garbage.
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale.to(device=x.device, dtype=x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, scale.shape, scale, eps=1e-6)
        # Normalise in fp32, then scale in the compute dtype (as the reference does).
        return F.rms_norm(x.float(), scale.shape, eps=1e-6).to(x.dtype) * scale


class QKNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype=dtype, device=device)
        self.key_norm = RMSNorm(dim, dtype=dtype, device=device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the weights of one stream's attention in a double block (the attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, operations=nn, dtype=None, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(dim // num_heads, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def apply(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x, 1 + self.scale)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool, operations=nn, dtype=None, device=None):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> three (B, H, L, D) views."""
    b, l, _ = qkv.shape
    q, k, v = qkv.view(b, l, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 operations=nn, dtype=None, device=None, attn_fn: AttentionFn = sdpa):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.attn_fn = attn_fn
        kw = dict(dtype=dtype, device=device)
        def norm():
            return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)

        def mlp():
            return nn.Sequential(operations.Linear(hidden_size, mlp_hidden, bias=True, **kw),
                                 nn.GELU(approximate="tanh"),
                                 operations.Linear(mlp_hidden, hidden_size, bias=True, **kw))

        # Image stream, then text stream, each in this order (the state_dict's order).
        self.img_mod = Modulation(hidden_size, True, operations, **kw)
        self.img_norm1 = norm()
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, operations, **kw)
        self.img_norm2 = norm()
        self.img_mlp = mlp()
        self.txt_mod = Modulation(hidden_size, True, operations, **kw)
        self.txt_norm1 = norm()
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, operations, **kw)
        self.txt_norm2 = norm()
        self.txt_mlp = mlp()

    def _qkv(self, x: Tensor, mod: ModulationOut, norm: nn.Module, attn: SelfAttention):
        q, k, v = split_heads(attn.qkv(mod.apply(norm(x))), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                attn_fn: AttentionFn | None = None) -> tuple[Tensor, Tensor]:
        """`attn_fn` replaces the block's attention function for this call."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(img, img_mod1, self.img_norm1, self.img_attn)
        txt_q, txt_k, txt_v = self._qkv(txt, txt_mod1, self.txt_norm1, self.txt_attn)

        # Joint attention over [text ‖ image] tokens, text first (the ids follow the same order).
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe, attn_fn or self.attn_fn)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = torch.addcmul(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod2.gate, self.img_mlp(img_mod2.apply(self.img_norm2(img))))
        txt = torch.addcmul(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod2.gate, self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt))))
        return img, keep_fp16_finite(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: linear1 = [q; k; v; mlp_in], linear2 = [attn_out ‖ gelu(mlp)] -> hidden."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 operations=nn, dtype=None, device=None, attn_fn: AttentionFn = sdpa):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.attn_fn = attn_fn
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        kw = dict(dtype=dtype, device=device)
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim, **kw)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, **kw)
        self.norm = QKNorm(hidden_size // num_heads, **kw)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, False, operations, **kw)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, attn_fn: AttentionFn | None = None) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.apply(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, attn_fn or self.attn_fn)
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return keep_fp16_finite(torch.addcmul(x, mod.gate, out))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, operations=nn, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = operations.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True, **kw))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = torch.addcmul(shift[:, None, :], self.norm_final(x), 1 + scale[:, None, :])
        return self.linear(x)
