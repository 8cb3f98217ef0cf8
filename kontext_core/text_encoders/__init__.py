"""FLUX's real text encoders in the standalone engine: prompt -> T5-XXL (B, 512, 4096) + CLIP-L pooled (B, 768).

```python
from kontext_core.text_encoders import load_text_encoders
te = load_text_encoders(t5="t5xxl_fp8_e4m3fn_scaled.safetensors", clip_l="clip_l.safetensors",
                        tokenizers="/path/to/ComfyUI")      # or a diffusers FLUX folder for all three
prompt_embeds, pooled = te.encode(["make the car red"])
te.free()                                                    # before loading the DiT when memory is short
```
Weights: see `checkpoints` (which files) and `models` (transformers' classes, stored dtypes, per-layer upcast);
tokenizers: see `tokenizers`. transformers is needed only here (`pip install .[text]`).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .checkpoints import read_text_encoder
from .tokenizers import Tokenizers, load_tokenizers, tokenize

__all__ = ["TextEncoders", "load_text_encoders", "load_t5", "load_clip_l", "read_text_encoder", "T5_MAX_LENGTH"]

T5_MAX_LENGTH = 512  # FLUX's text length (diffusers' max_sequence_length default)


def default_compute_dtype(device) -> torch.dtype:
    """fp32 on CPU; bf16 on a GPU (T5 overflows in fp16)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_t5(path, *, device="cpu", dtype=None) -> nn.Module:
    from .models import build_t5

    return build_t5(read_text_encoder(path, "t5"), dtype or default_compute_dtype(device), device)


def load_clip_l(path, *, device="cpu", dtype=None) -> nn.Module:
    from .models import build_clip_l

    return build_clip_l(read_text_encoder(path, "clip_l"), dtype or default_compute_dtype(device), device)


@dataclass
class TextEncoders:
    t5: nn.Module | None
    clip: nn.Module | None
    tokenizers: Tokenizers
    device: torch.device

    @torch.no_grad()
    def encode(self, prompts: str | list[str], max_sequence_length: int = T5_MAX_LENGTH
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, max_sequence_length, 4096), pooled (B, 768)) as diffusers' FLUX pipelines compute
        them: both tokenizers pad to their maximum length, no attention masks, CLIP's pooled output."""
        if self.t5 is None or self.clip is None:
            raise InputError("these text encoders were freed (free()); load them again to encode another prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        if not 1 <= max_sequence_length <= T5_MAX_LENGTH:
            raise InputError(f"max_sequence_length is {max_sequence_length}; FLUX's T5 takes 1 to {T5_MAX_LENGTH} tokens")
        clip_len = self.clip.config.max_position_embeddings
        clip_ids = tokenize(self.tokenizers.clip, prompts, clip_len, "CLIP-L").to(self.device)
        t5_ids = tokenize(self.tokenizers.t5, prompts, max_sequence_length, "T5").to(self.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        embeds = self.t5(t5_ids, output_hidden_states=False)[0]
        return embeds, pooled

    def free(self) -> None:
        """Drop both models (their memory-mapped weights and any device copies)."""
        self.t5 = self.clip = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_text_encoders(t5: str | os.PathLike, clip_l: str | os.PathLike | None = None,
                       tokenizers: str | os.PathLike | None = None, *, device="cpu", dtype=None) -> TextEncoders:
    """T5-XXL + CLIP-L + their tokenizers. `t5` may be a diffusers FLUX folder holding all of them (then `clip_l`
    and `tokenizers` default to it); single files need `clip_l` and `tokenizers` (a diffusers folder or a ComfyUI
    install). Tokenizers are resolved first, so a missing one is reported before gigabytes are mapped."""
    if clip_l is None:
        if not os.path.isdir(t5):
            raise InputError(f"{t5}: a single T5 file needs the CLIP-L text encoder too (clip_l.safetensors); pass "
                             "--clip-l / clip_l=")
        clip_l = t5
    toks = load_tokenizers(tokenizers, near=(t5, clip_l))
    device = torch.device(device)
    return TextEncoders(load_t5(t5, device=device, dtype=dtype), load_clip_l(clip_l, device=device, dtype=dtype),
                        toks, device)

