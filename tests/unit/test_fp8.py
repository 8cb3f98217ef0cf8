"""fp8 weights: plain and scaled-fp8 files, fp8 quantization at load, fp8 matmul math, LoRA on fp8.

References are built independently of the engine's fp8 code: the test quantizes with its own few lines
(scale = amax / 448, round with `.to(fp8)`) and compares the engine with an fp32 model loaded from the
dequantized weights, which must agree exactly (the upcast is exact and the arithmetic is the same)."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.errors import CheckpointError
from kontext_core.model import ops
from kontext_core.model.ops import CastLinear, enable_fp8_matmul
from kontext_core.quant.lora import apply_lora
from kontext_core.weights import fp8 as fp8w
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, diffusers_sd_to_bfl, tiny_diffusers_transformer

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
P = {"axes_dim": TINY_AXES}
KEPT = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def bfl_sd(seed=0):
    return diffusers_sd_to_bfl(tiny_diffusers_transformer(seed=seed).state_dict())


def is_block_linear_weight(k, t):
    return k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and t.ndim == 2


def my_scaled_fp8(sd, per_row=()):
    """Independent scaled-fp8 writer: (file tensors, dequantized fp32 weights)."""
    out, deq = {}, {}
    for k, t in sd.items():
        if is_block_linear_weight(k, t):
            layer = k[: -len(".weight")]
            if layer in per_row:
                s = t.abs().amax(dim=1) / 448
                q = (t / s[:, None]).to(E4M3)
                deq[k] = q.float() * s[:, None]
            else:
                s = t.abs().max() / 448
                q = (t / s).to(E4M3)
                deq[k] = q.float() * s
            out[k], out[layer + ".scale_weight"] = q, s.float()
        else:
            out[k], deq[k] = t, t
    out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out, deq


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.7]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 24, generator=g), torch.tensor([2.5]), [torch.randn(1, 16, 4, 6, generator=g)])


def run(model, dtype=torch.float32):
    x, t, txt, y, g, refs = inputs()
    with torch.no_grad():
        return model.forward_latent(x.to(dtype), t.to(dtype), txt.to(dtype), y.to(dtype), g.to(dtype),
                                    [r.to(dtype) for r in refs]).float()


def rel_rms(a, b):
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


# --- fp8 checkpoints ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_plain_fp8_file_stays_fp8_and_upcasts_exactly(tmp_path, fmt):
    sd = bfl_sd()
    # every Linear weight and the QK-norm scales in fp8 (norm scales are upcast at use); biases kept
    stored = {k: (v.to(fmt) if (v.ndim == 2 or k.endswith(".scale")) else v) for k, v in sd.items()}
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    model = load_transformer(tmp_path / "fp8.safetensors", params=P)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == fmt
    assert model.single_blocks[1].norm.query_norm.scale.dtype == fmt
    ref32 = load_transformer({k: v.float() for k, v in stored.items()}, params=P)
    assert torch.equal(run(model), run(ref32))  # fp32 compute (CPU): exact upcast
    ref16 = load_transformer({k: v.to(torch.bfloat16) for k, v in stored.items()}, params=P)
    assert torch.equal(run(model, torch.bfloat16), run(ref16, torch.bfloat16))  # bf16 compute (the GPU dtype)


def test_scaled_fp8_comfy_file_matches_dequantized_weights(tmp_path):
    sd = bfl_sd(seed=1)
    tensors, deq = my_scaled_fp8(sd, per_row={"double_blocks.0.img_mlp.0", "single_blocks.1.linear2"})
    tensors["double_blocks.1.txt_attn.proj.scale_input"] = torch.tensor(0.01)  # ignored by dequantized compute
    # a scale on a non-fp8 weight is applied too: stored img_in = w / 2 with scale 2
    tensors["img_in.weight"] = sd["img_in.weight"] / 2
    tensors["img_in.scale_weight"] = torch.tensor(2.0)
    save_file({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "scaled.safetensors"))

    model = load_transformer(tmp_path / "scaled.safetensors", params=P)
    lin = model.double_blocks[0].img_attn.qkv
    assert lin.weight.dtype == E4M3 and lin.scale_weight.shape == () and lin.scale_weight.dtype == torch.float32
    assert model.double_blocks[0].img_mlp[0].scale_weight.shape == (256,)
    assert model.double_blocks[1].txt_attn.proj.scale_input is not None
    # buffers: the state dict round-trips the scaled-fp8 layout
    assert "double_blocks.0.img_attn.qkv.scale_weight" in model.state_dict()

    deq["img_in.weight"] = (sd["img_in.weight"] / 2) * 2.0
    ref = load_transformer(deq, params=P)
    # Same weights bit for bit; not bitwise the same output only because the mmap'd fp32 biases/norm scales sit
    # at other alignments after 1-byte fp8 tensors, which changes the SIMD summation order (~1 ulp).
    assert (run(model) - run(ref)).abs().max() < 1e-5
    # fp8 is ~2-3% away from the full-precision model; reading the same file without its scales is garbage
    full = run(load_transformer(sd, params=P))
    assert rel_rms(run(model), full) < 0.08
    unscaled = {k: v for k, v in tensors.items() if not k.endswith(".scale_weight") and k != "scaled_fp8"}
    assert rel_rms(run(load_transformer(unscaled, params=P)), full) > 0.5


def test_scaled_fp8_marker_without_scales_is_refused(tmp_path):
    tensors, _ = my_scaled_fp8(bfl_sd())
    del tensors["double_blocks.1.img_attn.proj.scale_weight"]
    path = tmp_path / "noscale.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, str(path))
    with pytest.raises(CheckpointError) as e:
        load_transformer(path, params=P)
    msg = str(e.value)
    assert str(path) in msg and "double_blocks.1.img_attn.proj.weight" in msg and "scale keys are missing" in msg
    assert "black" in msg
    # without the marker, unscaled fp8 weights are plain fp8: accepted
    del tensors["scaled_fp8"]
    load_transformer(tensors, params=P)


def test_bad_scales_are_refused():
    tensors, _ = my_scaled_fp8(bfl_sd())
    bad = dict(tensors)
    bad["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_attn\.qkv\.scale_weight' has shape \[7\]"):
        load_transformer(bad, params=P)
    bad = dict(tensors)
    bad["single_blocks.0.linear1.scale_input"] = torch.ones(3)
    with pytest.raises(CheckpointError, match="expected a scalar"):
        load_transformer(bad, params=P)
    bad = dict(tensors)
    bad["double_blocks.0.img_attn.norm.query_norm.scale_weight"] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match="not a Linear weight"):
        load_transformer(bad, params=P)


# --- quantization at load ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt,ulp", [("fp8_e4m3fn", E4M3, 2.0 ** -3), ("fp8_e5m2", E5M2, 2.0 ** -2)])
def test_weight_dtype_fp8_quantizes_block_linears_only(name, fmt, ulp):
    sd = bfl_sd(seed=2)
    model = load_transformer(dict(sd), params=P, weight_dtype=name)
    n_fp8 = 0
    for key, p in model.state_dict().items():
        if key.endswith((".scale_weight", ".scale_input")):
            continue
        if is_block_linear_weight(key, p):
            n_fp8 += 1
            layer = model.get_submodule(key[: -len(".weight")])
            assert p.dtype == fmt and layer.scale_weight.shape == () and layer.scale_weight.dtype == torch.float32
            w = sd[key]
            deq = p.float() * layer.scale_weight
            # round to nearest: <= half an ulp relative for normals, half the subnormal step x scale below
            sub = layer.scale_weight * torch.finfo(fmt).smallest_normal * ulp / 2
            assert ((deq - w).abs() <= w.abs() * ulp / 2 + sub + 1e-12).all(), key
            # the largest weight maps to the top of the fp8 range
            assert torch.isclose(p.float().abs().max(), torch.tensor(torch.finfo(fmt).max))
        else:
            assert p.dtype == torch.float32, key  # biases, QK-norm scales, embedders, final layer
            assert torch.equal(p, sd[key])
    assert n_fp8 == 2 * 2 * 5 + 2 * 3  # per double block 2 x (qkv, proj, mlp.0, mlp.2, mod); single: 3
    assert all(model.get_submodule(k).weight.dtype == torch.float32 for k in
               ("img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
                "final_layer.linear", "final_layer.adaLN_modulation.1"))
    full = run(load_transformer(dict(sd), params=P))
    err = rel_rms(run(model), full)
    assert err < (0.05 if fmt == E4M3 else 0.15), err  # measured ~0.03 / ~0.11 (2 mantissa bits)


def test_scaled_quantization_beats_plain_cast():
    """Per-tensor scaling keeps ~2.6% relative RMS error at any magnitude; a plain cast loses small weights to
    fp8's subnormal range (e4m3 normals start at 2^-6)."""
    for std, plain_at_least in ((0.01, 0.05), (0.001, 0.5)):
        w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * std
        q, s = fp8w.quantize_fp8(w, E4M3)
        scaled = rel_rms(q.float() * s, w)
        plain = rel_rms(w.to(E4M3).float(), w)
        assert scaled < 0.03 and plain > plain_at_least, (std, scaled, plain)


