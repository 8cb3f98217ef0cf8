"""What the text-encoder GGUF loader decides without ComfyUI: reading and checking both files through the engine,
the state dicts in the key layout ComfyUI's FLUX text encoders load, and their architecture read from the shapes.

ComfyUI's T5 and CLIP classes use transformers' key names, so the engine's reading (`read_text_encoder`: GGUF T5
renamed from llama.cpp's names, prefixes stripped, bad files refused) is what they load. ComfyUI builds T5 from a
fixed T5-XXL config and CLIP-L from a fixed CLIP-L config; the dimensions read from the files are passed as
overrides (`<name>_model_config` model options), identical to those configs for the real files.
"""

from __future__ import annotations

import os
from typing import Iterable

from kontext_core.errors import CheckpointError
from kontext_core.text_encoders.checkpoints import TextEncoderWeights, read_text_encoder, usable_tensors

GGUF_EXTENSIONS = (".gguf",)
CLIP_EXTENSIONS = (".safetensors", ".sft")


def gguf_text_choices(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(GGUF_EXTENSIONS))


def clip_choices(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(CLIP_EXTENSIONS))


def read_pair(t5_path: str | os.PathLike, clip_path: str | os.PathLike) -> tuple[TextEncoderWeights, TextEncoderWeights]:
    """(T5 from a T5 encoder GGUF, CLIP-L from safetensors), each checked by the engine."""
    from kontext_core.weights.loader import is_gguf

    if not is_gguf(t5_path):
        raise CheckpointError(f"{t5_path}: not a GGUF file; this loader takes a T5 encoder GGUF (e.g. "
                              "t5-v1_1-xxl-encoder-Q8_0.gguf). For t5xxl_*.safetensors use core DualCLIPLoader "
                              "(type flux).")
    return read_text_encoder(t5_path, "t5"), read_text_encoder(clip_path, "clip_l")


def comfy_state_dicts(t5: TextEncoderWeights, clip: TextEncoderWeights) -> list[dict]:
    """[CLIP-L, T5] state dicts in ComfyUI's key layout (CLIP under `text_model.`, its projection kept)."""
    clip_sd = {"text_model." + k: v for k, v in usable_tensors(clip).items()}
    if "text_projection.weight" in clip.tensors:
        clip_sd["text_projection.weight"] = clip.tensors["text_projection.weight"]
    return [clip_sd, usable_tensors(t5)]


def comfy_model_configs(t5: TextEncoderWeights, clip: TextEncoderWeights) -> dict:
    """`t5xxl_model_config` / `clip_l_model_config` overrides: the dimensions the files' shapes give."""
    from kontext_core.text_encoders.models import clip_config, t5_config

    tc, cc = t5_config(t5), clip_config(clip)
    return {
        "t5xxl_model_config": {"d_model": tc.d_model, "d_ff": tc.d_ff, "d_kv": tc.d_kv, "num_heads": tc.num_heads,
                               "num_layers": tc.num_layers, "vocab_size": tc.vocab_size,
                               "relative_attention_num_buckets": tc.relative_attention_num_buckets,
                               "is_gated_act": tc.is_gated_act},
        "clip_l_model_config": {"hidden_size": cc.hidden_size, "intermediate_size": cc.intermediate_size,
                                "num_attention_heads": cc.num_attention_heads,
                                "num_hidden_layers": cc.num_hidden_layers,
                                "max_position_embeddings": cc.max_position_embeddings, "vocab_size": cc.vocab_size},
    }
