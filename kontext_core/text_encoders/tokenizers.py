"""The CLIP and T5 tokenizers: from a diffusers FLUX folder or from a ComfyUI install the user points at.

A diffusers folder has `tokenizer/` (CLIP) and `tokenizer_2/` (T5); ComfyUI ships the same vocabularies as
`comfy/sd1_tokenizer/` and `comfy/text_encoders/t5_tokenizer/`. Tokenization follows diffusers' FLUX pipelines:
pad to the maximum length (77 for CLIP, 512 for T5), truncate longer prompts with a warning naming what was cut.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

log = logging.getLogger("kontext_core")

DIFFUSERS_DIRS = ("tokenizer", "tokenizer_2")
COMFY_DIRS = (Path("comfy") / "sd1_tokenizer", Path("comfy") / "text_encoders" / "t5_tokenizer")

WHERE_TO_GET = ("Point --tokenizers (tokenizers=) at a diffusers FLUX.1 Kontext folder holding tokenizer/ and "
                "tokenizer_2/ (huggingface.co/black-forest-labs/FLUX.1-Kontext-dev, only those two folders are "
                "needed) or at your ComfyUI folder, which ships them as comfy/sd1_tokenizer and "
                "comfy/text_encoders/t5_tokenizer.")


@dataclass
class Tokenizers:
    clip: object  # transformers CLIPTokenizer
    t5: object  # transformers T5TokenizerFast
    source: str


def _pair(root: Path) -> tuple[Path, Path] | None:
    """(CLIP dir, T5 dir) under `root` if it is a diffusers folder, a ComfyUI install or its `comfy/` folder."""
    for clip, t5 in ((root / DIFFUSERS_DIRS[0], root / DIFFUSERS_DIRS[1]),
                     (root / COMFY_DIRS[0], root / COMFY_DIRS[1]),
                     (root / COMFY_DIRS[0].name, root / "text_encoders" / COMFY_DIRS[1].name)):
        if clip.is_dir() and t5.is_dir():
            return clip, t5
    return None


def find_tokenizers(source: str | os.PathLike | None, near: tuple = ()) -> tuple[Path, Path]:
    """The two tokenizer folders from `source`, else from a diffusers folder the weights came from (`near`)."""
    if source is not None:
        root = Path(source)
        if not root.is_dir():
            raise CheckpointError(f"{root}: tokenizers folder not found. {WHERE_TO_GET}")
        found = _pair(root)
        if found is None:
            raise CheckpointError(f"{root}: holds neither tokenizer/ + tokenizer_2/ (diffusers) nor "
                                  f"comfy/sd1_tokenizer + comfy/text_encoders/t5_tokenizer (ComfyUI). {WHERE_TO_GET}")
        return found
    for p in near:
        if p is None:
            continue
        p = Path(p)
        for root in (p, p.parent, p.parent.parent):
            if root.is_dir() and (found := _pair(root)) is not None and found[0].parent == root \
                    and (root / DIFFUSERS_DIRS[0]).is_dir():
                return found
    raise CheckpointError(f"no tokenizers given: single-file text encoders (t5xxl_*.safetensors, clip_l.safetensors, "
                          f"GGUF) do not contain them. {WHERE_TO_GET}")


def load_tokenizers(source: str | os.PathLike | None = None, near: tuple = ()) -> Tokenizers:
    from .models import require_transformers

    require_transformers()
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_dir, t5_dir = find_tokenizers(source, near)
    try:
        clip = CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
        t5 = T5TokenizerFast.from_pretrained(str(t5_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{clip_dir.parent}: cannot read the tokenizers ({type(e).__name__}: {e}). "
                              f"{WHERE_TO_GET}") from None
    return Tokenizers(clip, t5, str(clip_dir.parent))


def tokenize(tokenizer, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
    """(B, max_length) token ids, padded to max_length; longer prompts are cut (their end token kept) with a
    warning naming the words lost, as diffusers' FLUX pipelines do."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
    for prompt in prompts:
        full = tokenizer(prompt).input_ids
        if len(full) > max_length:
            lost = tokenizer.decode(full[max_length - 1: -1]).strip()
            log.warning("The prompt is longer than %s accepts (%d tokens, this one has %d); this part was cut off: "
                        "%r", what, max_length, len(full), lost)
    return ids
