"""Inside ComfyUI on CPU: core KSampler on the pack's MODEL vs on core's Flux MODEL, same weights, same steps.

A seeded FLUX-architecture transformer (hidden 256 = 4 heads x 64, 2 double + 4 single blocks, T5 width 256,
pooled 256) is written as a BFL file; ComfyUI (COMFYUI_PATH, run with COMFYUI_PYTHON) loads it with the pack's
loader and as core's `model_base.Flux`; tests/host/comfy_driver.py then times core's `common_ksampler` on both,
interleaved, one Kontext reference latent of the target's size. Both models use the attention function ComfyUI
chose at start-up (printed; on `--cpu` without flags that is the sub-quadratic one). Prints median seconds and
the ratio ours/core (1.0 = as fast as core).

    COMFYUI_PATH=... COMFYUI_PYTHON=... python benchmarks/bench_host_flux.py [--latent 32] [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

MID = dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
           pooled_projection_dim=256, axes_dims_rope=(8, 28, 28))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32, help="latent side (tokens = (side/2)^2 per image)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=64)
    args = ap.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its interpreter)")
    from host_env import run_driver
    from tiny_models import tiny_diffusers_transformer, write_bfl

    with tempfile.TemporaryDirectory(prefix="bench_host_flux_") as tmp:
        base = Path(tmp)
        for sub in ("custom_nodes", "models/diffusion_models", "input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "comfyui-kontext-native").symlink_to(ROOT, target_is_directory=True)
        write_bfl(tiny_diffusers_transformer(seed=0, **MID), base / "models" / "diffusion_models" / "mid.safetensors")
        job = {"name": "speed", "check": "core_flux_speed", "model": "mid.safetensors", "steps": args.steps,
               "repeats": args.repeats, "latent": [args.latent, args.latent], "text_tokens": args.text_tokens}
        r = run_driver(SimpleNamespace(base=base), [job], timeout=3600)["jobs"]["speed"]
    if not r.get("success"):
        sys.exit(f"benchmark failed: {r.get('driver_error') or r}")
    n = (args.latent // 2) ** 2
    mo, mc = r["median_s"]["ours"], r["median_s"]["core"]
    print(f"hidden {r['hidden']}, blocks {r['blocks']}, tokens {n} target + {n} reference + {args.text_tokens} text, "
          f"{args.steps} euler steps, device {r['device']}, attention {r['attention']}, threads {r['threads']}, "
          f"max|Δ| ours vs core {r['diff']:.1e}")
    print("| MODEL | median KSampler (s) |")
    print("|---|---|")
    print(f"| core Flux | {mc:.3f} |")
    print(f"| Kontext native | {mo:.3f} |")
    print(f"ratio ours/core = {mo / mc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
