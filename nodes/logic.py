"""Everything the nodes check or convert, without ComfyUI: option lists, conditioning and latent handling,
output sizes, image buckets, model-file listing and weight dtypes.

The V3 node classes are thin wrappers that call these functions, so every user-facing error is raised (and
unit-tested) here. Errors say what was expected, what was found and what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from kontext_core import images as im
from kontext_core import validation as val
from kontext_core.errors import InputError
from kontext_core.model.flux import FluxParams
from kontext_core.model.ops import FP8_DTYPES
from kontext_core.sampling import SOLVERS
from kontext_core.tokens import REFERENCE_LAYOUTS
from kontext_core.weights import fp8
from kontext_core.weights.loader import Checkpoint, read_transformer, resolve_params, validate_checkpoint

NODE_PREFIX = "KontextNative"
LATENT_CHANNELS = val.LATENT_CHANNELS

# ---------------------------------------------------------------------------------------------------- options

LAYOUTS: tuple[str, ...] = tuple(REFERENCE_LAYOUTS)  # offset (trained), index, uxo
BUCKET_MODES: tuple[str, ...] = tuple(im.RESIZE_MODES)  # stretch (reference), crop, pad, keep
SOLVER_NAMES: tuple[str, ...] = tuple(SOLVERS)
# The engine's own schedules; ComfyUI's schedulers are appended by the sampler node.
ENGINE_SCHEDULES: tuple[str, ...] = ("kontext", "kontext_unshifted")
DEFAULT_SCHEDULE = "kontext"

# "default" keeps the stored dtypes; the rest are the engine's conversions.
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {"default": None, **fp8.WEIGHT_DTYPES}


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise InputError(f"unknown {what} '{value}'; choose one of: {', '.join(map(str, choices))}")
    return value


def normalize_layout(layout: str | None) -> str:
    """Reference layout name; accepts ComfyUI's 'uxo/uno' spelling. None means the default (offset)."""
    if layout is None:
        return "offset"
    name = str(layout).strip().lower()
    if name in ("uxo/uno", "uno", "uso"):
        name = "uxo"
    if name not in LAYOUTS:
        raise InputError(f"unknown reference layout '{layout}'; choose one of: {', '.join(LAYOUTS)} "
                         "(offset is what Kontext was trained with)")
    return name


def check_bucket_mode(mode: str) -> str:
    return check_choice(mode, BUCKET_MODES, "bucket mode")


# ---------------------------------------------------------------------------------------------------- latents

def check_latent(latent, what: str = "latent") -> Tensor:
    """A FLUX latent (B, 16, h, w) in raw autoencoder space (what ComfyUI's VAEEncode produces); a ComfyUI
    LATENT dict is unwrapped here, the tensor is checked by the engine."""
    if isinstance(latent, dict):
        if "samples" not in latent:
            raise InputError(f"{what} is a dict without 'samples'; expected a ComfyUI LATENT")
        latent = latent["samples"]
    return val.check_latent(latent, what)


def output_latent_size(references: Sequence[Tensor], latent: Tensor | None = None, width: int = 0,
                       height: int = 0, batch_size: int = 1) -> tuple[int, int, int]:
    """(batch, latent height, latent width) of the sampler's output.

    An input latent decides (and must agree with width/height when those are set); else width x height in
    pixels; else the first reference's size (so the edit comes out at the input's size).
    """
    width, height = val.check_int(width, "width"), val.check_int(height, "height")
    batch_size = val.check_batch_size(batch_size, "batch_size")
    if width < 0 or height < 0:
        raise InputError(f"width and height must be >= 0 (0 = automatic), got {width}x{height}")
    if (width == 0) != (height == 0):
        raise InputError(f"set both width and height, or leave both at 0 for the first reference's size "
                         f"(got {width}x{height})")
    if width % 8 or height % 8:
        raise InputError(f"width and height must be multiples of 8 (16 is best), got {width}x{height}")
    if width:
        val.check_size(width, height, "width x height", hint=" (0 = the first reference's size)")
    if latent is not None:
        lat = check_latent(latent, "input latent")
        b, _, h, w = lat.shape
        if width and (w * 8, h * 8) != (width, height):
            raise InputError(f"mismatched sizes: the input latent is {w * 8}x{h * 8} pixels but width x height is "
                             f"{width}x{height}; set width and height to 0 to use the latent's size")
        val.check_batch_size(b, "input latent batch")
        val.check_latent_size(h, w, "input latent")
        return b, h, w
    if width:
        return batch_size, height // 8, width // 8
    if references:
        ref = check_latent(references[0], "first reference")
        return (batch_size, *val.check_latent_size(ref.shape[-2], ref.shape[-1], "first reference"))
    raise InputError("no output size: add a reference image (Kontext Reference node), connect a latent, or set "
                     "width and height")


