"""Argument checks for the engine's public API, in one place: the pipeline, the CLI and the ComfyUI nodes all
call these, so one bad input gives one message wherever it comes from.

Checks run against the loaded model's parameters (text widths, latent channels), never against FLUX.1-dev's
numbers, so smaller models of the same family pass. Sizes, batches and step counts have limits that keep memory
bounded on any input; each limit can be raised with an environment variable named in its message.
Non-finite results are caught cheaply (after the first step and at the end) and reported with their likely cause.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor

from .errors import InputError, NumericalError

LATENT_CHANNELS = 16  # FLUX.1 autoencoder latents; the DiT sees them as 2x2 patches (64 inputs)
MIN_SIDE = 16  # one latent patch
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts without wrapping

# name -> (environment variable, default). Defaults allow 16x the area Kontext was trained at (~1 MP).
LIMITS = {
    "pixels": ("KONTEXT_MAX_PIXELS", 4096 * 4096),
    "batch": ("KONTEXT_MAX_BATCH", 64),
    "steps": ("KONTEXT_MAX_STEPS", 10_000),
    "schedule": ("KONTEXT_MAX_SCHEDULE_STEPS", 1_000_000),  # full schedule length a partial denoise implies
}


def limit(name: str) -> int:
    env, default = LIMITS[name]
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"environment variable {env}={raw!r} must be a positive integer") from None
    if value < 1:
        raise InputError(f"environment variable {env}={raw!r} must be a positive integer")
    return value


def _raise_hint(name: str) -> str:
    return f"(raise the limit with the environment variable {LIMITS[name][0]})"


# ------------------------------------------------------------------------------------------------- scalars

def check_int(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (int, integral numpy/torch scalar, or integral float) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{lo} .. {hi}" if hi is not None else f">= {lo}"
        raise InputError(f"{name} must be {rng}, got {value}")
    return value


def check_float(value, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] ((lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        rng = f"in {left}{lo}, {hi}]" if hi is not None else (f"> {lo}" if lo_open else f">= {lo}")
        raise InputError(f"{name} must be {rng}, got {value}")
    return value


def check_seed(seed) -> int:
    return check_int(seed, "seed", *SEED_RANGE)


def check_steps(steps) -> int:
    steps = check_int(steps, "steps", 1)
    if steps > limit("steps"):
        raise InputError(f"steps={steps} is above the limit of {limit('steps')} {_raise_hint('steps')}; "
                         "FLUX.1 Kontext needs 20-50")
    return steps


def check_denoise(denoise) -> float:
    return check_float(denoise, "denoise", 0.0, 1.0, lo_open=True)


def check_guidance(guidance) -> float:
    return check_float(guidance, "guidance")


def check_true_cfg(true_cfg) -> float:
    return check_float(true_cfg, "true_cfg", 0.0)


def schedule_length(steps: int, denoise: float) -> int:
    """Steps of the full schedule whose last `steps` intervals a partial denoise runs (img2img convention)."""
    steps, denoise = check_steps(steps), check_denoise(denoise)
    total = max(steps, int(round(steps / denoise)))
    if total > limit("schedule"):
        raise InputError(f"denoise={denoise} with {steps} steps implies a {total}-step schedule, above the limit "
                         f"of {limit('schedule')} {_raise_hint('schedule')}; use denoise >= "
                         f"{steps / limit('schedule'):.2g} (a denoise this small leaves the input unchanged)")
    return total


# ------------------------------------------------------------------------------------------------- sizes

def check_size(width, height, what: str = "size", hint: str = "") -> tuple[int, int]:
    """An output/working size in pixels: integers >= 16 each, at most the pixel limit in area."""
    w, h = check_int(width, f"{what} width"), check_int(height, f"{what} height")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(f"{what} {w}x{h} is too small: width and height must be >= {MIN_SIDE} pixels"
                         f"{hint or ' (leave the size unset to use the first reference image)'}")
    if w * h > limit("pixels"):
        raise InputError(f"{what} {w}x{h} ({w * h / 1e6:.1f} MP) is above the limit of {limit('pixels') / 1e6:.1f} "
                         f"MP {_raise_hint('pixels')}; FLUX.1 Kontext works best near 1 MP"
                         f"{hint or '; choose a smaller size'}")
    return w, h


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """'WxH' (e.g. '1024x768') -> (width, height); the range is check_size's business."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise InputError(f"{what} must look like 1024x1024 (width x height), got {text!r}") from None
    return w, h


def check_batch_size(batch, what: str = "batch size") -> int:
    b = check_int(batch, what, 1)
    if b > limit("batch"):
        raise InputError(f"{what} {b} is above the limit of {limit('batch')} {_raise_hint('batch')}")
    return b


def check_latent_size(h: int, w: int, what: str = "output") -> tuple[int, int]:
    """Latent height/width (pixels / 8) within the same pixel limit as check_size."""
    h, w = check_int(h, f"{what} latent height", 1), check_int(w, f"{what} latent width", 1)
    check_size(w * 8, h * 8, what, hint=" (a latent of at least 2x2)")
    return h, w


# ------------------------------------------------------------------------------------------------- tensors

