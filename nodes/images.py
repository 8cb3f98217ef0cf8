"""Image -> Kontext resolution bucket."""

from __future__ import annotations

from comfy_api.latest import io

from . import logic

CATEGORY = "KontextNative"


class ImageBucket(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeImageBucket",
            display_name="Kontext Image Bucket",
            category=f"{CATEGORY}/image",
            description="Brings an image to the Kontext resolution nearest in aspect ratio (the 17 ~1 MP sizes it "
                        "was trained on), or keeps its size snapped to multiples of 16. Transparent areas are "
                        "filled with white.",
            inputs=[
                io.Image.Input("image", tooltip="Image (or batch of same-size images) to prepare as a reference."),
                io.Combo.Input(
                    "mode", options=list(logic.BUCKET_MODES), default="stretch",
                    tooltip="stretch: resize to the bucket, aspect not kept (the reference behaviour); crop: fill "
                            "the bucket and cut the overflow; pad: fit inside and pad with black; keep: the "
                            "input size rounded down to multiples of 16."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional transparency mask from LoadImage (1 = transparent); those pixels "
                                      "become white before resizing."),
            ],
            outputs=[
                io.Image.Output(tooltip="The resized image(s)."),
                io.Int.Output(display_name="width", tooltip="Width in pixels."),
                io.Int.Output(display_name="height", tooltip="Height in pixels."),
            ],
        )

    @classmethod
    def execute(cls, image, mode="stretch", mask=None) -> io.NodeOutput:
        out, w, h = logic.bucket_images(image, mode, mask)
        return io.NodeOutput(out, w, h)
