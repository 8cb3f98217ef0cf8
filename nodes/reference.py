"""Reference (context) images for Kontext, stored the way core ReferenceLatent stores them."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import logic

log = logging.getLogger("kontext_native")
CATEGORY = "KontextNative"


class ReferenceEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeReferenceEncoder",
            display_name="Kontext Reference",
            category=f"{CATEGORY}/conditioning",
            description="Adds a context image to a conditioning: an IMAGE (encoded with the VAE) and/or a LATENT "
                        "(e.g. the previous edit's output, so edit chains never leave latent space). Chain "
                        "several of these for multiple references. Compatible with core ReferenceLatent.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt to attach the reference(s) to."),
                io.Combo.Input(
                    "layout", options=list(logic.LAYOUTS), default="offset",
                    tooltip="How several references are told apart: offset (default, what Kontext was trained "
                            "with: placed side by side), index (each gets its own index), uxo (placed past the "
                            "output canvas). Applies to all references of this conditioning."),
                io.Vae.Input("vae", optional=True, tooltip="The FLUX VAE (ae.safetensors); needed for an image."),
                io.Image.Input("image", optional=True,
                               tooltip="Reference image, ideally from Kontext Image Bucket. A batch is one "
                                       "reference per output image, not several references."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Reference latent, e.g. the previous Kontext Sampler output (no "
                                        "decode/encode round trip between turns)."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="The conditioning with the reference(s) appended."),
                io.Latent.Output(tooltip="The reference latent just added (the encoded image, else the input "
                                         "latent); feed it to the sampler for img2img or to size the output."),
            ],
        )

    @classmethod
    def execute(cls, conditioning, layout="offset", vae=None, image=None, latent=None) -> io.NodeOutput:
        latents = []
        if image is not None:
            if vae is None:
                raise logic.InputError("an image reference needs the VAE: connect the FLUX VAE (ae.safetensors)")
            if image.shape[1] % 8 or image.shape[2] % 8:
                log.warning("Kontext Reference: %dx%d is not a multiple of 8; the VAE crops it. Use Kontext Image "
                            "Bucket first.", image.shape[2], image.shape[1])
            latents.append(vae.encode(image[:, :, :, :3]))
        if latent is not None:
            latents.append(logic.check_latent(latent, "latent input"))
        cond = logic.add_references(conditioning, latents, layout)
        return io.NodeOutput(cond, {"samples": latents[0] if image is not None else latents[-1]})
