"""Text-embedding files: T5 `prompt_embeds` (B, L, C) + CLIP `pooled_prompt_embeds` (B, P) in safetensors.

Encoding a prompt needs T5-XXL (~9.5 GB in bf16); saving the embeddings once lets low-VRAM setups and scripts
edit without ever loading it again. The ComfyUI conditioning save/load nodes use this same format.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from .errors import CheckpointError, KontextError
from .validation import check_guidance, check_text_embeddings
from .weights.safetensors_io import SafetensorsFile

PROMPT_KEY, POOLED_KEY = "prompt_embeds", "pooled_prompt_embeds"


def save_embeddings(path: str | os.PathLike, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                    guidance: float | None = None) -> None:
    meta = {"format": "kontext-conditioning/1"}
    if guidance is not None:
        meta["guidance"] = str(float(guidance))
    save_file({PROMPT_KEY: prompt_embeds.detach().cpu().contiguous(),
               POOLED_KEY: pooled_prompt_embeds.detach().cpu().contiguous()}, str(path), metadata=meta)


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(prompt_embeds, pooled_prompt_embeds, guidance or None); clear error if the file is something else."""
    f = SafetensorsFile(path)
    missing = [k for k in (PROMPT_KEY, POOLED_KEY) if k not in f.keys()]
    if missing:
        raise CheckpointError(f"{path}: not a conditioning file: missing {missing} (found {sorted(f.keys())[:5]}). "
                              "Save one with the conditioning save node or kontext_core.conditioning.save_embeddings.")
    t5, pooled = f.tensor(PROMPT_KEY).clone(), f.tensor(POOLED_KEY).clone()
    try:
        check_text_embeddings(t5, pooled, what="the saved prompt")
    except KontextError as e:
        raise CheckpointError(f"{path}: {e}. Save the conditioning again.") from None
    g = f.metadata.get("guidance")
    if g is None:
        return t5, pooled, None
    try:
        guidance = check_guidance(float(g))
    except (ValueError, KontextError):
        raise CheckpointError(f"{path}: metadata 'guidance' is {g!r}; expected a finite number such as 2.5. "
                              "Save the conditioning again (or remove that metadata entry).") from None
    return t5, pooled, guidance
