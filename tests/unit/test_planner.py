"""VRAM planner: byte counts equal real files and loaded models, time arithmetic per card equals hand-computed
cases, RAM limits reject plans, and recommendations move the expected way when the machine shrinks."""

import pytest
import torch

from kontext_core.errors import InputError
from kontext_core.hardware import GPUS, GPUSpec, GiB, find_gpu
from kontext_core.memory import CLIP_L_PARAMS, ae_param_count, largest_layer_bytes, text_encoder_bytes
from kontext_core.model.flux import KONTEXT_DEV, Flux, FluxParams
from kontext_core.planner import (Assumptions, Machine, machine, plan, recommend, report, storage_layout)
from kontext_core.streaming import model_block_bytes, stream_model
from kontext_core.weights.loader import load_transformer

SMALL = FluxParams(vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=3,
                   axes_dim=(4, 6, 6))
# rows of 256 so that the K-quants really apply (smaller rows fall back to F16)
K_SMALL = FluxParams(vec_in_dim=32, context_in_dim=256, hidden_size=256, num_heads=4, depth=1, depth_single_blocks=2,
                     axes_dim=(8, 28, 28))
H = 3072  # Kontext dev hidden size
EXACT = Assumptions(efficiency=1.0, mem_efficiency=1.0)


def model_file(tmp_path, params, name="small.safetensors"):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {k: (torch.randn_like(v) * 0.05).to(torch.bfloat16) for k, v in Flux(params).state_dict().items()}
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def card(**kw) -> GPUSpec:
    base = dict(name="test card", vram_gib=80, bf16_tflops=100.0, fp8_tflops=200.0, mem_gbps=1000.0,
                compute_capability=(8, 9), pcie_gen=4, pcie_lanes=16)
    return GPUSpec(**{**base, **kw})


def on(gpu, vram_gib=None, ram_gib=64) -> Machine:
    return machine(gpu, vram_gib, ram_gib)


# --- bytes: against the loaded model and the converter's files --------------------------------------------------

@pytest.mark.parametrize("storage,weight_dtype", [("bf16", None), ("fp8_e4m3fn", "fp8_e4m3fn")])
def test_planned_bytes_equal_the_loaded_model(tmp_path, storage, weight_dtype):
    model = load_transformer(model_file(tmp_path, SMALL), weight_dtype=weight_dtype)
    _, blocks, fixed = model_block_bytes(model)
    layout = storage_layout(SMALL, storage)
    assert list(layout.block_bytes) == blocks
    assert layout.fixed_bytes == fixed


@pytest.mark.parametrize("target", ["Q8_0", "Q6_K", "Q4_K_M", "Q2_K"])
def test_planned_bytes_equal_a_converted_gguf_file_and_its_loaded_model(tmp_path, target):
    import gguf

    from kontext_core.weights.gguf_convert import convert_to_gguf

    out = tmp_path / f"small-{target}.gguf"
    convert_to_gguf(model_file(tmp_path, K_SMALL), out, target)
    layout = storage_layout(K_SMALL, target)
    assert layout.total == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(out)).tensors)
    _, blocks, fixed = model_block_bytes(load_transformer(out))
    assert list(layout.block_bytes) == blocks and layout.fixed_bytes == fixed


def test_planned_residency_matches_streaming_on_a_simulated_device(tmp_path):
    """Same budget -> the planner's resident set and peak are what the streamer really puts on the device."""
    from kontext_core.streaming import plan_residency, streaming_peak

    model = load_transformer(model_file(tmp_path, SMALL))
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
    assert largest_layer_bytes(KONTEXT_DEV) == (3 * H + 4 * H) * H * 2  # single-block linear1 in bf16
    assert ae_param_count() == 83_819_683


def test_text_encoder_sizes_match_the_published_files():
    clip = 2 * CLIP_L_PARAMS
    assert text_encoder_bytes("fp16") - clip == pytest.approx(9.52e9, rel=0.005)  # t5xxl_fp16: 9.5 GB of weights
    assert text_encoder_bytes("fp8") - clip == pytest.approx(4.89e9, rel=0.005)  # t5xxl_fp8_e4m3fn: 4.89 GB
    assert text_encoder_bytes("none") == 0
    sizes = [text_encoder_bytes(t) for t in ("fp16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K")]
    assert sizes == sorted(sizes, reverse=True)
    with pytest.raises(InputError, match="fp16"):
        text_encoder_bytes("t5_int4")


# --- the GPU table -------------------------------------------------------------------------------------------