# ---------------------------------------------------------------------------------------------- conditioning

def check_conditioning(cond, what: str = "conditioning") -> list:
    """A ComfyUI CONDITIONING: a non-empty list of [embeddings (B, L, C), options dict]."""
    if not isinstance(cond, (list, tuple)) or len(cond) == 0:
        raise InputError(f"{what} is empty; connect the output of a text encoder (CLIPTextEncode) or of "
                         "Load Conditioning")
    for i, entry in enumerate(cond):
        ok = (isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[0], Tensor)
              and isinstance(entry[1], dict))
        if not ok:
            raise InputError(f"{what} entry {i} is not a ComfyUI conditioning entry [tensor, dict]")
        if entry[0].ndim != 3:
            raise InputError(f"{what} entry {i} has embeddings of shape {tuple(entry[0].shape)}; expected (B, L, C)")
    return list(cond)


def add_references(cond, latents: Sequence, layout: str = "offset") -> list:
    """Append context latents to every entry of a conditioning, the way core ReferenceLatent stores them.

    Latents stay in raw autoencoder space under 'reference_latents' (a list); the model applies its latent
    format when sampling. The layout is stored under 'reference_latents_method' and applies to all references.
    """
    cond = check_conditioning(cond)
    layout = normalize_layout(layout)
    if not latents:
        raise InputError("no reference to add: connect an image (together with a VAE) or a latent")
    lats = [check_latent(x, f"reference {i + 1}") for i, x in enumerate(latents)]
    out = []
    for entry in cond:
        opts = dict(entry[1])
        opts["reference_latents"] = list(opts.get("reference_latents") or []) + lats
        opts["reference_latents_method"] = layout
        out.append([entry[0], opts] + list(entry[2:]))
    return out


@dataclass
class PromptParts:
    context: Tensor  # T5 embeddings (B, L, C)
    pooled: Tensor  # CLIP pooled (B, P)
    references: list  # raw AE-space latents
    layout: str
    guidance: float | None


def prompt_parts(cond, what: str = "positive") -> PromptParts:
    """Split a one-entry conditioning into what the engine's sampler needs."""
    cond = check_conditioning(cond, what)
    if len(cond) > 1:
        raise InputError(f"{what} conditioning has {len(cond)} entries (Conditioning Combine, areas or timestep "
                         "ranges); the Kontext sampler takes a single prompt. Use one text encoder output, or "
                         "KSampler for combined conditioning.")
    emb, opts = cond[0][0], cond[0][1]
    if opts.get("control") is not None:
        raise InputError(f"{what} conditioning carries a ControlNet (Apply ControlNet); the Kontext sampler does not "
                         "run ControlNets. Sample this MODEL with core KSampler / SamplerCustom, which apply it, or "
                         "remove the ControlNet.")
    pooled = opts.get("pooled_output")
    if pooled is None:
        raise InputError(f"{what} conditioning has no pooled CLIP output; encode the prompt with CLIPTextEncode "
                         "using a DualCLIPLoader (t5xxl + clip_l, type flux), or load a saved conditioning")
    if pooled.ndim == 1:
        pooled = pooled.unsqueeze(0)
    refs = [check_latent(r, f"{what} reference {i + 1}") for i, r in enumerate(opts.get("reference_latents") or [])]
    g = opts.get("guidance")
    return PromptParts(emb, pooled, refs, normalize_layout(opts.get("reference_latents_method")),
                       None if g is None else float(g))


def check_text_dims(parts: PromptParts, context_dim: int, pooled_dim: int, what: str = "positive") -> None:
    val.check_text_embeddings(parts.context, parts.pooled, context_dim, pooled_dim, f"{what} conditioning")


def check_batches(parts: PromptParts, batch: int, what: str = "positive") -> None:
    val.check_batch(parts.context.shape[0], batch, f"{what} conditioning")
    for i, r in enumerate(parts.references):
        val.check_batch(r.shape[0], batch, f"{what} reference {i + 1}")


def check_sampler_options(steps: int, denoise: float, true_cfg: float, has_negative: bool, solver: str,
                          schedule: str, schedules: Sequence[str], guidance: float = 2.5, seed: int = 0) -> None:
    val.schedule_length(steps, denoise)  # steps, denoise and the full schedule a partial denoise implies
    val.check_true_cfg(true_cfg)
    val.check_guidance(guidance)
    val.check_seed(seed)
    if float(true_cfg) != 1.0 and not has_negative:
        raise InputError(f"true_cfg={true_cfg} needs a negative conditioning; connect one or set true_cfg to 1")
    check_choice(solver, SOLVER_NAMES, "solver")
    check_choice(schedule, schedules, "scheduler")


