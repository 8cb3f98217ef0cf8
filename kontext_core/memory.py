"""Memory arithmetic: tensor shapes of the transformer and the AE (from the model classes), the largest layer,
activation peaks, and the sizes of the text encoders that share the machine.

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

import math
from dataclasses import asdict
from functools import lru_cache

import torch

from .errors import InputError
from .model.autoencoder import AutoEncoderParams
from .model.flux import FluxParams


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
    b = compute_dtype.itemsize
    return n_tokens * (2 * h * b + (3 * h + m) * b + 2 * h * 4 + 2 * (h + m) * b + h * b)


def params_key(params) -> tuple:
    """A hashable key of a params dataclass (for caches keyed by architecture)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(params).items()))


@lru_cache(maxsize=16)
def _flux_shapes(key: tuple) -> dict[str, tuple[int, ...]]:
    from .model.flux import Flux

    with torch.device("meta"):
        m = Flux(FluxParams(**dict(key)))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def flux_shapes(params: FluxParams) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the transformer (BFL names), from the model class itself on the meta
    device (so it cannot drift from what the loaders build); built once per architecture."""
    return _flux_shapes(params_key(params))


@lru_cache(maxsize=4)
def _ae_param_count(key: tuple) -> int:
    from .model.autoencoder import AutoEncoder

    with torch.device("meta"):
        return sum(t.numel() for t in AutoEncoder(AutoEncoderParams(**dict(key))).state_dict().values())


def ae_param_count(params: AutoEncoderParams | None = None) -> int:
    """Parameters of the autoencoder (the FLUX AE: 83,819,683), counted on the meta device once."""
    return _ae_param_count(params_key(params or AutoEncoderParams()))


def largest_layer_bytes(params: FluxParams, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the largest single weight once dequantized/upcast to `dtype` (what streaming needs extra)."""
    return max(math.prod(s) for k, s in flux_shapes(params).items() if len(s) == 2) * dtype.itemsize


# --- what else shares the machine: text encoders -------------------------------------------------------------
# The engine does not implement T5-XXL or CLIP-L (ComfyUI's loaders run them); their sizes are counted from the
# public architectures. T5 v1.1 XXL encoder: vocab 32128, d_model 4096, 64 heads x 64, d_ff 10240 (gated GELU:
# wi_0, wi_1, wo), 24 layers, relative-position bias (32 buckets x 64 heads) in layer 0: 4,762,310,656
# parameters (9.52 GB in fp16; the fp8 files keep the embedding in fp16: 4.89 GB). CLIP-L text model: vocab
# 49408, 77 positions, width 768, 12 layers, MLP 3072, plus the 768x768 text projection: 123,650,304 parameters.

def t5_xxl_shapes() -> dict[str, tuple[int, ...]]:
    d, ff = 4096, 10240
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (32128, d), "final_layer_norm.weight": (d,),
                                          "block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64)}
    for i in range(24):
        for p in "qkvo":
            shapes[f"block.{i}.layer.0.SelfAttention.{p}.weight"] = (d, d)
        shapes[f"block.{i}.layer.1.DenseReluDense.wi_0.weight"] = (ff, d)
        shapes[f"block.{i}.layer.1.DenseReluDense.wi_1.weight"] = (ff, d)
        shapes[f"block.{i}.layer.1.DenseReluDense.wo.weight"] = (d, ff)
        shapes[f"block.{i}.layer.0.layer_norm.weight"] = (d,)
        shapes[f"block.{i}.layer.1.layer_norm.weight"] = (d,)
    return shapes


CLIP_L_PARAMS = 123_650_304
T5_STORAGES = ("fp16", "fp8", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "none")


@lru_cache(maxsize=None)
def text_encoder_bytes(t5: str) -> int:
    """Bytes of T5-XXL (stored as `t5`: fp16, fp8 (block linears in fp8, embedding fp16) or a GGUF type applied
    to every matrix; `none` = no T5 loaded, e.g. a saved conditioning) plus CLIP-L in fp16."""
    from .quant.gguf_dequant import nbytes_for

    if t5 not in T5_STORAGES:
        raise InputError(f"text encoder '{t5}' is not known to the planner; choose one of {', '.join(T5_STORAGES)} "
                         "(fp16 = t5xxl_fp16, fp8 = t5xxl_fp8_e4m3fn(_scaled), Q* = a T5 GGUF, none = no T5 "
                         "loaded because the conditioning was saved).")
    if t5 == "none":
        return 0
    total = 0
    for name, shape in t5_xxl_shapes().items():
        n = math.prod(shape)
        if len(shape) == 1:
            total += 4 * n if t5.startswith("Q") else 2 * n  # GGUF keeps norms in F32
        elif t5 == "fp16":
            total += 2 * n
        elif t5 == "fp8":
            total += 2 * n if name == "shared.weight" or "relative_attention" in name else n
        elif "relative_attention" in name:
            total += 4 * n
        else:
            total += nbytes_for(t5, shape)
    return total + 2 * CLIP_L_PARAMS


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
