"""VRAM plan node: the engine's planner for the loaded model on the named (or this) machine, as text."""

from __future__ import annotations

from comfy_api.latest import io

from kontext_core.hardware import GPUS
from kontext_core.memory import T5_STORAGES
from kontext_core.model.flux import Flux
from kontext_core.planner import STORAGES, Assumptions, machine, report

CATEGORY = "KontextNative"
AUTO = "auto (this machine)"


class VRAMPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeVRAMPlan",
            display_name="Kontext VRAM Plan",
            category=f"{CATEGORY}/utils",
            description="Predicts, for this model's architecture in every storage type (bf16, fp8, GGUF Q8_0 ... "
                        "Q2_K) on your GPU and RAM: peak GPU memory, peak system RAM (text encoders and streamed "
                        "blocks included), seconds per step and the output error, and recommends one, saying "
                        "which speed/quality trade-off it made. Same numbers as `python -m kontext_core plan`.",
            inputs=[
                io.Model.Input("model", tooltip="A model from the Kontext loaders (its architecture is planned)."),
                io.Combo.Input("gpu", options=[AUTO, *GPUS], default=AUTO,
                               tooltip="The GPU to plan for; auto = the GPU ComfyUI runs on."),
                io.Float.Input("vram_gb", default=0.0, min=0.0, max=192.0, step=0.5,
                               tooltip="GPU memory to plan for in GiB; 0 = the card's (less leaves room for the "
                                       "desktop)."),
                io.Float.Input("ram_gb", default=0.0, min=0.0, max=2048.0, step=1.0,
                               tooltip="System RAM in GiB; 0 = this machine's."),
                io.Combo.Input("text_encoder", options=list(T5_STORAGES), default="fp8",
                               tooltip="The T5 you load: fp16 (9.5 GB), fp8 (4.9 GB), a GGUF type, or none "
                                       "(saved conditioning). It is counted in RAM with CLIP-L."),
                io.Boolean.Input("free_text_encoder", default=False,
                                 tooltip="On: text encoders are freed after encoding. Off: kept in RAM while "
                                         "sampling (ComfyUI's default)."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=16, tooltip="Output width in pixels."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=16, tooltip="Output height in pixels."),
                io.Int.Input("references", default=1, min=0, max=8,
                             tooltip="Context images, each assumed at the output size."),
            ],
            outputs=[io.String.Output(display_name="plan", tooltip="The plan as a markdown table.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, gpu=AUTO, vram_gb=0.0, ram_gb=0.0, text_encoder="fp8", free_text_encoder=False,
                width=1024, height=1024, references=1) -> io.NodeOutput:
        dit = getattr(getattr(model, "model", None), "diffusion_model", None)
        if not isinstance(dit, Flux):
            raise ValueError("Kontext VRAM Plan needs a model from Load Kontext Model (native) or Load Kontext GGUF "
                             "(native); this MODEL comes from another loader.")
        m = machine(None if gpu == AUTO else gpu, vram_gb or None, ram_gb or None)  # 0 = automatic
        text = report(dit.params, m, width, height, references, text_encoder,
                      Assumptions(free_text_encoder=free_text_encoder), STORAGES)
        return io.NodeOutput(text, ui={"text": [text]})
