"""Quantizers (bit-exact where gguf-py has a reference, error bounds for K-quants), policy and conversion."""

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT

from kontext_core.errors import CheckpointError
from kontext_core.quant import gguf_quantize as GQ
from kontext_core.quant.gguf_dequant import dequantize
from kontext_core.quant.gguf_quantize import choose_qtype, quantize
from kontext_core.weights.gguf_convert import convert_to_gguf
from kontext_core.weights.gguf_file import read_gguf

RNG = np.random.default_rng(0)
GAUSS = RNG.standard_normal((64, 2048)).astype(np.float32)
STUDENT = RNG.standard_t(3, (64, 2048)).astype(np.float32)

# Relative RMS error, RMS(dequant(quant(w)) - w) / std(w), measured with this implementation on 256 x 4096
# weights (seed 0):           Gaussian  Student-t(3)
#   Q8_0   0.0054  0.0086      (bit-exact with gguf-py's Q8_0, i.e. the reference's own error)
#   Q6_K   0.0177  0.0259
#   Q5_K   0.0362  0.0473
#   Q4_K   0.0717  0.0930
#   Q3_K   0.1529  0.1915
#   Q2_K   0.2984  0.3500
# Uniform-quantizer theory for these block sizes gives ~0.005 / 0.016 / 0.038 / 0.079 / 0.13-0.19 / 0.3-0.34;
# llama.cpp-quoted figures: Q8_0 ~0.004-0.005, Q4_K ~0.07-0.1. Bounds below leave ~10% headroom.
BOUNDS = {  # type: (gaussian, student-t)
    QT.Q8_0: (0.006, 0.0095),
    QT.Q6_K: (0.020, 0.029),
    QT.Q5_K: (0.040, 0.053),
    QT.Q4_K: (0.080, 0.104),
    QT.Q3_K: (0.170, 0.215),
    QT.Q2_K: (0.330, 0.390),
}
ORDER = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def rel_rmse(x, q):
    d = gguf.quants.dequantize(quantize(x, q), q)
    return float(np.sqrt(np.mean((d - x) ** 2)) / x.std())


# ------------------------------------------------------------------------------------------ exactness

def edge_cases():
    w = (RNG.standard_normal((6, 256)) * 0.02).astype(np.float32)
    w[0, :32] = 0.0  # zero block
    w[1, :32] = 0.25  # constant block (max == min)
    w[2, :32] = -0.5  # constant negative
    w[3, 5] = 40.0  # outlier
    w[4, :32] = np.linspace(-1, 1, 32)
    w[5, 3], w[5, 7] = -3.0, 3.0  # tie for the largest magnitude with both signs
    return w


@pytest.mark.parametrize("q", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.BF16, QT.F16],
                         ids=lambda q: q.name)
def test_bit_exact_with_gguf_py(q):
    for w in (edge_cases(), GAUSS[:8], STUDENT[:8] * 1e-3):
        ours = quantize(w, q)
        ref = gguf.quants.quantize(w, q)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        np.testing.assert_array_equal(ours.view(np.uint8), ref.view(np.uint8))


def test_bf16_nan_and_rounding_match():
    w = np.array([[np.nan, -np.nan, np.inf, -np.inf, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -0.0, 3.4e38]],
                 dtype=np.float32)
    np.testing.assert_array_equal(quantize(w, QT.BF16), gguf.quants.quantize(w, QT.BF16))


@pytest.mark.parametrize("q", K_TYPES, ids=lambda q: q.name)
def test_k_quants_decode_identically_with_gguf_py_and_ours(q):
    raw = quantize(edge_cases(), q)
    ref = gguf.quants.dequantize(raw, q)
    ours = dequantize(torch.from_numpy(raw), q, (6, 256), torch.float32).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert np.isfinite(ref).all()
    assert np.all(ref[0, :32] == 0)  # a zero block stays exactly zero
    # the constant block is reproduced closely
    assert np.abs(ref[1, :32] - 0.25).max() < 0.02


# ------------------------------------------------------------------------------------------ quality

@pytest.mark.parametrize("q", ORDER, ids=lambda q: q.name)
def test_relative_rmse_bounds(q):
    g, t = rel_rmse(GAUSS, q), rel_rmse(STUDENT, q)
    bg, bt = BOUNDS[q]
    assert g < bg, f"{q.name} gaussian rel RMSE {g:.4f} >= {bg}"
    assert t < bt, f"{q.name} student-t rel RMSE {t:.4f} >= {bt}"


def test_quality_order_and_k_quants_beat_legacy_of_same_size():
    errs = [rel_rmse(GAUSS, q) for q in ORDER]
    assert errs == sorted(errs, reverse=True), dict(zip([q.name for q in ORDER], errs))
    assert rel_rmse(GAUSS, QT.Q4_K) < rel_rmse(GAUSS, QT.Q4_0)  # 4.5 bpw both
    assert rel_rmse(GAUSS, QT.Q5_K) < rel_rmse(GAUSS, QT.Q5_0)  # 5.5 bpw both


