"""Our torch GGML dequantizer against gguf-py's reference numpy implementation, bit for bit."""

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from kontext_core.errors import CheckpointError, UnsupportedQuantError
from kontext_core.quant import gguf_dequant as G
from kontext_core.quant.gguf_dequant import SUPPORTED_TYPES, block_info, dequantize, nbytes_for

# Byte offsets of the fp16 scale fields in each block type. Random bytes there could decode to NaN/inf
# (NaN != NaN would make equality checks meaningless), so those fields get finite random values.
F16_FIELDS = {
    QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.IQ4_NL: [0],
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208], QT.IQ4_XS: [0],
}
GGUFPY_QUANTIZABLE = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.BF16, QT.F16]
QUANT_TYPES = sorted(F16_FIELDS, key=int)


def random_blocks(q: QT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random block bytes, fp16 fields set to finite values (some negative, some tiny, some zero)."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[q]
    n = rows * cols // bs
    raw = rng.integers(0, 256, (n, ts), dtype=np.uint8)
    for off in F16_FIELDS[q]:
        vals = (rng.standard_normal(n) * rng.choice([1e-4, 1e-2, 1.0, 30.0], n)).astype(np.float16)
        vals[:: 7] = 0  # a few all-zero scales
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, cols // bs * ts)


def reference(raw: np.ndarray, q: QT) -> np.ndarray:
    return gguf.quants.dequantize(raw, q).astype(np.float32)


@pytest.mark.parametrize("q", QUANT_TYPES, ids=lambda q: q.name)
def test_random_blocks_match_gguf_py_exactly(q):
    bs, _ = block_info(q)
    rows, cols = 6, bs * 3
    raw = random_blocks(q, rows, cols)
    ref = reference(raw, q)
    ours = dequantize(torch.from_numpy(raw), q, (rows, cols), torch.float32)
    assert ours.shape == (rows, cols) and ours.dtype == torch.float32
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("q", GGUFPY_QUANTIZABLE, ids=lambda q: q.name)
def test_gguf_py_quantized_data_match_exactly(q):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 128)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = -3.0  # a constant negative block
    raw = gguf.quants.quantize(w, q)
    ref = gguf.quants.dequantize(raw, q).astype(np.float32)
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).copy())
    ours = dequantize(data, q, w.shape, torch.float32)
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_f32_passthrough():
    w = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    out = dequantize(torch.from_numpy(w.view(np.uint8).copy()), QT.F32, (3, 5), torch.float32)
    np.testing.assert_array_equal(out.numpy(), w)


@pytest.mark.parametrize("q", [QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.Q3_K, QT.IQ4_XS], ids=lambda q: q.name)
def test_chunked_cpu_path_matches(monkeypatch, q):
    # force several chunks, the last one partial, so chunk slicing of blocks and scales is exercised
    bs, _ = block_info(q)
    monkeypatch.setattr(G, "CPU_CHUNK_ELEMS", bs * 3)
    rows, cols = 5, bs * 2  # 10 blocks -> chunks of 3, 3, 3, 1
    raw = random_blocks(q, rows, cols, seed=3)
    ours = dequantize(torch.from_numpy(raw), q, (rows, cols), torch.float32)
    np.testing.assert_array_equal(ours.numpy(), reference(raw, q))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.IQ4_NL], ids=lambda q: q.name)
def test_half_outputs_are_the_float32_result_rounded_once(q, dtype):
    bs, _ = block_info(q)
    raw = random_blocks(q, 4, bs * 2, seed=4)
    f32 = torch.from_numpy(reference(raw, q))
    ours = dequantize(torch.from_numpy(raw), q, (4, bs * 2), dtype)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, f32.to(dtype), rtol=0, atol=0)


