"""Parity of kontext_core's FLUX AE with diffusers' AutoencoderKL on a seeded tiny Flux-style VAE.

The tiny VAE is saved in the three layouts users have (diffusers `vae/` folder, BFL/LDM `ae.safetensors`, a
bundled checkpoint with the AE under `vae.`), each file is loaded through `load_autoencoder`, and encode /
decode are compared with diffusers on square, non-square and odd (not a multiple of 8) sizes.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.weights.ae_layout import load_autoencoder

diffusers = pytest.importorskip("diffusers")

SCALE, SHIFT = 0.3611, 0.1159
SIZES = [(2, 64, 64), (1, 72, 56), (1, 50, 38)]  # (batch, H, W); 50x38 is odd and not a multiple of 8

# fp32 on both sides with the same op order; differences come only from kernel choices (diffusers runs the
# attention projections as Linear on (B, HW, C), we run them as 1x1 convs; GroupNorm / SDPA reductions may
# be blocked differently). The attention's ~1 ulp difference is amplified by the random decoder: measured
# encode <= ~5e-7, decode <= ~3e-6 on outputs of magnitude ~1, so 1e-5 still fails on any real mistake (a wrong
# key, a swapped level or a missing shortcut gives differences of order 0.1-1; see the last test).
FP32_TOL = 1e-5
# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); rounding accumulates through ~30 layers, so we
# allow 5% of the reference's max magnitude (measured ~1-2%).
BF16_REL_TOL = 0.05


def tiny_flux_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=16, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SCALE, shift_factor=SHIFT,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:  # GroupNorm affine params: move them off 1 / 0 so a mix-up shows
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        # A trained AE decodes to about [-1, 1]; this random one reaches ~3-5. Scale its last conv so outputs
        # have the real range and an absolute tolerance means the same as it would on the real model.
        vae.decoder.conv_out.weight.mul_(0.3)
        vae.decoder.conv_out.bias.mul_(0.3)
    return vae


def _ldm_from_diffusers_independent(sd: dict, levels: int) -> dict:
    """diffusers -> LDM names, written separately from the engine's converter so the LDM file does not
    depend on the code under test."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, t in sd.items():
        t = t.detach().clone().contiguous()
        parts = key.split(".")
        side = parts[0]
        rest = ".".join(parts[1:])
        if rest.startswith(("down_blocks", "up_blocks")):
            idx = int(parts[2])
            if side == "decoder":
                idx = levels - 1 - idx
            group = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                name = "nin_shortcut" if parts[5] == "conv_shortcut" else parts[5]
                new = f"{side}.{group}.{idx}.block.{parts[4]}.{name}.{parts[6]}"
            else:
                new = f"{side}.{group}.{idx}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
        elif rest.startswith("mid_block.resnets"):
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{parts[4]}.{parts[5]}"
        elif rest.startswith("mid_block.attentions"):
            inner = ".".join(parts[4:-1])
            new = f"{side}.mid.attn_1.{attn[inner]}.{parts[-1]}"
            if t.ndim == 2:
                t = t[:, :, None, None].contiguous()
        else:
            new = f"{side}.{'norm_out' if parts[1] == 'conv_norm_out' else parts[1]}.{parts[2]}"
        out[new] = t
    return out


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    vae = tiny_flux_vae()
    vae.save_pretrained(root / "pipe" / "vae", safe_serialization=True)
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    sd = vae.state_dict()
    ldm = _ldm_from_diffusers_independent(sd, levels=4)
    save_file(ldm, str(root / "ae.safetensors"))
    bundle = {f"vae.{k}": v for k, v in ldm.items()}
    bundle["model.diffusion_model.x"] = torch.zeros(3)
    bundle["text_encoders.clip_l.junk"] = torch.zeros(2)
    save_file(bundle, str(root / "bundle.safetensors"))
    return vae, {
        "diffusers_vae_folder": root / "pipe" / "vae",
        "diffusers_pipeline_root": root / "pipe",
        "ldm_ae": root / "ae.safetensors",
        "comfy_bundle": root / "bundle.safetensors",
    }


def _reference(vae, x: torch.Tensor, z: torch.Tensor):
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        lat = (mean - SHIFT) * SCALE
        img = vae.decode(z / SCALE + SHIFT).sample
    return lat, img


def _inputs(b, h, w):
    g = torch.Generator().manual_seed(h * 1000 + w)
    x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    z = torch.randn(b, 16, h // 8, w // 8, generator=g)
    return x, z


@pytest.mark.parametrize("layout", ["diffusers_vae_folder", "diffusers_pipeline_root", "ldm_ae", "comfy_bundle"])
def test_fp32_parity(vae_files, layout):
    vae, files = vae_files
    ae = load_autoencoder(files[layout])
    assert ae.dtype == torch.float32 and not ae.training
    assert ae.scale_factor == pytest.approx(SCALE) and ae.shift_factor == pytest.approx(SHIFT)
    for b, h, w in SIZES:
        x, z = _inputs(b, h, w)
        ref_lat, ref_img = _reference(vae, x, z)
        with torch.no_grad():
            lat = ae.encode(x)
            img = ae.decode(z)
        assert lat.shape == ref_lat.shape == (b, 16, h // 8, w // 8)
        assert img.shape == ref_img.shape == (b, 3, (h // 8) * 8, (w // 8) * 8)
        d_enc = (lat - ref_lat).abs().max().item()
        d_dec = (img - ref_img).abs().max().item()
        print(f"[{layout} {b}x{h}x{w}] encode max|d|={d_enc:.3g} (ref max {ref_lat.abs().max():.3g}) "
              f"decode max|d|={d_dec:.3g} (ref max {ref_img.abs().max():.3g})")
        assert d_enc <= FP32_TOL
        assert d_dec <= FP32_TOL


def test_bf16_close_to_fp32_reference(vae_files):
    vae, files = vae_files
    ae = load_autoencoder(files["ldm_ae"], dtype=torch.bfloat16)
    assert ae.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in ae.parameters())
    for b, h, w in SIZES:
        x, z = _inputs(b, h, w)
        ref_lat, ref_img = _reference(vae, x, z)
        with torch.no_grad():
            lat = ae.encode(x)  # fp32 input is cast to bf16
            img = ae.decode(z)
        assert lat.dtype == img.dtype == torch.bfloat16
        r_enc = ((lat.float() - ref_lat).abs().max() / ref_lat.abs().max()).item()
        r_dec = ((img.float() - ref_img).abs().max() / ref_img.abs().max()).item()
        print(f"[bf16 {b}x{h}x{w}] encode max|d|/max|ref|={r_enc:.3g} decode={r_dec:.3g}")
        assert r_enc <= BF16_REL_TOL
        assert r_dec <= BF16_REL_TOL


def test_parity_detects_a_wrong_weight(vae_files):
    """The comparison is sensitive: perturbing one GroupNorm bias deep in the decoder breaks parity."""
    vae, files = vae_files
    ae = load_autoencoder(files["ldm_ae"])
    x, z = _inputs(1, 64, 64)
    _, ref_img = _reference(vae, x, z)
    with torch.no_grad():
        ae.decoder.up[0].block[2].norm2.bias.add_(0.05)
        d = (ae.decode(z) - ref_img).abs().max().item()
    print(f"[perturbed] decode max|d|={d:.3g}")
    assert d > 100 * FP32_TOL
