"""Seeded tiny reference models (diffusers) and writers for the real checkpoint layouts.

The BFL writer below is written independently of `kontext_core.weights.flux_layout` on purpose: a file the
tests write in BFL layout must not depend on the converter whose correctness the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# A tiny FLUX: hidden 64 = 4 heads x 16, RoPE axes (4, 6, 6), 2 double + 2 single blocks.
TINY = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_AXES = (4, 6, 6)


def tiny_diffusers_transformer(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    model = FluxTransformer2DModel(**cfg).eval()
    # Default init leaves norms at 1 and some projections at 0 (AdaLN-zero); randomise everything so that
    # every weight matters for the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5) if p.ndim > 1 else 0.05 * torch.randn_like(p))
    return model


def diffusers_sd_to_bfl(sd: dict) -> dict:
    """Independent diffusers -> BFL conversion used only to write test files."""
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    out = {}
    simple = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    }
    for a, b in simple.items():
        for s in ("weight", "bias"):
            if f"{a}.{s}" in sd:
                out[f"{b}.{s}"] = sd[f"{a}.{s}"]
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(n_double):
        p, q = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{q}.img_attn.qkv.{s}"] = torch.cat([sd[f"{p}.attn.to_{x}.{s}"] for x in "qkv"])
            out[f"{q}.txt_attn.qkv.{s}"] = torch.cat([sd[f"{p}.attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[f"{q}.img_attn.proj.{s}"] = sd[f"{p}.attn.to_out.0.{s}"]
            out[f"{q}.txt_attn.proj.{s}"] = sd[f"{p}.attn.to_add_out.{s}"]
            out[f"{q}.img_mod.lin.{s}"] = sd[f"{p}.norm1.linear.{s}"]
            out[f"{q}.txt_mod.lin.{s}"] = sd[f"{p}.norm1_context.linear.{s}"]
            out[f"{q}.img_mlp.0.{s}"] = sd[f"{p}.ff.net.0.proj.{s}"]
            out[f"{q}.img_mlp.2.{s}"] = sd[f"{p}.ff.net.2.{s}"]
            out[f"{q}.txt_mlp.0.{s}"] = sd[f"{p}.ff_context.net.0.proj.{s}"]
            out[f"{q}.txt_mlp.2.{s}"] = sd[f"{p}.ff_context.net.2.{s}"]
        out[f"{q}.img_attn.norm.query_norm.scale"] = sd[f"{p}.attn.norm_q.weight"]
        out[f"{q}.img_attn.norm.key_norm.scale"] = sd[f"{p}.attn.norm_k.weight"]
        out[f"{q}.txt_attn.norm.query_norm.scale"] = sd[f"{p}.attn.norm_added_q.weight"]
        out[f"{q}.txt_attn.norm.key_norm.scale"] = sd[f"{p}.attn.norm_added_k.weight"]
    n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for i in range(n_single):
        p, q = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{q}.linear1.{s}"] = torch.cat([sd[f"{p}.attn.to_{x}.{s}"] for x in "qkv"] + [sd[f"{p}.proj_mlp.{s}"]])
            out[f"{q}.linear2.{s}"] = sd[f"{p}.proj_out.{s}"]
            out[f"{q}.modulation.lin.{s}"] = sd[f"{p}.norm.linear.{s}"]
        out[f"{q}.norm.query_norm.scale"] = sd[f"{p}.attn.norm_q.weight"]
        out[f"{q}.norm.key_norm.scale"] = sd[f"{p}.attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def write_bfl(model, path: Path, dtype=None) -> Path:
    sd = diffusers_sd_to_bfl(model.state_dict())
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, str(path))
    return path


def write_comfy(model, path: Path, bundle_vae: bool = True) -> Path:
    """ComfyUI-saved checkpoint: `model.diffusion_model.` prefix, optionally bundling other components."""
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusers_sd_to_bfl(model.state_dict()).items()}
    if bundle_vae:
        sd["vae.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
        sd["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(8, 4)
    save_file(sd, str(path))
    return path


def write_diffusers(model, folder: Path, shards: int = 1) -> Path:
    """A diffusers pipeline-style folder (`transformer/`), optionally sharded with an index json."""
    tdir = folder / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    (tdir / "config.json").write_text(json.dumps(dict(model.config)))
    if shards == 1:
        save_file(sd, str(tdir / "diffusion_pytorch_model.safetensors"))
        return folder
    keys = sorted(sd)
    wm = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k] for k in part}, str(tdir / name))
        wm.update({k: name for k in part})
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return folder


# --- Kontext token layout written from the published description, independent of kontext_core.tokens ---

def independent_pack(x):
    """Packing written from the published layout, independent of kontext_core.tokens."""
    b, c, h, w = x.shape
    x = F.pad(x, (0, w % 2, 0, h % 2), mode="circular")
    H, W = x.shape[-2] // 2, x.shape[-1] // 2
    return x.view(b, c, H, 2, W, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, H * W, c * 4)


def independent_ids(h, w, index=0, r0=0, c0=0):
    H, W = (h + 1) // 2, (w + 1) // 2
    rows = torch.arange(H).repeat_interleave(W) + r0
    cols = torch.arange(W).repeat(H) + c0
    return torch.stack([torch.full_like(rows, index), rows, cols], -1).float()


def diffusers_velocity(model, x, refs_with_ids, txt, y, t, g):
    img = torch.cat([independent_pack(x)] + [independent_pack(r.expand(x.shape[0], -1, -1, -1)) for r, _ in refs_with_ids], 1)
    ids = torch.cat([independent_ids(*x.shape[-2:])] + [i for _, i in refs_with_ids], 0)
    with torch.no_grad():
        out = model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                    img_ids=ids, txt_ids=torch.zeros(txt.shape[1], 3), guidance=g).sample
    n = independent_pack(x).shape[1]
    H, W = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
    lat = out[:, :n].reshape(x.shape[0], H, W, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape[0], 16, 2 * H, 2 * W)
    return lat[..., : x.shape[-2], : x.shape[-1]]
