"""GGUF-quantized Kontext transformers as ComfyUI MODELs, with LoRA applied at use.

The quantized bytes stay what the file holds (memory-mapped `GGMLTensor` parameters) everywhere: on disk, in
RAM, in VRAM. What ComfyUI's memory manager sees:

* sizes: `module_size` counts a GGMLTensor as its raw bytes (it is a uint8 tensor), so partial loading
  budgets the real footprint; `KontextNativeGGUFFlux.memory_required` adds the working memory of
  dequantizing the largest layer (see `gguf_logic.dequant_reserve_bytes`), so load_models_gpu keeps it free;
* layers: `GGUFComfyOps.Linear` is the engine's GGUF Linear on top of `comfy.ops.manual_cast.Linear`, so the
  patcher can mark it for per-use casting when it does not fit; either way it dequantizes its weight at
  every forward, on the input's device and in the compute dtype ComfyUI chose (bf16/fp16 on GPUs, fp32 on
  CPU), moving the bytes there first when they were left in RAM;
* LoRA: `ModelPatcher.patch_weight_to_device` would decode the weight, add the LoRA and write a dense float
  tensor back into the parameter, which is meaningless for quantized bytes. `GGUFModelPatcher` overrides it
  for our GGUF layers: it attaches a `LivePatch` (ComfyUI's own `comfy.lora.calculate_weight` over the key's
  patches) to the layer's `weight_patches`, run on the dequantized float32 weight at every forward; unpatching
  detaches it. Layers that ComfyUI leaves in RAM get its `LowVramPatch` in `weight_function` instead, which
  the layer runs at the same point in float32 - so fully loaded, partially loaded and unpatched models give
  the same numbers, and no layer is ever stored dense.
"""

from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths

from kontext_core.errors import InputError
from kontext_core.quant.ggml_tensor import GGMLTensor
from kontext_core.quant.gguf_ops import make_gguf_ops, materialize

from . import comfy_model, gguf_logic, model_sources

log = logging.getLogger("kontext_native")

LIVE_PATCHES_ATTR = "gguf_live_patches"  # on the BaseModel, shared by every clone of the patcher


# ------------------------------------------------------------------------------------------------- layers

class LivePatch:
    """ModelPatcher patches of one weight, applied to its dequantized float32 copy at every use."""

    def __init__(self, key: str, patches: list):
        self.key = key
        self.patches = list(patches)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return comfy.lora.calculate_weight(self.patches, weight, self.key, intermediate_dtype=torch.float32)


def _host_patches(functions, key: str) -> bool:
    """Does ComfyUI's per-use hook list already carry the patches of `key` (a partially loaded layer)?"""
    return any(isinstance(f, comfy.model_patcher.LowVramPatch) and getattr(f, "key", None) == key
               for f in functions)


_BASE = make_gguf_ops(comfy.ops.manual_cast)


class GGUFComfyOps(_BASE):
    """`operations` for GGUF checkpoints inside ComfyUI (Linear on manual_cast; other layers dequantize at load)."""

    class Linear(_BASE.Linear):
        def get_weight(self, dtype, device):
            return self._dense("weight", dtype, device)

        def get_bias(self, dtype, device):
            return None if self.bias is None else self._dense("bias", dtype, device)

        def _dense(self, name: str, dtype, device) -> torch.Tensor:
            stored = getattr(self, name)
            host = list(getattr(self, f"{name}_function", None) or ())
            own = self.weight_patches if name == "weight" else self.bias_patches
            # A LowVramPatch for the same key means ComfyUI applies these patches itself (the layer was moved
            # out after our LivePatch was attached): never apply a LoRA twice.
            own = [p for p in own if not (isinstance(p, LivePatch) and _host_patches(host, p.key))]
            if not own and not host:
                return materialize(stored, dtype, device)
            w = materialize(stored, torch.float32, device)
            if not isinstance(stored, GGMLTensor) and w.data_ptr() == stored.data_ptr():
                w = w.clone()  # patches may work in place: never on the stored tensor
            for p in own:
                w = p(w)
            for f in host:
                w = f(w)
            return w.to(dtype)


# -------------------------------------------------------------------------------------------------- model