def check_latent(x, what: str = "latent", channels: int = LATENT_CHANNELS) -> Tensor:
    """A FLUX latent (B, 16, h, w) with finite values."""
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise InputError(f"{what} has shape {tuple(x.shape)}; expected an image latent (B, {channels}, H/8, W/8)")
    if x.shape[1] != channels:
        raise InputError(f"{what} has {x.shape[1]} channels; FLUX.1 Kontext latents have {channels}. Encode images "
                         "with the FLUX autoencoder (ae.safetensors), not an SD1.x/SDXL VAE (4 channels).")
    if min(x.shape) < 1:
        raise InputError(f"{what} is empty: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{what} has dtype {x.dtype}; latents are floating point")
    check_finite_input(x, what, "the VAE that encoded it produced NaN/Inf (corrupt VAE weights, or an fp16 VAE: "
                                "run the VAE in bf16 or fp32)")
    return x


def check_finite_input(x: Tensor, what: str, cause: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{what} contains NaN or Inf values; {cause}")


def check_text_embeddings(prompt: Tensor, pooled: Tensor, context_dim: int | None = None,
                          pooled_dim: int | None = None, what: str = "prompt") -> None:
    """T5 embeddings (B, L, context_dim) with L >= 1 and CLIP pooled (B, pooled_dim), finite, same B."""
    enc = " Encode the prompt with the model's text encoders (for FLUX.1: T5-XXL + CLIP-L; in ComfyUI a " \
          "DualCLIPLoader of type flux)."
    for t, name in ((prompt, "text embeddings"), (pooled, "pooled output")):
        if not isinstance(t, Tensor):
            raise InputError(f"{what} {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"{what} {name} have dtype {t.dtype}; expected floating point embeddings")
    if prompt.ndim != 3 or pooled.ndim != 2:
        raise InputError(f"{what}: text embeddings must be (B, L, C) and the pooled output (B, P); got "
                         f"{tuple(prompt.shape)} and {tuple(pooled.shape)}")
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise InputError(f"{what} has empty text embeddings {tuple(prompt.shape)}; a prompt needs at least one "
                         "token (an empty prompt still encodes to padding tokens)." + enc)
    if context_dim is not None and prompt.shape[-1] != context_dim:
        raise InputError(f"{what} has text embeddings of width {prompt.shape[-1]}, but the model expects "
                         f"{context_dim} (its context_in_dim; T5-XXL's 4096 for FLUX.1).{enc}")
    if pooled_dim is not None and pooled.shape[-1] != pooled_dim:
        raise InputError(f"{what} has a pooled output of width {pooled.shape[-1]}, but the model expects "
                         f"{pooled_dim} (its vec_in_dim; CLIP-L's 768 for FLUX.1).{enc}")
    if pooled.shape[0] != prompt.shape[0]:
        raise InputError(f"mismatched sizes: {what} text embeddings have batch {prompt.shape[0]} but the pooled "
                         f"output has batch {pooled.shape[0]}; they must come from the same prompts")
    for t, name in ((prompt, "text embeddings"), (pooled, "pooled output")):
        check_finite_input(t, f"{what} {name}", "the text encoder produced NaN/Inf (corrupt weights or fp16 "
                                                "overflow: run it in bf16 or fp32)")


def check_batch(n: int, batch: int, what: str) -> None:
    """Per-sample inputs are either shared (batch 1) or one per output."""
    if n not in (1, batch):
        raise InputError(f"mismatched sizes: {what} has batch {n} but {batch} images are sampled; give one, or "
                         f"one per image")


def model_text_dims(transformer) -> tuple[int | None, int | None]:
    """(context width, pooled width) the transformer was built for, when it says (Flux and wrappers do)."""
    params = getattr(transformer, "params", None)
    if params is None:
        return None, None
    return int(params.context_in_dim), int(params.vec_in_dim)


def check_sigmas(sigmas) -> Tensor:
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise InputError(f"sigmas must be a 1-D tensor of at least 2 decreasing times, got "
                         f"{getattr(sigmas, 'shape', type(sigmas).__name__)}")
    if not bool(torch.isfinite(sigmas).all()) or float(sigmas.max()) > 1.0 or float(sigmas.min()) < 0.0:
        raise InputError("sigmas must be finite times in [0, 1]")
    if len(sigmas) - 1 > limit("steps"):
        raise InputError(f"sigmas has {len(sigmas) - 1} steps, above the limit of {limit('steps')} "
                         f"{_raise_hint('steps')}")
    return sigmas


# ----------------------------------------------------------------------------------------------- results

def fp_hint(dtype) -> str:
    if dtype == torch.float16:
        return "fp16 overflow is the most likely cause: run in bfloat16 or float32"
    return "if it ran in fp16, use bfloat16 or float32 instead"


def check_finite_result(x: Tensor, stage: str, model: str, source: str | None, dtype=None) -> None:
    """Raise NumericalError when a model turned finite inputs into NaN/Inf (a black image otherwise)."""
    if bool(torch.isfinite(x).all()):
        return
    where = f"corrupt weights in {source} (re-download the file or check its hash)" if source \
        else "corrupt weights (re-download the file or check its hash)"
    raise NumericalError(f"the {model} produced NaN/Inf {stage} although its inputs were finite. Likely causes: "
                         f"{where}; or numeric overflow ({fp_hint(dtype)}).")