def test_scale_search_improves_on_plain_min_max():
    # Q4_K with the search disabled (a single min/max fit) must be clearly worse than the real thing
    x = GAUSS[:16]
    d_search = gguf.quants.dequantize(quantize(x, QT.Q4_K), QT.Q4_K)
    orig = GQ._qkx2

    def no_search(x_, w, nmax, rmin, rdelta, nstep, use_mad):
        return orig(x_, w, nmax, rmin, rdelta, -1, use_mad)

    GQ._qkx2 = no_search
    try:
        d_plain = gguf.quants.dequantize(quantize(x, QT.Q4_K), QT.Q4_K)
    finally:
        GQ._qkx2 = orig
    e_search = np.sqrt(np.mean((d_search - x) ** 2))
    e_plain = np.sqrt(np.mean((d_plain - x) ** 2))
    assert e_search < 0.97 * e_plain


@pytest.mark.parametrize("q", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.BF16], ids=lambda q: q.name)
def test_quantize_tensor_bytes_do_not_depend_on_chunking(q):
    # the device path processes many rows per step; blocks never span rows, so the bytes must not change
    w = torch.from_numpy(STUDENT[:24])
    ref = quantize(w, q)
    for chunk in (1, 2048 * 5, 1 << 24):  # one row, a few rows, everything at once
        out = GQ.quantize_tensor(w, q, chunk_elems=chunk)
        assert isinstance(out, torch.Tensor) and out.device == w.device and out.dtype == torch.uint8
        np.testing.assert_array_equal(out.numpy(), ref)


def test_quantize_shapes_and_errors():
    assert quantize(GAUSS[:2, :256], QT.Q4_K).shape == (2, 144)
    assert quantize(GAUSS[0, :64], "Q8_0").shape == (1, 68)
    assert quantize(GAUSS[:2, :8], QT.F32).dtype == np.float32
    with pytest.raises(ValueError, match="block size 256"):
        quantize(GAUSS[:2, :96], QT.Q4_K)
    with pytest.raises(CheckpointError):
        quantize(GAUSS[:2, :256], QT.IQ2_XXS)


# ------------------------------------------------------------------------------------------ policy

@pytest.mark.parametrize("name,shape,target,expected", [
    ("double_blocks.0.img_attn.qkv.bias", (9216,), "Q4_K_M", QT.F32),
    ("single_blocks.3.norm.query_norm.scale", (128,), "Q8_0", QT.F32),
    ("single_blocks.3.norm.query_norm.scale", (128,), "BF16", QT.F32),
    ("img_in.weight", (3072, 64), "Q4_K_M", QT.F16),
    ("txt_in.weight", (3072, 4096), "Q8_0", QT.F16),
    ("time_in.in_layer.weight", (3072, 256), "Q4_0", QT.F16),
    ("guidance_in.out_layer.weight", (3072, 3072), "Q6_K", QT.F16),
    ("final_layer.linear.weight", (64, 3072), "Q5_K_M", QT.F16),
    ("final_layer.adaLN_modulation.1.weight", (6144, 3072), "BF16", QT.BF16),
    ("model.diffusion_model.vector_in.in_layer.weight", (3072, 768), "Q4_K_M", QT.F16),
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "Q4_K_M", QT.Q6_K),
    ("double_blocks.18.txt_attn.qkv.weight", (9216, 3072), "Q5_K_M", QT.Q6_K),
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "Q4_K_S", QT.Q4_K),
    ("single_blocks.37.linear2.weight", (3072, 15360), "Q4_K_M", QT.Q6_K),
    ("single_blocks.37.linear2.weight", (3072, 15360), "Q3_K_M", QT.Q4_K),
    ("single_blocks.37.linear2.weight", (3072, 15360), "Q2_K", QT.Q3_K),
    ("single_blocks.0.linear1.weight", (21504, 3072), "Q4_K_M", QT.Q4_K),
    ("double_blocks.1.img_mod.lin.weight", (18432, 3072), "Q3_K_M", QT.Q3_K),
    ("double_blocks.1.img_mlp.0.weight", (12288, 3072), "Q8_0", QT.Q8_0),
    ("double_blocks.1.img_mlp.0.weight", (12288, 3072), "q5_0", QT.Q5_0),
    ("double_blocks.1.img_mlp.0.weight", (12288, 3072), "F16", QT.F16),
    ("double_blocks.1.img_mlp.0.weight", (12288, 3072), "BF16", QT.BF16),
    ("double_blocks.1.img_mlp.2.weight", (64, 96), "Q4_K_M", QT.F16),  # 96 % 256 != 0
    ("double_blocks.1.img_mlp.2.weight", (64, 96), "Q8_0", QT.Q8_0),  # 96 % 32 == 0
    ("double_blocks.1.img_mlp.2.weight", (64, 100), "Q4_0", QT.F16),
    ("double_blocks.1.conv.weight", (8, 4, 3, 3), "Q8_0", QT.F16),
])
def test_policy(name, shape, target, expected):
    assert choose_qtype(name, shape, target) == expected


