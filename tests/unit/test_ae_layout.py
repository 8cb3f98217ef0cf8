"""AE layout detection, key conversion, architecture inference, loading and every loader error."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.errors import CheckpointError
from kontext_core.model.autoencoder import AutoEncoder, AutoEncoderParams
from kontext_core.weights.ae_layout import (convert_diffusers_vae_to_ldm, detect_ae_layout, infer_ae_params,
                                            load_autoencoder, strip_ae_prefix)
from kontext_core.weights.safetensors_io import load_state_dict

TINY = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16)


def tiny_sd(params=TINY, dtype=torch.float32) -> dict[str, torch.Tensor]:
    ae = AutoEncoder(params)
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_(0, 0.1)
    return {k: v.to(dtype).contiguous() for k, v in ae.state_dict().items()}


# --- the module itself ---------------------------------------------------------------------------------------

def test_default_params_are_the_flux_ae():
    ae = AutoEncoder(AutoEncoderParams(), device="meta")
    sd = ae.state_dict()
    n = sum(t.numel() for t in sd.values())
    print(f"FLUX AE: {len(sd)} tensors, {n} parameters")
    assert len(sd) == 244
    assert n == 83_819_683  # 83.8M
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)  # up.0 = full resolution
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert not any("quant_conv" in k for k in sd)


def test_every_weight_layer_comes_from_operations():
    made = []

    class Ops:
        class Conv2d(torch.nn.Conv2d):
            def __init__(self, *a, **kw):
                made.append(("conv", kw.get("dtype"), kw.get("device")))
                super().__init__(*a, **kw)

        class GroupNorm(torch.nn.GroupNorm):
            def __init__(self, *a, **kw):
                made.append(("norm", kw.get("dtype"), kw.get("device")))
                super().__init__(*a, **kw)

    ae = AutoEncoder(TINY, operations=Ops, dtype=torch.bfloat16, device="meta")
    weight_modules = [m for m in ae.modules() if any(True for _ in m.parameters(recurse=False))]
    assert len(made) == len(weight_modules)
    assert all(isinstance(m, (Ops.Conv2d, Ops.GroupNorm)) for m in weight_modules)
    assert all(d == torch.bfloat16 and str(dev) == "meta" for _, d, dev in made)


@pytest.mark.parametrize("h,w", [(8, 8), (9, 13), (17, 8), (31, 40)])
def test_any_size_at_least_8(h, w):
    ae = load_autoencoder(tiny_sd())
    with torch.no_grad():
        z = ae.encode(torch.rand(1, 3, h, w) * 2 - 1)
        assert z.shape == (1, 16, h // 4, w // 4)  # TINY has 3 levels: 4x reduction
        img = ae.decode(z)
    assert img.shape == (1, 3, (h // 4) * 4, (w // 4) * 4)
    assert torch.isfinite(img).all()


# --- detection / prefixes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model.", "ae."])
def test_detect_and_strip_prefix(prefix):
    sd = tiny_sd()
    bundled = {prefix + k: v for k, v in sd.items()}
    bundled["model.diffusion_model.img_in.weight"] = torch.zeros(2, 2)
    bundled["text_encoders.t5xxl.shared.weight"] = torch.zeros(2, 2)
    assert detect_ae_layout(bundled if prefix else sd) == "ldm"
    if prefix:
        stripped = strip_ae_prefix(bundled)
        assert set(stripped) == set(sd)
        assert all(stripped[k] is sd[k] for k in sd)
        ae = load_autoencoder(bundled)
        assert torch.equal(ae.decoder.conv_out.weight, sd["decoder.conv_out.weight"])


def test_diffusers_layout_conversion_is_zero_copy():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32,
                                  use_quant_conv=False, use_post_quant_conv=False)
    sd = vae.state_dict()
    assert detect_ae_layout(sd) == "diffusers"
    ldm = convert_diffusers_vae_to_ldm(sd)
    assert set(ldm) == set(AutoEncoder(AutoEncoderParams(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                                        z_channels=4), device="meta").state_dict())
    assert ldm["decoder.up.2.block.0.conv1.weight"] is sd["decoder.up_blocks.0.resnets.0.conv1.weight"]
    assert ldm["decoder.up.0.block.1.conv2.bias"] is sd["decoder.up_blocks.2.resnets.1.conv2.bias"]
    assert ldm["decoder.up.1.upsample.conv.weight"] is sd["decoder.up_blocks.1.upsamplers.0.conv.weight"]
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"] is sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"]
    assert ldm["encoder.mid.block_2.norm1.weight"] is sd["encoder.mid_block.resnets.1.norm1.weight"]
    q = ldm["encoder.mid.attn_1.q.weight"]
    assert q.shape == (64, 64, 1, 1)
    assert q.data_ptr() == sd["encoder.mid_block.attentions.0.to_q.weight"].data_ptr()  # a view, not a copy
    assert ldm["decoder.mid.attn_1.proj_out.bias"] is sd["decoder.mid_block.attentions.0.to_out.0.bias"]
    assert infer_ae_params(ldm) == AutoEncoderParams(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)


# --- architecture inference --------------------------------------------------------------------------------

def test_infer_params_default_and_tiny():
    meta = AutoEncoder(AutoEncoderParams(), device="meta").state_dict()
    assert infer_ae_params(meta) == AutoEncoderParams()
    assert infer_ae_params(tiny_sd()) == TINY
    odd = AutoEncoderParams(in_channels=4, out_ch=4, ch=64, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=3, z_channels=8)
    assert infer_ae_params(AutoEncoder(odd, device="meta").state_dict()) == odd


def test_infer_params_inconsistent():
    sd = tiny_sd()
    sd["encoder.conv_out.weight"] = torch.zeros(6, 64, 3, 3)  # 6 != 2 * z (z = 4 from the decoder)
    with pytest.raises(CheckpointError, match="2 x latent channels"):
        infer_ae_params(sd)
    sd = tiny_sd()
    sd["encoder.down.1.block.0.conv1.weight"] = torch.zeros(48, 32, 3, 3)  # 48 is not a multiple of ch=32
    with pytest.raises(CheckpointError, match="not a multiple"):
        infer_ae_params(sd)
    sd = tiny_sd()
    del sd["decoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="decoder.conv_in.weight"):
        infer_ae_params(sd)


# --- loading -----------------------------------------------------------------------------------------------

def test_load_file_is_zero_copy_and_frozen(tmp_path):
    sd = tiny_sd(dtype=torch.bfloat16)
    path = tmp_path / "ae.safetensors"
    save_file(sd, str(path))
    ae = load_autoencoder(path)
    assert ae.dtype == torch.bfloat16 and not ae.training
    assert not any(p.requires_grad for p in ae.parameters())
    for k, v in ae.state_dict().items():
        assert torch.equal(v, sd[k])
    # The parameters are the (mmap) tensors handed in, not copies.
    mm = load_state_dict(path)
    ae = load_autoencoder(mm)
    assert all(v.data_ptr() == mm[k].data_ptr() for k, v in ae.state_dict().items())
    ae32 = load_autoencoder(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in ae32.parameters())
    with torch.no_grad():
        out = ae.decode(torch.randn(1, 16, 3, 5))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 12, 20)


def test_params_override_and_diffusers_folder_config(tmp_path):
    sd = tiny_sd()
    p = AutoEncoderParams(**{**TINY.__dict__, "scale_factor": 0.5, "shift_factor": 0.0})
    ae = load_autoencoder(sd, params=p)
    assert ae.scale_factor == 0.5 and ae.shift_factor == 0.0
    assert load_autoencoder(sd).scale_factor == pytest.approx(0.3611)
    # A diffusers folder's config.json carries the latent scale/shift.
    folder = tmp_path / "pipe" / "vae"
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text('{"scaling_factor": 0.25, "shift_factor": 0.125}')
    ae = load_autoencoder(tmp_path / "pipe")
    assert (ae.scale_factor, ae.shift_factor) == (0.25, 0.125)


def _check_message(err: CheckpointError, *needles: str):
    msg = str(err)
    print(msg)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_transformer_given_as_ae(tmp_path):
    sd = {f"double_blocks.{i}.img_attn.qkv.weight": torch.zeros(6, 2) for i in range(3)}
    sd["img_in.weight"] = torch.zeros(2, 4)
    path = tmp_path / "flux1-kontext-dev.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(path)
    _check_message(e.value, str(path), "transformer", "ae.safetensors", "vae/", "double_blocks.0")


def test_text_encoder_given_as_ae():
    sd = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2), "shared.weight": torch.zeros(2, 2),
          "encoder.final_layer_norm.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError) as e:
        detect_ae_layout(sd)
    _check_message(e.value, "text encoder", "ae.safetensors")


def test_missing_keys(tmp_path):
    sd = tiny_sd()
    for k in ["decoder.up.0.block.1.norm2.bias", "encoder.mid.attn_1.k.weight"]:
        del sd[k]
    path = tmp_path / "ae_missing.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(path)
    _check_message(e.value, str(path), "2 missing", "decoder.up.0.block.1.norm2.bias", "encoder.mid.attn_1.k.weight")


def test_unexpected_keys():
    sd = tiny_sd()
    for i in range(7):
        sd[f"decoder.extra.{i}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(sd)
    _check_message(e.value, "7 unexpected", "decoder.extra.0.weight", "(+2 more)")


def test_quant_conv_is_rejected():
    sd = tiny_sd()
    sd["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(sd)
    _check_message(e.value, "quant_conv.weight", "not the FLUX autoencoder")


def test_wrong_shape():
    sd = tiny_sd()
    sd["decoder.mid.block_1.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(sd)
    _check_message(e.value, "decoder.mid.block_1.conv2.weight", "[64, 64, 1, 1]", "[64, 64, 3, 3]")


def test_truncated_file(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file(tiny_sd(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(path)
    _check_message(e.value, str(path), "truncated")


def test_garbage_header(tmp_path):
    path = tmp_path / "ae.safetensors"
    body = b"{this is not json" + b" " * 40
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 64)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(path)
    _check_message(e.value, str(path), "not valid JSON")
    path.write_bytes(b"PK\x03\x04 a zip/pickle checkpoint, not safetensors" * 4)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(path)
    _check_message(e.value, str(path), "not a valid safetensors")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_autoencoder(tmp_path / "nope.safetensors")
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_autoencoder(tmp_path / "vae")


def test_bad_inputs():
    from kontext_core.errors import InputError

    ae = load_autoencoder(tiny_sd())
    with pytest.raises(InputError, match="smaller than"):
        ae.encode(torch.zeros(1, 3, 3, 16))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(InputError, match=r"\(B, 16, H, W\)"):
        ae.decode(torch.zeros(1, 4, 4, 4))