def test_float_types_to_other_dtypes():
    w = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    h = torch.from_numpy(w.astype(np.float16).view(np.uint8).copy())
    assert dequantize(h, QT.F16, (4, 8), torch.float16).dtype == torch.float16
    np.testing.assert_array_equal(dequantize(h, QT.F16, (4, 8), torch.float32).numpy(),
                                  w.astype(np.float16).astype(np.float32))
    b = torch.from_numpy(gguf.quants.quantize(w, QT.BF16))
    np.testing.assert_array_equal(dequantize(b, QT.BF16, (4, 8), torch.float32).numpy(),
                                  gguf.quants.dequantize(gguf.quants.quantize(w, QT.BF16), QT.BF16))


def test_accepts_int_and_name_and_3d_shapes():
    raw = random_blocks(QT.Q8_0, 4, 64)
    a = dequantize(torch.from_numpy(raw), 8, (2, 2, 64), torch.float32)
    b = dequantize(torch.from_numpy(raw), "q8_0", (2, 2, 64), torch.float32)
    assert a.shape == (2, 2, 64)
    assert torch.equal(a, b)
    np.testing.assert_array_equal(a.reshape(4, 64).numpy(), reference(raw, QT.Q8_0))


@pytest.mark.parametrize("q", [QT.IQ2_XXS, QT.TQ1_0, QT.Q8_1, QT.I32], ids=lambda q: q.name)
def test_unsupported_type_is_named(q):
    with pytest.raises(UnsupportedQuantError) as e:
        dequantize(torch.zeros(1024, dtype=torch.uint8), q, (1, 256))
    msg = str(e.value)
    assert q.name in msg and "Q4_K" in msg and "Q8_0" in msg  # names the type and lists supported ones


def test_unknown_type_id():
    with pytest.raises(UnsupportedQuantError, match="unknown GGML tensor type"):
        dequantize(torch.zeros(34, dtype=torch.uint8), 999, (1, 32))


def test_byte_count_mismatch_is_a_checkpoint_error():
    raw = torch.zeros(34 * 4 - 1, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="needs 136 bytes but 135"):
        dequantize(raw, QT.Q8_0, (4, 32))


def test_row_not_multiple_of_block():
    with pytest.raises(CheckpointError, match="multiple of 256"):
        nbytes_for(QT.Q4_K, (2, 300))


def test_block_info_and_nbytes():
    assert block_info(QT.Q4_K) == (256, 144)
    assert block_info("Q8_0") == (32, 34)
    assert nbytes_for(QT.Q6_K, (3072, 3072)) == 3072 * 12 * 210
    assert nbytes_for(QT.F32, (7,)) == 28
    assert QT.Q4_K in SUPPORTED_TYPES and QT.IQ2_XXS not in SUPPORTED_TYPES


def test_output_on_input_device_and_ggml_tensor_input():
    from kontext_core.quant.ggml_tensor import GGMLTensor
    raw = random_blocks(QT.Q5_K, 2, 256)
    t = GGMLTensor(torch.from_numpy(raw), QT.Q5_K, (2, 256))
    out = dequantize(t, QT.Q5_K, (2, 256), torch.float32)
    assert type(out) is torch.Tensor and out.device == t.device
    np.testing.assert_array_equal(out.numpy(), reference(raw, QT.Q5_K))


@pytest.mark.parametrize("q", QUANT_TYPES, ids=lambda q: q.name)
def test_whole_tensor_path_used_on_accelerators_is_exact_too(q):
    # the single-pass path (taken for CUDA tensors) run on CPU tensors: same results as the chunked path
    bs, ts = block_info(q)
    raw = random_blocks(q, 3, bs * 2, seed=6)
    blocks = torch.from_numpy(raw).reshape(-1, ts)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty((blocks.shape[0], bs), dtype=dtype)
        G._run_whole(q, blocks, out)
        ref = torch.from_numpy(reference(raw, q)).to(dtype)
        torch.testing.assert_close(out.view(3, bs * 2), ref, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("q", QUANT_TYPES, ids=lambda q: q.name)
def test_cuda_matches_reference(q):
    bs, _ = block_info(q)
    raw = random_blocks(q, 4, bs * 2, seed=7)
    out = dequantize(torch.from_numpy(raw).cuda(), q, (4, bs * 2), torch.float32)
    assert out.is_cuda
    np.testing.assert_array_equal(out.cpu().numpy(), reference(raw, q))
