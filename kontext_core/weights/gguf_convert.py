"""FLUX/Kontext safetensors transformer -> GGUF, streamed one tensor at a time.

The per-tensor type policy (`choose_qtype`, `TARGETS`) and the quantizer live in `kontext_core.quant.gguf_quantize`;
the GGUF writer in `gguf_file`. This module only joins them: read a tensor, pick its type, quantize, write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from ..errors import CheckpointError
from ..quant.gguf_quantize import choose_qtype, file_type_for, quantize, target_key
from .gguf_file import write_gguf
from .safetensors_io import SafetensorsFile

__all__ = ["convert_to_gguf"]

_SKIP_PREFIXES = ("vae.", "text_encoders.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def _select_keys(path: Path, keys) -> list[tuple[str, str]]:
    keys = list(keys)
    prefixed = [k for k in keys if k.startswith("model.diffusion_model.")]
    if prefixed:
        pairs = [(k, k[len("model.diffusion_model."):]) for k in prefixed]
    else:
        pairs = [(k, k) for k in keys if not k.startswith(_SKIP_PREFIXES)]
    names = [n for _, n in pairs]
    if not any(n.startswith(("double_blocks.", "single_blocks.")) for n in names) or "img_in.weight" not in names:
        hint = ""
        if any(".transformer_blocks." in n or n.startswith("transformer_blocks.") for n in names):
            hint = " It looks like a diffusers-layout transformer; convert it to BFL keys first."
        raise CheckpointError(
            f"{path}: no FLUX transformer found (expected BFL keys such as img_in.weight, double_blocks.N.*, "
            f"single_blocks.N.*, optionally under 'model.diffusion_model.').{hint}")
    return pairs


def convert_to_gguf(src_path, out_path, target: str, *, progress: Callable[[int, int, str], None] | None = None,
                    device=None) -> Path:
    """Convert a BFL-keyed FLUX/Kontext safetensors transformer to GGUF, one tensor in memory at a time.

    `target` is one of TARGETS (e.g. "Q4_K_M", "Q8_0"); `progress(i, n, name)` is called per tensor;
    `device` runs the quantizer arithmetic on e.g. "cuda". Returns the output path.
    """
    key = target_key(target)
    src_path = Path(src_path)
    sf = SafetensorsFile(src_path)
    pairs = _select_keys(src_path, sf.keys())
    for k, _ in pairs:
        if sf.infos[k].dtype not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(
                f"{src_path}: tensor '{k}' is stored as {sf.infos[k].dtype}; the GGUF converter needs a float "
                "(F32/F16/BF16) checkpoint. Convert from the original bf16 release, not an fp8 or already "
                "quantized file.")

    def producer(k: str, q: QT, shape):
        def make():
            t = sf.tensor(k)
            if q == QT.F32:
                return t.float().numpy()
            if q == QT.F16:
                return t.to(torch.float16).numpy()
            rows = int(np.prod(shape[:-1]))
            return quantize(t.reshape(rows, shape[-1]), q, device=device)
        return make

    plan = []
    for k, name in pairs:
        shape = sf.infos[k].shape
        q = choose_qtype(name, shape, key)
        plan.append((name, producer(k, q, shape), q, shape))
    metadata = {"general.file_type": file_type_for(key), "general.quantization_version": 2,
                "general.name": Path(src_path).stem}
    return write_gguf(out_path, plan, arch="flux", metadata=metadata, progress=progress)
