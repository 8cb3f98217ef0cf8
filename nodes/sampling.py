"""Run the engine's sampler (`kontext_core.pipeline.sample`) inside ComfyUI's memory manager.

The model is loaded with `load_models_gpu` (which may load it partially and evicts other models), the engine
integrates the flow ODE with its solvers and CPU-generator noise (same seed -> same result as the engine's
`sample`/`edit`), and every step reports progress, sends a latent preview and honours ComfyUI's interrupt.
Latents cross the boundary in ComfyUI's convention (raw autoencoder space) and are converted with the model's
latent format.
"""

from __future__ import annotations

import copy
import logging

import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.patcher_extension
import comfy.samplers
import latent_preview

from kontext_core import pipeline
from kontext_core import validation as val
from kontext_core.sampling import flux_sigmas

from . import logic

log = logging.getLogger("kontext_native")


def schedule_names() -> list[str]:
    return list(logic.ENGINE_SCHEDULES) + [s for s in comfy.samplers.SCHEDULER_NAMES if s not in logic.ENGINE_SCHEDULES]


class ComfyTransformer:
    """What `pipeline.sample` needs from a transformer (`forward_latent`), calling the ComfyUI diffusion model
    in its own convention so wrappers on transformer_options apply. Works for our model and core's Flux."""

    def __init__(self, diffusion_model, transformer_options: dict):
        self.diffusion_model = diffusion_model
        self.transformer_options = transformer_options
        # What the engine validates against and names in errors (core's Flux has params but no source).
        self.params = getattr(diffusion_model, "params", None)
        self.source = getattr(diffusion_model, "source", None)

    def forward_latent(self, x, timestep, context, y, guidance=None, references=(), layout="offset"):
        refs = list(references)
        return self.diffusion_model(x, timestep, context, y=y, guidance=guidance, ref_latents=refs or None,
                                    ref_latents_method=layout, transformer_options=self.transformer_options)


def _transformer_options(patcher) -> dict:
    opts = copy.copy(patcher.model_options.get("transformer_options", {}))
    opts["wrappers"] = comfy.patcher_extension.merge_nested_dicts(opts.get("wrappers", {}), patcher.wrappers,
                                                                  copy_dict1=True)
    return opts


def _text_dims(base) -> tuple[int, int]:
    params = base.diffusion_model.params
    return int(params.context_in_dim), int(params.vec_in_dim)


def sigmas_for(patcher, schedule: str, steps: int, denoise: float, n_target_tokens: int) -> torch.Tensor:
    if schedule in logic.ENGINE_SCHEDULES:
        return flux_sigmas(steps, n_target_tokens, shift=(schedule == "kontext"), denoise=denoise)
    ms = patcher.get_model_object("model_sampling")
    total = val.schedule_length(steps, denoise)  # bounded: a tiny denoise must not build a huge schedule
    return comfy.samplers.calculate_sigmas(ms, schedule, total)[-(steps + 1):].float().cpu()


def run_sampler(patcher, positive, *, seed: int, steps: int, guidance: float, solver: str, scheduler: str,
                denoise: float = 1.0, negative=None, true_cfg: float = 1.0, latent=None, width: int = 0,
                height: int = 0, batch_size: int = 1) -> dict:
    base = getattr(patcher, "model", None)
    fmt = getattr(base, "latent_format", None)
    logic.check_sampler_model(isinstance(base, comfy.model_base.Flux), getattr(fmt, "latent_channels", None),
                              logic.describe_model(base))
    use_cfg = float(true_cfg) != 1.0
    logic.check_sampler_options(steps, denoise, true_cfg, negative is not None, solver, scheduler, schedule_names(),
                                guidance, seed)
    if float(denoise) < 1.0 and latent is None:
        raise logic.InputError(f"denoise={denoise} starts from a partly noised image: connect the latent to edit "
                               "(e.g. from VAEEncode), or set denoise to 1")

    ctx_dim, pooled_dim = _text_dims(base)
    pos = logic.prompt_parts(positive, "positive")
    logic.check_text_dims(pos, ctx_dim, pooled_dim, "positive")
    neg = None
    if use_cfg:
        neg = logic.prompt_parts(negative, "negative")
        logic.check_text_dims(neg, ctx_dim, pooled_dim, "negative")
    samples = latent["samples"] if isinstance(latent, dict) else latent
    if isinstance(latent, dict) and latent.get("noise_mask") is not None:
        log.warning("Kontext Sampler: the latent's noise mask is ignored (no inpainting in this sampler).")
    batch, h, w = logic.output_latent_size(pos.references, samples, width, height, batch_size)
    logic.check_batches(pos, batch, "positive")
    if neg is not None:
        logic.check_batches(neg, batch, "negative")

    refs = [base.process_latent_in(r.float()) for r in pos.references]
    init = base.process_latent_in(samples.float()) if samples is not None and float(denoise) < 1.0 else None
    noise = pipeline.make_noise((batch, logic.LATENT_CHANNELS, h, w), seed)
    sigmas = sigmas_for(patcher, scheduler, int(steps), float(denoise), (-(-h // 2)) * (-(-w // 2)))

    # Ask ComfyUI for the memory one model pass needs (target + context tokens), as its own samplers do; with
    # true CFG the engine runs the positive and negative passes one after the other, not as a batch.
    shapes = {}
    if pos.references:
        shapes = {k: [v] for k, v in base.extra_conds_shapes(reference_latents=pos.references).items()}
    need = base.memory_required([batch, logic.LATENT_CHANNELS, h, w], cond_shapes=shapes)
    mm.load_models_gpu([patcher], memory_required=need, minimum_memory_required=need)

    device = patcher.load_device
    dtype = base.manual_cast_dtype or base.get_dtype()
    n_steps = len(sigmas) - 1
    preview = latent_preview.prepare_callback(patcher, n_steps)

    def on_step(i, total, x, x0):
        mm.throw_exception_if_processing_interrupted()
        preview(i, x0, x, total)  # progress bar + preview of the (unpacked, 16-channel) x0 estimate

    mm.throw_exception_if_processing_interrupted()
    transformer = ComfyTransformer(base.diffusion_model, _transformer_options(patcher))
    patcher.pre_run()
    try:
        x, _ = pipeline.sample(
            transformer, prompt_embeds=pos.context, pooled_prompt_embeds=pos.pooled, references=refs,
            size_latent=(h, w), steps=int(steps), guidance=float(guidance), noise=noise, layout=pos.layout,
            solver=solver, denoise=float(denoise), init_latent=init,
            negative_prompt_embeds=None if neg is None else neg.context,
            negative_pooled_prompt_embeds=None if neg is None else neg.pooled,
            true_cfg=float(true_cfg), sigmas=sigmas, device=device, dtype=dtype, callback=on_step)
    finally:
        patcher.cleanup()
    return {"samples": base.process_latent_out(x.float()).to(mm.intermediate_device())}
