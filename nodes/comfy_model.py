"""The engine's FLUX transformer as a ComfyUI model: the only module that knows ComfyUI's model internals.

    KontextNativeDiT     the engine's `Flux`, built from ComfyUI's `operations` (casting Linear layers that
                         `ModelPatcher` can switch to per-use casting when it loads a model partially), with
                         `forward` in ComfyUI's diffusion-model call convention and the host mechanisms core's
                         Flux honours: ComfyUI's attention function, `patches_replace["dit"]` block patches,
                         `post_input` patches, ControlNet residuals and attention masks (see `host_hooks`).
    KontextNativeFlux    a `comfy.model_base.Flux` whose diffusion model is KontextNativeDiT: ComfyUI's own
                         conditioning (pooled output, guidance, `reference_latents` -> `ref_latents`), latent
                         format and flow-matching sampling apply, so core KSampler / ReferenceLatent /
                         FluxGuidance / LoRA loaders work with it.
    KontextNativeConfig  the model config (modelled on `supported_models.Flux`) with the engine's FluxParams
                         fields as unet_config.

`load_transformer_model` reads any checkpoint the engine reads and returns a `ModelPatcher`; `operations`
lets a quantized loader (GGUF) plug in its own layer classes.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.latent_formats
import comfy.ldm.flux.math
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import folder_paths

from kontext_core.errors import CheckpointError
from kontext_core.model.flux import Flux as EngineFlux
from kontext_core.model.flux import FluxParams, ForwardHooks
from kontext_core.weights.loader import Checkpoint

from . import logic, model_sources

log = logging.getLogger("kontext_native")

GGUF_FOLDER_KEY = "unet_gguf"  # the key ComfyUI-GGUF uses too, so both packs list the same files
CONDITIONING_FOLDER_KEY = "kontext_conditioning"
DIFFUSERS_FOLDER_KEYS = ("diffusion_models", "diffusers")


# ------------------------------------------------------------------------------------------------- the model

class KontextNativeDiT(EngineFlux):
    """The engine's Flux with ComfyUI's diffusion-model call convention.

    BaseModel builds it as `unet_model(**unet_config, device=..., operations=...)`; unet_config holds the
    FluxParams fields plus ComfyUI's `dtype`.
    """

    def __init__(self, image_model=None, dtype=None, device=None, operations=None, **config):
        names = FluxParams.field_names()
        params = FluxParams(**{k: v for k, v in config.items() if k in names})
        super().__init__(params, operations=operations or comfy.ops.disable_weight_init, dtype=dtype, device=device)
        self.dtype = dtype
        self.patch_size = 2  # read by comfy.model_base.Flux (concat_cond, attention masks)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward_comfy, self, wrappers).execute(
            x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _forward_comfy(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                       transformer_options={}, **kwargs):
        if y is None:
            y = torch.zeros(x.shape[0], self.params.vec_in_dim, device=x.device, dtype=x.dtype)
        layout = logic.normalize_layout(kwargs.get("ref_latents_method", "offset"))
        refs = list(ref_latents) if ref_latents is not None else []
        hooks = host_hooks(transformer_options, control, kwargs.get("attention_mask"))
        return self.forward_latent(x, timestep, context, y[:, :self.params.vec_in_dim], guidance, refs, layout,
                                   hooks=hooks)


# ------------------------------------------------------------------------------------ host mechanisms, per call

def host_attention(transformer_options: dict, mask=None):
    """The engine's attention hook calling the function core's Flux calls, as core calls it: whatever
    `--use-sage-attention` / `--use-flash-attention` / xformers / PyTorch chose at start-up or a pack patched in
    since, with `transformer_options` so `optimized_attention_override` applies. Looked up per forward, not
    at import, so later patches are seen."""
    fn = getattr(comfy.ldm.flux.math, "optimized_attention", None) or comfy.ldm.modules.attention.optimized_attention

    def attn(q, k, v):
        return fn(q, k, v, q.shape[1], skip_reshape=True, mask=mask, transformer_options=transformer_options)
    return attn


def host_hooks(transformer_options: dict, control=None, attn_mask=None) -> ForwardHooks:
    """ForwardHooks with core Flux's semantics for this call. Only what the call uses is installed, so a plain
    call runs the engine's own block loop.

    - `patches_replace["dit"][("double_block", i)]` / `[("single_block", i)]`: called with core's args dict
      ({"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}; single blocks get the joint tokens as
      "img") and {"original_block": ...}; they return {"img", "txt"} / {"img"}. "pe" is the engine's RoPE
      tensor (complex), which patches pass on to the original block.
    - `patches["post_input"]`: each gets and returns {"img", "txt", "img_ids", "txt_ids"} after the input layers.
    - ControlNet: control["input"][i] is added to the first image tokens after double block i,
      control["output"][i] to the image tokens after single block i (after any patch of that block).
    """
    patches = transformer_options.get("patches", {})
    replace = transformer_options.get("patches_replace", {}).get("dit", {})
    post = patches.get("post_input") or []
    c_in = (control or {}).get("input") or ()
    c_out = (control or {}).get("output") or ()
    attn_fn = host_attention(transformer_options, attn_mask)
    hooks = ForwardHooks(attn_fn=attn_fn)
    if post:
        def post_input(img, txt, img_ids, txt_ids):
            for p in post:
                out = p({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids})
                img, txt, img_ids, txt_ids = out["img"], out["txt"], out["img_ids"], out["txt_ids"]
            return img, txt, img_ids, txt_ids
        hooks.post_input = post_input

    def args_attention(args):
        return host_attention(args.get("transformer_options") or transformer_options, args.get("attn_mask"))

    if c_in or any(k[0] == "double_block" for k in replace):
        def double_block(i, run, img, txt, vec, pe):
            patch = replace.get(("double_block", i))
            if patch is None:
                img, txt = run(img, txt, vec, pe)
            else:
                def original(args):
                    o_img, o_txt = run(args["img"], args["txt"], args["vec"], args["pe"], attn_fn=args_attention(args))
                    return {"img": o_img, "txt": o_txt}
                out = patch({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                             "transformer_options": transformer_options}, {"original_block": original})
                img, txt = out["img"], out["txt"]
            add = c_in[i] if i < len(c_in) else None
            if add is not None:
                img[:, :add.shape[1]] += add
            return img, txt
        hooks.double_block = double_block

    if c_out or any(k[0] == "single_block" for k in replace):
        def single_block(i, run, x, vec, pe, n_txt):
            patch = replace.get(("single_block", i))
            if patch is None:
                x = run(x, vec, pe)
            else:
                def original(args):
                    return {"img": run(args["img"], args["vec"], args["pe"], attn_fn=args_attention(args))}
                x = patch({"img": x, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                           "transformer_options": transformer_options}, {"original_block": original})["img"]
            add = c_out[i] if i < len(c_out) else None
            if add is not None:
                x[:, n_txt:n_txt + add.shape[1]] += add
            return x
        hooks.single_block = single_block
    return hooks


class KontextNativeFlux(comfy.model_base.Flux):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=KontextNativeDiT)


class KontextNativeConfig(comfy.supported_models.Flux):
    """Like supported_models.Flux (latent format, shift 1.15, memory factor), with the engine's params.

    Not registered in ComfyUI's model detection: only our loader builds it.
    """

    unet_config = {}
    unet_extra_config = {}
    sampling_settings = {}
    latent_format = comfy.latent_formats.Flux
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, params: FluxParams):
        cfg = params.to_dict()
        cfg["axes_dim"] = list(cfg["axes_dim"])
        super().__init__(cfg)
        self.params = params
        if not params.guidance_embed:  # schnell-like models: no resolution shift
            self.sampling_settings = {"multiplier": 1.0, "shift": 1.0}

    def get_model(self, state_dict=None, prefix="", device=None):
        kind = comfy.model_base.ModelType.FLUX if self.params.guidance_embed else comfy.model_base.ModelType.FLOW
        return KontextNativeFlux(self, model_type=kind, device=device)


# ---------------------------------------------------------------------------------------------------- loading

def _fill_missing_scales(module: torch.nn.Module) -> None:
    """Scaled-fp8 layers whose file carries no scale get 1 (ComfyUI's scaled ops create them on meta)."""
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta and name in ("scale_weight", "scale_input"):
                setattr(mod, name, torch.nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False))


def load_transformer_model(source, weight_dtype: str = "default", *, operations=None, params_override=None,
                           checkpoint: Checkpoint | None = None, unet_dtype: torch.dtype | None = None,
                           keep_stored: bool = False, config_class: type | None = None,
                           patcher_class: type | None = None) -> comfy.model_patcher.ModelPatcher:
    """Any transformer the engine reads (BFL, ComfyUI-prefixed, diffusers folder; fp32/bf16/fp16/fp8) -> MODEL.

    Weights that already have the storage dtype are the file's memory-mapped pages (no copy); others are
    converted once. fp8 files stay fp8 and are cast per layer at use (ComfyUI's manual-cast ops).

    Hooks for quantized loaders (GGUF, see gguf_model.py): `unet_dtype` fixes the model dtype instead of
    choosing it from `weight_dtype`; `keep_stored` keeps every tensor as the file stores it (the layers cast at
    use); `config_class` / `patcher_class` replace KontextNativeConfig / ModelPatcher.
    """
    prep = logic.prepare_checkpoint(source, params_override, checkpoint)
    params, tensors = prep.params, prep.tensors

    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    supported = KontextNativeConfig.supported_inference_dtypes
    n_params = sum(t.numel() for t in tensors.values() if hasattr(t, "numel"))
    stored = prep.stored_dtype
    if unet_dtype is not None:
        pass
    elif prep.scaled_fp8 is not None:
        if weight_dtype != "default":
            log.warning("%s is a scaled-fp8 file: weight_dtype '%s' is ignored (the scales belong to the fp8 "
                        "weights).", prep.source, weight_dtype)
        unet_dtype = mm.unet_dtype(model_params=n_params, supported_dtypes=supported, weight_dtype=None)
    else:
        unet_dtype = logic.choose_weight_dtype(
            weight_dtype, stored,
            lambda: mm.unet_dtype(model_params=n_params, supported_dtypes=supported, weight_dtype=stored))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, supported)

    config = (config_class or KontextNativeConfig)(params)
    config.set_inference_dtype(unet_dtype, manual_cast)
    if prep.scaled_fp8 is not None:
        config.scaled_fp8 = prep.scaled_fp8
    if operations is not None:
        config.custom_operations = operations
    model = config.get_model({}, device=torch.device("meta"))
    dit = model.diffusion_model
    dit.requires_grad_(False)
    dit.source = prep.source  # named by the engine's errors about the weights (e.g. NaN results)

    sd = {}
    for k, t in tensors.items():
        dt = None if keep_stored else logic.tensor_storage_dtype(k, t, unet_dtype, manual_cast,
                                                                 scaled_fp8=prep.scaled_fp8 is not None)
        sd[k] = t if dt is None or t.dtype == dt else t.to(dt)
    missing, unexpected = dit.load_state_dict(sd, strict=False, assign=True)
    extra = ("scale_weight", "scale_input")
    missing = [k for k in missing if not k.endswith(extra)]
    unexpected = [k for k in unexpected if not k.endswith(extra)]
    if missing or unexpected:
        raise CheckpointError(f"{prep.source}: weights do not fit the model built for them (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); the file may be incomplete.")
    _fill_missing_scales(dit)
    left = [n for n, p in dit.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{prep.source}: no weights for {left[:5]}; the file is incomplete.")
    model.device = offload_device
    model.eval()
    log.info("Kontext native model: %s (%s layout), %d double + %d single blocks, weights %s, compute %s",
             prep.source, prep.layout, params.depth, params.depth_single_blocks, unet_dtype,
             manual_cast or unet_dtype)
    return (patcher_class or comfy.model_patcher.ModelPatcher)(model, load_device=load_device,
                                                               offload_device=offload_device)



# ------------------------------------------------------------------------------------------------ model files

def register_model_folders() -> None:
    """`.gguf` as its own key sharing the diffusion-model folders, and the conditioning cache folder."""
    fnp = folder_paths.folder_names_and_paths
    if GGUF_FOLDER_KEY not in fnp:
        base = fnp.get("diffusion_models", ([], set()))[0]
        fnp[GGUF_FOLDER_KEY] = (base, {".gguf"})  # the same list: folders added later are shared
    if CONDITIONING_FOLDER_KEY not in fnp:
        fnp[CONDITIONING_FOLDER_KEY] = ([os.path.join(folder_paths.models_dir, CONDITIONING_FOLDER_KEY),
                                         folder_paths.get_input_directory()], {".safetensors"})


def _folder_roots() -> list[str]:
    roots: list[str] = []
    for key in DIFFUSERS_FOLDER_KEYS:
        if key in folder_paths.folder_names_and_paths:
            roots += [p for p in folder_paths.get_folder_paths(key) if p not in roots]
    return roots


def model_file_choices() -> list[str]:
    files = folder_paths.get_filename_list("diffusion_models")
    return logic.model_choices(files, logic.find_diffusers_folders(_folder_roots()))


def model_file_problem(name: str) -> str | None:
    """None when the loader's choice resolves to a file or diffusers folder, else what to do about it."""
    if name.endswith(("/", "\\")):
        if logic.resolve_folder_choice(name, _folder_roots()) is not None:
            return None
    elif folder_paths.get_full_path("diffusion_models", name) is not None:
        return None
    return model_sources.missing_file_message(name, "model", "models/diffusion_models",
                                              folder_paths.get_folder_paths("diffusion_models"), model_file_choices())


def resolve_model_choice(name: str) -> str:
    if name.endswith(("/", "\\")):
        path = logic.resolve_folder_choice(name, _folder_roots())
        if path is None:
            raise CheckpointError(f"diffusers folder '{name}' not found in models/diffusion_models or "
                                  "models/diffusers")
        return path
    return folder_paths.get_full_path_or_raise("diffusion_models", name)


# ------------------------------------------------------------------------------------------------- the AE
class EngineAEStage(torch.nn.Module):
    """The first-stage interface core's VAE calls (encode -> unscaled latent mean, decode -> image in [-1, 1])
    over the engine's AutoEncoder. Core's own VAE builder assumes the full-size FLUX AE, so a smaller one (the
    bundled Kontext-Tiny) comes in through this."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode_moments(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode_raw(z)


def engine_vae(ae) -> "comfy.sd.VAE":
    """A core VAE object (accepted by VAEEncode / VAEDecode, loaded by ComfyUI's memory manager) around `ae`."""
    import comfy.sd

    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # an empty state dict makes core log "No VAE weights detected"
    try:
        vae = comfy.sd.VAE(sd={})
    finally:
        logging.disable(quiet)
    ae = ae.float().eval()
    vae.first_stage_model = EngineAEStage(ae).eval()
    vae.latent_channels = ae.params.z_channels
    vae.downscale_ratio = vae.upscale_ratio = ae.downscale
    per_pixel = 4 * ae.params.ch * max(ae.params.ch_mult)  # bytes of the widest activation, fp32
    vae.memory_used_encode = lambda shape, dtype: per_pixel * shape[-2] * shape[-1]
    vae.memory_used_decode = lambda shape, dtype: per_pixel * shape[-2] * shape[-1] * ae.downscale ** 2
    vae.working_dtypes = [torch.float32]
    vae.device = mm.vae_device()
    vae.vae_dtype = torch.float32
    vae.output_device = mm.intermediate_device()
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    return vae
