"""Loader nodes: the transformer (any layout the engine reads, or a GGUF quantization) and the conditioning cache."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from kontext_core.conditioning import load_embeddings, save_embeddings

from . import comfy_model, gguf_logic, gguf_model, logic, model_sources

log = logging.getLogger("kontext_native")
CATEGORY = "KontextNative"


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeModelLoader",
            display_name="Load Kontext Model (native)",
            category=f"{CATEGORY}/loaders",
            description="Loads a FLUX.1 Kontext transformer with the native engine as a standard MODEL that "
                        "ComfyUI's memory manager can load partially. Works with core KSampler, "
                        "ReferenceLatent, FluxGuidance and LoRA loaders too.",
            inputs=[
                io.Combo.Input(
                    "model_name", options=comfy_model.model_file_choices(),
                    tooltip="Transformer weights from models/diffusion_models (or models/diffusers): "
                            "flux1-kontext-dev.safetensors (BFL), a ComfyUI-saved checkpoint, an fp8 file, or a "
                            "diffusers folder (shown with a trailing '/'). The layout is detected from the keys."),
                io.Combo.Input(
                    "weight_dtype", options=list(logic.WEIGHT_DTYPES), default="default",
                    tooltip="Storage dtype of the weight layers. default: fp8 files stay fp8 (each layer is "
                            "upcast when it runs), other files use what ComfyUI picks for your device. fp8 "
                            "halves the memory of a bf16 model at a small quality cost."),
            ],
            outputs=[io.Model.Output(tooltip="The Kontext transformer, wrapped for ComfyUI's memory manager.")],
        )

    @classmethod
    def validate_inputs(cls, model_name) -> bool | str:
        # ComfyUI 0.3.64 does not check V3 combo values: without this, a missing file surfaces only when the
        # node runs, as a bare "file not found"
        return comfy_model.model_file_problem(model_name) or True

    @classmethod
    def execute(cls, model_name, weight_dtype="default") -> io.NodeOutput:
        path = comfy_model.resolve_model_choice(model_name)
        return io.NodeOutput(comfy_model.load_transformer_model(path, weight_dtype))


class GGUFLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeGGUFLoader",
            display_name="Load Kontext GGUF (native)",
            category=f"{CATEGORY}/loaders",
            description="Loads a GGUF-quantized FLUX.1 Kontext transformer (Q8_0, Q6_K, Q5_K_M, Q4_K_M, ...) with "
                        "the native engine. The weights stay quantized in memory and are dequantized layer by "
                        "layer at use, so a Q4_K_M model needs about a quarter of the bf16 memory; ComfyUI can "
                        "still load it partially. Works with core KSampler, ReferenceLatent, FluxGuidance and "
                        "LoraLoaderModelOnly (the LoRA is applied at use, the weights are never made dense).",
            inputs=[
                io.Combo.Input(
                    "gguf_name", options=gguf_model.gguf_file_choices(),
                    tooltip="A .gguf transformer from models/diffusion_models (or models/unet), e.g. "
                            "flux1-kontext-dev-Q4_K_M.gguf. Q8_0 is nearly lossless, Q5_K_M / Q4_K_M are the "
                            "usual quality/size trade-offs, Q3_K / Q2_K lose visible detail."),
                io.Combo.Input(
                    "compute_dtype", options=list(gguf_logic.COMPUTE_DTYPES), default="default",
                    tooltip="Dtype the weights are dequantized to and the model runs in. default: what ComfyUI "
                            "picks for your device (bf16 on recent GPUs, fp16 on older ones, fp32 on CPU). fp16 "
                            "can overflow with FLUX on some prompts; prefer bf16 where the GPU supports it."),
            ],
            outputs=[io.Model.Output(tooltip="The quantized Kontext transformer, wrapped for ComfyUI's memory "
                                             "manager.")],
        )

    @classmethod
    def validate_inputs(cls, gguf_name) -> bool | str:
        return gguf_model.gguf_file_problem(gguf_name) or True

    @classmethod
    def execute(cls, gguf_name, compute_dtype="default") -> io.NodeOutput:
        path = gguf_model.resolve_gguf_choice(gguf_name)
        return io.NodeOutput(gguf_model.load_gguf_model(path, compute_dtype))


class SaveConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeSaveConditioning",
            display_name="Save Kontext Conditioning",
            category=f"{CATEGORY}/conditioning",
            description="Saves a prompt's T5 embeddings, CLIP pooled output and guidance to a safetensors file in "
                        "the output folder. Move it to models/kontext_conditioning (or input/) and use Load "
                        "Kontext Conditioning: the text encoders never need to be loaded again for that prompt.",
            is_output_node=True,
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="A text encoder's output (CLIPTextEncode with a "
                                                              "flux DualCLIPLoader), optionally after FluxGuidance."),
                io.String.Input("filename_prefix", default="kontext_conditioning/prompt",
                                tooltip="File name prefix, relative to the output folder; a counter is appended."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, conditioning, filename_prefix="kontext_conditioning/prompt") -> io.NodeOutput:
        context, pooled, guidance, dropped = logic.conditioning_to_embeddings(conditioning)
        if dropped:
            log.warning("Save Kontext Conditioning: %s are not saved (only the text embeddings are).", dropped)
        prefix = logic.safe_prefix(filename_prefix)
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir)
        os.makedirs(folder, exist_ok=True)
        fname = f"{name}_{counter:05}_.safetensors"
        save_embeddings(os.path.join(folder, fname), context, pooled, guidance)
        log.info("Saved Kontext conditioning to %s", os.path.join(folder, fname))
        return io.NodeOutput(ui={"text": [os.path.join(subfolder, fname)]})


class LoadConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeLoadConditioning",
            display_name="Load Kontext Conditioning",
            category=f"{CATEGORY}/conditioning",
            description="Loads a conditioning saved by Save Kontext Conditioning (no text encoder needed).",
            inputs=[
                io.Combo.Input(
                    "conditioning_file",
                    options=logic.conditioning_choices(
                        folder_paths.get_filename_list(comfy_model.CONDITIONING_FOLDER_KEY)),
                    tooltip="A .safetensors conditioning file from models/kontext_conditioning or the input "
                            "folder."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The saved prompt as a standard CONDITIONING.")],
        )

    @classmethod
    def validate_inputs(cls, conditioning_file) -> bool | str:
        key = comfy_model.CONDITIONING_FOLDER_KEY
        if folder_paths.get_full_path(key, conditioning_file) is not None:
            return True
        return model_sources.missing_conditioning_message(conditioning_file, folder_paths.get_folder_paths(key),
                                                          folder_paths.get_filename_list(key))

    @classmethod
    def fingerprint_inputs(cls, conditioning_file):
        path = folder_paths.get_full_path(comfy_model.CONDITIONING_FOLDER_KEY, conditioning_file)
        return os.path.getmtime(path) if path and os.path.exists(path) else conditioning_file

    @classmethod
    def execute(cls, conditioning_file) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(comfy_model.CONDITIONING_FOLDER_KEY, conditioning_file)
        context, pooled, guidance = load_embeddings(path)
        return io.NodeOutput(logic.embeddings_to_conditioning(context, pooled, guidance))
