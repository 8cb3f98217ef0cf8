"""Kontext Keep Unchanged: anchored edit chains and paste-back in the node graph (logic in chain_logic.py)."""

from __future__ import annotations

from comfy_api.latest import io

from . import chain_logic

CATEGORY = "KontextNative"


class KeepUnchanged(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeKeepUnchanged",
            display_name="Kontext Keep Unchanged",
            category=f"{CATEGORY}/chain",
            description="Keeps what an edit did not change exactly as it was in the original picture. Each Kontext "
                        "edit re-generates the whole image, so untouched regions soften and shift a little per "
                        "turn. This node estimates the region this turn changed, keeps the original's latent "
                        "everywhere else for the next turn, and pastes the original's pixels back outside the "
                        "regions edited so far (feathered seam, colour-matched). Use it instead of VAE Decode "
                        "after each Kontext Sampler; first turn: connect the original image, later turns: the "
                        "previous Keep Unchanged's LATENT.",
            inputs=[
                io.Latent.Input("samples", tooltip="This turn's edit: the Kontext Sampler's LATENT."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors)."),
                io.Image.Input("image", optional=True,
                               tooltip="First turn (or a single edit): the original picture as it went into "
                                       "Kontext Reference (after Kontext Image Bucket)."),
                io.Latent.Input("previous", optional=True,
                                tooltip="Later turns: the LATENT output of the previous turn's Kontext Keep "
                                        "Unchanged (it carries the original and the regions edited so far)."),
                io.Combo.Input("estimator", options=list(chain_logic.ESTIMATOR_NAMES), default="pixels",
                               tooltip="How the changed region is found: pixels (decoded output vs decoded input; "
                                       "measured best) or latent (latent difference; no extra decode)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=255.0, step=0.5,
                               tooltip="Change threshold: 8-bit levels for pixels (0 = default 24), mean absolute "
                                       "latent difference for latent (0 = default 0.1). Lower keeps less of the "
                                       "original."),
                io.Int.Input("feather", default=chain_logic.DEFAULT_FEATHER, min=0, max=32,
                             tooltip="Width in pixels of the blended seam around edited regions."),
                io.Boolean.Input("colour_match", default=True,
                                 tooltip="Remove the decode's colour offset next to the seam (never inside the "
                                         "edited region)."),
            ],
            outputs=[
                io.Latent.Output(tooltip="The next turn's context: connect to the next Kontext Reference's latent "
                                         "and to the next Keep Unchanged's previous."),
                io.Image.Output(tooltip="The edit, with every pixel no turn has changed taken from the original."),
                io.Mask.Output(display_name="edited", tooltip="The region edited so far (1 = edited)."),
            ],
        )

    @classmethod
    def execute(cls, samples, vae, image=None, previous=None, estimator="pixels", threshold=0.0,
                feather=chain_logic.DEFAULT_FEATHER, colour_match=True) -> io.NodeOutput:
        latent, pixels, mask = chain_logic.keep_unchanged(samples, vae, image, previous, estimator, threshold,
                                                          feather, colour_match)
        return io.NodeOutput(latent, pixels, mask)


NODES = [KeepUnchanged]
