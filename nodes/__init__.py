"""ComfyUI nodes for kontext_core.

`logic` holds every check and conversion the nodes need and imports neither ComfyUI nor its modules, so it is
unit-tested without ComfyUI. `comfy_model` is the one module that knows ComfyUI internals (BaseModel,
ModelPatcher, casting ops); `sampling` drives the engine's sampler inside ComfyUI's memory manager. `gguf_model` adds GGUF layers on
ComfyUI's casting ops and a ModelPatcher that applies LoRA to quantized weights on the fly (`gguf_logic` is
its comfy-free part). The node
modules (`loaders`, `images`, `reference`, `sampler`, `conditioning_files`) are thin V3 schemas around them and
are imported only inside ComfyUI (see `extension`).
"""
