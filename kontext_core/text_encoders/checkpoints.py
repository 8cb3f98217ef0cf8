"""Reading T5-XXL and CLIP-L text-encoder weights from the files people have, as memory-mapped tensors.

Accepted, told apart by content (never by file name):
* ComfyUI's single files: `t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`,
  `t5xxl_fp8_e4m3fn_scaled.safetensors` (a `scaled_fp8` marker + per-layer `scale_weight`), `clip_l.safetensors`;
  keys in transformers' naming (`encoder.block.N.layer.0.SelfAttention.q.weight`, `text_model.encoder.layers.N...`),
  optionally under a bundle prefix such as `text_encoders.t5xxl.transformer.`;
* a diffusers FLUX folder (its `text_encoder_2/` for T5, `text_encoder/` for CLIP, sharded or not) or one of those
  component folders; their `config.json` gives the architecture;
* T5 encoder GGUF files as llama.cpp's converter writes them (`general.architecture` = `t5encoder` or `t5`;
  `token_embd`, `enc.blk.N.attn_q`, ..., `enc.output_norm`), read by the project's GGUF reader and renamed here to
  transformers' names. Quantized tensors stay `GGMLTensor`s (dequantized per layer at use).

Everything else gets a `CheckpointError` naming the file and what it holds instead (a FLUX transformer, an
autoencoder, the other text encoder, a GGUF of another architecture).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..weights.fp8 import validate_scaled_fp8
from ..weights.safetensors_io import load_state_dict

T5_GGUF_ARCHS = ("t5encoder", "t5")

# A key that only each model has (after any bundle prefix).
T5_MARK = "encoder.final_layer_norm.weight"
CLIP_MARK = "encoder.layers.0.self_attn.q_proj.weight"  # under `text_model.` in transformers' files

# Keys the files carry that the encoder-only model does not use.
_IGNORED = re.compile(r"^(scaled_fp8|spiece_model|logit_scale|text_projection\.weight|"
                      r"(text_model\.)?embeddings\.position_ids|decoder\..*|lm_head\..*)$")


@dataclass
class TextEncoderWeights:
    """One text encoder's tensors in transformers' naming (no bundle prefix, CLIP without `text_model.`)."""

    kind: str  # "t5" | "clip_l"
    source: str
    tensors: dict[str, Tensor]
    container: str  # "safetensors" | "gguf"
    config: dict = field(default_factory=dict)  # from a diffusers config.json, else empty (inferred from shapes)
    qtypes: dict[str, str] = field(default_factory=dict)  # GGUF storage type per tensor


# ================================================================================================ what a file holds

def describe_foreign(keys) -> str | None:
    """A short name for what a state dict holds when it is no text encoder we load (None if unknown)."""
    keys = list(keys)
    has = lambda *parts: any(any(p in k for p in parts) for k in keys)  # noqa: E731
    if has("double_blocks.", "single_blocks.", "transformer_blocks.", "img_in.weight", "x_embedder."):
        return ("a FLUX transformer (the DiT); pass it as the transformer (--transformer / the model loader), not "
                "as a text encoder")
    if has("decoder.up.", "encoder.down.", "decoder.up_blocks.", "encoder.down_blocks.", "post_quant_conv"):
        return "an autoencoder (VAE); pass it as the autoencoder (--ae / the VAE loader), not as a text encoder"
    if has("conditioner.embedders.", "model.diffusion_model.input_blocks"):
        return "a Stable Diffusion checkpoint"
    if has("transformer.resblocks."):
        return "an OpenCLIP-layout CLIP (e.g. CLIP-G or a full CLIP); FLUX needs CLIP-L in transformers' layout"
    if has("model.layers.0.self_attn.", "blk.0.attn_q"):
        return "an LLM text encoder (Llama/Qwen style), which FLUX does not use"
    return None


def _strip_prefix(sd: Mapping[str, Tensor], mark: str) -> dict[str, Tensor]:
    """Drop the bundle prefix found in front of `mark` (e.g. `text_encoders.t5xxl.transformer.`)."""
    hits = [k[: -len(mark)] for k in sd if k.endswith(mark)]
    if not hits:
        return dict(sd)
    prefix = min(hits, key=len)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _kind_of(sd: Mapping[str, Tensor]) -> str | None:
    if any(k.endswith(T5_MARK) for k in sd):
        return "t5"
    if any(k.endswith(CLIP_MARK) for k in sd):
        return "clip_l"
    return None


def _wrong_model(path, sd, want: str) -> CheckpointError:
    label = {"t5": "a T5-XXL text encoder (t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled) .safetensors, a T5 encoder "
                   "GGUF, or a diffusers text_encoder_2/ folder)",
             "clip_l": "a CLIP-L text encoder (clip_l.safetensors or a diffusers text_encoder/ folder)"}[want]
    found = _kind_of(sd)
    if found and found != want:
        what = {"t5": "the T5 text encoder", "clip_l": "the CLIP-L text encoder"}[found]
        opt = {"t5": "--t5", "clip_l": "--clip-l"}[found]
        return CheckpointError(f"{path}: this file holds {what}, but {label} is expected here; pass it as {opt} "
                               "(the two encoders may be swapped).")
    foreign = describe_foreign(sd)
    hint = f"it holds {foreign}" if foreign else f"its keys look like none of them (e.g. {sorted(sd)[:3]})"
    return CheckpointError(f"{path}: expected {label}, but {hint}.")


# ================================================================================================ safetensors

_DIFFUSERS_SUB = {"t5": "text_encoder_2", "clip_l": "text_encoder"}
_INDEX = "model.safetensors.index.json"


def _component_folder(path: Path, kind: str) -> Path:
    sub = path / _DIFFUSERS_SUB[kind]
    return sub if sub.is_dir() else path


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: cannot read the text encoder's config ({e}); download it again.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object; download it again.")
    return data


def read_text_encoder(path: str | os.PathLike, kind: str) -> TextEncoderWeights:
    """The weights of `kind` ("t5" or "clip_l") from a file, GGUF or diffusers folder; see the module docstring."""
    from ..weights.loader import is_gguf

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder (expected the {'T5-XXL' if kind == 't5' else 'CLIP-L'} "
                              "text encoder).")
    if is_gguf(p):
        if kind != "t5":
            raise CheckpointError(f"{p}: a GGUF file was given for CLIP-L; CLIP-L is loaded from safetensors "
                                  "(clip_l.safetensors, 246 MB). GGUF is supported for T5.")
        from .gguf_t5 import read_t5_gguf

        return read_t5_gguf(p)
    config: dict = {}
    if p.is_dir():
        p = _component_folder(p, kind)
        config = _read_config(p)
    sd = load_state_dict(p, prefer=(_INDEX, "model.safetensors"))
    mark = T5_MARK if kind == "t5" else CLIP_MARK
    if not any(k.endswith(mark) for k in sd):
        raise _wrong_model(p, sd, kind)
    sd = _strip_prefix(sd, mark)
    if kind == "clip_l":
        sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
    validate_scaled_fp8(sd, str(p))
    return TextEncoderWeights(kind, str(p), sd, "safetensors", config)


def usable_tensors(w: TextEncoderWeights) -> dict[str, Tensor]:
    """The tensors the encoder-only model takes (decoder halves, projections, markers dropped)."""
    return {k: v for k, v in w.tensors.items() if not _IGNORED.match(k)}


# ================================================================================================ planning

# GGUF types the planner does not list, counted as the planner type of about the same bits per weight.
_PLANNER_QTYPE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K": "Q5_K", "Q5_0": "Q5_K", "Q5_1": "Q5_K", "Q4_K": "Q4_K",
                  "Q4_0": "Q4_K", "Q4_1": "Q4_K", "IQ4_NL": "Q4_K", "IQ4_XS": "Q4_K", "Q3_K": "Q3_K", "Q2_K": "Q3_K",
                  "F16": "fp16", "BF16": "fp16", "F32": "fp16"}


def t5_planner_storage(path: str | os.PathLike) -> str:
    """The planner's name for how a T5 file stores its matrices ("fp16", "fp8", "Q8_0", ... "Q3_K"), read from the
    file (headers and tensor types only): the storage of most of its Linear weights."""
    from collections import Counter

    w = read_text_encoder(path, "t5")
    counts: Counter = Counter()
    for k, t in w.tensors.items():
        if not k.endswith(".weight") or k == "shared.weight":
            continue
        if w.qtypes:
            counts[_PLANNER_QTYPE.get(w.qtypes[k], "Q8_0")] += 1
        elif t.ndim == 2:
            counts["fp8" if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else "fp16"] += 1
    return counts.most_common(1)[0][0] if counts else "fp16"