def describe_model(model) -> str:
    return type(model).__name__ if model is not None else "nothing"


def check_sampler_model(is_flux: bool, latent_channels: int | None, what: str) -> None:
    """The sampler drives FLUX-family models only (ours, or core's Flux class)."""
    if not is_flux or latent_channels != LATENT_CHANNELS:
        raise InputError(f"this MODEL is {what}; the Kontext sampler needs a FLUX.1 Kontext model. Load "
                         "flux1-kontext-dev with 'Load Kontext Model (native)' (or core's Load Diffusion Model).")


def conditioning_to_embeddings(cond) -> tuple[Tensor, Tensor, float | None, list[str]]:
    """(T5 embeddings, pooled, guidance or None, names of options not saved) for the conditioning cache."""
    parts = prompt_parts(cond, "conditioning")
    dropped = sorted(k for k in cond[0][1] if k not in ("pooled_output", "guidance"))
    return parts.context, parts.pooled, parts.guidance, dropped


def embeddings_to_conditioning(context: Tensor, pooled: Tensor, guidance: float | None = None) -> list:
    val.check_text_embeddings(context, pooled, what="conditioning")
    opts = {"pooled_output": pooled}
    if guidance is not None:
        opts["guidance"] = float(guidance)
    return [[context, opts]]


CONDITIONING_EXTENSIONS = (".safetensors",)


def conditioning_choices(files: Iterable[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(CONDITIONING_EXTENSIONS))


def safe_prefix(prefix: str) -> str:
    """A relative save path from a filename prefix; refuses absolute paths and '..'."""
    p = str(prefix).strip().replace("\\", "/")
    if not p:
        raise InputError("filename_prefix is empty")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p) or any(x == ".." for x in parts):
        raise InputError(f"filename_prefix '{prefix}' must be a relative name inside the output folder "
                         "(no absolute paths, no '..')")
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------------- images