def test_gpu_table_matches_vendor_figures():
    # dense figures printed in NVIDIA's whitepapers / datasheets (FP32 accumulation)
    assert find_gpu("RTX 4090").bf16_tflops == pytest.approx(165.2, abs=0.2)
    assert find_gpu("RTX 4090").fp8_tflops == pytest.approx(330.3, abs=0.4)
    assert find_gpu("RTX 3090").bf16_tflops == pytest.approx(71.0, abs=0.3)
    assert find_gpu("RTX 5090").bf16_tflops == pytest.approx(209.5, abs=0.3)
    assert find_gpu("H100").fp8_tflops == 1979 and find_gpu("L4").bf16_tflops == 121
    assert not find_gpu("RTX 3090").fp8_matmul and not find_gpu("A100 80GB").fp8_matmul
    assert find_gpu("RTX 4060").fp8_matmul and find_gpu("H200").fp8_matmul
    assert find_gpu("RTX 4060 Laptop").pcie_lanes == 8 and find_gpu("RTX 4060 Laptop").laptop
    assert find_gpu("RTX 4060 Laptop").bf16_tflops < find_gpu("RTX 4060").bf16_tflops
    assert find_gpu("RTX 4060 Laptop").link_gbps == pytest.approx(8 * 1.969)
    vram = {g.vram_gib for g in GPUS.values()}
    assert {8, 10, 12, 16, 24} <= vram


@pytest.mark.parametrize("detected,entry", [
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 4060 Laptop GPU", "RTX 4060 Laptop"),
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB"), ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"), ("h200", "H200")])
def test_detected_names_find_their_entry(detected, entry):
    assert find_gpu(detected).name == entry


def test_unknown_gpu_and_laptop_parts_are_not_guessed():
    with pytest.raises(InputError, match="RTX 3080 Laptop"):  # suggests, but never a desktop 3080 Ti
        find_gpu("NVIDIA GeForce RTX 3080 Ti Laptop GPU")


def test_machine_without_a_gpu_or_with_bad_sizes_says_what_to_pass(monkeypatch):
    import kontext_core.planner as planner

    monkeypatch.setattr(planner, "detect_gpu", lambda: None)
    with pytest.raises(InputError, match="--gpu"):
        machine(None, 8, 16)
    with pytest.raises(InputError, match="ram"):
        machine("RTX 4090", None, -1)
    m = machine("RTX 4090", 20, 32)
    assert m.vram_bytes == 20 * GiB and m.ram_bytes == 32 * GiB


# --- time: hand-computed cases -------------------------------------------------------------------------------

def kontext_flops(n_img: int, n_txt: int = 512) -> float:
    """By hand: a double block's img and txt halves have 12 H^2 weights each (qkv 3H^2, proj H^2, MLP 8H^2),
    passed by their own tokens; a single block has 12 H^2 (linear1 7H^2, linear2 5H^2) for every token;
    modulation weights (double 2 x 6H^2, single 3H^2) see one vector; attention is 4 N^2 H per block."""
    n = n_img + n_txt
    double = 2 * 12 * H * H * (n_img + n_txt) + 2 * 12 * H * H + 4 * n * n * H
    single = 2 * 12 * H * H * n + 2 * 3 * H * H + 4 * n * n * H
    return 19 * double + 38 * single


@pytest.mark.parametrize("name,tflops", [("RTX 4090", 128 * 2.52 * 512 / 1e3), ("RTX 3060", 28 * 1.777 * 512 / 1e3),
                                         ("RTX 4060 Laptop", 24 * 2.37 * 512 / 1e3), ("H200", 989)])
def test_compute_time_per_card_by_hand(name, tflops):
    p = plan(KONTEXT_DEV, "bf16", on(name, vram_gib=80), 1024, 1024, 1, assumptions=EXACT)
    # 1024^2 target (4096 tokens) + one 1024^2 reference (4096) + 512 text; biases and norms not counted
    assert p.compute_seconds == pytest.approx(kontext_flops(8192) / (tflops * 1e12), rel=2e-3)
    assert p.dequant_seconds == 0 and p.streamed_bytes == 0 and p.step_seconds == p.compute_seconds


