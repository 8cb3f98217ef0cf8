"""fp8 weights: scaled-fp8 validation and per-tensor fp8 quantization at load time.

Scaled fp8 (the scheme ComfyUI writes): a marker tensor `scaled_fp8` whose dtype names the fp8 format, and for
each fp8 Linear weight `<layer>.weight` a `<layer>.scale_weight` (a scalar, or one value per output row) such that
the real weight is `stored.float() * scale_weight`; optionally `<layer>.scale_input` (a scalar) for fp8 matmul.
Loading such a file as plain fp8 (ignoring the scales) gives black or noise images, so a marked file whose fp8
weight has no scale is refused.

Quantization policy for `weight_dtype="fp8_e4m3fn" | "fp8_e5m2"` (see `should_quantize`):
  quantized   the 2-D `.weight` of every Linear inside `double_blocks.*` and `single_blocks.*` — qkv, proj, mlp,
              mod.lin, linear1, linear2, modulation.lin — i.e. ~99.6% of FLUX's parameters;
  kept        biases, the QK-norm scales, and everything outside the blocks (`img_in`, `txt_in`, `time_in`,
              `vector_in`, `guidance_in`, `final_layer`): small, and the first/last layers and embedders are
              the most sensitive to rounding.
Each quantized weight gets a per-tensor scale `amax(|w|) / fp8_max`, stored as `scale_weight` (the scaled-fp8
scheme), so the full fp8 range is used whatever the weight's magnitude — much closer to the original than a plain
`.to(fp8)` cast, which flushes small weights to zero. Weights that are already fp8 in the requested format are
kept as they are (never requantized); fp8 weights of the other format are dequantized and requantized.
Work is done tensor by tensor and in chunks of the flattened tensor (`_CHUNK_ELEMENTS`), so the extra memory is one
fp8 tensor plus one chunk.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..model.ops import FP8_DTYPES, CastLinear, _scale_for_rows

log = logging.getLogger("kontext_core")

# Storage dtypes a loader can convert weights to (the nodes' weight_dtype option lists them in this order).
WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
# Dtypes the engine computes in (activations, dequantized weights).
COMPUTE_DTYPES: dict[str, torch.dtype] = {k: WEIGHT_DTYPES[k] for k in ("bf16", "fp16", "fp32")}
FP8_MAX = {dt: float(torch.finfo(dt).max) for dt in FP8_DTYPES}

_BLOCK_LINEAR = re.compile(r"(double_blocks|single_blocks)\.\d+\..+")
_CHUNK_ELEMENTS = 1 << 22  # quantize in chunks of this many elements (16 MiB as fp32)


def parse_weight_dtype(weight_dtype) -> torch.dtype | None:
    """'fp8_e4m3fn' | 'fp8_e5m2' | 'bf16' | 'fp16' | 'fp32' | a torch dtype among those | None -> dtype or None."""
    if weight_dtype is None or weight_dtype == "default":
        return None
    if isinstance(weight_dtype, torch.dtype):
        if weight_dtype in WEIGHT_DTYPES.values():
            return weight_dtype
    elif isinstance(weight_dtype, str):
        key = weight_dtype.lower().replace("torch.", "")
        aliases = {"float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2", "bfloat16": "bf16",
                   "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
        key = aliases.get(key, key)
        if key in WEIGHT_DTYPES:
            return WEIGHT_DTYPES[key]
    raise ValueError(f"weight_dtype {weight_dtype!r} is not supported; use one of {', '.join(WEIGHT_DTYPES)} or None "
                     "(keep the stored dtypes).")


def is_fp8_candidate(tensor_name: str, shape) -> bool:
    """The policy at tensor level (used by the VRAM planner): a 2-D `<block Linear>.weight`."""
    return (tensor_name.endswith(".weight") and len(shape) == 2
            and bool(_BLOCK_LINEAR.fullmatch(tensor_name[: -len(".weight")])))


def should_quantize(name: str, module: nn.Module) -> bool:
    """The quantization policy: is `name` (a module path, BFL names) a block Linear whose weight goes to fp8?"""
    return isinstance(module, CastLinear) and bool(_BLOCK_LINEAR.fullmatch(name)) and module.weight.ndim == 2


# --- scaled-fp8 validation -------------------------------------------------------------------------------------

def validate_scaled_fp8(tensors: Mapping[str, Tensor], source: str) -> None:
    """Check the scale tensors of a (BFL-layout, prefix-stripped) state dict; CheckpointError if unusable.

    - a `scaled_fp8` marker with an fp8 Linear weight that has no `scale_weight` -> error (black images otherwise)
    - a `scale_weight` / `scale_input` without its Linear weight -> error
    - a `scale_weight` that is neither a scalar nor one value per output row, or a non-scalar `scale_input` -> error
    - `scale_weight` on a non-fp8 weight is allowed (it is applied); fp8 norm scales and biases are allowed
      (upcast at use)
    """
    marker = tensors.get("scaled_fp8")
    for key, t in tensors.items():
        for suffix in (".scale_weight", ".scale_input"):
            if not key.endswith(suffix):
                continue
            layer = key[: -len(suffix)]
            w = tensors.get(layer + ".weight")
            if w is None or len(tuple(getattr(w, "logical_shape", w.shape))) != 2:
                raise CheckpointError(f"{source}: '{key}' is a scale for '{layer}.weight', which is not a Linear "
                                      "weight of this checkpoint; the file is corrupt or was converted wrongly.")
            rows = tuple(getattr(w, "logical_shape", w.shape))[0]
            if not t.is_floating_point():
                raise CheckpointError(f"{source}: '{key}' has dtype {t.dtype}; scales must be floating point.")
            shape = tuple(t.shape)
            ok = t.numel() == 1 if suffix == ".scale_input" else (
                t.numel() == 1 or shape in ((rows,), (rows, 1)))
            if not ok:
                want = "a scalar" if suffix == ".scale_input" else f"a scalar or one value per output row ({rows},)"
                raise CheckpointError(f"{source}: '{key}' has shape {list(shape)}, expected {want}. The file's "
                                      "scales do not match its weights; re-download or re-convert it.")
    if marker is None:
        return
    if marker.dtype not in FP8_DTYPES:
        log.warning("%s: 'scaled_fp8' marker has dtype %s (expected an fp8 dtype); using the per-layer scales anyway",
                    source, marker.dtype)
    missing = sorted(k for k, t in tensors.items()
                     if k.endswith(".weight") and t.dtype in FP8_DTYPES and t.ndim == 2
                     and k[: -len(".weight")] + ".scale_weight" not in tensors)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{source}: marked as scaled fp8 ('scaled_fp8' key) but the scale keys are missing for fp8 weight(s) "
            f"{', '.join(repr(m) for m in missing[:3])}{more} (expected '<layer>.scale_weight'). Without them the "
            "weights are off by their scale and images come out black; the file was probably saved or converted "
            "without its scales. Re-download it, or use an unscaled fp8 / bf16 checkpoint.")


# --- quantization ----------------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_fp8(w: Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """w (any float dtype, real values) -> (fp8 tensor q, fp32 scalar scale) with w ~= q.float() * scale.

    The scale is amax(|w|) / fp8_max (1 for an all-zero tensor) unless given. Computed in chunks, so the
    temporaries are at most one chunk; the result is allocated once, on w's device.
    """
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"{fp8_dtype} is not an fp8 dtype")
    fmax = FP8_MAX[fp8_dtype]
    flat_w = w.reshape(-1)
    if scale is None:
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        for i in range(0, flat_w.numel(), _CHUNK_ELEMENTS):
            amax = torch.maximum(amax, flat_w[i:i + _CHUNK_ELEMENTS].abs().amax().float())
        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    scale = scale.to(device=w.device, dtype=torch.float32).reshape(())
    q = torch.empty(w.shape, dtype=fp8_dtype, device=w.device)
    flat_q = q.view(-1)
    for i in range(0, flat_w.numel(), _CHUNK_ELEMENTS):
        chunk = (flat_w[i:i + _CHUNK_ELEMENTS].float() / scale).clamp_(-fmax, fmax)  # a new tensor: w is untouched
        flat_q[i:i + _CHUNK_ELEMENTS] = chunk.to(fp8_dtype)
    return q, scale


def dequantized_weight(mod: CastLinear, dtype: torch.dtype = torch.float32) -> Tensor:
    """The layer's real weight (stored x scale_weight), without LoRA patches, in `dtype` on its device."""
    w = mod.weight
    if mod.scale_weight is None:
        return w.to(dtype)
    return (w.float() * _scale_for_rows(mod.scale_weight, w.shape[0], torch.float32, w.device)).to(dtype)


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn, device=None) -> int:
    """Quantize the block Linear weights of `model` in place (policy in the module docstring); returns the number
    of layers quantized. With `device` (e.g. "cuda") each weight is moved there first and quantized there, so a
    GPU does the arithmetic and receives fp8 bytes only."""
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"{fp8_dtype} is not an fp8 dtype")
    n = 0
    for name, mod in model.named_modules():
        if not should_quantize(name, mod):
            continue
        w = mod.weight
        if type(w.data) is not torch.Tensor:
            continue  # quantized storage (e.g. GGUF) stays as it is
        if w.dtype == fp8_dtype:
            continue  # already fp8 in this format (scaled or not): keep, never requantize
        target = torch.device(device) if device is not None else w.device
        if w.dtype in FP8_DTYPES or mod.scale_weight is not None:
            src = dequantized_weight(mod, torch.float32).to(target)  # other fp8 format / scaled: real values
        else:
            src = w.data.to(target)
        q, scale = quantize_fp8(src, fp8_dtype)
        del src
        mod.weight = nn.Parameter(q, requires_grad=False)
        mod.scale_weight = scale  # scale_input (if any) describes the inputs, so it stays valid
        n += 1
    return n


@torch.no_grad()
def cast_model_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every float parameter of `model` in `dtype` (bf16/fp16/fp32); fp8 weights are dequantized (their
    `scale_weight` folded in and dropped). Returns the number of tensors changed."""
    n = 0
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if type(p.data) is not torch.Tensor or not p.is_floating_point():
                continue
            if isinstance(mod, CastLinear) and name == "weight" and mod.scale_weight is not None:
                new = dequantized_weight(mod, dtype)
                mod.scale_weight = None
                mod.scale_input = None
            elif p.dtype != dtype:
                new = p.data.to(dtype)
            else:
                continue
            setattr(mod, name, nn.Parameter(new, requires_grad=False))
            n += 1
    return n
