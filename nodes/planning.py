"""VRAM plan node: the engine's planner for the loaded model, shown in the UI and returned as text."""

from __future__ import annotations

from comfy_api.latest import io

from kontext_core.model.flux import Flux
from kontext_core.planner import BUDGETS_GB, STORAGES, Assumptions, report

CATEGORY = "KontextNative"


class VRAMPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeVRAMPlan",
            display_name="Kontext VRAM Plan",
            category=f"{CATEGORY}/utils",
            description="Predicts peak GPU memory and seconds per step for this model's architecture in every "
                        "storage type (bf16, fp8, GGUF Q8_0 ... Q2_K) at 7/8/12/16/24 GB and your budget, and "
                        "recommends the fastest one that fits. Same numbers as `python -m kontext_core plan`.",
            inputs=[
                io.Model.Input("model", tooltip="A model from the Kontext loaders (its architecture is planned)."),
                io.Float.Input("vram_gb", default=12.0, min=2.0, max=192.0, step=0.5,
                               tooltip="Your GPU's memory in GB, added to the standard budgets."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=16, tooltip="Output width in pixels."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=16, tooltip="Output height in pixels."),
                io.Int.Input("references", default=1, min=0, max=8,
                             tooltip="Context images, each assumed at the output size."),
                io.Float.Input("tflops", default=150.0, min=1.0, max=5000.0,
                               tooltip="Dense bf16 TFLOP/s your GPU reaches (about 150 for an RTX 4090)."),
            ],
            outputs=[io.String.Output(display_name="plan", tooltip="The plan as a markdown table.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vram_gb=12.0, width=1024, height=1024, references=1, tflops=150.0) -> io.NodeOutput:
        dit = getattr(getattr(model, "model", None), "diffusion_model", None)
        if not isinstance(dit, Flux):
            raise ValueError("Kontext VRAM Plan needs a model from Load Kontext Model (native) or Load Kontext GGUF "
                             "(native); this MODEL comes from another loader.")
        budgets = sorted(set(BUDGETS_GB) | {vram_gb})
        text = report(dit.params, width, height, references, budgets, STORAGES, Assumptions(tflops=tflops))
        return io.NodeOutput(text, ui={"text": [text]})