def test_fp8_upcast_costs_memory_traffic_and_fp8_matmul_doubles_the_linear_rate():
    block_weights = 19 * 36 * H * H + 38 * 15 * H * H  # every 2-D block weight (incl. modulation) is fp8
    p = plan(KONTEXT_DEV, "fp8_e4m3fn", on("RTX 3070", 80), assumptions=EXACT)
    assert p.dequant_seconds == pytest.approx(block_weights * 7 / 448e9, rel=1e-6)  # 1+2 B cast, 2+2 B scale

    attn = 57 * 4 * 8704**2 * H
    lin = kontext_flops(8192) - attn
    fast = plan(KONTEXT_DEV, "fp8_e4m3fn", on("RTX 4090", 80),
                assumptions=Assumptions(efficiency=1.0, mem_efficiency=1.0, fp8_matmul=True))
    g = find_gpu("RTX 4090")
    assert fast.dequant_seconds == 0
    assert fast.compute_seconds == pytest.approx(lin / (g.fp8_tflops * 1e12) + attn / (g.bf16_tflops * 1e12), rel=2e-3)
    # the same flag on a GPU without fp8 matmul changes nothing and says why
    slow = plan(KONTEXT_DEV, "fp8_e4m3fn", on("RTX 3070", 80),
                assumptions=Assumptions(efficiency=1.0, mem_efficiency=1.0, fp8_matmul=True))
    assert slow.step_seconds == p.step_seconds and any("no fp8 matmul" in n for n in slow.notes)


def test_copies_over_the_link_by_hand():
    # compute and dequant ~free: every copied byte is exposed, at 8 lanes x 1.969 GB/s x 0.5 (pageable)
    gpu = card(bf16_tflops=1e9, fp8_tflops=1e9, mem_gbps=1e9, pcie_lanes=8)
    p = plan(KONTEXT_DEV, "bf16", Machine(gpu, 12 * GiB, 64 * GiB), assumptions=EXACT)
    assert p.mode == "partial" and p.streamed_bytes > 0
    assert p.transfer_seconds == pytest.approx(p.streamed_bytes / (8 * 1.969e9 * 0.5), rel=1e-9)
    assert p.exposed_transfer_seconds == pytest.approx(p.transfer_seconds, rel=1e-3)
    # a real card hides part of it behind compute, never more than `overlap` of the compute
    real = plan(KONTEXT_DEV, "bf16", Machine(find_gpu("RTX 4090"), 12 * GiB, 64 * GiB), assumptions=EXACT)
    assert 0 < real.exposed_transfer_seconds < real.transfer_seconds
    assert real.exposed_transfer_seconds >= real.transfer_seconds - 0.5 * (real.compute_seconds + real.dequant_seconds)
    pinned = plan(KONTEXT_DEV, "bf16", Machine(find_gpu("RTX 4090"), 12 * GiB, 64 * GiB),
                  assumptions=Assumptions(efficiency=1.0, mem_efficiency=1.0, pinned=True))
    assert pinned.exposed_transfer_seconds < real.exposed_transfer_seconds


# --- RAM -----------------------------------------------------------------------------------------------------

def test_a_plan_that_exceeds_system_ram_is_rejected_with_the_reason():
    m = Machine(find_gpu("RTX 4060 Laptop"), 8 * GiB, 16 * GiB)
    p = plan(KONTEXT_DEV, "fp8_e4m3fn", m, text_encoder="fp16")
    assert p.mode == "partial" and not p.fits  # fits the GPU, not the RAM
    a = Assumptions()
    expected = a.host_reserve_bytes + p.streamed_bytes + text_encoder_bytes("fp16") + 4 * 83_819_683
    assert p.peak_ram_bytes == expected > 16 * GiB
    assert len(p.reasons) == 1 and p.reasons[0].startswith("RAM") and "text encoders" in p.reasons[0]
    # freeing the text encoders after encoding (a saved conditioning) brings it under 16 GiB
    freed = plan(KONTEXT_DEV, "fp8_e4m3fn", m, text_encoder="fp16", assumptions=Assumptions(free_text_encoder=True))
    text_phase = a.host_reserve_bytes + text_encoder_bytes("fp16") + 4 * 83_819_683  # encoding, before the DiT
    assert text_phase > expected - text_encoder_bytes("fp16")  # now the encoding phase is the peak
    assert freed.fits and freed.peak_ram_bytes == text_phase < 16 * GiB
    text = report(KONTEXT_DEV, m, text_encoder="fp16")
    assert "fp8_e4m3fn: RAM: needs" in text and "it would swap" in text


def test_too_small_vram_does_not_fit_and_report_says_so():
    m = Machine(find_gpu("RTX 4090"), 2 * GiB, 64 * GiB)
    p = plan(KONTEXT_DEV, "bf16", m)
    assert not p.fits and p.mode == "does not fit" and p.reasons[0].startswith("VRAM")
    assert "nothing fits" in report(KONTEXT_DEV, m, storages=("bf16", "fp8_e4m3fn"))


# --- direction of the recommendations ------------------------------------------------------------------------