def test_quantize_is_chunked_and_leaves_input_untouched(monkeypatch):
    w = torch.randn(64, 48)
    keep = w.clone()
    q_all, s_all = fp8w.quantize_fp8(w)
    monkeypatch.setattr(fp8w, "_CHUNK_ELEMENTS", 100)  # 31 chunks, one ragged
    q, s = fp8w.quantize_fp8(w)
    assert torch.equal(q.view(torch.uint8), q_all.view(torch.uint8)) and torch.equal(s, s_all)
    assert torch.equal(w, keep)
    z, sz = fp8w.quantize_fp8(torch.zeros(4, 4))
    assert sz == 1 and (z.float() == 0).all()


def test_weight_dtype_on_fp8_files():
    sd = bfl_sd(seed=3)
    tensors, deq = my_scaled_fp8(sd)
    base = run(load_transformer(dict(tensors), params=P))
    # already e4m3: kept byte for byte (never requantized)
    again = load_transformer(dict(tensors), params=P, weight_dtype="fp8_e4m3fn")
    lin = again.single_blocks[0].linear1
    assert lin.weight.data_ptr() == tensors["single_blocks.0.linear1.weight"].data_ptr()
    assert torch.equal(run(again), base)
    # fp32 storage: scales folded in and dropped, same output
    f32 = load_transformer(dict(tensors), params=P, weight_dtype="fp32")
    assert f32.single_blocks[0].linear1.scale_weight is None
    assert all(p.dtype == torch.float32 for p in f32.parameters())
    assert (run(f32) - base).abs().max() < 1e-6
    # bf16 storage: every float tensor bf16
    b16 = load_transformer(dict(tensors), params=P, weight_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
    # e4m3 -> e5m2: requantized from the real values
    e5 = load_transformer(dict(tensors), params=P, weight_dtype="fp8_e5m2")
    assert e5.single_blocks[0].linear1.weight.dtype == E5M2
    assert rel_rms(run(e5), base) < 0.15
    with pytest.raises(ValueError, match="weight_dtype 'int4'"):
        load_transformer(dict(sd), params=P, weight_dtype="int4")
    with pytest.raises(ValueError, match="disagree"):
        load_transformer(dict(sd), params=P, weight_dtype="bf16", dtype=torch.float16)


# --- fp8 matmul -----------------------------------------------------------------------------------------------

def fp8_linear(out_f=192, in_f=256, per_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = CastLinear(in_f, out_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    s = w.abs().amax(1) / 448 if per_row else w.abs().max() / 448
    q = (w / (s[:, None] if per_row else s)).to(E4M3)
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    lin.scale_weight = s
    lin.bias = torch.nn.Parameter(torch.randn(out_f, generator=g) * 0.1, requires_grad=False)
    return lin.requires_grad_(False)


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(ops, "_logged", set())


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("scale_input", [None, 0.02])
def test_fp8_matmul_math_on_cpu(monkeypatch, fresh_log, per_row, scale_input):
    monkeypatch.setattr(ops, "_fp8_mm_supported", lambda device: True)  # _scaled_mm runs on CPU in this torch
    lin = fp8_linear(per_row=per_row)
    if scale_input is not None:
        lin.scale_input = torch.tensor(scale_input)
    x = torch.randn(2, 37, 256)
    with torch.no_grad():
        upcast = lin(x)
        lin.fp8_matmul = True
        got = lin(x)
    assert got.shape == (2, 37, 192) and got.dtype == torch.float32
    # exactly the documented math: input quantized per tensor, fp8 x fp8 product, weight/input scales, bias
    s_in = torch.tensor(scale_input) if scale_input is not None else x.abs().max() / 448
    xq = (x / s_in).clamp(-448, 448).to(E4M3).float() * s_in
    w = lin.weight.float() * (lin.scale_weight[:, None] if per_row else lin.scale_weight)
    want = xq @ w.t() + lin.bias
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    # and within fp8 input-rounding error of the upcast path (e4m3: <= 2^-4 relative per input element)
    assert rel_rms(got, upcast) < 0.04
    # bf16 activations (the GPU case): bf16 out, bias fused
    with torch.no_grad():
        got16 = lin(x.bfloat16())
    assert got16.dtype == torch.bfloat16 and rel_rms(got16.float(), upcast) < 0.04


def test_fp8_matmul_falls_back_with_one_log_line(fresh_log, caplog):
    lin = fp8_linear()
    x = torch.randn(3, 256)
    with torch.no_grad():
        upcast = lin(x)
        enable_fp8_matmul(lin)
        with caplog.at_level(logging.INFO, logger="kontext_core"):
            a, b = lin(x), lin(x)
    assert torch.equal(a, upcast) and torch.equal(b, upcast)  # CPU: the upcast path
    lines = [r.getMessage() for r in caplog.records if "fp8 matmul" in r.getMessage()]
    assert lines == ["fp8 matmul unavailable (fp8 matmul needs a CUDA GPU, the input is on cpu); computing fp8 "
                     "layers by upcasting the weights instead"]


def test_fp8_matmul_fallbacks_when_supported(monkeypatch, fresh_log, caplog):
    monkeypatch.setattr(ops, "_fp8_mm_supported", lambda device: True)
    odd = fp8_linear(out_f=40, in_f=24)  # not multiples of 16
    e5 = fp8_linear()
    e5.weight = torch.nn.Parameter(e5.weight.float().to(E5M2), requires_grad=False)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="kontext_core"):
        for lin, inp in ((odd, torch.randn(5, 24)), (e5, torch.randn(5, 256))):
            ref = lin(inp)
            lin.fp8_matmul = True
            assert torch.equal(lin(inp), ref)
    text = caplog.text
    assert "not multiples of 16" in text and "float8_e5m2" in text


def test_lora_on_fp8_weights_is_applied_and_fp8_matmul_defers_to_it(monkeypatch, fresh_log, caplog):
    """LoRA patches apply after the upcast, on scaled-fp8 and quantized-at-load weights alike, and the fp8 matmul
    path never skips them."""
    monkeypatch.setattr(ops, "_fp8_mm_supported", lambda device: True)
    sd = bfl_sd(seed=4)
    tensors, deq = my_scaled_fp8(sd)
    g = torch.Generator().manual_seed(5)
    targets = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.0.linear1", "img_in"]
    lora, merged = {}, dict(deq)
    for n in targets:
        w = sd[n + ".weight"]
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 4, generator=g) * 0.3
        lora[f"diffusion_model.{n}.lora_A.weight"], lora[f"diffusion_model.{n}.lora_B.weight"] = down, up
        merged[n + ".weight"] = deq[n + ".weight"] + 0.7 * (up @ down)
    want = run(load_transformer(merged, params=P))
    for model in (load_transformer(dict(tensors), params=P),
                  load_transformer(deq, params=P, weight_dtype="fp8_e4m3fn")):
        handle = apply_lora(model, lora, 0.7)
        plain = run(model)
        enable_fp8_matmul(model)
        with caplog.at_level(logging.INFO, logger="kontext_core"):
            fast = run(model)
        assert handle.patches and not handle.unmatched
        if model.single_blocks[0].linear1.weight.data_ptr() == tensors["single_blocks.0.linear1.weight"].data_ptr():
            assert (plain - want).abs().max() < 1e-5  # same dequantized weights + same merged LoRA
        else:
            assert rel_rms(plain, want) < 0.05  # requantized from the dequantized weights: fp8 error again
        # fp8 matmul on the unpatched layers only: close to, not equal to, the upcast result
        assert rel_rms(fast, plain) < 0.05 and not torch.equal(fast, plain)
        handle.remove()
    assert "LoRA patches are computed by upcasting" in caplog.text


def test_whole_model_fp8_matmul_close_to_upcast(monkeypatch, fresh_log):
    monkeypatch.setattr(ops, "_fp8_mm_supported", lambda device: True)
    model = load_transformer(bfl_sd(seed=6), params=P, weight_dtype="fp8_e4m3fn")
    upcast = run(model)
    assert enable_fp8_matmul(model) == 26
    fast = run(model)
    assert rel_rms(fast, upcast) < 0.05
    enable_fp8_matmul(model, False)
    assert torch.equal(run(model), upcast)


def test_quantized_model_saves_as_a_scaled_fp8_file(tmp_path):
    """`state_dict()` of a model quantized at load is a ComfyUI-style scaled-fp8 checkpoint that loads back to the
    same model (the scales are buffers)."""
    model = load_transformer(bfl_sd(seed=7), params=P, weight_dtype="fp8_e4m3fn")
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=E4M3)
    save_file(sd, str(tmp_path / "q.safetensors"))
    again = load_transformer(tmp_path / "q.safetensors", params=P)
    assert again.single_blocks[0].linear2.weight.dtype == E4M3
    assert (run(again) - run(model)).abs().max() < 1e-5
