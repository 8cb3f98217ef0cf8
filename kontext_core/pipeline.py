"""The standalone edit API: context image(s) + text embeddings -> edited image and latent.

    result = edit(transformer, ae, images=[img], prompt_embeds=t5, pooled_prompt_embeds=clip, seed=0)
    result.images[0].save("out.png")
    again = edit(transformer, ae, latents=[result.latent], ...)   # edit chains stay in latent space

Text encoding is outside the engine (ComfyUI's CLIP nodes, or any T5-XXL + CLIP-L encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from . import images as im
from . import validation as val
from .errors import InputError
from .model.flux import Flux
from .sampling.schedule import flux_sigmas
from .sampling.solvers import get_solver


@dataclass
class EditResult:
    latent: Tensor  # (B, 16, h, w) in the model's latent space (scaled and shifted); feed it back for chains
    images: list[Image.Image] = field(default_factory=list)
    pixels: Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    sigmas: Tensor | None = None
    changed: Tensor | None = None  # (B, 1, H, W) bool: pixels the edit changed (paste_back only)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def make_noise(shape: Sequence[int], seed: int) -> Tensor:
    """Gaussian noise from a CPU generator: the same seed gives the same image on every device."""
    g = torch.Generator("cpu").manual_seed(val.check_seed(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def encode_images(ae, images: Sequence, mode: str = "stretch", size: tuple[int, int] | None = None,
                  device=None, dtype=None) -> list[Tensor]:
    """Context images -> latents (each at its own Kontext bucket unless `size` is given)."""
    out = []
    for i, img in enumerate(images):
        x = im.prepare_image(img, mode, size, what=f"context image {i + 1}")
        p = next(ae.parameters())
        x = x.to(device=device or p.device, dtype=dtype or p.dtype)
        with torch.no_grad():
            z = ae.encode(x).float()
        val.check_finite_result(z, f"encoding context image {i + 1}", "autoencoder", getattr(ae, "source", None),
                                x.dtype)
        out.append(z)
    return out


def make_velocity(transformer: Flux, context: Tensor, pooled: Tensor, guidance: float,
                  references: Sequence[Tensor], layout: str, negative: tuple[Tensor, Tensor] | None = None,
                  true_cfg: float = 1.0) -> Callable[[Tensor, float], Tensor]:
    """v(x, t) for the solver: the DiT on [target ‖ context] tokens, optionally with true CFG."""
    def run(x: Tensor, t: float, ctx: Tensor, vec: Tensor) -> Tensor:
        b = x.shape[0]
        ts = torch.full((b,), t, device=x.device, dtype=x.dtype)
        g = torch.full((b,), guidance, device=x.device, dtype=x.dtype)
        return transformer.forward_latent(x, ts, ctx.expand(b, -1, -1), vec.expand(b, -1), g, references, layout)

    def velocity(x: Tensor, t: float) -> Tensor:
        v = run(x, t, context, pooled)
        if negative is not None and true_cfg != 1.0:
            v_neg = run(x, t, *negative)
            v = v_neg + true_cfg * (v - v_neg)
        return v

    return velocity


@torch.no_grad()
def sample(transformer: Flux, *, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor,
           references: Sequence[Tensor] = (), size_latent: tuple[int, int] | None = None,
           steps: int = 28, guidance: float = 2.5, seed: int = 0, noise: Tensor | None = None,
           layout: str = "offset", solver: str = "euler", denoise: float = 1.0, init_latent: Tensor | None = None,
           negative_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
           true_cfg: float = 1.0, shift: bool = True, sigmas: Tensor | None = None,
           device=None, dtype=None, callback=None) -> tuple[Tensor, Tensor]:
    """Latent-space sampling. Returns (latent (B,16,h,w) float32, sigmas used)."""
    device = torch.device(device) if device is not None else model_device(transformer)
    dtype = dtype or default_dtype(device)
    ctx_dim, pooled_dim = val.model_text_dims(transformer)
    val.check_text_embeddings(prompt_embeds, pooled_prompt_embeds, ctx_dim, pooled_dim, "prompt")
    guidance, true_cfg = val.check_guidance(guidance), val.check_true_cfg(true_cfg)
    get_solver(solver)
    refs = [val.check_latent(r, f"context latent {i + 1}") for i, r in enumerate(references)]
    if noise is not None:
        val.check_latent(noise, "noise")
    if init_latent is not None:
        val.check_latent(init_latent, "init latent")
    if size_latent is None:
        if noise is not None:
            size_latent = tuple(noise.shape[-2:])
        elif init_latent is not None:
            size_latent = tuple(init_latent.shape[-2:])
        elif refs:
            size_latent = tuple(refs[0].shape[-2:])
        else:
            raise InputError("no output size: give size, noise, an init latent, or at least one context image")
    h, w = val.check_latent_size(*size_latent)
    batch = val.check_batch_size(max(prompt_embeds.shape[0], 1 if noise is None else noise.shape[0]))
    val.check_batch(prompt_embeds.shape[0], batch, "the prompt")
    if noise is not None and noise.shape[0] != batch:
        raise InputError(f"mismatched sizes: noise has batch {noise.shape[0]} but the prompt has batch {batch}; "
                         "give one noise per prompt")
    for i, r in enumerate(refs):
        val.check_batch(r.shape[0], batch, f"context latent {i + 1}")
    if noise is None:
        noise = make_noise((batch, val.LATENT_CHANNELS, h, w), seed)
    if tuple(noise.shape[-2:]) != (h, w):
        raise InputError(f"mismatched sizes: noise has latent size {tuple(noise.shape[-2:])}, expected {(h, w)}")
    n_target = (-(-h // 2)) * (-(-w // 2))
    if sigmas is None:
        sigmas = flux_sigmas(steps, n_target, shift=shift, denoise=denoise)
    else:
        val.check_denoise(denoise)
        val.check_sigmas(sigmas)
    x = noise.to(device=device, dtype=torch.float32)
    if float(sigmas[0]) < 1.0:
        if init_latent is None:
            raise InputError(f"denoise={denoise} starts from a partly noised input: pass init_latent")
        if tuple(init_latent.shape[-2:]) != (h, w):
            raise InputError(f"mismatched sizes: init latent has size {tuple(init_latent.shape[-2:])}, output is "
                             f"{(h, w)}")
        val.check_batch(init_latent.shape[0], batch, "the init latent")
        s0 = float(sigmas[0])
        x = s0 * x + (1.0 - s0) * init_latent.to(device=device, dtype=torch.float32)
    negative = None
    if true_cfg != 1.0:
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise InputError("true_cfg != 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds")
        val.check_text_embeddings(negative_prompt_embeds, negative_pooled_prompt_embeds, ctx_dim, pooled_dim,
                                  "negative prompt")
        val.check_batch(negative_prompt_embeds.shape[0], batch, "the negative prompt")
        negative = (negative_prompt_embeds.to(device, dtype), negative_pooled_prompt_embeds.to(device, dtype))
    refs = [r.to(device=device, dtype=dtype) for r in refs]
    velocity_dtype = make_velocity(transformer, prompt_embeds.to(device, dtype), pooled_prompt_embeds.to(device, dtype),
                                   guidance, refs, layout, negative, true_cfg)

    def velocity(xf: Tensor, t: float) -> Tensor:
        # The state is integrated in fp32; the DiT runs in the compute dtype.
        return velocity_dtype(xf.to(dtype), t).float()

    source = getattr(transformer, "source", None)
    n_steps = len(sigmas) - 1

    def step_cb(i: int, xi: Tensor, x0: Tensor) -> None:
        if i == 0:  # one cheap check after the first model call: NaN weights show up here, not as a black PNG
            val.check_finite_result(x0, "at the first step", "transformer", source, dtype)
        if callback is not None:
            callback(i, n_steps, xi, x0)

    x = get_solver(solver)(velocity, x, sigmas, step_cb)
    val.check_finite_result(x, f"after {n_steps} steps", "transformer", source, dtype)
    return x, sigmas


def decode_latent(ae, z: Tensor, budget_bytes: int | None = None) -> Tensor:
    """AE decode, tiled when the activations of a whole-image decode would exceed `budget_bytes`."""
    if budget_bytes is None:
        return ae.decode(z)
    from .model.tiling import decode_tiled, estimate_tile_bytes, tile_size_for_budget

    dtype = next(ae.parameters()).dtype
    side = max(z.shape[-2:])
    if estimate_tile_bytes(side, ae.params, dtype, "decode", batch=z.shape[0]) <= budget_bytes:
        return ae.decode(z)
    tile = tile_size_for_budget(budget_bytes, ae.params, dtype, "decode", batch=z.shape[0])
    return decode_tiled(ae, z, tile=tile, overlap=max(2, tile // 8))


@torch.no_grad()
def edit(transformer: Flux, ae=None, *, images: Sequence = (), latents: Sequence[Tensor] = (),
         prompt_embeds: Tensor, pooled_prompt_embeds: Tensor, size: tuple[int, int] | None = None,
         resize: str = "stretch", decode: bool = True, ae_budget_bytes: int | None = None,
         paste_back: bool | dict = False, **sample_kwargs) -> EditResult:
    """Edit with one or more context images (PIL / tensors in [0, 1]) and/or context latents.

    size: output (width, height) in pixels, snapped down to multiples of 16; default: the first context's size
    (its Kontext bucket for images with resize='stretch'|'crop'|'pad', or its own size snapped to 16 for 'keep').
    ae_budget_bytes: activation memory allowed for the AE decode; when the whole image does not fit, it is decoded
    in overlapping tiles as large as the budget allows (`kontext_core.model.tiling`).
    paste_back: keep the first context's own pixels wherever the edit did not change anything (`kontext_core.chain`:
    the change is estimated from the decoded output vs the decoded context, the seam is feathered); True, or a dict
    of `EditChain` options (threshold, grow, feather_px, colour_match, estimator). Needs the output at the first
    context's size.
    Other keyword arguments go to `sample` (steps, guidance, seed, noise, layout, solver, denoise, init_latent,
    negative_*, true_cfg, device, dtype, callback).
    """
    im.check_resize_mode(resize)
    size_latent = None
    if size is not None:
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise InputError(f"size must be (width, height) in pixels, got {size!r}")
        w, h = im.snap16(*val.check_size(*size))
        size_latent = (h // 8, w // 8)
    refs: list[Tensor] = []
    if images:
        if ae is None:
            raise InputError("context images need the autoencoder (ae) to be encoded")
        refs += encode_images(ae, images, resize)
    if paste_back and not decode:
        raise InputError("paste_back works on the decoded picture; it needs decode=True")
    refs += [r if not isinstance(r, Tensor) or r.ndim != 3 else r.unsqueeze(0) for r in latents]
    x, sigmas = sample(transformer, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                       references=refs, size_latent=size_latent, **sample_kwargs)
    result = EditResult(latent=x, sigmas=sigmas)
    if decode:
        if ae is None:
            raise InputError("decoding needs the autoencoder (ae); pass decode=False for latents only")
        p = next(ae.parameters())
        pixels = decode_latent(ae, x.to(device=p.device, dtype=p.dtype), ae_budget_bytes).float()
        val.check_finite_result(pixels, "decoding the result", "autoencoder", getattr(ae, "source", None), p.dtype)
        if paste_back:
            pixels, result.changed = _paste_back(ae, images, resize, refs, x, pixels, paste_back)
        result.pixels = pixels
        result.images = im.tensor_to_pil(pixels)
    return result


def _paste_back(ae, images, resize, refs, out_latent, out_pixels, options):
    """The edited pixels where the edit changed something, the first context's own pixels elsewhere."""
    from .chain import EditChain

    if not refs:
        raise InputError("paste_back needs a context image or latent to paste back from")
    ctx = refs[0].float()
    if ctx.shape[-2:] != out_latent.shape[-2:]:
        raise InputError(f"paste_back needs the output at the context's size: context latent {tuple(ctx.shape[-2:])},"
                         f" output {tuple(out_latent.shape[-2:])}; leave size unset")
    anchor = None
    if images:
        size = (ctx.shape[-1] * ae.downscale, ctx.shape[-2] * ae.downscale)
        anchor = im.prepare_image(images[0], resize, size).to(out_pixels.device)
    ctx = ctx.expand(out_latent.shape[0], -1, -1, -1)
    anchor = None if anchor is None else anchor.expand(out_latent.shape[0], -1, -1, -1)
    chain = EditChain(ae, ctx, anchor, **(options if isinstance(options, dict) else {}))
    step = chain.step(out_latent, out_pixels=out_pixels)
    return chain.decode(), step.changed
