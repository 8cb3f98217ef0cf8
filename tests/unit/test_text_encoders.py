"""Text encoders: what the engine refuses (with what to do) and where tokenizers come from."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.cli import main as cli
from kontext_core.errors import CheckpointError, KontextError
from kontext_core.text_encoders import load_clip_l, load_t5, load_text_encoders
from kontext_core.text_encoders.tokenizers import find_tokenizers, load_tokenizers
from kontext_core.weights.gguf_file import write_gguf
from tiny_models import tiny_diffusers_transformer, write_bfl
from tiny_text_encoders import tiny_clip, tiny_t5, write_flux_text_folder, write_t5_gguf

import numpy as np
from gguf import GGMLQuantizationType as QT


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_flux_text_folder(tmp_path_factory.mktemp("te"))


@pytest.fixture(scope="module")
def single_files(folder, tmp_path_factory):
    root, t5, _, _, ctok = folder
    clip = tiny_clip(len(ctok), seed=3, hidden_size=128, num_attention_heads=2, intermediate_size=96)  # CLIP-L's 64-wide heads
    d = tmp_path_factory.mktemp("single")
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if "embed_tokens" not in k},
              str(d / "t5xxl_fp16.safetensors"))
    save_file({"text_model." + k if not k.startswith("text_model.") else k: v.contiguous()
               for k, v in clip.state_dict().items() if "position_ids" not in k}, str(d / "clip_l.safetensors"))
    return d / "t5xxl_fp16.safetensors", d / "clip_l.safetensors", clip


def test_dit_passed_as_text_encoder(tmp_path):
    dit = write_bfl(tiny_diffusers_transformer(), tmp_path / "flux1-kontext-dev.safetensors")
    with pytest.raises(CheckpointError, match=r"FLUX transformer.*--transformer"):
        load_t5(dit)
    with pytest.raises(CheckpointError, match=r"FLUX transformer"):
        load_clip_l(dit)


def test_autoencoder_passed_as_text_encoder(tmp_path):
    ae = {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
          "decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}
    save_file(ae, str(tmp_path / "ae.safetensors"))
    with pytest.raises(CheckpointError, match=r"autoencoder.*--ae"):
        load_t5(tmp_path / "ae.safetensors")


def test_swapped_encoders_are_named(single_files):
    t5_file, clip_file, _ = single_files
    with pytest.raises(CheckpointError, match=r"CLIP-L text encoder.*--clip-l"):
        load_t5(clip_file)
    with pytest.raises(CheckpointError, match=r"T5 text encoder.*--t5"):
        load_clip_l(t5_file)


def test_gguf_of_another_architecture(tmp_path):
    flux = [("img_in.weight", np.zeros((32, 64), np.float32), QT.F32, (32, 64)),
            ("double_blocks.0.img_attn.qkv.weight", np.zeros((96, 64), np.float32), QT.F32, (96, 64))]
    write_gguf(tmp_path / "flux.gguf", flux)
    with pytest.raises(CheckpointError, match=r"'flux' model.*FLUX transformer.*T5 encoder GGUF"):
        load_t5(tmp_path / "flux.gguf")
    llama = [("token_embd.weight", np.zeros((8, 32), np.float32), QT.F32, (8, 32)),
             ("blk.0.attn_q.weight", np.zeros((32, 32), np.float32), QT.F32, (32, 32))]
    write_gguf(tmp_path / "llama.gguf", llama, arch="llama")
    with pytest.raises(CheckpointError, match=r"'llama' model.*T5 encoder GGUF"):
        load_t5(tmp_path / "llama.gguf")
    with pytest.raises(CheckpointError, match=r"GGUF.*CLIP-L.*safetensors"):
        load_clip_l(tmp_path / "llama.gguf")


def test_t5_gguf_without_encoder_tensors(tmp_path):
    write_gguf(tmp_path / "t5.gguf", [("dec.blk.0.attn_q.weight", np.zeros((32, 32), np.float32), QT.F32, (32, 32))],
               arch="t5encoder")
    with pytest.raises(CheckpointError, match="no T5 encoder tensors"):
        load_t5(tmp_path / "t5.gguf")


def test_gguf_t5_keeps_quantized_embedding(folder, tmp_path):
    """Full T5 GGUFs (architecture 't5') load too; the decoder half is ignored."""
    _, t5, _, ttok, _ = folder
    write_t5_gguf(t5, tmp_path / "t5.gguf", "Q8_0", arch="t5")
    model = load_t5(tmp_path / "t5.gguf")
    ids = ttok(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids)[0]).all()


def test_missing_tokenizers_say_where_to_get_them(single_files, tmp_path):
    t5_file, clip_file, _ = single_files
    with pytest.raises(CheckpointError, match=r"tokenizer/ and tokenizer_2/.*comfy/sd1_tokenizer"):
        load_text_encoders(t5_file, clip_file)
    with pytest.raises(CheckpointError, match=r"holds neither"):
        load_text_encoders(t5_file, clip_file, tokenizers=tmp_path)


def test_single_files_with_tokenizers_from_a_folder(folder, single_files):
    root, t5, clip, ttok, ctok = folder
    t5_file, clip_file, wide_clip = single_files
    embeds, pooled = load_text_encoders(t5_file, clip_file, tokenizers=root).encode("make the red car blue")
    with torch.no_grad():
        ref_e = t5(ttok(["make the red car blue"], padding="max_length", max_length=512, return_tensors="pt").input_ids)[0]
        ref_p = wide_clip(ctok(["make the red car blue"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids).pooler_output
    assert torch.allclose(embeds, ref_e, atol=1e-6) and torch.allclose(pooled, ref_p, atol=1e-6)


def test_transformers_missing_is_a_clear_error(single_files, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(KontextError, match=r"pip install transformers"):
        load_t5(single_files[0])


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a ComfyUI checkout (COMFYUI_PATH)")
def test_tokenizers_from_a_comfyui_install():
    root = Path(os.environ["COMFYUI_PATH"])
    clip_dir, t5_dir = find_tokenizers(root)
    assert clip_dir.name == "sd1_tokenizer" and t5_dir.name == "t5_tokenizer"
    toks = load_tokenizers(root)
    t5_ids = toks.t5(["a cat"], padding="max_length", max_length=512).input_ids[0]
    clip_ids = toks.clip(["a cat"], padding="max_length", max_length=77).input_ids[0]
    n = t5_ids.index(toks.t5.eos_token_id)
    assert len(t5_ids) == 512 and n > 0 and set(t5_ids[n + 1:]) == {toks.t5.pad_token_id}
    assert clip_ids[0] == toks.clip.bos_token_id and clip_ids[-1] == toks.clip.eos_token_id and len(clip_ids) == 77


def test_cli_text_encoder_argument_errors(tmp_path, capsys, single_files):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(img)
    t5_file, clip_file, _ = single_files
    assert cli(["edit", str(img), "--prompt", "x", "--t5", str(t5_file)]) == 1
    assert "--transformer and --ae" in capsys.readouterr().err
    assert cli(["edit", str(img), "--prompt", "x", "--transformer", "t", "--ae", "a"]) == 1
    assert "--embeds" in capsys.readouterr().err
    assert cli(["edit", str(img), "--prompt", "x", "--transformer", "t", "--ae", "a", "--embeds", "e",
                "--t5", str(t5_file)]) == 1
    assert "not both" in capsys.readouterr().err
    assert cli(["edit", str(img), "--prompt", "x", "--transformer", "t", "--ae", "a", "--t5", str(t5_file),
                "--clip-l", str(clip_file)]) == 1
    err = capsys.readouterr().err
    assert "tokenizer" in err and err.count("\n") == 1


def test_plan_reads_the_t5_storage_from_the_file(folder, single_files, tmp_path, capsys):
    from kontext_core.weights.fp8 import quantize_fp8

    _, t5, _, _, _ = folder
    write_t5_gguf(t5, tmp_path / "t5-Q4_0.gguf", "Q4_0")  # not a planner type: counted as Q4_K (same bits)
    sd = {k: (quantize_fp8(v)[0] if v.ndim == 2 and k != "shared.weight" else v).contiguous()
          for k, v in t5.state_dict().items() if "embed_tokens" not in k}
    save_file(sd, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    for path, want in ((tmp_path / "t5-Q4_0.gguf", "T5 Q4_K"), (tmp_path / "t5xxl_fp8_e4m3fn.safetensors", "T5 fp8"),
                       (single_files[0], "T5 fp16")):
        assert cli(["plan", "--gpu", "RTX 4060", "--ram", "32", "--t5", str(path)]) == 0
        assert want + " + CLIP-L" in capsys.readouterr().out
    assert cli(["plan", "--t5", str(single_files[0]), "--text-encoder", "fp16"]) == 1
    assert "not both" in capsys.readouterr().err
    assert cli(["plan", "--t5", str(single_files[1])]) == 1  # CLIP-L given as T5
    assert "--clip-l" in capsys.readouterr().err
