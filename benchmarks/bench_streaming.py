"""CPU cost of block streaming and of fp8 weight storage, against full residency measured in the same run.

Mid-size config: hidden 512 (8 heads x 64), 4 double + 8 single blocks, 256 target + 256 context tokens (32x32
latents) + 128 text tokens, fp32 compute, batch 1. On CPU a streamed block's weights are cloned before it runs
and dropped after, so the ratio streamed/resident is the bookkeeping + copy overhead (on a GPU it is the
host->device copy, largely hidden by prefetch). Also prints weight bytes and forward time with fp8 storage.

    python benchmarks/bench_streaming.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from kontext_core.memory import human_bytes  # noqa: E402
from kontext_core.streaming import minimum_budget, model_block_bytes, stream_model  # noqa: E402
from kontext_core.weights.loader import load_transformer  # noqa: E402
from tiny_models import diffusers_sd_to_bfl  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import mid_reference_model  # noqa: E402



def timed_round_robin(fns: dict, repeats: int) -> dict:
    """Median time of each function, run in turns so that load from other processes hits them all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = mid_reference_model()
    sd = diffusers_sd_to_bfl(ref.state_dict())
    del ref
    model = load_transformer(dict(sd), params={"axes_dim": (8, 28, 28)})
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 32, 32, generator=g), torch.randn(1, 16, 32, 32, generator=g)
    txt, y = torch.randn(1, 128, 4096, generator=g), torch.randn(1, 768, generator=g)
    t, gd = torch.tensor([0.7]), torch.tensor([2.5])

    def fwd(m):
        with torch.inference_mode():
            return m.forward_latent(x, t, txt, y, gd, [ctx])

    names, sizes, fixed = model_block_bytes(model)
    want = fwd(model)
    params = {"axes_dim": (8, 28, 28)}
    variants = {"resident": model}
    handles = {}
    for prefetch in (False, True):
        m = load_transformer(dict(sd), params=params)  # shares the weight storage with `model`
        budget = minimum_budget(sizes, fixed, 2 if prefetch else 1)
        handles[prefetch] = stream_model(m, "cpu", budget, prefetch=prefetch)
        variants[f"streamed, prefetch={prefetch}"] = m
    fp8 = load_transformer(dict(sd), params=params, weight_dtype="fp8_e4m3fn")
    variants["fp8 e4m3 storage"] = fp8
    times = timed_round_robin({k: (lambda m=m: fwd(m)) for k, m in variants.items()}, args.repeats)
    base = times["resident"]
    print(f"weights {human_bytes(fixed + sum(sizes))} ({len(names)} blocks); resident forward {base * 1e3:.1f} ms")
    for prefetch, h in handles.items():
        k = f"streamed, prefetch={prefetch}"
        print(f"{k}: budget {human_bytes(h.plan.budget)}, peak {human_bytes(h.peak_device_bytes)}, "
              f"{len(h.plan.streamed_names)} blocks streamed ({human_bytes(h.plan.streamed_bytes_per_step)}/step): "
              f"{times[k] * 1e3:.1f} ms, ratio {times[k] / base:.3f}, identical={torch.equal(fwd(variants[k]), want)}")
    _, sizes8, fixed8 = model_block_bytes(fp8)
    err = ((fwd(fp8) - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    t8 = times["fp8 e4m3 storage"]
    print(f"fp8 e4m3 storage: weights {human_bytes(fixed8 + sum(sizes8))} "
          f"(ratio {(fixed8 + sum(sizes8)) / (fixed + sum(sizes)):.3f}), forward {t8 * 1e3:.1f} ms "
          f"(ratio {t8 / base:.3f}), relative RMS error {err:.4f}")


if __name__ == "__main__":
    main()
