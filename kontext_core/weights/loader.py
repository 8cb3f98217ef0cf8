"""Load a FLUX.1 Kontext transformer from any supported file into the engine's `Flux` module.

Formats are told apart by content: GGUF by its magic bytes, safetensors by its header; BFL, ComfyUI-prefixed,
bundled and diffusers layouts by their keys. The module is built on the meta device and the memory-mapped
tensors are assigned to it, so the weights exist once (as file pages) and stay in their stored dtype unless a
dtype is asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..model.flux import Flux, FluxParams
from ..model.ops import FP8_DTYPES, CastOps
from .fp8 import cast_model_weights, parse_weight_dtype, quantize_model_fp8, validate_scaled_fp8
from .flux_layout import (check_flux_family, check_tensor_storage, infer_flux_params, key_mismatch, shape_of,
                          to_bfl)
from .safetensors_io import load_state_dict

DIFFUSERS_TRANSFORMER_FILES = ("transformer/diffusion_pytorch_model.safetensors.index.json",
                               "transformer/diffusion_pytorch_model.safetensors",
                               "diffusion_pytorch_model.safetensors.index.json",
                               "diffusion_pytorch_model.safetensors")


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


@dataclass
class Checkpoint:
    """A transformer checkpoint read into memory-mapped tensors, in BFL layout."""

    source: str
    container: str  # "safetensors" | "gguf" | "state_dict"
    # as found, before conversion: "bfl", "comfyui" (model.diffusion_model. prefix), "bfl+<prefix>", "diffusers"
    layout: str
    tensors: dict[str, Tensor]
    qtypes: dict[str, str] = field(default_factory=dict)  # per tensor storage type (GGUF) or dtype name
    metadata: dict = field(default_factory=dict)
    file_size: int = 0
    config: dict = field(default_factory=dict)  # FluxParams facts from a diffusers config.json (e.g. axes_dim)


def diffusers_config_overrides(path: str | os.PathLike) -> dict:
    """Architecture facts a diffusers folder's config.json gives and shapes cannot: the RoPE split."""
    p = Path(path)
    if not p.is_dir():
        return {}
    for cfg in (p / "transformer" / "config.json", p / "config.json"):
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{cfg}: not valid JSON ({e}); the diffusers folder is damaged.") from e
            axes = data.get("axes_dims_rope") if isinstance(data, dict) else None
            if axes is None:
                return {}
            ok = isinstance(axes, (list, tuple)) and len(axes) > 0 and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and float(a).is_integer() and a > 0
                for a in axes)
            if not ok:
                raise CheckpointError(f"{cfg}: 'axes_dims_rope' is {axes!r}; expected a list of positive integers "
                                      "(FLUX.1: [16, 56, 56]). Fix or re-download config.json.")
            return {"axes_dim": tuple(int(a) for a in axes)}
    return {}


