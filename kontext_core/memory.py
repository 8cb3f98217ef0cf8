"""Memory arithmetic for the transformer: weight bytes, the largest layer, and activation peaks.

The activation model counts the tensors alive at the peak of one single-stream block (the widest point of the
network) for N = text + target + context tokens, hidden H, MLP width M, compute dtype of b bytes:
    x, modulated x                      2·N·H·b
    linear1 output [q;k;v;mlp]          N·(3H+M)·b
    q, k rotated in fp32                2·N·H·4
    attention output, gelu(mlp)         N·(H+M)·b
    concatenation for linear2           N·(H+M)·b
    linear2 output                      N·H·b
Attention itself runs through scaled_dot_product_attention's memory-efficient kernels (O(N) extra), so no
N² score matrix is counted. The sampler keeps a few latent-sized fp32 buffers, counted separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.flux import FluxParams


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tokens_for(width: int, height: int, refs: int = 1, ref_size: tuple[int, int] | None = None,
               txt_tokens: int = 512) -> tuple[int, int]:
    """(target tokens, total tokens) for an output of width x height pixels and `refs` context images."""
    target = (-(-height // 16)) * (-(-width // 16))
    rw, rh = ref_size or (width, height)
    ctx = refs * (-(-rh // 16)) * (-(-rw // 16))
    return target, target + ctx + txt_tokens


def activation_bytes(params: FluxParams, n_tokens: int, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    h = params.hidden_size
    m = int(h * params.mlp_ratio)
    b = dtype_bytes(compute_dtype)
    return n_tokens * (2 * h * b + (3 * h + m) * b + 2 * h * 4 + 2 * (h + m) * b + h * b)


def linear_shapes(params: FluxParams) -> dict[str, tuple[int, int]]:
    """(out, in) of every distinct Linear in one double and one single block, plus the big embedders."""
    h, m = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    return {
        "double.qkv": (3 * h, h), "double.proj": (h, h), "double.mlp0": (m, h), "double.mlp2": (h, m),
        "double.mod": (6 * h, h), "single.linear1": (3 * h + m, h), "single.linear2": (h, h + m),
        "single.mod": (3 * h, h), "txt_in": (h, params.context_in_dim),
    }


def largest_layer_bytes(params: FluxParams, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the largest single weight once dequantized/upcast to `dtype` (what streaming needs extra)."""
    out, inp = max(linear_shapes(params).values(), key=lambda s: s[0] * s[1])
    return out * inp * dtype_bytes(dtype)


@dataclass
class Footprint:
    weights: int
    largest_layer: int
    activations: int
    n_tokens: int

    @property
    def full_load(self) -> int:
        return self.weights + self.largest_layer + self.activations


def footprint(params: FluxParams, weight_bytes: int, width: int = 1024, height: int = 1024, refs: int = 1,
              compute_dtype: torch.dtype = torch.bfloat16) -> Footprint:
    _, n = tokens_for(width, height, refs)
    return Footprint(weight_bytes, largest_layer_bytes(params, compute_dtype),
                     activation_bytes(params, n, compute_dtype), n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
