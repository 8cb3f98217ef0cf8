"""What the GGUF loader node decides without ComfyUI: the file list, the compute dtype, the file check, and the
extra memory that dequantizing at use needs.

Imported by nodes/gguf_model.py (the ComfyUI side) and unit-tested without ComfyUI (tests/unit/test_nodes_gguf.py).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from kontext_core.errors import CheckpointError
from kontext_core.quant.ggml_tensor import GGMLTensor
from kontext_core.weights.fp8 import COMPUTE_DTYPES as ENGINE_COMPUTE_DTYPES
from kontext_core.weights.loader import Checkpoint, is_gguf, read_transformer

from .logic import check_choice

GGUF_EXTENSIONS = (".gguf",)

# Compute dtype of the dequantized weights and activations; "default" lets ComfyUI pick for the device
# (bf16 on recent GPUs, fp16 on older ones, fp32 on CPU).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"default": None, **ENGINE_COMPUTE_DTYPES}


def gguf_choices(files: Iterable[str]) -> list[str]:
    """The loader's list: `.gguf` files only (any case), sorted."""
    return sorted(f for f in files if f.lower().endswith(GGUF_EXTENSIONS))


def choose_compute_dtype(option: str, host_default: Callable[[], torch.dtype]) -> torch.dtype:
    check_choice(option, tuple(COMPUTE_DTYPES), "compute dtype")
    want = COMPUTE_DTYPES[option]
    return want if want is not None else host_default()


def _first_bytes(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e}).") from e


def check_gguf_file(path: str | os.PathLike) -> Path:
    """The path of a readable GGUF file; CheckpointError naming the file and what to do otherwise.

    A file is recognised by its magic bytes, not its name: a .safetensors renamed to .gguf is refused here
    (the engine would otherwise load it as safetensors, not quantized).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a GGUF file. Diffusers folders load with 'Load Kontext "
                              "Model (native)'.")
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found. Put GGUF transformers in models/diffusion_models (or "
                              "models/unet) and refresh the node list.")
    if not is_gguf(p):
        head = _first_bytes(p)
        if len(head) >= 9 and head[8:9] == b"{":
            found = "a safetensors file"
            hint = ("Load it with 'Load Kontext Model (native)' instead (and give it its .safetensors name "
                    "back), or make a GGUF with `python -m kontext_core convert FILE OUT.gguf --type Q4_K_M`.")
        elif not head:
            found, hint = "an empty file", "The download failed; download the file again."
        else:
            found, hint = f"no GGUF header (starts with {head[:4]!r})", "The file is damaged or not a GGUF " \
                                                                        "model; download it again."
        raise CheckpointError(f"{p}: not a GGUF file (expected the magic bytes b'GGUF' at the start, found "
                              f"{found}). {hint}")
    return p


def read_gguf_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read (memory-map) a FLUX/Kontext GGUF through the engine; its errors (truncated file, another
    architecture, unsupported quant type) surface unchanged."""
    p = check_gguf_file(path)
    ckpt = read_transformer(p)
    if ckpt.container != "gguf":  # is_gguf said yes, so this cannot happen unless the engine changes
        raise CheckpointError(f"{p}: read as {ckpt.container}, expected GGUF.")
    return ckpt


def logical_numel(t: Tensor) -> int:
    return t.logical_numel if isinstance(t, GGMLTensor) else t.numel()


def logical_param_count(tensors: Mapping[str, Tensor]) -> int:
    return sum(logical_numel(t) for t in tensors.values() if isinstance(t, Tensor))


def quant_summary(qtypes: Mapping[str, str]) -> str:
    """'Q4_K x 76, F32 x 300, F16 x 8' (most frequent first)."""
    return ", ".join(f"{q} x {n}" for q, n in Counter(qtypes.values()).most_common())


def dequant_reserve_bytes(largest_numel: int, compute_dtype: torch.dtype, patched: bool = False) -> int:
    """Working memory beyond the stored bytes to run one layer: its dequantized weight in the compute dtype
    plus a float32 decode buffer, and, when LoRA patches are applied at use, a float32 copy of the weight and
    of its delta."""
    per_element = compute_dtype.itemsize + 4 + (8 if patched else 0)
    return int(largest_numel) * per_element
