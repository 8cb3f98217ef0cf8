"""GGUF layers for the `operations` namespace, and GGMLTensor surviving what host memory managers do."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gguf
from gguf import GGMLQuantizationType as QT

from kontext_core.quant.ggml_tensor import GGMLTensor, is_quantized
from kontext_core.quant.gguf_ops import GGUFOps, make_gguf_ops

RNG = np.random.default_rng(0)


def qtensor(w: np.ndarray, q: QT) -> GGMLTensor:
    return GGMLTensor(torch.from_numpy(gguf.quants.quantize(w, q)), q, w.shape)


def q4k_tensor(rows, cols):
    from kontext_core.quant.gguf_quantize import quantize
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    return GGMLTensor(torch.from_numpy(quantize(w, QT.Q4_K)), QT.Q4_K, (rows, cols))


class Tiny(nn.Module):
    def __init__(self, operations=nn, device=None, dtype=None):
        super().__init__()
        self.inp = operations.Linear(256, 64, bias=True, device=device, dtype=dtype)
        self.norm = operations.LayerNorm(64, device=device, dtype=dtype)
        self.out = operations.Linear(64, 32, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.out(F.gelu(self.norm(self.inp(x))))


def tiny_state():
    return {
        "inp.weight": q4k_tensor(64, 256),
        "inp.bias": torch.from_numpy(RNG.standard_normal(64).astype(np.float32)),
        "norm.weight": torch.from_numpy(RNG.standard_normal(64).astype(np.float32)),
        "norm.bias": torch.zeros(64),
        "out.weight": qtensor(RNG.standard_normal((32, 64)).astype(np.float32), QT.Q8_0),
    }


def reference_forward(sd, x):
    h = F.linear(x, sd["inp.weight"].dequantize(torch.float32), sd["inp.bias"])
    h = F.gelu(F.layer_norm(h, (64,), sd["norm.weight"], sd["norm.bias"]))
    return F.linear(h, sd["out.weight"].dequantize(torch.float32))


def loaded(sd=None, **kw):
    m = Tiny(GGUFOps, device="meta")
    sd = sd or tiny_state()
    assert not m.load_state_dict(sd, assign=True, **kw).missing_keys
    return m, sd


# ------------------------------------------------------------------------------------------ GGMLTensor

def test_ggml_tensor_attributes_survive_moves_and_wrapping():
    t = q4k_tensor(8, 256)
    dense = t.dequantize(torch.float32)
    variants = {
        "to": t.to("cpu"), "to uint8": t.to("cpu", torch.uint8), "to non_blocking": t.to("cpu", non_blocking=True),
        "to copy": t.to("cpu", copy=True), "cpu": t.cpu(), "detach": t.detach(), "clone": t.clone(),
        "data": t.data, "contiguous": t.contiguous(), "param": nn.Parameter(t, requires_grad=False),
        "deepcopy": copy.deepcopy(t),
    }
    for name, v in variants.items():
        assert isinstance(v, GGMLTensor), name
        assert v.qtype == QT.Q4_K and v.logical_shape == (8, 256), name
        assert v.dtype == torch.uint8 and v.shape == t.shape, name
        assert torch.equal(v.dequantize(torch.float32), dense), name
    assert isinstance(variants["param"], nn.Parameter)
    assert variants["clone"].data_ptr() != t.data_ptr() and variants["to"].data_ptr() == t.data_ptr()
    assert variants["to copy"].data_ptr() != t.data_ptr()
    dst = GGMLTensor(torch.zeros_like(t.as_subclass(torch.Tensor)), QT.Q4_K, (8, 256))
    dst.copy_(t)
    assert torch.equal(dst.dequantize(torch.float32), dense)
    assert t.logical_numel == 8 * 256
    assert "Q4_K" in repr(t) and "(8, 256)" in repr(t)
    # arithmetic / slicing give plain tensors: a slice of block bytes is not a quantized weight
    assert type(t[0]) is torch.Tensor and type(t + 1) is torch.Tensor
    assert is_quantized(t) and not is_quantized(torch.zeros(1))


def test_ggml_tensor_float_conversions_dequantize_never_reinterpret():
    t = q4k_tensor(8, 256)
    dense = t.dequantize(torch.float32)
    for name, v in {"to f32": t.to(torch.float32), "to dev f16": t.to("cpu", torch.float16),
                    "to kw": t.to(device="cpu", dtype=torch.bfloat16), "float": t.float(), "half": t.half(),
                    "bfloat16": t.bfloat16(), "type": t.type(torch.float32)}.items():
        assert type(v) is torch.Tensor and v.shape == (8, 256), name
        torch.testing.assert_close(v.float(), dense.to(v.dtype).float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="int32"):
        t.to(torch.int32)
    # the "empty_like + copy_" casting idiom: right shape -> values, packed shape -> refused
    out = torch.empty(8, 256, dtype=torch.float16)
    out.copy_(t)
    assert torch.equal(out, dense.half())
    with pytest.raises(TypeError, match="logical shape"):
        torch.empty_like(t, dtype=torch.float32).copy_(t)
    raw = torch.empty_like(t.as_subclass(torch.Tensor))
    raw.copy_(t)  # bytes into bytes is fine
    assert torch.equal(raw, t.as_subclass(torch.Tensor))


def test_ggml_tensor_requires_uint8():
    with pytest.raises(TypeError):
        GGMLTensor(torch.zeros(4), QT.Q8_0, (1, 32))


# ------------------------------------------------------------------------------------------ Linear

def test_meta_build_assign_load_and_forward_exact():
    m, sd = loaded()
    assert isinstance(m.inp.weight, GGMLTensor) and isinstance(m.inp.weight, nn.Parameter)
    assert not m.inp.weight.requires_grad and m.inp.is_quantized
    assert m.inp.weight.data_ptr() == sd["inp.weight"].data_ptr()  # no copy of the bytes
    x = torch.randn(3, 256)
    torch.testing.assert_close(m(x), reference_forward(sd, x), rtol=0, atol=0)


def test_forward_in_bf16_dequantizes_to_input_dtype():
    m, sd = loaded()
    x = torch.randn(2, 256)
    y = m.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert isinstance(m.inp.weight, GGMLTensor) and m.inp.weight.dtype == torch.uint8
    torch.testing.assert_close(y.float(), reference_forward(sd, x), rtol=0.05, atol=0.05)


def test_survives_module_moves_and_parameter_replacement():
    m, sd = loaded()
    x = torch.randn(4, 256)
    ref = reference_forward(sd, x)
    m.to("cpu", torch.float32)  # Module.to only touches floating tensors' dtype
    assert isinstance(m.inp.weight, GGMLTensor)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    # what a memory manager does when it offloads / reloads a weight: a new Parameter around a moved copy
    m.inp.weight = nn.Parameter(m.inp.weight.to("cpu", copy=True), requires_grad=False)
    m.out.weight = nn.Parameter(m.out.weight.data, requires_grad=False)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    m._apply(lambda t: t.cpu())
    torch.testing.assert_close(copy.deepcopy(m)(x), ref, rtol=0, atol=0)
    sd2 = m.state_dict()
    assert isinstance(sd2["inp.weight"], GGMLTensor) and sd2["inp.weight"].qtype == QT.Q4_K


def test_weight_and_bias_patches():
    m, sd = loaded()
    x = torch.randn(2, 256)
    delta = torch.randn(64, 256) * 0.01
    m.inp.weight_patches.append(lambda w: w + delta.to(w.dtype))
    m.inp.bias_patches.append(lambda b: b * 2)
    w = m.inp.get_weight(torch.float32, "cpu")
    torch.testing.assert_close(w, sd["inp.weight"].dequantize(torch.float32) + delta, rtol=0, atol=0)
    h = F.linear(x, w, sd["inp.bias"] * 2)
    torch.testing.assert_close(m.inp(x), h, rtol=0, atol=0)


def test_host_weight_function_hooks_apply_after_own_patches():
    m, _ = loaded()
    order = []
    m.inp.weight_patches.append(lambda w: (order.append("patch"), w)[1])
    m.inp.weight_function = [lambda w: (order.append("host"), w * 0)[1]]
    y = m.inp(torch.randn(1, 256))
    assert order == ["patch", "host"]
    torch.testing.assert_close(y, m.inp.bias.detach().expand(1, 64), rtol=0, atol=0)


def test_strict_missing_and_unexpected_keys_still_reported():
    sd = tiny_state()
    del sd["out.weight"]
    m = Tiny(GGUFOps, device="meta")
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "out.weight"'):
        m.load_state_dict(sd, assign=True)
    sd = tiny_state()
    sd["out.bias"] = torch.zeros(32)  # out has bias=False
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "out.bias"'):
        Tiny(GGUFOps, device="meta").load_state_dict(sd, assign=True)
    res = Tiny(GGUFOps, device="meta").load_state_dict(sd, assign=True, strict=False)
    assert res.unexpected_keys == ["out.bias"] and res.missing_keys == []


def test_wrong_logical_shape_is_a_size_mismatch():
    sd = tiny_state()
    sd["inp.weight"] = q4k_tensor(32, 256)
    with pytest.raises(RuntimeError, match="size mismatch for inp.weight.*Q4_K"):
        Tiny(GGUFOps, device="meta").load_state_dict(sd, assign=True)


def test_load_without_assign_into_a_real_module():
    m = Tiny(GGUFOps)  # on CPU, allocated
    sd = tiny_state()
    m.load_state_dict(sd)  # copy semantics for plain tensors, quantized weights are adopted as they are
    x = torch.randn(2, 256)
    torch.testing.assert_close(m(x), reference_forward(sd, x), rtol=0, atol=0)
    assert m.norm.weight.data_ptr() != sd["norm.weight"].data_ptr()  # plain tensors were copied


def test_dense_weights_still_work_and_can_replace_quantized_ones():
    dense = {k: (v.dequantize(torch.float32) if isinstance(v, GGMLTensor) else v) for k, v in tiny_state().items()}
    m = Tiny(GGUFOps, device="meta")
    m.load_state_dict(dense, assign=True)
    x = torch.randn(2, 256)
    ref = F.linear(F.gelu(F.layer_norm(F.linear(x, dense["inp.weight"], dense["inp.bias"]), (64,),
                                       dense["norm.weight"], dense["norm.bias"])), dense["out.weight"])
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    q, _ = loaded()
    q.load_state_dict(dense)  # dense over quantized (no assign): replaces the parameter
    assert not isinstance(q.inp.weight, GGMLTensor)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)


def test_other_layers_accept_quantized_or_plain_and_cast_at_use():
    # a conv kernel stored quantized as (out, in*kh*kw) rows, logical shape 4-D: dequantized once at load
    conv = GGUFOps.Conv2d(4, 4, 4, device="meta")
    w = RNG.standard_normal((4, 64)).astype(np.float32)
    qw = GGMLTensor(torch.from_numpy(gguf.quants.quantize(w, QT.Q8_0)), QT.Q8_0, (4, 4, 4, 4))
    conv.load_state_dict({"weight": qw, "bias": torch.zeros(4)}, assign=True)
    assert not isinstance(conv.weight, GGMLTensor) and conv.weight.shape == (4, 4, 4, 4)
    x = torch.randn(1, 4, 6, 6)
    ref = F.conv2d(x, torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, QT.Q8_0), QT.Q8_0))
                   .view(4, 4, 4, 4), torch.zeros(4))
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)
    assert conv(x.bfloat16()).dtype == torch.bfloat16  # float32 weights cast to the input at use
    emb = GGUFOps.Embedding(10, 32, device="meta")
    ew = RNG.standard_normal((10, 32)).astype(np.float32)
    emb.load_state_dict({"weight": qtensor(ew, QT.Q8_0)}, assign=True)
    ref = gguf.quants.dequantize(gguf.quants.quantize(ew, QT.Q8_0), QT.Q8_0)
    np.testing.assert_array_equal(emb(torch.tensor([3])).detach().numpy()[0], ref[3])
    gn = GGUFOps.GroupNorm(2, 4, device="meta")
    gn.load_state_dict({"weight": torch.ones(4), "bias": torch.zeros(4)}, assign=True)
    assert gn(torch.randn(1, 4, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_make_gguf_ops_on_a_host_namespace():
    class HostOps:  # stands in for e.g. comfy.ops.manual_cast
        class Linear(nn.Linear):
            comfy_cast_weights = True
            weight_function = []
            bias_function = []

            def forward(self, x):  # the host's own casting path must not be used for quantized weights
                raise AssertionError("host forward called")

        class LayerNorm(nn.LayerNorm):
            host_marker = True

    ops = make_gguf_ops(HostOps)
    assert issubclass(ops.Linear, HostOps.Linear) and issubclass(ops.LayerNorm, HostOps.LayerNorm)
    assert ops.Conv2d is GGUFOps.Conv2d
    m = Tiny(ops, device="meta")
    sd = tiny_state()
    m.load_state_dict(sd, assign=True)
    x = torch.randn(2, 256)
    torch.testing.assert_close(m(x), reference_forward(sd, x), rtol=0, atol=0)
    assert m.inp.comfy_cast_weights is True
    m.inp.weight_function = [lambda w: w * 0]
    torch.testing.assert_close(m.inp.forward_comfy_cast_weights(x), m.inp.bias.detach().expand(2, 64), rtol=0,
                               atol=0)


def test_linear_starts_initialised_like_torch_and_builds_nothing_on_meta():
    torch.manual_seed(7)
    ours = GGUFOps.Linear(48, 32)
    torch.manual_seed(7)
    ref = torch.nn.Linear(48, 32)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    with torch.device("meta"):
        assert GGUFOps.Linear(48, 32).weight.is_meta
