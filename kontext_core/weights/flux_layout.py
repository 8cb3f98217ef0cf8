"""Transformer checkpoint layouts: detection, prefix stripping, diffusers -> BFL keys, architecture from shapes.

The engine's canonical layout is BFL's (`double_blocks.0.img_attn.qkv.weight` …). Detection looks only at keys
and shapes, never at file names.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..model.flux import FluxParams

# Prefixes under which the transformer appears in files people download.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")

# Keys that identify other model types, for a helpful "wrong file" message. Diffusion models come first: a full
# SD checkpoint also bundles a VAE and text encoders, and is a UNet checkpoint, not "an autoencoder".
_OTHER_MODELS = [
    ("input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x/XL checkpoint (UNet; a bundled VAE or text encoder "
                                "does not make it a FLUX model), not a FLUX transformer"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 MMDiT, not a FLUX transformer"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder — load it with a CLIP/text-encoder loader"),
    ("text_model.embeddings.token_embedding.weight", "a CLIP text encoder — load it with a CLIP/text-encoder loader"),
    ("encoder.conv_in.weight", "an autoencoder (VAE) — load it with the VAE loader"),
    ("decoder.conv_in.weight", "an autoencoder (VAE) — load it with the VAE loader"),
]

# FLUX.1 family members by the width of img_in: the DiT sees 2x2 patches of latents, so 64 inputs are the
# 16 latent channels alone; the conditioning variants concatenate more channels to them.
KONTEXT_IN_CHANNELS = 64
_FLUX_VARIANTS = {
    384: "a FLUX.1 Fill (inpainting/outpainting) transformer: img_in takes 384 inputs (latent + masked image + "
         "mask)",
    128: "a FLUX.1 Depth or Canny (structural control) transformer: img_in takes 128 inputs (latent + control "
         "image latent)",
}


def check_flux_family(params: FluxParams, source: str) -> None:
    """Refuse FLUX-family transformers the Kontext sampler cannot drive: any Flux whose img_in and final layer
    work on 64 channels (16 latent channels x 2x2) is accepted, whatever its size."""
    if params.in_channels == KONTEXT_IN_CHANNELS and params.out_channels == KONTEXT_IN_CHANNELS:
        return
    what = _FLUX_VARIANTS.get(params.in_channels) or (
        f"a FLUX-style transformer with {params.in_channels} input and {params.out_channels} output channels")
    raise CheckpointError(f"{source}: this file is {what}. Expected a FLUX.1 Kontext transformer (img_in and "
                          f"final_layer on {KONTEXT_IN_CHANNELS} channels = 16 latent channels x 2x2), e.g. "
                          "flux1-kontext-dev.safetensors; this sampler cannot drive it.")


def check_tensor_storage(sd: Mapping[str, Tensor], source: str) -> None:
    """Every weight non-empty and floating point (or quantized); a zero-size or integer tensor would otherwise
    divide by zero while the architecture is inferred, or fail inside the first matmul."""
    for k, t in sd.items():
        if k == "scaled_fp8":
            continue  # ComfyUI's (empty) scaled-fp8 marker
        shape = shape_of(t)
        if 0 in shape:
            raise CheckpointError(f"{source}: tensor '{k}' has zero size {list(shape)}; the file is corrupt or "
                                  "was written incompletely. Download or convert it again.")
        if type(t) is torch.Tensor and not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {str(t.dtype).replace('torch.', '')}; model "
                                  "weights are floating point (or GGUF-quantized). The file is corrupt or not a "
                                  "model checkpoint.")


def describe_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def key_mismatch(expected, found) -> str | None:
    """'N missing key(s): …; M unexpected key(s): …', or None when the key sets agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {describe_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {describe_keys(unexpected)}")
    return "; ".join(parts) or None


def strip_transformer_prefix(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Select the transformer's tensors from a bare, ComfyUI-prefixed or bundled checkpoint: (tensors, prefix)."""
    for prefix in TRANSFORMER_PREFIXES:
        if prefix + "img_in.weight" in sd or prefix + "x_embedder.weight" in sd:
            n = len(prefix)
            return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return dict(sd), ""


def detect_layout(sd: Mapping[str, Tensor]) -> str:
    """'bfl' or 'diffusers' for a prefix-stripped state dict; CheckpointError for anything else."""
    if "img_in.weight" in sd and any(k.startswith("double_blocks.") for k in sd):
        return "bfl"
    if "x_embedder.weight" in sd and any(k.startswith("transformer_blocks.") for k in sd):
        return "diffusers"
    for key, what in _OTHER_MODELS:
        if any(k.endswith(key) for k in sd):
            raise CheckpointError(f"this file is {what}. Expected a FLUX.1 Kontext transformer "
                                  "(e.g. flux1-kontext-dev.safetensors).")
    raise CheckpointError(
        "not a FLUX transformer: expected keys like 'double_blocks.0.img_attn.qkv.weight' (BFL / ComfyUI) or "
        f"'transformer_blocks.0.attn.to_q.weight' (diffusers); found {describe_keys(sd.keys())}.")


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# diffusers module -> BFL module (also used to map diffusers LoRA keys)
DIFFUSERS_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
DIFFUSERS_DOUBLE_BLOCK = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}


def diffusers_to_bfl(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a diffusers `FluxTransformer2DModel` state dict to BFL keys (fusing q/k/v as BFL stores them)."""
    src = dict(sd)
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        try:
            return src.pop(key)
        except KeyError:
            raise CheckpointError(f"diffusers transformer is missing '{key}'") from None

    def fuse(dst: str, parts: list[str]):
        for suffix in ("weight", "bias"):
            keys = [f"{p}.{suffix}" for p in parts]
            present = [k in src for k in keys]
            if all(present):
                out[f"{dst}.{suffix}"] = torch.cat([take(k) for k in keys], dim=0)
            elif any(present):
                raise CheckpointError(f"diffusers transformer has only some of {keys}")

    for d, b in DIFFUSERS_TOP_LEVEL.items():
        for suffix in ("weight", "bias"):
            if f"{d}.{suffix}" in src:
                out[f"{b}.{suffix}"] = take(f"{d}.{suffix}")
    # diffusers stores the final adaLN as (scale, shift); BFL as (shift, scale).
    for suffix in ("weight", "bias"):
        if f"norm_out.linear.{suffix}" in src:
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(take(f"norm_out.linear.{suffix}"))

    blocks = sorted({int(m.group(1)) for k in src if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in blocks:
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        fuse(d + "img_attn.qkv", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"])
        fuse(d + "txt_attn.qkv", [s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"])
        for a, b in DIFFUSERS_DOUBLE_BLOCK.items():
            for suffix in ("weight", "bias"):
                if s + f"{a}.{suffix}" in src:
                    out[d + f"{b}.{suffix}"] = take(s + f"{a}.{suffix}")
        for a, b in _DOUBLE_NORMS.items():
            out[d + b] = take(s + a)

    singles = sorted({int(m.group(1)) for k in src if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for i in singles:
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        fuse(d + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"])
        for suffix in ("weight", "bias"):
            out[d + f"linear2.{suffix}"] = take(s + f"proj_out.{suffix}")
            out[d + f"modulation.lin.{suffix}"] = take(s + f"norm.linear.{suffix}")
        out[d + "norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = take(s + "attn.norm_k.weight")

    if src:
        raise CheckpointError(f"diffusers transformer has keys this converter does not know: {describe_keys(src)}")
    return out


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE split for a head dim: FLUX's (16, 56, 56) at 128. Otherwise the same proportions: the two spatial
    axes get 7/16 of the dims each (rounded down to even), the index axis the rest."""
    spatial = 2 * ((head_dim * 7) // 32)
    return (head_dim - 2 * spatial, spatial, spatial)


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if idx and idx != set(range(max(idx) + 1)):
        missing = sorted(set(range(max(idx) + 1)) - idx)
        raise CheckpointError(f"blocks {prefix}{missing[:5]} are missing; the checkpoint is incomplete.")
    return len(idx)


def shape_of(t) -> tuple[int, ...]:
    """Logical shape of a weight (quantized tensors expose `logical_shape`)."""
    return tuple(getattr(t, "logical_shape", t.shape))


def infer_flux_params(sd: Mapping[str, Tensor], overrides: Mapping | None = None) -> FluxParams:
    """FluxParams from the shapes of a BFL-layout state dict; `overrides` wins for what shapes cannot tell."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - FluxParams.field_names()
    if unknown:
        raise CheckpointError(f"unknown FluxParams fields in override: {sorted(unknown)}; "
                              f"valid fields: {sorted(FluxParams.field_names())}")
    try:
        hidden, in_ch = shape_of(sd["img_in.weight"])
        head_dim = shape_of(sd["double_blocks.0.img_attn.norm.query_norm.scale"])[0] if "double_blocks.0.img_attn.norm.query_norm.scale" in sd \
            else shape_of(sd["single_blocks.0.norm.query_norm.scale"])[0]
        mlp_hidden = shape_of(sd["double_blocks.0.img_mlp.0.weight"])[0] if "double_blocks.0.img_mlp.0.weight" in sd \
            else shape_of(sd["single_blocks.0.linear1.weight"])[0] - 3 * hidden
        inferred = dict(
            in_channels=in_ch,
            out_channels=shape_of(sd["final_layer.linear.weight"])[0],
            vec_in_dim=shape_of(sd["vector_in.in_layer.weight"])[1],
            context_in_dim=shape_of(sd["txt_in.weight"])[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=_count(sd, "double_blocks."),
            depth_single_blocks=_count(sd, "single_blocks."),
            axes_dim=default_axes_dim(head_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )
    except KeyError as e:
        raise CheckpointError(f"FLUX transformer is missing {e.args[0]!r}; the checkpoint is incomplete or "
                              "not a FLUX model.") from None
    inferred.update(overrides)
    try:
        return FluxParams(**inferred)
    except ValueError as e:
        raise CheckpointError(f"inconsistent architecture: {e}. Pass a config override (e.g. axes_dim).") from e


def to_bfl(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Any supported transformer state dict -> (BFL-layout dict, layout name: 'bfl', 'comfyui' for BFL keys
    under ComfyUI's `model.diffusion_model.` prefix, 'bfl+<prefix>' for other prefixes, or 'diffusers')."""
    sd, prefix = strip_transformer_prefix(sd)
    layout = detect_layout(sd)
    if layout == "diffusers":
        return diffusers_to_bfl(sd), layout
    if prefix:
        layout = "comfyui" if prefix == "model.diffusion_model." else f"bfl+{prefix}"
    return sd, layout
