"""The Kontext sampler node: the engine's sampler under ComfyUI's memory manager."""

from __future__ import annotations

from comfy_api.latest import io

from . import logic, sampling

CATEGORY = "KontextNative"


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeSampler",
            display_name="Kontext Sampler",
            category=f"{CATEGORY}/sampling",
            description="Samples an edit with the native engine: the references come from the positive "
                        "conditioning (Kontext Reference or core ReferenceLatent). The output has the first "
                        "reference's size unless a latent or width/height is given. Same seed, same result as "
                        "the engine's standalone sample/edit.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 Kontext MODEL (Load Kontext Model (native), or core's "
                                                "Load Diffusion Model)."),
                io.Conditioning.Input("positive", tooltip="The edit instruction with its reference image(s)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (CPU generator: the same on every device)."),
                io.Int.Input("steps", default=28, min=1, max=200,
                             tooltip="Sampling steps; 20-30 is typical for Kontext dev."),
                io.Float.Input("guidance", default=2.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Distilled guidance embedded into the model (Kontext default 2.5). This "
                                       "sampler uses this value, not a FluxGuidance value on the conditioning."),
                io.Float.Input("true_cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="True classifier-free guidance with the negative prompt; 1 = off (one model "
                                       "pass per step). Above 1 doubles the cost."),
                io.Combo.Input("solver", options=list(logic.SOLVER_NAMES), default="euler",
                               tooltip="ODE solver: euler (reference), heun (2 passes per step), dpmpp_2m."),
                io.Combo.Input("scheduler", options=sampling.schedule_names(), default=logic.DEFAULT_SCHEDULE,
                               tooltip="kontext: the reference schedule, shifted for the output resolution; "
                                       "kontext_unshifted: linear; the others are ComfyUI's schedulers on the "
                                       "model's sampling (shift 1.15, as KSampler uses)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1 = generate from noise; below 1 starts from the connected latent."),
                io.Int.Input("width", default=0, min=0, max=8192, step=16,
                             tooltip="Output width in pixels; 0 = the first reference's (or the latent's) size."),
                io.Int.Input("height", default=0, min=0, max=8192, step=16,
                             tooltip="Output height in pixels; 0 = the first reference's (or the latent's) size."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per run (ignored when a latent is connected: its batch is used)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt, used only when true_cfg is not 1."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional latent: sets the output size, and is the starting point when "
                                        "denoise < 1."),
            ],
            outputs=[io.Latent.Output(tooltip="The edited latent (decode with VAEDecode, or feed the next Kontext "
                                              "Reference for an edit chain).")],
        )

    @classmethod
    def execute(cls, model, positive, seed, steps, guidance, true_cfg, solver, scheduler, denoise, width, height,
                batch_size, negative=None, latent=None) -> io.NodeOutput:
        out = sampling.run_sampler(model, positive, seed=seed, steps=steps, guidance=guidance, solver=solver,
                                   scheduler=scheduler, denoise=denoise, negative=negative, true_cfg=true_cfg,
                                   latent=latent, width=width, height=height, batch_size=batch_size)
        return io.NodeOutput(out)
