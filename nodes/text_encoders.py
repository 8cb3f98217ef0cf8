"""Load Kontext Text Encoders (T5 GGUF + CLIP-L): a standard CLIP for core CLIPTextEncode, under ComfyUI's memory
manager, with T5 kept quantized (dequantized layer by layer at use, like the GGUF transformer)."""

from __future__ import annotations

import logging

import comfy.sd
import folder_paths
from comfy_api.latest import io

from . import gguf_logic, text_encoder_logic as logic
from .gguf_model import GGUFComfyOps

log = logging.getLogger("kontext_native")
CATEGORY = "KontextNative"
TEXT_GGUF_KEY = "clip_gguf"  # the key ComfyUI-GGUF uses too, so both packs list the same files


def register_folder() -> None:
    fnp = folder_paths.folder_names_and_paths
    if TEXT_GGUF_KEY not in fnp:
        base = fnp.get("text_encoders", ([], set()))[0]
        fnp[TEXT_GGUF_KEY] = (base, {".gguf"})  # the same list object: folders added later are shared


def t5_choices() -> list[str]:
    register_folder()
    return logic.gguf_text_choices(folder_paths.get_filename_list(TEXT_GGUF_KEY))


def clip_choices() -> list[str]:
    return logic.clip_choices(folder_paths.get_filename_list("text_encoders"))


def load_flux_clip(t5_path: str, clip_path: str, compute_dtype: str = "default"):
    """A ComfyUI CLIP of type flux from a T5 encoder GGUF and a CLIP-L safetensors file."""
    t5, clip = logic.read_pair(t5_path, clip_path)
    configs = logic.comfy_model_configs(t5, clip)
    # ComfyUI (0.3.64) replaces `clip_l_model_config` by `model_config` + the position count read from the file
    # (its long-CLIP support), so the CLIP dimensions go under both names.
    options = {"custom_operations": GGUFComfyOps, **configs, "model_config": dict(configs["clip_l_model_config"])}
    dtype = gguf_logic.COMPUTE_DTYPES[gguf_logic.check_choice(compute_dtype, tuple(gguf_logic.COMPUTE_DTYPES),
                                                              "compute dtype")]
    if dtype is not None:
        options["dtype"] = dtype
    out = comfy.sd.load_text_encoder_state_dicts(logic.comfy_state_dicts(t5, clip),
                                                 embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                 clip_type=comfy.sd.CLIPType.FLUX, model_options=options)
    log.info("Kontext native text encoders: T5 %s (%s), CLIP-L %s", t5_path,
             ", ".join(sorted(set(t5.qtypes.values()))), clip_path)
    return out


class TextEncoderGGUFLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeTextEncoderGGUFLoader",
            display_name="Load Kontext Text Encoders (T5 GGUF + CLIP-L)",
            category=f"{CATEGORY}/loaders",
            description="Loads FLUX's text encoders with T5-XXL from a GGUF file (Q8_0 ... Q3_K: about 5.1 to "
                        "2.1 GB instead of 9.5 GB in fp16) and CLIP-L from safetensors, as a standard CLIP for core "
                        "CLIPTextEncode. T5 stays quantized in memory and is dequantized layer by layer; ComfyUI's "
                        "memory manager loads and offloads it like any text encoder.",
            inputs=[
                io.Combo.Input("t5_name", options=t5_choices(),
                               tooltip="A T5-XXL encoder GGUF from models/text_encoders (e.g. "
                                       "t5-v1_1-xxl-encoder-Q8_0.gguf from city96/t5-v1_1-xxl-encoder-gguf)."),
                io.Combo.Input("clip_name", options=clip_choices(),
                               tooltip="clip_l.safetensors from models/text_encoders (comfyanonymous/"
                                       "flux_text_encoders)."),
                io.Combo.Input("compute_dtype", options=list(gguf_logic.COMPUTE_DTYPES), default="default",
                               tooltip="Dtype the encoders run in. default: ComfyUI's text-encoder dtype (fp16 "
                                       "unless --fp32-text-enc / --bf16-text-enc); bf16 avoids fp16 overflow in "
                                       "T5 on GPUs that support it; fp32 is exact and slowest."),
            ],
            outputs=[io.Clip.Output(tooltip="FLUX text encoders (T5-XXL + CLIP-L) for CLIPTextEncode.")],
        )

    @classmethod
    def validate_inputs(cls, t5_name, clip_name, compute_dtype="default") -> bool | str:
        register_folder()
        for key, name, what in ((TEXT_GGUF_KEY, t5_name, "T5 encoder GGUF"),
                                ("text_encoders", clip_name, "CLIP-L file")):
            if folder_paths.get_full_path(key, name) is None:
                have = folder_paths.get_filename_list(key)
                return (f"{what} '{name}' was not found in models/text_encoders (searched: "
                        f"{'; '.join(folder_paths.get_folder_paths(key))}). Put it there and press R; files there "
                        f"now: {', '.join(have[:8]) or 'none'}.")
        return True

    @classmethod
    def execute(cls, t5_name, clip_name, compute_dtype="default") -> io.NodeOutput:
        register_folder()
        return io.NodeOutput(load_flux_clip(folder_paths.get_full_path_or_raise(TEXT_GGUF_KEY, t5_name),
                                            folder_paths.get_full_path_or_raise("text_encoders", clip_name),
                                            compute_dtype))
