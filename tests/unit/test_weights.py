"""Transformer checkpoint reading: layout/architecture detection, overrides, zero-copy loading, and errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.errors import CheckpointError
from kontext_core.model.flux import Flux, FluxParams
from kontext_core.weights.flux_layout import default_axes_dim, detect_layout, infer_flux_params
from kontext_core.weights.loader import diffusers_config_overrides, load_transformer, read_transformer
from kontext_core.weights.safetensors_io import SafetensorsFile, load_state_dict, read_header

SMALL = FluxParams(in_channels=64, out_channels=64, vec_in_dim=24, context_in_dim=32, hidden_size=64, mlp_ratio=3.0,
                   num_heads=4, depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6), qkv_bias=True, guidance_embed=True)


def bfl_state_dict(params=SMALL, seed=0):
    torch.manual_seed(seed)
    m = Flux(params)
    return {k: torch.randn_like(v) * 0.1 for k, v in m.state_dict().items()}


@pytest.fixture
def bfl_file(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file(bfl_state_dict(), str(path))
    return path


def test_architecture_inferred_from_shapes(bfl_file):
    ck = read_transformer(bfl_file)
    assert ck.layout == "bfl" and ck.container == "safetensors"
    p = infer_flux_params(ck.tensors)
    assert (p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks) == (64, 4, 2, 3)
    assert (p.vec_in_dim, p.context_in_dim, p.mlp_ratio, p.qkv_bias, p.guidance_embed) == (24, 32, 3.0, True, True)
    assert p.axes_dim == default_axes_dim(16) == (4, 6, 6)


def test_full_size_defaults_match_kontext_dev():
    with torch.device("meta"):
        m = Flux(FluxParams())
    sd = m.state_dict()
    assert len(sd) == 780
    assert sum(v.numel() for v in sd.values()) == 11_901_408_320
    assert infer_flux_params(sd) == FluxParams()


def test_no_guidance_and_no_qkv_bias_variants(tmp_path):
    p = FluxParams(**{**SMALL.to_dict(), "guidance_embed": False, "qkv_bias": False})
    path = tmp_path / "schnell_like.safetensors"
    save_file(bfl_state_dict(p), str(path))
    m = load_transformer(path)
    assert not m.params.guidance_embed and not m.params.qkv_bias


def test_override_wins_and_bad_override_is_reported(bfl_file):
    m = load_transformer(bfl_file, params={"axes_dim": (2, 8, 6)})
    assert m.params.axes_dim == (2, 8, 6)
    with pytest.raises(CheckpointError, match="unknown FluxParams"):
        load_transformer(bfl_file, params={"hidden": 3})
    with pytest.raises(CheckpointError, match="axes_dim"):
        load_transformer(bfl_file, params={"axes_dim": (4, 4, 4)})


def test_weights_are_memory_mapped_not_copied(bfl_file):
    m = load_transformer(bfl_file)
    f = SafetensorsFile(bfl_file)
    assert torch.equal(m.img_in.weight, f.tensor("img_in.weight"))
    # zero-copy: parameter storage is the mmap buffer, not a private allocation
    assert not m.img_in.weight.untyped_storage().resizable()


def test_dtype_is_kept_unless_asked(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in bfl_state_dict().items()}, str(path))
    assert load_transformer(path).img_in.weight.dtype == torch.bfloat16
    assert load_transformer(path, dtype=torch.float32).img_in.weight.dtype == torch.float32


def test_wrong_model_types_are_named(tmp_path):
    cases = {
        "ae.safetensors": ({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4)}, "autoencoder"),
        "t5.safetensors": ({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, "T5"),
        "clip.safetensors": ({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}, "CLIP"),
        "sdxl.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, "UNet"),
        "random.safetensors": ({"foo.bar": torch.zeros(2)}, "not a FLUX transformer"),
    }
    for name, (sd, msg) in cases.items():
        save_file(sd, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=msg) as e:
            load_transformer(tmp_path / name)
        assert name in str(e.value)


def test_missing_and_unexpected_keys_listed(tmp_path):
    sd = bfl_state_dict()
    del sd["double_blocks.1.img_mlp.2.weight"]
    sd["double_blocks.0.lora_up.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing" in msg and "double_blocks.1.img_mlp.2.weight" in msg
    assert "unexpected" in msg and "lora_up" in msg


def test_missing_block_reported(tmp_path):
    sd = {k: v for k, v in bfl_state_dict().items() if not k.startswith("single_blocks.1.")}
    save_file(sd, str(tmp_path / "gap.safetensors"))
    with pytest.raises(CheckpointError, match="single_blocks"):
        load_transformer(tmp_path / "gap.safetensors")


def test_shape_mismatch_names_key(tmp_path):
    sd = bfl_state_dict()
    sd["double_blocks.0.txt_attn.proj.weight"] = torch.zeros(64, 60)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"txt_attn\.proj\.weight.*\[64, 60\].*\[64, 64\]"):
        load_transformer(tmp_path / "shape.safetensors")


def test_truncated_file(bfl_file, tmp_path):
    data = bfl_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(cut)


def test_corrupt_headers(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="JSON"):
        read_header(bad)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        read_header(huge)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        load_transformer(tiny)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError):
        load_transformer(pickle)


def test_header_lies_about_size(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    p = tmp_path / "lie.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 32)
    with pytest.raises(CheckpointError, match="occupies 32 bytes"):
        read_header(p)


def test_missing_shard_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_state_dict(tmp_path / "empty")
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        load_state_dict(idx)
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "nope.safetensors")


def test_detect_layout_diffusers_keys():
    assert detect_layout({"x_embedder.weight": 0, "transformer_blocks.0.attn.to_q.weight": 0}) == "diffusers"
    assert detect_layout({"img_in.weight": 0, "double_blocks.0.img_mod.lin.weight": 0}) == "bfl"


def test_diffusers_config_gives_rope_axes(tmp_path):
    from tiny_models import tiny_diffusers_transformer, write_diffusers

    m = tiny_diffusers_transformer(axes_dims_rope=(2, 8, 6))
    write_diffusers(m, tmp_path / "k")
    assert diffusers_config_overrides(tmp_path / "k") == {"axes_dim": (2, 8, 6)}
    assert diffusers_config_overrides(tmp_path / "k" / "transformer") == {"axes_dim": (2, 8, 6)}
    assert diffusers_config_overrides(tmp_path / "nofolder.safetensors") == {}
    assert load_transformer(tmp_path / "k").params.axes_dim == (2, 8, 6)  # not the shape-based default
    (tmp_path / "bad" / "transformer").mkdir(parents=True)
    (tmp_path / "bad" / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        diffusers_config_overrides(tmp_path / "bad")


def test_guidance_none_skips_the_guidance_embedding():
    m = Flux(SMALL)
    m.load_state_dict(bfl_state_dict())
    img, ids = torch.randn(1, 4, 64), torch.zeros(1, 4, 3)
    txt, txt_ids, y, t = torch.randn(1, 2, 32), torch.zeros(1, 2, 3), torch.randn(1, 24), torch.tensor([0.5])
    with torch.no_grad():
        off = m(img, ids, txt, txt_ids, t, y, None)
        on = m(img, ids, txt, txt_ids, t, y, torch.tensor([2.5]))
        m.guidance_in.out_layer.bias.zero_(); m.guidance_in.out_layer.weight.zero_()
        zero = m(img, ids, txt, txt_ids, t, y, torch.tensor([2.5]))
    assert not torch.allclose(off, on) and torch.allclose(off, zero)
