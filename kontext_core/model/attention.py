"""Rotary position embedding over 3 axes and the attention call used by every block."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""attn_fn(q, k, v) -> out. q, k, v: (B, H, L, D) in the compute dtype, already QK-normed and rotated; out:
(B, L, H*D), heads merged in head order. Any backend computing softmax(q kᵀ / sqrt(D)) v over all tokens fits
(a host's own kernel, a masked or patched variant); the default is PyTorch's SDPA."""


def rope_frequencies(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Unit complex rotations (…, L, dim/2) for positions `pos` (…, L) along one axis.

    Angles are computed in float64 where the device has it: at position ~100 with theta 1e4, fp32 angles
    are off by ~1e-5 rad, enough to show up in parity tests. The rotations are stored as complex64.
    """
    if dim % 2:
        raise ValueError(f"RoPE axis dimension must be even, got {dim}")
    hi = torch.float32 if pos.device.type == "mps" else torch.float64
    exponents = torch.arange(0, dim, 2, dtype=hi, device=pos.device) / dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = pos.to(hi).unsqueeze(-1) * inv_freq  # (…, L, dim/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


class RopeEmbedder(torch.nn.Module):
    """Position ids (B, L, n_axes) -> complex rotations (B, 1, L, head_dim/2)."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        parts = [rope_frequencies(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(parts, dim=-1).unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent element pairs (x[2i], x[2i+1]) of x (B, H, L, D) by pe (B, 1, L, D/2); math in fp32.

    One complex multiply instead of the equivalent 2x2 real matrix product: fewer passes over memory.
    """
    xf = x.float()
    if xf.stride(-1) != 1 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    rotated = torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * pe
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, attn_fn: AttentionFn = sdpa) -> Tensor:
    """RoPE on q and k, then `attn_fn` over all tokens: -> (B, L, H*D)."""
    return attn_fn(apply_rope(q, pe), apply_rope(k, pe), v)
