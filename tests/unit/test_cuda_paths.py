"""What only a CUDA device exercises: quantizing on the GPU, fp8 matmul through torch._scaled_mm, block streaming
with a copy stream and pinned memory. Skipped without CUDA; benchmarks/gpu_suite.py runs them (`-m cuda`) when a
GPU is available."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from kontext_core.model.ops import CastLinear
from kontext_core.pipeline import sample
from kontext_core.quant.gguf_dequant import dequantize
from kontext_core.quant.gguf_quantize import quantize, quantize_tensor
from kontext_core.streaming import minimum_budget, model_block_bytes, stream_model
from kontext_core.weights.fp8 import quantize_fp8
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, diffusers_sd_to_bfl, tiny_diffusers_transformer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def rel_rms(a, b):
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def test_quantize_on_cuda_matches_cpu():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    # Q8_0 is the same float32 arithmetic in the same order: identical bytes
    gpu = quantize_tensor(w, QT.Q8_0, device="cuda")
    assert gpu.is_cuda
    np.testing.assert_array_equal(gpu.cpu().numpy(), quantize(w, QT.Q8_0))
    # K-quants search scales with sums the GPU may accumulate in another order: the same error, not the same bytes
    for q in (QT.Q4_K, QT.Q6_K):
        on_cpu = dequantize(torch.from_numpy(quantize(w, q)), q, tuple(w.shape), torch.float32)
        on_gpu = dequantize(quantize_tensor(w, q, device="cuda"), q, tuple(w.shape), torch.float32).cpu()
        assert rel_rms(on_gpu, w) <= rel_rms(on_cpu, w) * 1.02


def test_fp8_matmul_goes_through_scaled_mm(monkeypatch):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmul needs compute capability >= 8.9")
    g = torch.Generator().manual_seed(0)
    lin = CastLinear(256, 192, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    q, s = quantize_fp8((torch.randn(192, 256, generator=g) * 0.05).cuda())
    lin.weight = torch.nn.Parameter(q, requires_grad=False)
    lin.scale_weight = s
    x = torch.randn(4, 37, 256, generator=g).to("cuda", torch.bfloat16)
    with torch.no_grad():
        upcast = lin(x)
        calls = []
        real = torch._scaled_mm
        monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
        lin.fp8_matmul = True
        got = lin(x)
    assert calls, "the fp8 layer fell back to upcasting on a GPU that supports fp8 matmul"
    assert got.dtype == torch.bfloat16 and got.shape == upcast.shape
    assert rel_rms(got, upcast) < 0.04  # e4m3 input rounding, as on CPU


@pytest.mark.parametrize("pin", [False, True])
def test_streaming_on_cuda_matches_resident_within_budget(pin):
    sd = diffusers_sd_to_bfl(tiny_diffusers_transformer(seed=0).state_dict())
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
              references=[torch.randn(1, 16, 4, 6, generator=g)], steps=2, seed=1, guidance=2.5,
              dtype=torch.float32)
    resident = load_transformer(dict(sd), params={"axes_dim": TINY_AXES}, device="cuda")
    with torch.inference_mode():
        want, _ = sample(resident, device="cuda", **kw)
    model = load_transformer(dict(sd), params={"axes_dim": TINY_AXES})
    _, sizes, fixed = model_block_bytes(model)
    budget = minimum_budget(sizes, fixed, 2)
    with stream_model(model, "cuda", budget, pin_memory=pin, prefetch=True) as handle:
        with torch.inference_mode():
            got, _ = sample(model, device="cuda", **kw)
        assert handle.plan.streamed_names and handle.loads > 0
        assert handle.peak_device_bytes <= budget
    assert got.is_cuda
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
