"""The FLUX.1 autoencoder (AE): a KL-VAE with 16 latent channels and an 8x spatial reduction.

Module and parameter names follow the LDM layout of BFL's `ae.safetensors` (`encoder.down.i.block.j.conv1`,
`decoder.up.i.upsample.conv`, `mid.attn_1.q` ...), so that file loads with `load_state_dict` as it is;
`kontext_core.weights.ae_layout` converts the diffusers `vae/` layout to these names.

Shape of the network (defaults = the real FLUX AE, ch=128, ch_mult=(1, 2, 4, 4), 2 res blocks, z=16):

    encoder: conv_in -> for level i: num_res_blocks ResBlocks to ch*ch_mult[i], then a stride-2 downsample
             (except on the last level) -> mid (ResBlock, self-attention, ResBlock) -> GroupNorm, swish,
             conv_out to 2*z channels (mean and log-variance).
    decoder: conv_in from z -> mid -> for level i = n-1 ... 0: num_res_blocks+1 ResBlocks to ch*ch_mult[i],
             then a nearest x2 upsample + conv (except on level 0) -> GroupNorm, swish, conv_out.

`decoder.up[i]` is indexed by resolution level, so `up[n-1]` (the coarsest) runs first.

Every layer that owns weights is created through the `operations` namespace (default `torch.nn`) with the
given `dtype` / `device`, so a host can substitute its own casting layers (ComfyUI's `comfy.ops.*`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


@dataclass
class AutoEncoderParams:
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = field(default=(1, 2, 4, 4))
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side (8 for the FLUX AE)."""
        return 2 ** (len(self.ch_mult) - 1)


_GROUPS = 32
_EPS = 1e-6


def _norm(ops, channels: int, dtype, device):
    return ops.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=_EPS, affine=True,
                         dtype=dtype, device=device)


def _conv(ops, cin: int, cout: int, k: int, stride: int, pad: int, dtype, device):
    return ops.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=pad, dtype=dtype, device=device)


class ResnetBlock(nn.Module):
    """norm -> swish -> 3x3 conv, twice, plus a (1x1-projected when the width changes) skip connection."""

    def __init__(self, cin: int, cout: int, ops, dtype, device):
        super().__init__()
        self.norm1 = _norm(ops, cin, dtype, device)
        self.conv1 = _conv(ops, cin, cout, 3, 1, 1, dtype, device)
        self.norm2 = _norm(ops, cout, dtype, device)
        self.conv2 = _conv(ops, cout, cout, 3, 1, 1, dtype, device)
        self.nin_shortcut = _conv(ops, cin, cout, 1, 1, 0, dtype, device) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/out projections are 1x1 convolutions."""

    def __init__(self, channels: int, ops, dtype, device):
        super().__init__()
        self.norm = _norm(ops, channels, dtype, device)
        self.q = _conv(ops, channels, channels, 1, 1, 0, dtype, device)
        self.k = _conv(ops, channels, channels, 1, 1, 0, dtype, device)
        self.v = _conv(ops, channels, channels, 1, 1, 0, dtype, device)
        self.proj_out = _conv(ops, channels, channels, 1, 1, 0, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad one row/column at the bottom/right, then a stride-2 3x3 conv (floor(H/2) out)."""

    def __init__(self, channels: int, ops, dtype, device):
        super().__init__()
        self.conv = _conv(ops, channels, channels, 3, 2, 0, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int, ops, dtype, device):
        super().__init__()
        self.conv = _conv(ops, channels, channels, 3, 1, 1, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, ops, dtype, device):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, ops, dtype, device)
        self.attn_1 = AttnBlock(channels, ops, dtype, device)
        self.block_2 = ResnetBlock(channels, channels, ops, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: a list of ResBlocks (`block`) and an optional resampler."""


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams, ops, dtype, device):
        super().__init__()
        self.conv_in = _conv(ops, p.in_channels, p.ch, 3, 1, 1, dtype, device)
        widths = [p.ch * m for m in p.ch_mult]
        cin = p.ch
        self.down = nn.ModuleList()
        for i, cout in enumerate(widths):
            level = _Level()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, ops, dtype, device))
                cin = cout
            if i != len(widths) - 1:
                level.downsample = Downsample(cin, ops, dtype, device)
            self.down.append(level)
        self.mid = MidBlock(cin, ops, dtype, device)
        self.norm_out = _norm(ops, cin, dtype, device)
        self.conv_out = _conv(ops, cin, 2 * p.z_channels, 3, 1, 1, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams, ops, dtype, device):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        cin = widths[-1]
        self.conv_in = _conv(ops, p.z_channels, cin, 3, 1, 1, dtype, device)
        self.mid = MidBlock(cin, ops, dtype, device)
        levels: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            level = _Level()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, widths[i], ops, dtype, device))
                cin = widths[i]
            if i != 0:
                level.upsample = Upsample(cin, ops, dtype, device)
            levels.append(level)
        # Registered in resolution order (up[0] = full resolution), run from the coarsest level.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(ops, cin, dtype, device)
        self.conv_out = _conv(ops, cin, p.out_ch, 3, 1, 1, dtype, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX AE. `encode`: image in [-1, 1] -> scaled latent; `decode`: scaled latent -> image in ~[-1, 1]."""

    def __init__(self, params: AutoEncoderParams | None = None, operations=torch.nn, dtype=None, device=None):
        super().__init__()
        self.params = params = params or AutoEncoderParams()
        if params.in_channels < 1 or params.out_ch < 1 or params.z_channels < 1 or not params.ch_mult:
            raise ValueError(f"invalid AutoEncoderParams: {params}")
        self.encoder = Encoder(params, operations, dtype, device)
        self.decoder = Decoder(params, operations, dtype, device)
        self.scale_factor = float(params.scale_factor)
        self.shift_factor = float(params.shift_factor)
        # Optional override of the dtype the math runs in (None: the dtype of the stored weights). A host whose
        # layers cast weights at use (e.g. fp8 storage) sets this to the dtype it casts to.
        self.compute_dtype: torch.dtype | None = None

    @property
    def downscale(self) -> int:
        return self.params.downscale

    @property
    def dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return self.encoder.conv_in.weight.dtype

    def _prepare(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"AutoEncoder.{what}: expected a (B, {channels}, H, W) tensor, got {tuple(x.shape)}")
        dev = self.encoder.conv_in.weight.device
        if dev.type == "meta":
            dev = x.device
        return x.to(device=dev, dtype=self.dtype)

    # --- unscaled access -------------------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, unscaled, each (B, z, floor(H/8), floor(W/8))."""
        x = self._prepare(x, self.params.in_channels, "encode")
        if min(x.shape[-2:]) < self.downscale:
            raise InputError(f"AutoEncoder.encode: image {tuple(x.shape[-2:])} is smaller than "
                             f"{self.downscale}x{self.downscale} pixels")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an *unscaled* latent (the posterior mean's space)."""
        return self.decoder(self._prepare(z, self.params.z_channels, "decode"))

    # --- scaled latents (what the DiT sees) --------------------------------------------------------------
    def process_in(self, mean: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * (mean - self.shift_factor)

    def process_out(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale_factor + self.shift_factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (B, C, H, W) in [-1, 1] -> scale * (mean - shift). Deterministic (no sampling)."""
        mean, _ = self.encode_moments(x)
        return self.process_in(mean)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image batch in about [-1, 1] (not clamped)."""
        z = self._prepare(z, self.params.z_channels, "decode")
        return self.decoder(self.process_out(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
