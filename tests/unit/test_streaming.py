"""Block streaming within a device budget: the residency arithmetic, exact budgets, and bitwise-identical
sampling on CPU (where streamed blocks' weights are real copies made before the block and dropped after)."""

import itertools
import random

import pytest
import torch

from kontext_core.pipeline import sample
from kontext_core.quant.lora import apply_lora
from kontext_core.streaming import (BudgetError, minimum_budget, model_block_bytes, plan_residency, stream_model,
                                    streaming_peak)
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, diffusers_sd_to_bfl, tiny_diffusers_transformer

P = {"axes_dim": TINY_AXES}


# --- the arithmetic -------------------------------------------------------------------------------------------

def brute_force(block_bytes, fixed, budget, buffers):
    best = None
    for res in itertools.product([True, False], repeat=len(block_bytes)):
        if streaming_peak(block_bytes, fixed, res, buffers) <= budget:
            kept = sum(b for b, r in zip(block_bytes, res) if r)
            best = kept if best is None else max(best, kept)
    return best


def test_plan_flux_sizes():
    # FLUX.1 in bf16: double block 36·H²·2 bytes, single 15·H²·2 (+ small biases/norms, ignored here)
    h2 = 3072 ** 2
    dbl, sgl = 36 * h2 * 2, 15 * h2 * 2
    blocks = [dbl] * 19 + [sgl] * 38
    fixed = 500_000_000
    assert plan_residency(blocks, fixed, fixed + sum(blocks)) == [True] * 57
    # 12 GB: every single block that fits is kept, doubles are streamed (the reserve is 2 doubles)
    plan = plan_residency(blocks, fixed, 12 * 10 ** 9)
    assert streaming_peak(blocks, fixed, plan) <= 12 * 10 ** 9
    assert minimum_budget(blocks, fixed) == fixed + 2 * dbl
    assert minimum_budget(blocks, fixed, buffers=1) == fixed + dbl
    with pytest.raises(BudgetError) as e:
        plan_residency(blocks, fixed, fixed + 2 * dbl - 1)
    assert str(fixed + 2 * dbl) in str(e.value) and "minimum" in str(e.value)
    assert plan_residency(blocks, fixed, fixed + 2 * dbl) == [False] * 57


@pytest.mark.parametrize("buffers", [1, 2])
def test_plan_is_optimal_and_within_budget(buffers):
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 7)
        sizes = [rng.choice([36, 15, 15, 9]) for _ in range(n)]
        fixed = rng.randint(0, 20)
        budget = rng.randint(0, fixed + sum(sizes) + 10)
        best = brute_force(sizes, fixed, budget, buffers)
        if best is None:
            assert budget < minimum_budget(sizes, fixed, buffers)
            with pytest.raises(BudgetError):
                plan_residency(sizes, fixed, budget, buffers)
            continue
        assert budget >= minimum_budget(sizes, fixed, buffers)
        plan = plan_residency(sizes, fixed, budget, buffers)
        assert streaming_peak(sizes, fixed, plan, buffers) <= budget
        assert sum(b for b, r in zip(sizes, plan) if r) == best, (sizes, fixed, budget)


# --- the model -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    sd = diffusers_sd_to_bfl(tiny_diffusers_transformer(seed=0).state_dict())
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
              references=[torch.randn(1, 16, 4, 6, generator=g)], steps=2, seed=1, guidance=2.5)
    model = load_transformer(dict(sd), params=P)
    return sd, kw, sample(model, **kw)[0]


def test_block_bytes_of_the_tiny_model(tiny):
    sd, _, _ = tiny
    model = load_transformer(dict(sd), params=P)
    names, sizes, fixed = model_block_bytes(model)
    assert names == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert sizes == [sum(v.numel() * 4 for k, v in sd.items() if k.startswith(n + ".")) for n in names]
    assert fixed + sum(sizes) == sum(v.numel() * 4 for v in sd.values())