class KontextNativeGGUFFlux(comfy_model.KontextNativeFlux):
    """KontextNativeFlux whose memory estimate includes dequantizing the largest layer at use."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type=model_type, device=device)
        self.gguf_largest_numel = 0  # elements of the largest weight layer (set by the loader)
        self.gguf_patched = False  # a LoRA was added to a clone: reserve float32 patch buffers too
        setattr(self, LIVE_PATCHES_ATTR, {})

    def compute_dtype(self) -> torch.dtype:
        return self.manual_cast_dtype or self.get_dtype()

    def gguf_reserve_bytes(self) -> int:
        return gguf_logic.dequant_reserve_bytes(self.gguf_largest_numel, self.compute_dtype(), self.gguf_patched)

    def memory_required(self, input_shape, cond_shapes={}):
        return super().memory_required(input_shape, cond_shapes=cond_shapes) + self.gguf_reserve_bytes()


class KontextNativeGGUFConfig(comfy_model.KontextNativeConfig):
    def get_model(self, state_dict=None, prefix="", device=None):
        kind = comfy.model_base.ModelType.FLUX if self.params.guidance_embed else comfy.model_base.ModelType.FLOW
        return KontextNativeGGUFFlux(self, model_type=kind, device=device)


# ------------------------------------------------------------------------------------------------ patcher

def _live(model) -> dict:
    reg = getattr(model, LIVE_PATCHES_ATTR, None)
    if reg is None:
        reg = {}
        setattr(model, LIVE_PATCHES_ATTR, reg)
    return reg


def _detach_live(model, key: str) -> None:
    entry = _live(model).pop(key, None)
    if entry is None:
        return
    layer, patch = entry
    for name in ("weight_patches", "bias_patches"):
        setattr(layer, name, [p for p in getattr(layer, name) if p is not patch])


def _attach_live(model, layer, key: str, patch: LivePatch) -> None:
    _detach_live(model, key)
    (layer.weight_patches if key.endswith(".weight") else layer.bias_patches).append(patch)
    _live(model)[key] = (layer, patch)


class GGUFModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher that patches GGUF layers at use instead of writing dense weights (see module docs).

    `clone()` builds `self.__class__`, so LoRA loaders and every other node that clones keep this class.
    """

    def gguf_layer(self, key: str):
        """Our GGUF Linear holding `key` ('<module>.weight' / '.bias'), or None."""
        mod_name, _, attr = key.rpartition(".")
        if attr not in ("weight", "bias") or not mod_name:
            return None
        try:
            mod = comfy.utils.get_attr(self.model, mod_name)
        except AttributeError:
            return None
        return mod if isinstance(mod, GGUFComfyOps.Linear) else None

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        added = super().add_patches(patches, strength_patch=strength_patch, strength_model=strength_model)
        if any(self.gguf_layer(k if isinstance(k, str) else k[0]) is not None for k in added):
            self.model.gguf_patched = True
        return added

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        layer = self.gguf_layer(key)
        if layer is None:  # loose parameters (norm scales): ComfyUI's dense path is right for them
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)
        _attach_live(self.model, layer, key, LivePatch(key, self.patches[key]))

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for key in list(_live(self.model)):
                _detach_live(self.model, key)
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

    def partially_unload(self, device_to, memory_to_free=0):
        freed = super().partially_unload(device_to, memory_to_free=memory_to_free)
        # Layers moved out now carry ComfyUI's LowVramPatch; drop the LivePatch they had while loaded.
        for key, (layer, _) in list(_live(self.model).items()):
            if getattr(layer, "comfy_patched_weights", None) is False:
                _detach_live(self.model, key)
        return freed

    def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
        if key in combined_patches and self.gguf_layer(key) is not None:
            raise InputError(f"'{key}' is GGUF-quantized: hook/scheduled LoRAs (Create Hook LoRA, Set Model Hooks) "
                             "would need dense weights. Apply the LoRA with LoraLoaderModelOnly instead.")
        return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights, memory_counter)


# ---------------------------------------------------------------------------------------------- loading

def gguf_file_choices() -> list[str]:
    comfy_model.register_model_folders()
    return gguf_logic.gguf_choices(folder_paths.get_filename_list(comfy_model.GGUF_FOLDER_KEY))


def gguf_file_problem(name: str) -> str | None:
    """None when the GGUF loader's choice is a file in the GGUF folders, else what to do about it."""
    comfy_model.register_model_folders()
    if folder_paths.get_full_path(comfy_model.GGUF_FOLDER_KEY, name) is not None:
        return None
    return model_sources.missing_file_message(name, "gguf", "models/diffusion_models (or models/unet)",
                                              folder_paths.get_folder_paths(comfy_model.GGUF_FOLDER_KEY),
                                              gguf_file_choices())


def resolve_gguf_choice(name: str) -> str:
    comfy_model.register_model_folders()
    return folder_paths.get_full_path_or_raise(comfy_model.GGUF_FOLDER_KEY, name)


def load_gguf_model(path, compute_dtype: str = "default") -> GGUFModelPatcher:
    """A FLUX.1 Kontext GGUF as a MODEL: quantized tensors stay quantized (memory-mapped), float tensors stay
    as stored, every layer dequantizes / casts at use to the compute dtype."""
    ckpt = gguf_logic.read_gguf_checkpoint(path)
    supported = comfy_model.KontextNativeConfig.supported_inference_dtypes
    n_params = gguf_logic.logical_param_count(ckpt.tensors)
    dtype = gguf_logic.choose_compute_dtype(
        compute_dtype, lambda: mm.unet_dtype(model_params=n_params, supported_dtypes=supported))
    patcher = comfy_model.load_transformer_model(
        ckpt.source, checkpoint=ckpt, operations=GGUFComfyOps, unet_dtype=dtype, keep_stored=True,
        config_class=KontextNativeGGUFConfig, patcher_class=GGUFModelPatcher)
    model = patcher.model
    layers = [m for m in model.diffusion_model.modules() if isinstance(m, GGUFComfyOps.Linear)]
    model.gguf_largest_numel = max((gguf_logic.logical_numel(m.weight) for m in layers), default=0)
    log.info("Kontext native GGUF: %s (%s), %.1f MB stored, compute %s, %.1f MB reserved to dequantize a layer",
             ckpt.source, gguf_logic.quant_summary(ckpt.qtypes), patcher.model_size() / 2**20,
             model.compute_dtype(), model.gguf_reserve_bytes() / 2**20)
    return patcher
