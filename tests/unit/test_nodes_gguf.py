"""The GGUF loader node's decisions (nodes/gguf_logic.py), without ComfyUI."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file

from kontext_core.errors import CheckpointError, InputError, UnsupportedQuantError
from kontext_core.quant.ggml_tensor import GGMLTensor
from kontext_core.weights.gguf_convert import convert_to_gguf
from kontext_core.weights.gguf_file import write_gguf
from nodes import gguf_logic
from tiny_models import tiny_diffusers_transformer, write_bfl


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    src = write_bfl(tiny_diffusers_transformer(seed=0), d / "tiny.safetensors")
    return convert_to_gguf(src, d / "tiny-Q8_0.gguf", "Q8_0"), src


def test_gguf_logic_does_not_import_comfyui():
    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules


def test_choices_are_gguf_files_only():
    files = ["b.gguf", "a/flux1-kontext-dev-Q4_K_M.GGUF", "model.safetensors", "x.gguf.partial", "notes.txt"]
    assert gguf_logic.gguf_choices(files) == ["a/flux1-kontext-dev-Q4_K_M.GGUF", "b.gguf"]


def test_compute_dtype_default_is_the_hosts_choice():
    assert gguf_logic.choose_compute_dtype("default", lambda: torch.bfloat16) is torch.bfloat16
    assert gguf_logic.choose_compute_dtype("default", lambda: torch.float32) is torch.float32


@pytest.mark.parametrize("option,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_compute_dtype_option_overrides_the_host(option, dtype):
    def host():
        raise AssertionError("the host default must not be asked for when an option is given")
    assert gguf_logic.choose_compute_dtype(option, host) is dtype


def test_unknown_compute_dtype():
    with pytest.raises(InputError, match="compute dtype 'fp8'"):
        gguf_logic.choose_compute_dtype("fp8", lambda: torch.float32)


def test_a_renamed_safetensors_is_not_loaded_as_gguf(tiny_gguf, tmp_path):
    _, src = tiny_gguf
    fake = tmp_path / "flux1-kontext-dev-Q4_K_M.gguf"
    fake.write_bytes(src.read_bytes())
    with pytest.raises(CheckpointError) as e:
        gguf_logic.read_gguf_checkpoint(fake)
    msg = str(e.value)
    assert str(fake) in msg and "not a GGUF file" in msg and "safetensors" in msg and "Load Kontext Model" in msg


@pytest.mark.parametrize("content,needle", [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + bytes(64), "no GGUF header")])
def test_other_files_are_refused_with_what_was_found(tmp_path, content, needle):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        gguf_logic.check_gguf_file(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        gguf_logic.check_gguf_file(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        gguf_logic.check_gguf_file(tmp_path)


def test_reads_a_flux_gguf_quantized_and_memory_mapped(tiny_gguf):
    path, src = tiny_gguf
    ckpt = gguf_logic.read_gguf_checkpoint(path)
    assert ckpt.container == "gguf" and ckpt.source == str(path)
    q = ckpt.tensors["double_blocks.0.img_attn.qkv.weight"]
    assert isinstance(q, GGMLTensor) and q.qtype == QT.Q8_0 and tuple(q.logical_shape) == (192, 64)
    assert ckpt.tensors["img_in.weight"].dtype == torch.float16  # embedders are kept in 16 bits
    assert "Q8_0 x" in gguf_logic.quant_summary(ckpt.qtypes) and "F32 x" in gguf_logic.quant_summary(ckpt.qtypes)
    # parameters, not bytes: the same count as the float checkpoint it was made from
    assert gguf_logic.logical_param_count(ckpt.tensors) == sum(t.numel() for t in load_file(str(src)).values())


def test_wrong_architecture_is_the_engines_error(tmp_path):
    p = write_gguf(tmp_path / "t5-Q8_0.gguf", [("enc.blk.0.attn_q.weight", np.ones((64, 64), np.float32), QT.Q8_0,
                                                (64, 64))], arch="t5")
    with pytest.raises(CheckpointError) as e:
        gguf_logic.read_gguf_checkpoint(p)
    assert "'t5' model" in str(e.value) and str(p) in str(e.value)


def test_truncated_gguf_is_the_engines_error(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        gguf_logic.read_gguf_checkpoint(cut)


def test_unsupported_quant_type_is_the_engines_error(tmp_path):
    import gguf

    p = tmp_path / "tq.gguf"
    w = gguf.GGUFWriter(p, "flux")
    w.add_tensor("img_in.weight", np.zeros((2, 54), np.uint8), raw_shape=(2, 54), raw_dtype=QT.TQ1_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedQuantError, match="TQ1_0"):
        gguf_logic.read_gguf_checkpoint(p)


def test_dequant_reserve():
    n = 3072 * 21504  # FLUX single-block linear1, the largest layer
    assert gguf_logic.dequant_reserve_bytes(n, torch.bfloat16) == n * (2 + 4)
    assert gguf_logic.dequant_reserve_bytes(n, torch.float32) == n * (4 + 4)
    assert gguf_logic.dequant_reserve_bytes(n, torch.bfloat16, patched=True) == n * (2 + 4 + 8)
    assert gguf_logic.dequant_reserve_bytes(0, torch.float16) == 0
