"""VRAM planner: its byte counts equal what is really resident, and its recommendations behave sensibly."""

import pytest
import torch

from kontext_core.model.flux import KONTEXT_DEV, Flux, FluxParams
from kontext_core.planner import Assumptions, plan, recommend, report, storage_layout
from kontext_core.streaming import model_block_bytes, stream_model
from kontext_core.weights.loader import load_transformer

SMALL = FluxParams(vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=3,
                   axes_dim=(4, 6, 6))


def small_model_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {k: (torch.randn_like(v) * 0.05).to(torch.bfloat16) for k, v in Flux(SMALL).state_dict().items()}
    path = tmp_path / "small.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("storage,weight_dtype", [("bf16", None), ("fp8_e4m3fn", "fp8_e4m3fn")])
def test_planned_bytes_equal_the_loaded_model(tmp_path, storage, weight_dtype):
    model = load_transformer(small_model_file(tmp_path), weight_dtype=weight_dtype)
    _, blocks, fixed = model_block_bytes(model)
    layout = storage_layout(SMALL, storage)
    assert layout.block_bytes == blocks
    assert layout.fixed_bytes == fixed


def test_planned_residency_matches_streaming_on_a_simulated_device(tmp_path):
    """Same budget -> the planner's resident set and peak are what the streamer really puts on the device."""
    from kontext_core.streaming import plan_residency, streaming_peak

    model = load_transformer(small_model_file(tmp_path))
    layout = storage_layout(SMALL, "bf16")
    budget = layout.fixed_bytes + 2 * max(layout.block_bytes) + layout.block_bytes[0]
    resident = plan_residency(layout.block_bytes, layout.fixed_bytes, budget)
    handle = stream_model(model, "cpu", budget)
    try:
        assert list(handle.plan.resident) == resident
        x = torch.randn(1, 16, 4, 4)
        with torch.inference_mode():
            model.forward_latent(x, torch.tensor([0.5]), torch.randn(1, 3, 32), torch.randn(1, 24),
                                 torch.tensor([2.5]), [x])
        assert handle.peak_device_bytes == streaming_peak(layout.block_bytes, layout.fixed_bytes, resident)
        assert handle.peak_device_bytes <= budget
    finally:
        handle.remove()


def test_full_size_kontext_numbers():
    bf16 = storage_layout(KONTEXT_DEV, "bf16")
    assert bf16.total == 2 * 11_901_408_320
    fp8 = storage_layout(KONTEXT_DEV, "fp8_e4m3fn")
    assert 0.49 < fp8.total / bf16.total < 0.52  # block linears at 1 byte, embedders/norms/biases kept
    p = plan(KONTEXT_DEV, "bf16", 80 * 10**9)
    assert p.mode == "full" and p.resident_blocks == 57 and p.streamed_bytes == 0
    # ~260 TFLOP per step at 8704 tokens -> 1.73 s at 150 TFLOP/s
    assert p.step_seconds == pytest.approx(260e12 / 150e12, rel=0.03)


def test_more_vram_never_recommends_slower():
    a = Assumptions()
    prev = float("inf")
    for gb in (7, 8, 12, 16, 24, 48, 80):
        best = recommend([plan(KONTEXT_DEV, s, gb * 10**9, assumptions=a) for s in ("bf16", "fp8_e4m3fn")])
        assert best is not None and best.fits and best.peak_bytes <= gb * 10**9
        assert best.step_seconds <= prev + 1e-9
        prev = best.step_seconds


def test_too_small_budget_does_not_fit_and_report_says_so():
    p = plan(KONTEXT_DEV, "bf16", 2 * 10**9)
    assert not p.fits and p.mode == "does not fit"
    text = report(KONTEXT_DEV, 1024, 1024, 1, [2], ("bf16", "fp8_e4m3fn"))
    assert "nothing fits" in text


def test_bigger_images_need_more_memory():
    small = plan(KONTEXT_DEV, "fp8_e4m3fn", 80 * 10**9, 512, 512)
    big = plan(KONTEXT_DEV, "fp8_e4m3fn", 80 * 10**9, 1024, 1024, refs=2)
    assert big.peak_bytes > small.peak_bytes and big.step_seconds > small.step_seconds