def bucket_images(images: Tensor, mode: str = "stretch", mask: Tensor | None = None,
                  background: float = 1.0) -> tuple[Tensor, int, int]:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (images at the Kontext size, width, height).

    stretch: nearest of the 17 Kontext resolutions, aspect not kept (BFL's reference behaviour); crop: cover
    then centre-crop; pad: contain then pad; keep: the input size snapped down to multiples of 16. Alpha (a 4th
    channel, or LoadImage's MASK where 1 = transparent) is composited on `background` before resizing.
    """
    mode = check_bucket_mode(mode)
    if not isinstance(images, Tensor):
        raise InputError(f"image must be a tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(f"image has shape {tuple(images.shape)}; expected a ComfyUI IMAGE (B, H, W, 3)")
    b, h, w, c = images.shape
    if b == 0 or h == 0 or w == 0:
        raise InputError(f"image is empty: shape {tuple(images.shape)}")
    x = images.float()
    rgb = x[..., :3] if c >= 3 else x.expand(b, h, w, 3)
    alpha = x[..., 3:4] if c == 4 else None
    if mask is not None:
        m = mask.float()
        if m.ndim == 2:
            m = m.unsqueeze(0)
        if m.ndim != 3:
            raise InputError(f"mask has shape {tuple(mask.shape)}; expected (B, H, W)")
        if tuple(m.shape[-2:]) != (h, w):
            # LoadImage returns a 64x64 zero mask for images without alpha: nothing to composite.
            if not bool(m.any()):
                m = None
            else:
                raise InputError(f"mismatched sizes: mask is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}")
        if m is not None:
            if m.shape[0] not in (1, b):
                raise InputError(f"mismatched sizes: mask batch {m.shape[0]} vs image batch {b}")
            opaque = (1.0 - m).clamp(0, 1).unsqueeze(-1)
            alpha = opaque if alpha is None else alpha * opaque
    if alpha is not None:
        rgb = rgb * alpha + background * (1.0 - alpha)
    rgb = rgb.clamp(0, 1)
    tw, th = im.target_size(w, h, mode)
    if (tw, th) == (w, h):
        return rgb.contiguous(), w, h
    out = []
    for i in range(b):
        fitted = im.fit(im.to_pil(rgb[i]), (tw, th), mode)
        out.append(torch.from_numpy(np.asarray(fitted.convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(out).to(images.device), tw, th


# ------------------------------------------------------------------------------------------------ model files

WEIGHT_FILE_EXTENSIONS = (".safetensors", ".sft")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def _is_diffusers_transformer_dir(d: Path) -> bool:
    return (d / "config.json").is_file() and (any((d / n).is_file() for n in _DIFFUSERS_WEIGHTS)
                                              or any(d.glob("diffusion_pytorch_model-*.safetensors")))


def is_diffusers_folder(d: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (with transformer/) or a bare transformer folder."""
    d = Path(d)
    return d.is_dir() and (_is_diffusers_transformer_dir(d / "transformer") or _is_diffusers_transformer_dir(d))


def find_diffusers_folders(roots: Iterable[str], max_depth: int = 2) -> list[str]:
    """Relative names ('name/') of diffusers folders under the given roots, searched `max_depth` levels deep."""
    found: set[str] = set()
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        stack = [(base, 0)]
        while stack:
            d, depth = stack.pop()
            if depth > max_depth:
                continue
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                if is_diffusers_folder(child):
                    found.add(child.relative_to(base).as_posix() + "/")
                else:
                    stack.append((child, depth + 1))
    return sorted(found)


def model_choices(files: Iterable[str], folders: Iterable[str] = ()) -> list[str]:
    """The loader's list: diffusers folders plus safetensors files that are not inside one of them.

    Pickle formats (.ckpt/.pt/.bin) are never offered: they can run code when loaded.
    """
    folders = sorted(set(folders))
    inside = tuple(f.rstrip("/") + "/" for f in folders)
    keep = []
    for f in files:
        g = f.replace("\\", "/")
        if g.lower().endswith(WEIGHT_FILE_EXTENSIONS) and not g.startswith(inside):
            keep.append(f)
    return folders + sorted(keep)


def resolve_folder_choice(name: str, roots: Iterable[str]) -> str | None:
    """Full path of a 'name/' folder choice under one of the roots, refusing anything that escapes them."""
    rel = name.rstrip("/\\")
    for root in roots:
        base = os.path.realpath(root)
        cand = os.path.realpath(os.path.join(root, rel))
        if (cand == base or cand.startswith(base + os.sep)) and os.path.isdir(cand):
            return os.path.join(root, rel)
    return None


@dataclass
class PreparedCheckpoint:
    """A transformer checkpoint read, recognised and checked, ready to be put into a host's model."""

    source: str
    layout: str
    tensors: dict  # BFL keys, without the scaled-fp8 marker
    params: FluxParams
    scaled_fp8: torch.dtype | None  # the marker's dtype for scaled-fp8 files
    stored_dtype: torch.dtype | None


def prepare_checkpoint(source, params_override: dict | None = None,
                       checkpoint: Checkpoint | None = None) -> PreparedCheckpoint:
    """Read any file/folder the engine reads (wrong model types fail here with the engine's message), infer the
    architecture (a diffusers folder's config.json supplies the RoPE split) and check every shape."""
    ckpt = checkpoint if checkpoint is not None else read_transformer(source)
    params = resolve_params(ckpt, params_override)
    validate_checkpoint(ckpt, params)
    tensors = dict(ckpt.tensors)
    marker = tensors.pop("scaled_fp8", None)
    return PreparedCheckpoint(ckpt.source, ckpt.layout, tensors, params,
                              None if marker is None else marker.dtype, stored_weight_dtype(tensors))


def weight_dtype_option(name: str) -> torch.dtype | None:
    check_choice(name, tuple(WEIGHT_DTYPES), "weight dtype")
    return WEIGHT_DTYPES[name]


def stored_weight_dtype(tensors: dict) -> torch.dtype | None:
    """The dtype most of the checkpoint's (>= 2-D, floating point) weights are stored in."""
    count: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if isinstance(t, Tensor) and t.ndim >= 2 and t.is_floating_point() and type(t) is torch.Tensor:
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


def choose_weight_dtype(option: str, stored: torch.dtype | None, host_default: Callable[[], torch.dtype]) -> torch.dtype:
    """Storage dtype of the weight layers: the option if given; fp8 files stay fp8 (upcast per layer at use);
    otherwise the host's choice for the device (ComfyUI: bf16/fp16 on GPUs, fp32 on CPU)."""
    want = weight_dtype_option(option)
    if want is not None:
        return want
    if stored in FP8_DTYPES:
        return stored
    return host_default()


def tensor_storage_dtype(key: str, t: Tensor, weight_dtype: torch.dtype, compute_dtype: torch.dtype | None,
                         scaled_fp8: bool = False) -> torch.dtype | None:
    """The dtype one checkpoint tensor is kept in (None: keep as stored)."""
    if not t.is_floating_point() or type(t) is not torch.Tensor:
        return None  # integer markers and quantized (GGUF) tensors are never converted here
    if key.endswith(("scale_weight", "scale_input")):
        return torch.float32
    if scaled_fp8 and t.dtype in FP8_DTYPES:
        return None  # scaled-fp8 weights are only meaningful together with their scale
    if weight_dtype in FP8_DTYPES and t.ndim < 2:
        return compute_dtype or torch.float32  # biases and norm scales are tiny: keep them precise
    return weight_dtype