@pytest.mark.parametrize("prefetch", [True, False])
def test_streamed_sampling_is_bitwise_identical_and_within_budget(tiny, prefetch):
    sd, kw, full = tiny
    model = load_transformer(dict(sd), params=P)
    names, sizes, fixed = model_block_bytes(model)
    buffers = 2 if prefetch else 1
    originals = {n: p for n, p in model.named_parameters()}
    budgets = [minimum_budget(sizes, fixed, buffers), fixed + buffers * max(sizes) + sizes[-1],
               fixed + sum(sizes) - 1, fixed + sum(sizes)]
    n_streamed_seen = set()
    for budget in budgets:
        handle = stream_model(model, "cpu", budget, prefetch=prefetch)
        streamed = handle.plan.streamed_names
        n_streamed_seen.add(len(streamed))
        with torch.inference_mode():
            out, _ = sample(model, **kw)
        assert torch.equal(out, full), (budget, streamed)
        assert handle.peak_device_bytes <= budget  # the budget is honoured exactly
        assert handle.resident_bytes() == fixed + sum(s for s, r in zip(sizes, handle.plan.resident) if r)
        if streamed:
            assert handle.peak_device_bytes == handle.plan.peak_bytes  # the reserve is really used
            # each streamed block loaded once per step (2 steps), plus the wrap-round prefetch for the next step
            assert handle.loads == 2 * len(streamed) + (1 if prefetch and len(streamed) > 1 else 0)
        else:
            assert handle.peak_device_bytes == fixed + sum(sizes) and handle.loads == 0
        handle.remove()
        assert handle.current_device_bytes == handle.resident_bytes()
        # the plain model again: same parameter objects, no hooks, same output
        assert all(p is originals[n] for n, p in model.named_parameters())
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        assert torch.equal(sample(model, **kw)[0], full)
    # the budgets above exercise: everything streamed, one / both singles resident, everything resident
    assert n_streamed_seen == ({4, 3, 0} if prefetch else {4, 3, 2, 0})


def test_streamed_weights_are_copies_made_before_and_dropped_after(tiny):
    sd, kw, _ = tiny
    model = load_transformer(dict(sd), params=P)
    names, sizes, fixed = model_block_bytes(model)
    handle = stream_model(model, "cpu", fixed + sizes[0] + max(sizes), prefetch=False)
    assert handle.plan.resident == [True, False, False, False]
    block = model.single_blocks[0]
    stored = block.linear1.weight
    seen = []
    block.register_forward_pre_hook(lambda m, a: seen.append(
        (m.linear1.weight is stored, m.linear1.weight.data_ptr() != stored.data_ptr(),
         torch.equal(m.linear1.weight, stored), handle.current_device_bytes)))
    with torch.no_grad():
        sample(model, **{**kw, "steps": 1})
    assert seen == [(False, True, True, fixed + sizes[0] + sizes[2])]
    assert block.linear1.weight is stored and handle.current_device_bytes == fixed + sizes[0]
    handle.remove()


def test_recovers_after_an_interrupted_run(tiny):
    sd, kw, full = tiny
    model = load_transformer(dict(sd), params=P)
    names, sizes, fixed = model_block_bytes(model)
    budget = minimum_budget(sizes, fixed, 2)
    handle = stream_model(model, "cpu", budget)

    def boom(module, args):
        raise KeyboardInterrupt

    h = model.single_blocks[0].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        sample(model, **kw)
    h.remove()
    assert handle.current_device_bytes > handle.resident_bytes()  # a block was left loaded
    with torch.no_grad():
        out, _ = sample(model, **kw)
    assert torch.equal(out, full) and handle.peak_device_bytes <= budget
    handle.remove()
    assert handle.current_device_bytes == handle.resident_bytes()


def test_budget_errors(tiny):
    sd, _, _ = tiny
    model = load_transformer(dict(sd), params=P)
    names, sizes, fixed = model_block_bytes(model)
    need = fixed + 2 * max(sizes)
    with pytest.raises(BudgetError, match=rf"the minimum is .*\({need} bytes\).*turn prefetch off"):
        stream_model(model, "cpu", need - 1)
    with pytest.raises(BudgetError, match=rf"\({fixed + max(sizes)} bytes\)"):
        stream_model(model, "cpu", fixed + max(sizes) - 1, prefetch=False)
    handle = stream_model(model, "cpu", need)
    with pytest.raises(ValueError, match="already streaming"):
        stream_model(model, "cpu", need)
    handle.remove()
    stream_model(model, "cpu", need).remove()


def test_streaming_fp8_weights_with_lora(tiny):
    """Bytes are counted as stored (fp8 = 1 byte), and LoRA patches still apply to streamed blocks."""
    sd, kw, _ = tiny
    model = load_transformer(dict(sd), params=P, weight_dtype="fp8_e4m3fn")
    names, sizes, fixed = model_block_bytes(model)
    _, sizes32, _ = model_block_bytes(load_transformer(dict(sd), params=P))
    assert all(s < s32 / 3 for s, s32 in zip(sizes, sizes32))
    w = sd["single_blocks.1.linear1.weight"]
    g = torch.Generator().manual_seed(3)
    key = "diffusion_model.single_blocks.1.linear1"
    apply_lora(model, {f"{key}.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
                       f"{key}.lora_B.weight": torch.randn(w.shape[0], 4, generator=g)})
    with torch.no_grad():
        want, _ = sample(model, **kw)
        with stream_model(model, "cpu", minimum_budget(sizes, fixed)) as handle:
            assert "single_blocks.1" in handle.plan.streamed_names
            got, _ = sample(model, **kw)
    assert torch.equal(got, want) and model.single_blocks[1].linear1.weight.dtype == torch.float8_e4m3fn
