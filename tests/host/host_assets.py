"""Tiny weights, conditionings and images in real layouts, written into a ComfyUI `--base-directory`.

Runs in the pytest interpreter (it has diffusers). Sizes are chosen so a whole workflow takes seconds on CPU:
the transformer is tests/tiny_models.py's 2+2-block FLUX (hidden 64, T5 width 32, pooled 24), also as GGUF files
converted by the engine (write_gguf_assets, with broken ones for the error paths); images are 32-48 px.
The autoencoder must be full width: this ComfyUI's VAE loader hard-codes ch=128 / ch_mult (1,2,4,4) for LDM
files (only z_channels is read from the weights), so a narrower AE would not load. It is the FLUX AE
architecture with random weights (84M parameters, bf16 on disk), converted to BFL's LDM key names.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from kontext_core.conditioning import save_embeddings
from kontext_core.weights.ae_layout import convert_diffusers_vae_to_ldm
from tiny_models import TINY, tiny_diffusers_transformer, write_bfl, write_comfy, write_diffusers

CONTEXT_DIM = TINY["joint_attention_dim"]  # 32: the tiny model's T5 width
POOLED_DIM = TINY["pooled_projection_dim"]  # 24: the tiny model's CLIP pooled width
TEXT_TOKENS = 8

MODEL_BFL = "kontext_tiny_bfl.safetensors"
MODEL_COMFY = "kontext_tiny_comfy.safetensors"
MODEL_FP8 = "kontext_tiny_fp8.safetensors"
MODEL_DIFFUSERS = "kontext_tiny_diffusers/"
MODEL_SCALED_FP8 = "kontext_tiny_scaled_fp8.safetensors"
NOT_A_TRANSFORMER = "not_a_transformer.safetensors"
VAE_NAME = "ae.safetensors"
LORA_NAME = "kontext_tiny_lora.safetensors"
COND_FILES = [f"tiny_prompt_{i}.safetensors" for i in range(3)]
# GGUF quantizations of MODEL_BFL, made with the engine's converter. Row lengths of the tiny model are 64-320:
# Q8_0 (blocks of 32) quantizes every block weight; Q4_K_M (blocks of 256) quantizes the MLP down projections
# (in_features 256) to Q4_K and keeps the rest F16/F32, as the converter's policy says.
MODEL_GGUF_Q8 = "kontext_tiny_Q8_0.gguf"
MODEL_GGUF_Q4KM = "kontext_tiny_Q4_K_M.gguf"
BAD_GGUF = {"truncated": "kontext_tiny_truncated.gguf", "not_flux": "t5_encoder_Q8_0.gguf",
            "unsupported": "kontext_tiny_TQ1_0.gguf", "renamed": "renamed_safetensors.gguf"}
# A LoRA touching Q8_0 / Q4_K / F16-stored GGUF layers (the MLP down projection is Q4_K in the Q4_K_M file).
GGUF_LORA_NAME = "kontext_tiny_gguf_lora.safetensors"
GGUF_LORA_KEYS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.2", "double_blocks.1.txt_mlp.2",
                  "single_blocks.0.linear1", "single_blocks.1.linear2", "final_layer.linear")
IMAGES = {"example.png": (32, 32), "scene.png": (48, 32), "character.png": (32, 48)}  # (width, height)


@dataclass
class HostAssets:
    base: Path
    models: Path
    model_files: dict = field(default_factory=dict)
    cond_files: list = field(default_factory=list)


def tiny_ae_ldm(seed: int = 0) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                       use_post_quant_conv=False).eval()
    sd = convert_diffusers_vae_to_ldm(ae.state_dict())
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}


def write_scaled_fp8(model, path: Path) -> None:
    """ComfyUI's scaled-fp8 layout: fp8 weights with a per-layer `scale_weight`, a `scaled_fp8` marker, and
    the other tensors in bf16 (as the files people download are)."""
    from tiny_models import diffusers_sd_to_bfl

    sd = diffusers_sd_to_bfl(model.state_dict())
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max().float() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.bfloat16)
    save_file(out, str(path))


def write_gguf_assets(dm: Path, loras: Path, g: torch.Generator) -> None:
    """Tiny GGUF files (good and bad) in diffusion_models, and a LoRA for them."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    from kontext_core.weights.gguf_convert import convert_to_gguf
    from kontext_core.weights.gguf_file import write_gguf

    convert_to_gguf(dm / MODEL_BFL, dm / MODEL_GGUF_Q8, "Q8_0")
    convert_to_gguf(dm / MODEL_BFL, dm / MODEL_GGUF_Q4KM, "Q4_K_M")
    data = (dm / MODEL_GGUF_Q8).read_bytes()
    (dm / BAD_GGUF["truncated"]).write_bytes(data[:len(data) * 2 // 3])  # an interrupted download
    write_gguf(dm / BAD_GGUF["not_flux"], [("enc.blk.0.attn_q.weight", np.ones((64, 64), np.float32), QT.Q8_0,
                                            (64, 64))], arch="t5")
    w = gguf.GGUFWriter(dm / BAD_GGUF["unsupported"], "flux")  # a ternary type the engine cannot decode
    w.add_tensor("img_in.weight", np.zeros((2, 54), np.uint8), raw_shape=(2, 54), raw_dtype=QT.TQ1_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shutil.copy(dm / MODEL_BFL, dm / BAD_GGUF["renamed"])
    bfl = load_file(str(dm / MODEL_BFL))
    lora = {}
    for key in GGUF_LORA_KEYS:
        out_f, in_f = bfl[key + ".weight"].shape
        lora[f"diffusion_model.{key}.lora_down.weight"] = 0.3 * torch.randn(4, in_f, generator=g)
        lora[f"diffusion_model.{key}.lora_up.weight"] = 0.3 * torch.randn(out_f, 4, generator=g)
        lora[f"diffusion_model.{key}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(loras / GGUF_LORA_NAME))


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), rng.integers(0, 256, (h, w))], -1)
    Image.fromarray(img.astype(np.uint8)).save(path)


def write_host_assets(base: Path, repo_root: Path) -> HostAssets:
    """A ComfyUI base directory: custom_nodes/<pack> -> repo, tiny models, a LoRA, conditionings, images."""
    for sub in ("custom_nodes", "models/diffusion_models", "models/vae", "models/loras", "models/kontext_conditioning", "input",
                "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui-kontext-native"
    if not link.exists():
        link.symlink_to(repo_root, target_is_directory=True)
    dm = base / "models" / "diffusion_models"
    model = tiny_diffusers_transformer(seed=0)
    write_bfl(model, dm / MODEL_BFL)
    write_comfy(model, dm / MODEL_COMFY)
    write_bfl(model, dm / MODEL_FP8, dtype=torch.float8_e4m3fn)
    write_diffusers(model, dm / MODEL_DIFFUSERS.rstrip("/"))
    write_scaled_fp8(model, dm / MODEL_SCALED_FP8)

    ae = tiny_ae_ldm()
    save_file(ae, str(base / "models" / "vae" / VAE_NAME))
    shutil.copy(base / "models" / "vae" / VAE_NAME, dm / NOT_A_TRANSFORMER)  # wrong model type for the loader

    g = torch.Generator().manual_seed(1234)
    # A LoRA in the generic BFL-key format ComfyUI's LoRA loader maps onto any model's own parameter names.
    lora = {}
    bfl = load_file(str(dm / MODEL_BFL))
    for key in ("double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0", "single_blocks.0.linear1",
                "single_blocks.1.linear2", "final_layer.linear"):
        out_f, in_f = bfl[key + ".weight"].shape
        lora[f"diffusion_model.{key}.lora_down.weight"] = 0.3 * torch.randn(4, in_f, generator=g)
        lora[f"diffusion_model.{key}.lora_up.weight"] = 0.3 * torch.randn(out_f, 4, generator=g)
        lora[f"diffusion_model.{key}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(base / "models" / "loras" / LORA_NAME))
    write_gguf_assets(dm, base / "models" / "loras", torch.Generator().manual_seed(99))
    conds = []
    for i, name in enumerate(COND_FILES):
        t5 = torch.randn(1, TEXT_TOKENS, CONTEXT_DIM, generator=g)
        pooled = torch.randn(1, POOLED_DIM, generator=g)
        save_embeddings(base / "models" / "kontext_conditioning" / name, t5, pooled, None)
        conds.append(name)

    for i, (name, size) in enumerate(IMAGES.items()):
        write_image(base / "input" / name, size, seed=i)
    return HostAssets(base, base / "models",
                      {"bfl": MODEL_BFL, "comfy": MODEL_COMFY, "fp8": MODEL_FP8, "diffusers": MODEL_DIFFUSERS,
                       "scaled_fp8": MODEL_SCALED_FP8, "gguf_q8": MODEL_GGUF_Q8, "gguf_q4km": MODEL_GGUF_Q4KM},
                      conds)