def test_policy_unknown_target():
    with pytest.raises(ValueError, match="Q4_K_M"):
        choose_qtype("img_in.weight", (4, 4), "Q7_Z")


# ------------------------------------------------------------------------------------------ conversion

def tiny_bfl(prefix=""):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)

    sd = {
        "img_in.weight": r(32, 64),
        "img_in.bias": r(32),
        "double_blocks.0.img_attn.qkv.weight": r(96, 256),
        "double_blocks.0.img_attn.qkv.bias": r(96),
        "double_blocks.0.img_mlp.0.weight": r(48, 256),
        "double_blocks.0.img_mlp.2.weight": r(32, 48),  # row of 48: not a multiple of 256 -> F16
        "single_blocks.0.linear1.weight": r(64, 256),
        "single_blocks.0.linear2.weight": r(32, 512),
        "single_blocks.0.norm.query_norm.scale": r(16),
    }
    out = {prefix + k: v for k, v in sd.items()}
    if prefix:
        out["vae.decoder.conv_in.weight"] = r(4, 4)
        out["text_encoders.t5.x"] = r(4)
    return out, sd


EXPECTED_Q4KM = {
    "img_in.weight": QT.F16, "img_in.bias": QT.F32,
    "double_blocks.0.img_attn.qkv.weight": QT.Q6_K, "double_blocks.0.img_attn.qkv.bias": QT.F32,
    "double_blocks.0.img_mlp.0.weight": QT.Q4_K, "double_blocks.0.img_mlp.2.weight": QT.F16,
    "single_blocks.0.linear1.weight": QT.Q4_K, "single_blocks.0.linear2.weight": QT.Q6_K,
    "single_blocks.0.norm.query_norm.scale": QT.F32,
}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_convert_tiny_bfl_checkpoint(tmp_path, prefix):
    from safetensors.torch import save_file
    src, sd = tiny_bfl(prefix)
    save_file(src, str(tmp_path / "tiny.safetensors"))
    out = convert_to_gguf(tmp_path / "tiny.safetensors", tmp_path / "tiny-Q4_K_M.gguf", "Q4_K_M")

    r = gguf.GGUFReader(out)
    assert {t.name: t.tensor_type for t in r.tensors} == EXPECTED_Q4KM  # prefix stripped, vae/te ignored
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in r.tensors}
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "flux"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert fields["general.quantization_version"] == 2

    c = read_gguf(out)
    assert c.qtypes == {k: v.name for k, v in EXPECTED_Q4KM.items()}
    for name, ref in sd.items():
        t = c.tensors[name]
        dense = t.dequantize(torch.float32) if hasattr(t, "qtype") else t.float()
        assert dense.shape == ref.shape, name
        err = (dense - ref.float()).pow(2).mean().sqrt() / ref.float().std()
        assert err < {"Q4_K": 0.08, "Q6_K": 0.02}.get(c.qtypes[name], 1e-3), (name, float(err))
    assert torch.equal(c.tensors["img_in.bias"], sd["img_in.bias"].float())


def test_convert_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    src, _ = tiny_bfl()
    save_file(src, str(tmp_path / "tiny.safetensors"))
    import kontext_core.weights.gguf_convert as GC

    produced = []
    orig = GC.quantize

    def spy(w, q, **kw):
        produced.append(q)
        return orig(w, q, **kw)

    monkeypatch.setattr(GC, "quantize", spy)
    written = []

    def progress(i, n, name):
        written.append(i)
        # each tensor is quantized right before it is written, never all up front
        assert len(produced) <= i

    convert_to_gguf(tmp_path / "tiny.safetensors", tmp_path / "o.gguf", "Q8_0", progress=progress)
    assert written == list(range(1, 10)) and len(produced) == 4  # the four 2-D non-embedder weights


def test_convert_rejects_non_flux_and_fp8(tmp_path):
    from safetensors.torch import save_file
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointError, match="diffusers"):
        convert_to_gguf(tmp_path / "d.safetensors", tmp_path / "d.gguf", "Q8_0")
    src, _ = tiny_bfl()
    src["double_blocks.0.img_attn.qkv.weight"] = src["double_blocks.0.img_attn.qkv.weight"].to(torch.float8_e4m3fn)
    save_file(src, str(tmp_path / "f8.safetensors"))
    with pytest.raises(CheckpointError, match="F8_E4M3"):
        convert_to_gguf(tmp_path / "f8.safetensors", tmp_path / "f8.gguf", "Q8_0")
    assert not (tmp_path / "f8.gguf").exists()
