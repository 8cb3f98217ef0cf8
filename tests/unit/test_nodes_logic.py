"""The nodes' validation and conversions (nodes/logic.py), without ComfyUI."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.conditioning import load_embeddings, save_embeddings
from kontext_core.errors import CheckpointError, InputError
from kontext_core.images import KONTEXT_BUCKETS, nearest_bucket
from nodes import logic
from tiny_models import TINY_AXES, tiny_diffusers_transformer, write_bfl, write_comfy, write_diffusers


def cond(t5=None, **opts):
    t5 = torch.randn(1, 8, 32) if t5 is None else t5
    return [[t5, {"pooled_output": torch.randn(1, 24), **opts}]]


def lat(b=1, c=16, h=8, w=8):
    return torch.randn(b, c, h, w)


def test_logic_does_not_import_comfyui():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


# --------------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("name,expect", [("offset", "offset"), ("index", "index"), ("uxo", "uxo"),
                                         ("uxo/uno", "uxo"), (None, "offset"), ("UXO", "uxo")])
def test_layout_names(name, expect):
    assert logic.normalize_layout(name) == expect


@pytest.mark.parametrize("bad", ["diagonal", "", "offset "+"x"])
def test_bad_layout(bad):
    with pytest.raises(InputError, match="reference layout"):
        logic.normalize_layout(bad)


def test_bad_bucket_mode():
    with pytest.raises(InputError, match="bucket mode 'zoom'"):
        logic.check_bucket_mode("zoom")
    with pytest.raises(InputError, match="bucket mode"):
        logic.bucket_images(torch.rand(1, 64, 64, 3), "zoom")


def test_option_lists_match_engine():
    assert logic.LAYOUTS == ("offset", "index", "uxo")
    assert set(logic.BUCKET_MODES) == {"stretch", "crop", "pad", "keep"}
    assert {"euler", "heun", "dpmpp_2m"} <= set(logic.SOLVER_NAMES)
    assert logic.DEFAULT_SCHEDULE in logic.ENGINE_SCHEDULES


# ---------------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
def test_bucket_sizes(mode):
    img = torch.rand(2, 48, 64, 3)
    out, w, h = logic.bucket_images(img, mode)
    assert (w, h) == nearest_bucket(64, 48) and (w, h) in KONTEXT_BUCKETS
    assert out.shape == (2, h, w, 3) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_bucket_keep_snaps_to_16_without_resampling():
    img = torch.rand(1, 50, 70, 3)
    out, w, h = logic.bucket_images(img, "keep")
    assert (w, h) == (64, 48) and out.shape == (1, 48, 64, 3)
    same = torch.rand(1, 48, 64, 3)
    assert torch.equal(logic.bucket_images(same, "keep")[0], same)  # no resize: pixels untouched


def test_bucket_stretch_matches_reference_behaviour():
    # a solid colour stays that colour whatever the resampling
    img = torch.full((1, 30, 40, 3), 0.5)
    out, w, h = logic.bucket_images(img, "stretch")
    assert (w, h) == nearest_bucket(40, 30)
    assert torch.allclose(out, torch.full_like(out, 128 / 255), atol=1 / 255)


def test_bucket_alpha_channel_composited_on_white():
    img = torch.zeros(1, 32, 32, 4)
    img[..., 3] = 0.0  # fully transparent black
    out, _, _ = logic.bucket_images(img, "keep")
    assert out.shape[-1] == 3 and torch.allclose(out, torch.ones_like(out))


def test_bucket_loadimage_mask():
    img = torch.zeros(1, 32, 32, 3)
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0  # LoadImage: 1 = transparent
    out, _, _ = logic.bucket_images(img, "keep", mask)
    assert torch.allclose(out[:, :, :16], torch.ones(1, 32, 16, 3))
    assert torch.allclose(out[:, :, 16:], torch.zeros(1, 32, 16, 3))
    # images without alpha get a 64x64 zero mask from LoadImage: ignored whatever the image size
    out2, _, _ = logic.bucket_images(img, "keep", torch.zeros(1, 64, 64))
    assert torch.equal(out2, img)


def test_bucket_errors():
    with pytest.raises(InputError, match="mismatched sizes"):
        logic.bucket_images(torch.rand(1, 32, 32, 3), "keep", torch.ones(1, 16, 16))
    with pytest.raises(InputError, match="mask batch"):
        logic.bucket_images(torch.rand(2, 32, 32, 3), "keep", torch.ones(3, 32, 32))
    with pytest.raises(InputError, match="expected a ComfyUI IMAGE"):
        logic.bucket_images(torch.rand(1, 3, 32, 32, 2), "keep")
    with pytest.raises(InputError, match="empty"):
        logic.bucket_images(torch.rand(0, 32, 32, 3), "keep")
    with pytest.raises(InputError, match="tensor"):
        logic.bucket_images([[0.0]], "keep")


# --------------------------------------------------------------------------------------------------- latents

def test_check_latent():
    x = lat()
    assert logic.check_latent(x) is x and logic.check_latent({"samples": x}) is x
    with pytest.raises(InputError, match="4 channels; FLUX.1 Kontext latents have 16"):
        logic.check_latent(lat(c=4))
    with pytest.raises(InputError, match="shape"):
        logic.check_latent(torch.randn(1, 16, 1, 8, 8))
    with pytest.raises(InputError, match="samples"):
        logic.check_latent({"noise_mask": x})


def test_output_size_rules():
    refs = [lat(h=6, w=10), lat(h=8, w=8)]
    assert logic.output_latent_size(refs) == (1, 6, 10)  # the first reference
    assert logic.output_latent_size(refs, batch_size=3) == (3, 6, 10)
    assert logic.output_latent_size(refs, width=128, height=64) == (1, 8, 16)
    assert logic.output_latent_size(refs, lat(b=2, h=4, w=4)) == (2, 4, 4)  # a latent wins, with its batch
    assert logic.output_latent_size([], lat(h=4, w=4), 32, 32) == (1, 4, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(references=[], latent=None), "no output size"),
    (dict(references=[lat()], width=64, height=0), "both width and height"),
    (dict(references=[lat()], width=60, height=64), "multiples of 8"),
    (dict(references=[lat()], width=-16, height=64), ">= 0"),
    (dict(references=[lat()], batch_size=0), "batch_size"),
    (dict(references=[], latent=lat(h=4, w=4), width=64, height=64), "mismatched sizes"),
    (dict(references=[lat(c=4)]), "channels"),
])
def test_output_size_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        logic.output_latent_size(**kwargs)


# ---------------------------------------------------------------------------------------------- conditioning

def test_add_references_like_core_reference_latent():
    a, b = lat(), lat(h=6)
    c0 = cond()
    c1 = logic.add_references(c0, [a], "offset")
    c2 = logic.add_references(c1, [b], "index")
    assert "reference_latents" not in c0[0][1]  # inputs are never modified
    assert c1[0][1]["reference_latents"] == [a] and c1[0][1]["reference_latents_method"] == "offset"
    assert c2[0][1]["reference_latents"][0] is a and c2[0][1]["reference_latents"][1] is b
    assert c2[0][1]["reference_latents_method"] == "index"
    assert c2[0][0] is c0[0][0] and c2[0][1]["pooled_output"] is c0[0][1]["pooled_output"]


def test_add_references_errors():
    with pytest.raises(InputError, match="no reference to add"):
        logic.add_references(cond(), [], "offset")
    with pytest.raises(InputError, match="reference layout"):
        logic.add_references(cond(), [lat()], "spiral")
    with pytest.raises(InputError, match="channels"):
        logic.add_references(cond(), [lat(c=4)], "offset")
    with pytest.raises(InputError, match="empty"):
        logic.add_references([], [lat()], "offset")
    with pytest.raises(InputError, match="not a ComfyUI conditioning entry"):
        logic.add_references([torch.zeros(1)], [lat()], "offset")


def test_prompt_parts():
    r = lat()
    p = logic.prompt_parts(cond(reference_latents=[r], reference_latents_method="uxo/uno", guidance=3.0))
    assert p.references == [r] and p.layout == "uxo" and p.guidance == 3.0
    assert p.context.shape == (1, 8, 32) and p.pooled.shape == (1, 24)
    assert logic.prompt_parts(cond()).layout == "offset" and logic.prompt_parts(cond()).references == []


def test_prompt_parts_errors():
    with pytest.raises(InputError, match="no pooled CLIP output"):
        logic.prompt_parts([[torch.randn(1, 8, 32), {}]])
    with pytest.raises(InputError, match="2 entries"):
        logic.prompt_parts(cond() + cond())
    with pytest.raises(InputError, match="ControlNet.*core KSampler"):
        logic.prompt_parts(cond(control=object()))
    with pytest.raises(InputError, match="empty"):
        logic.prompt_parts(None, "negative")
    with pytest.raises(InputError, match=r"\(B, L, C\)"):
        logic.prompt_parts([[torch.randn(8, 32), {"pooled_output": torch.randn(1, 24)}]])


def test_text_dims_and_batches():
    p = logic.prompt_parts(cond())
    logic.check_text_dims(p, 32, 24)
    with pytest.raises(InputError, match="width 32, but the model expects 4096"):
        logic.check_text_dims(p, 4096, 24)
    with pytest.raises(InputError, match="pooled output of width 24, but the model expects 768"):
        logic.check_text_dims(p, 32, 768)
    logic.check_batches(p, 4)
    with pytest.raises(InputError, match="mismatched sizes"):
        logic.check_batches(logic.prompt_parts(cond(reference_latents=[lat(b=2)])), 3)
    with pytest.raises(InputError, match="batch 2"):
        logic.check_batches(logic.prompt_parts(cond(torch.randn(2, 8, 32))), 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(denoise=0.0), "denoise"), (dict(denoise=1.5), "denoise"),
    (dict(true_cfg=2.0, has_negative=False), "negative"), (dict(true_cfg=-1.0), "true_cfg"),
    (dict(solver="rk4"), "solver 'rk4'"), (dict(schedule="karras"), "scheduler 'karras'"),
])
def test_sampler_option_errors(kwargs, match):
    args = dict(steps=20, denoise=1.0, true_cfg=1.0, has_negative=False, solver="euler", schedule="kontext",
                schedules=logic.ENGINE_SCHEDULES)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        logic.check_sampler_options(**args)


def test_sampler_options_ok():
    logic.check_sampler_options(20, 0.5, 2.0, True, "heun", "kontext_unshifted", logic.ENGINE_SCHEDULES)


def test_sampler_model_type():
    logic.check_sampler_model(True, 16, "KontextNativeFlux")
    with pytest.raises(InputError, match="SDXL.*needs a FLUX.1 Kontext model"):
        logic.check_sampler_model(False, 4, "SDXL")
    with pytest.raises(InputError, match="needs a FLUX.1 Kontext model"):
        logic.check_sampler_model(True, 4, "Flux with a 4-channel latent")


def test_conditioning_cache_round_trip(tmp_path):
    c = cond(guidance=2.5, reference_latents=[lat()])
    t5, pooled, g, dropped = logic.conditioning_to_embeddings(c)
    assert g == 2.5 and dropped == ["reference_latents"]
    save_embeddings(tmp_path / "p.safetensors", t5, pooled, g)
    back = logic.embeddings_to_conditioning(*load_embeddings(tmp_path / "p.safetensors"))
    assert torch.equal(back[0][0], c[0][0]) and torch.equal(back[0][1]["pooled_output"], c[0][1]["pooled_output"])
    assert back[0][1]["guidance"] == 2.5
    assert "guidance" not in logic.embeddings_to_conditioning(t5, pooled)[0][1]
    with pytest.raises(InputError, match="batch 2 but the pooled output has batch 1"):
        logic.embeddings_to_conditioning(torch.randn(2, 8, 32), torch.randn(1, 24))


def test_conditioning_file_choices_and_prefix():
    assert logic.conditioning_choices(["b.safetensors", "a.png", "x/a.safetensors", "c.pt"]) == \
        ["b.safetensors", "x/a.safetensors"]
    assert logic.safe_prefix("kontext_conditioning/prompt") == "kontext_conditioning/prompt"
    assert logic.safe_prefix("./a//b") == "a/b"
    for bad in ("/etc/x", "../x", "a/../../x", "C:/x", "  "):
        with pytest.raises(InputError):
            logic.safe_prefix(bad)


# ----------------------------------------------------------------------------------------------- model files

def test_model_choices_hide_pickles_and_diffusers_internals():
    files = ["flux1-kontext-dev.safetensors", "old.ckpt", "evil.pt", "x.bin", "q.gguf", "sub/model.sft",
             "kdiff/transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "kdiff/vae/x.safetensors"]
    assert logic.model_choices(files, ["kdiff/"]) == ["kdiff/", "flux1-kontext-dev.safetensors", "sub/model.sft"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_diffusers_transformer(seed=0)


def test_find_and_resolve_diffusers_folders(tmp_path, tiny):
    root = tmp_path / "diffusion_models"
    write_diffusers(tiny, root / "pipelines" / "kontext")
    write_diffusers(tiny, root / "sharded", shards=2)
    (root / "empty").mkdir()
    assert logic.find_diffusers_folders([str(root), str(tmp_path / "missing")]) == ["pipelines/kontext/", "sharded/"]
    assert logic.resolve_folder_choice("sharded/", [str(root)]) == str(root / "sharded")
    assert logic.resolve_folder_choice("../diffusion_models/sharded/", [str(root / "pipelines")]) is None
    assert logic.resolve_folder_choice("nope/", [str(root)]) is None


def test_prepare_checkpoint_layouts(tmp_path, tiny):
    bfl = logic.prepare_checkpoint(write_bfl(tiny, tmp_path / "bfl.safetensors"))
    comfy = logic.prepare_checkpoint(write_comfy(tiny, tmp_path / "comfy.safetensors"))
    diff = logic.prepare_checkpoint(write_diffusers(tiny, tmp_path / "diff"))
    fp8 = logic.prepare_checkpoint(write_bfl(tiny, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn))
    assert bfl.params == comfy.params == diff.params == fp8.params
    assert bfl.params.axes_dim == tuple(TINY_AXES) and bfl.params.hidden_size == 64
    assert bfl.layout == "bfl" and diff.layout == "diffusers"
    assert set(bfl.tensors) == set(comfy.tensors) == set(diff.tensors)
    assert bfl.stored_dtype == torch.float32 and fp8.stored_dtype == torch.float8_e4m3fn
    assert bfl.scaled_fp8 is None


def test_prepare_checkpoint_scaled_fp8(tmp_path, tiny):
    from tiny_models import diffusers_sd_to_bfl

    sd = diffusers_sd_to_bfl(tiny.state_dict())
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            out[k] = v.to(torch.float8_e4m3fn)
            out[k[:-6] + "scale_weight"] = torch.tensor(1.0)
        else:
            out[k] = v
    save_file(out, str(tmp_path / "s.safetensors"))
    prep = logic.prepare_checkpoint(tmp_path / "s.safetensors")
    assert prep.scaled_fp8 == torch.float8_e4m3fn and "scaled_fp8" not in prep.tensors


def test_loader_rejects_wrong_model_types(tmp_path):
    vae = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}
    save_file(vae, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match="autoencoder"):
        logic.prepare_checkpoint(tmp_path / "ae.safetensors")
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, str(tmp_path / "t5.safetensors"))
    with pytest.raises(CheckpointError, match="T5"):
        logic.prepare_checkpoint(tmp_path / "t5.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        logic.prepare_checkpoint(tmp_path / "junk.safetensors")


def test_loader_rejects_incomplete_checkpoints(tmp_path, tiny):
    from tiny_models import diffusers_sd_to_bfl

    sd = diffusers_sd_to_bfl(tiny.state_dict())
    del sd["single_blocks.1.linear2.weight"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        logic.prepare_checkpoint(tmp_path / "cut.safetensors")


def test_weight_dtype_rules():
    assert logic.weight_dtype_option("fp8_e4m3fn") == torch.float8_e4m3fn
    with pytest.raises(InputError, match="weight dtype 'int4'"):
        logic.weight_dtype_option("int4")
    host = lambda: torch.bfloat16  # noqa: E731
    assert logic.choose_weight_dtype("default", torch.float32, host) == torch.bfloat16
    assert logic.choose_weight_dtype("default", torch.float8_e5m2, host) == torch.float8_e5m2  # fp8 stays fp8
    assert logic.choose_weight_dtype("fp16", torch.float8_e5m2, host) == torch.float16
    w, b = torch.zeros(4, 4), torch.zeros(4)
    f8 = torch.float8_e4m3fn
    assert logic.tensor_storage_dtype("a.weight", w, torch.bfloat16, None) == torch.bfloat16
    assert logic.tensor_storage_dtype("a.bias", b, f8, torch.float16) == torch.float16  # small tensors stay precise
    assert logic.tensor_storage_dtype("a.weight", w.to(f8), torch.bfloat16, None, scaled_fp8=True) is None
    assert logic.tensor_storage_dtype("a.scale_weight", torch.tensor(1.0), f8, None) == torch.float32
    assert logic.tensor_storage_dtype("ids", torch.zeros(3, dtype=torch.int64), f8, None) is None
    assert logic.stored_weight_dtype({"a": torch.zeros(8, 8, dtype=torch.bfloat16), "b": torch.zeros(2, 2),
                                      "c": torch.zeros(100)}) == torch.bfloat16