def read_transformer(src: str | os.PathLike | Mapping[str, Tensor]) -> Checkpoint:
    """Read a path (file, index json, diffusers folder) or a state dict; returns BFL-layout tensors."""
    if isinstance(src, Mapping):
        tensors, layout = to_bfl(src)
        if "scaled_fp8" in src and "scaled_fp8" not in tensors:
            tensors["scaled_fp8"] = src["scaled_fp8"]  # marker at the top level, outside the model prefix
        return Checkpoint("<state dict>", "state_dict", layout, tensors,
                          {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()})
    path = Path(src)
    if is_gguf(path):
        from .gguf_file import read_gguf  # gguf is only imported when a GGUF file is actually used

        g = read_gguf(path)
        try:
            tensors, layout = to_bfl(g.tensors)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return Checkpoint(str(path), "gguf", layout, tensors, dict(g.qtypes), dict(g.metadata), g.file_size)
    config = diffusers_config_overrides(path)  # a damaged config.json is reported before the weights are read
    raw = load_state_dict(path, prefer=DIFFUSERS_TRANSFORMER_FILES)
    try:
        tensors, layout = to_bfl(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "scaled_fp8" in raw and "scaled_fp8" not in tensors:
        tensors["scaled_fp8"] = raw["scaled_fp8"]  # marker saved at the top level, outside the model prefix
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    return Checkpoint(str(path), "safetensors", layout, tensors,
                      {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}, {}, size, config)


def check_shapes(model: nn.Module, sd: Mapping[str, Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    ours = {k for k in sd if not k.endswith((".scale_weight", ".scale_input")) and k != "scaled_fp8"}
    mismatch = key_mismatch(expected, ours)
    if mismatch:
        raise CheckpointError(f"{source}: does not match the inferred FLUX architecture — {mismatch}"
                              ". The file may be incomplete, or a different model; pass a config override if "
                                "the architecture was guessed wrong.")
    for k, shape in expected.items():
        found = shape_of(sd[k])
        if found != shape:
            raise CheckpointError(f"{source}: tensor '{k}' has shape {list(found)}, expected {list(shape)} "
                                  "for this architecture; the checkpoint is corrupt or a different model.")


def resolve_params(ckpt: Checkpoint, params: FluxParams | Mapping | None = None) -> FluxParams:
    """The architecture: explicit FluxParams, else shapes + the folder's config + `params` overrides."""
    if isinstance(params, FluxParams):
        return params
    check_tensor_storage(ckpt.tensors, ckpt.source)
    return infer_flux_params(ckpt.tensors, {**ckpt.config, **dict(params or {})})


def validate_checkpoint(ckpt: Checkpoint, params: FluxParams) -> None:
    """The model family, every key, shape and storage type against the architecture, and scaled-fp8 scales;
    CheckpointError otherwise."""
    check_flux_family(params, ckpt.source)
    check_tensor_storage(ckpt.tensors, ckpt.source)
    with torch.device("meta"):
        reference = Flux(params)
    check_shapes(reference, ckpt.tensors, ckpt.source)
    validate_scaled_fp8(ckpt.tensors, ckpt.source)


def default_operations(ckpt: Checkpoint):
    if ckpt.container == "gguf":
        from ..quant.gguf_ops import GGUFOps

        return GGUFOps
    return CastOps


def build_transformer(ckpt: Checkpoint, *, params: FluxParams | Mapping | None = None, dtype=None,
                      device="cpu", operations=None, weight_dtype=None) -> Flux:
    """Instantiate `Flux` for a read checkpoint and assign its tensors (zero-copy unless dtype/device change).

    dtype: storage dtype for the float (bf16/fp16/fp32) parameters; fp8 and quantized storage stay as they are.
    weight_dtype: "fp8_e4m3fn" | "fp8_e5m2" quantize the block Linear weights per tensor with a `scale_weight`
    (scaled fp8, policy in `weights/fp8.py`), keeping small sensitive tensors as stored (or in `dtype`);
    "bf16" | "fp16" | "fp32" store every float tensor in that dtype, dequantizing fp8 weights (scales folded in);
    None keeps the stored dtypes.
    """
    wdt = parse_weight_dtype(weight_dtype)
    if wdt is not None and wdt not in FP8_DTYPES:
        if dtype is not None and dtype != wdt:
            raise ValueError(f"dtype={dtype} and weight_dtype={weight_dtype!r} disagree; give one of them.")
        dtype = None  # cast_model_weights below covers every float tensor
    params = resolve_params(ckpt, params)
    validate_checkpoint(ckpt, params)
    with torch.device("meta"):
        model = Flux(params, operations=operations or default_operations(ckpt))
    model.source = None if ckpt.container == "state_dict" else ckpt.source  # named in errors about the weights (e.g. NaN results)
    sd = dict(ckpt.tensors)
    sd.pop("scaled_fp8", None)
    model.load_state_dict(sd, strict=True, assign=True)
    if wdt in FP8_DTYPES:
        # On a GPU, each weight is quantized there (fast) and only fp8 bytes stay on it.
        quantize_model_fp8(model, wdt, device=None if str(device) == "cpu" else device)
    elif wdt is not None:
        cast_model_weights(model, wdt)
    if dtype is not None:
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                # Quantized (GGUF) and fp8 storage stays as is; dtype applies to float weights.
                if p.dtype in (torch.float32, torch.float16, torch.bfloat16) and type(p.data) is torch.Tensor:
                    setattr(mod, name, nn.Parameter(p.data.to(dtype), requires_grad=False))
    if str(device) != "cpu":
        model.to(device)
    model.eval().requires_grad_(False)
    return model


def load_transformer(src, *, params: FluxParams | Mapping | None = None, dtype=None, device="cpu",
                     operations=None, weight_dtype=None) -> Flux:
    """Load a FLUX.1 Kontext transformer from a path or a state dict (any supported layout).

    weight_dtype: None (as stored) | "fp8_e4m3fn" | "fp8_e5m2" | "bf16" | "fp16" | "fp32"; see build_transformer.
    """
    return build_transformer(read_transformer(src), params=params, dtype=dtype, device=device, operations=operations,
                             weight_dtype=weight_dtype)