def best(m, **kw):
    a = Assumptions(**kw)
    rec = recommend([plan(KONTEXT_DEV, s, m, text_encoder="fp16", assumptions=a) for s in
                     ("bf16", "fp8_e4m3fn", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")], a.max_slowdown)
    assert rec is not None
    return rec


def test_less_ram_moves_to_smaller_weights():
    gpu = find_gpu("RTX 4060 Laptop")
    picks = [best(Machine(gpu, 8 * GiB, ram * GiB)).plan for ram in (64, 24, 16, 14)]
    assert [p.storage for p in picks][0] != picks[-1].storage
    sizes = [p.weights_bytes for p in picks]
    assert sizes == sorted(sizes, reverse=True)
    assert all(p.peak_ram_bytes <= ram * GiB for p, ram in zip(picks, (64, 24, 16, 14)))


def test_less_vram_never_predicts_faster():
    gpu = find_gpu("RTX 4090")
    fastest = [best(Machine(gpu, v * GiB, 64 * GiB)).fastest.step_seconds for v in (24, 16, 12, 10, 8, 6)]
    assert fastest == sorted(fastest)
    resident = [plan(KONTEXT_DEV, "fp8_e4m3fn", Machine(gpu, v * GiB, 64 * GiB)).resident_blocks
                for v in (24, 16, 12, 10, 8)]
    assert resident == sorted(resident, reverse=True) and resident[0] == 57 and resident[-1] < 57


def test_slower_link_moves_to_fewer_streamed_bytes():
    m = Machine(find_gpu("RTX 4090"), 10 * GiB, 64 * GiB)
    picks = [best(m, link_gbps=gbps).plan for gbps in (32, 8, 2, 0.5)]
    streamed = [p.streamed_bytes for p in picks]
    assert streamed == sorted(streamed, reverse=True) and streamed[0] > streamed[-1]
    times = [plan(KONTEXT_DEV, "bf16", m, assumptions=Assumptions(link_gbps=g)).step_seconds for g in (32, 8, 2)]
    assert times == sorted(times)


def test_recommendation_trades_speed_for_quality_within_the_allowed_slowdown():
    m = Machine(find_gpu("RTX 4090"), 24 * GiB, 64 * GiB)
    plans = [plan(KONTEXT_DEV, s, m) for s in ("Q4_K_M", "Q8_0", "Q2_K")]
    rec = recommend(plans, max_slowdown=1.25)
    assert rec.plan.storage == "Q8_0"  # lower error than Q4_K_M/Q2_K and not much slower
    assert "lowest error" in rec.tradeoff or "fastest" in rec.tradeoff
    strict = recommend(plans, max_slowdown=1.0)
    assert strict.plan is strict.fastest
    assert strict.plan.step_seconds == min(p.step_seconds for p in plans)


def test_bigger_images_need_more_memory_and_time():
    m = Machine(find_gpu("H100"), 80 * GiB, 64 * GiB)
    small = plan(KONTEXT_DEV, "fp8_e4m3fn", m, 512, 512)
    big = plan(KONTEXT_DEV, "fp8_e4m3fn", m, 1024, 1024, refs=2)
    assert big.peak_bytes > small.peak_bytes and big.step_seconds > small.step_seconds


def test_bad_arguments_are_refused():
    m = Machine(find_gpu("RTX 4090"), 24 * GiB, 64 * GiB)
    with pytest.raises(InputError, match="storage 'int4'"):
        plan(KONTEXT_DEV, "int4", m)
    with pytest.raises(InputError, match="width"):
        plan(KONTEXT_DEV, "bf16", m, width=0)
    with pytest.raises(InputError, match="refs"):
        plan(KONTEXT_DEV, "bf16", m, refs=-1)


def test_a_report_builds_no_model(monkeypatch):
    """Shapes and layouts are computed once per architecture: a second report constructs no Flux at all."""
    m = Machine(find_gpu("RTX 3060"), 12 * GiB, 32 * GiB)
    report(KONTEXT_DEV, m)
    built = []
    orig = Flux.__init__
    monkeypatch.setattr(Flux, "__init__", lambda self, *a, **k: (built.append(1), orig(self, *a, **k))[1])
    report(KONTEXT_DEV, Machine(find_gpu("RTX 4070"), 12 * GiB, 16 * GiB), 768, 1024, 2, "Q4_K")
    assert built == []


def test_cli_plan_prints_the_machine_and_a_recommendation(capsys):
    from kontext_core.cli import main

    assert main(["plan", "--gpu", "RTX 4060 Laptop", "--ram", "16", "--text-encoder", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "RTX 4060 Laptop" in out and "Recommended:" in out and "Trade-off:" in out
    assert main(["plan", "--gpu", "GTX 970"]) == 1
    assert "not in the planner's table" in capsys.readouterr().err
