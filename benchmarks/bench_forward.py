"""CPU forward time of the engine's DiT vs diffusers' FluxTransformer2DModel on the same weights, same run.

Mid-size config: hidden 512 (8 heads x 64), 4 double + 8 single blocks, 1024 target + 1024 context tokens
(a 64x64 latent each) + 128 text tokens, fp32, batch 1. Prints median times and the ratio ours/diffusers
(target <= 0.9).

    python benchmarks/bench_forward.py [--repeats 5] [--threads N]
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

from kontext_core import tokens as tok  # noqa: E402
from kontext_core.weights.loader import load_transformer  # noqa: E402
from tiny_models import diffusers_sd_to_bfl  # noqa: E402

MID = dict(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=8,
           joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(8, 28, 28))


def mid_reference_model():
    """The seeded diffusers mid-size transformer both forward benchmarks measure (weights N(0, 0.02))."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**MID).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    return ref


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = mid_reference_model()
    ours = load_transformer(diffusers_sd_to_bfl(ref.state_dict()), params={"axes_dim": (8, 28, 28)})

    x = torch.randn(1, 16, 64, 64)
    ctx_lat = torch.randn(1, 16, 64, 64)
    txt = torch.randn(1, 128, 4096)
    y = torch.randn(1, 768)
    t = torch.tensor([0.6])
    g = torch.tensor([2.5])
    img, ids, n = tok.kontext_tokens(x, [ctx_lat])
    txt_ids = torch.zeros(1, 128, 3)

    def run_ours():
        with torch.inference_mode():
            return ours(img, ids, txt, txt_ids, t, y, g)

    def run_diffusers():
        with torch.inference_mode():
            return ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids[0],
                       txt_ids=txt_ids[0], guidance=g).sample

    diff = (run_ours() - run_diffusers()).abs().max().item()
    # interleave to share thermal/cache conditions
    t_ours, t_ref = [], []
    for _ in range(args.repeats):
        t_ref.append(timed(run_diffusers, 1))
        t_ours.append(timed(run_ours, 1))
    mo, md = statistics.median(t_ours), statistics.median(t_ref)
    print(f"tokens: {n} target + {img.shape[1] - n} context + 128 text; threads {torch.get_num_threads()}; "
          f"max|Δ| {diff:.1e}")
    print("| implementation | median forward (s) |")
    print("|---|---|")
    print(f"| diffusers FluxTransformer2DModel | {md:.3f} |")
    print(f"| kontext_core Flux | {mo:.3f} |")
    print(f"ratio ours/diffusers = {mo / md:.3f} (target <= 0.9)")


if __name__ == "__main__":
    main()
