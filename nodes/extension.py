"""The V3 extension ComfyUI loads from the pack's `comfy_entrypoint`."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import comfy_model
from .images import ImageBucket
from .keep_unchanged import KeepUnchanged
from .loaders import GGUFLoader, LoadConditioning, ModelLoader, SaveConditioning
from .planning import VRAMPlan
from .reference import ReferenceEncoder
from .sampler import Sampler
from .text_encoders import TextEncoderGGUFLoader, register_folder
from .tiny import NODES as TINY_NODES

NODES: list[type[io.ComfyNode]] = [ModelLoader, GGUFLoader, ImageBucket, ReferenceEncoder, Sampler,
                                   KeepUnchanged, SaveConditioning, LoadConditioning, VRAMPlan, TextEncoderGGUFLoader,
                                   *TINY_NODES]


class KontextNativeExtension(ComfyExtension):
    async def on_load(self) -> None:
        comfy_model.register_model_folders()
        register_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> KontextNativeExtension:
    comfy_model.register_model_folders()
    return KontextNativeExtension()
