"""Rotary position embedding over 3 axes and the attention call used by every block."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (B,H,L,D) x3 -> (B,H,L,D)


def rope_frequencies(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (…, L, dim/2, 2, 2) for positions `pos` (…, L) along one axis.

    Angles are computed in float64 where the device has it: at position ~100 with theta 1e4, fp32 angles
    are off by ~1e-5 rad, enough to show up in parity tests.
    """
    if dim % 2:
        raise ValueError(f"RoPE axis dimension must be even, got {dim}")
    hi = torch.float32 if pos.device.type == "mps" else torch.float64
    exponents = torch.arange(0, dim, 2, dtype=hi, device=pos.device) / dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = pos.to(hi).unsqueeze(-1) * inv_freq  # (…, L, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rot.unflatten(-1, (2, 2)).float()


class RopeEmbedder(torch.nn.Module):
    """Position ids (B, L, n_axes) -> rotation tensor (B, 1, L, head_dim/2, 2, 2)."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        parts = [rope_frequencies(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(parts, dim=-3).unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent element pairs of x (B, H, L, D) by pe (B, 1, L, D/2, 2, 2); math in fp32."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))  # (B,H,L,D/2,1,2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]  # (B,H,L,D/2,2)
    return out.flatten(-2).type_as(x)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, attn_fn: AttentionFn = sdpa) -> Tensor:
    """RoPE on q and k, attention over all tokens (no mask), heads merged: -> (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = attn_fn(q, k, v)
    return x.transpose(1, 2).flatten(2)
