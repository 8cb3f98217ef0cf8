"""GGUF in the engine on CPU: forward time of Q8_0 / Q4_K vs bf16 weights, and peak RSS loading a ~1 GB Q4_K file.

1. Forward: the mid config of bench_forward.py (hidden 512, 4 double + 8 single blocks, 1024 + 1024 image
   tokens + 128 text, fp32 compute). bf16 weights are upcast per layer; GGUF weights are dequantized per
   layer at every forward. Prints median times and ratios to bf16, interleaved in one run.
2. Load: a Q4_K file of ~1 GB (block weights in Q4_K with random nibbles and finite scales — loading cost does
   not depend on the values — the rest as the converter's policy keeps them) loaded in a fresh process with
   `load_transformer`, every quantized byte then read once; peak RSS over the post-import baseline vs the file
   size (target <= 1.15x).

    python benchmarks/bench_gguf.py [--repeats 3] [--gb 1.0] [--skip-forward] [--skip-load]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from kontext_core import tokens as tok  # noqa: E402
from kontext_core.model.flux import Flux, FluxParams  # noqa: E402
from kontext_core.quant.gguf_dequant import block_info, nbytes_for  # noqa: E402
from kontext_core.quant.gguf_quantize import choose_qtype  # noqa: E402
from kontext_core.weights.gguf_convert import convert_to_gguf  # noqa: E402
from kontext_core.weights.gguf_file import write_gguf  # noqa: E402
from kontext_core.weights.loader import load_transformer  # noqa: E402

MID = FluxParams(hidden_size=512, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(8, 28, 28))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from kontext_core.quant.ggml_tensor import GGMLTensor
from kontext_core.weights.loader import load_transformer
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = rss()
t0 = time.perf_counter()
m = load_transformer(sys.argv[1])
t_load = time.perf_counter() - t0
for p in m.parameters():
    raw = p.as_subclass(torch.Tensor) if isinstance(p, GGMLTensor) else p
    (raw.view(torch.uint8) if raw.element_size() == 1 else raw.view(torch.int16) if raw.element_size() == 2 else raw).max()
t_read = time.perf_counter() - t0
print(json.dumps(dict(load_s=t_load, read_s=t_read, peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)))
"""


def bench_forward(repeats: int) -> None:
    from safetensors.torch import save_file

    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    sd = {k: (torch.randn_like(v) * 0.02 if v.ndim > 1 else 1 + 0.1 * torch.randn_like(v)).to(torch.bfloat16)
          for k, v in Flux(MID).state_dict().items()}
    src = os.path.join(tmp, "mid.safetensors")
    save_file(sd, src)
    models = {"bf16": load_transformer(src)}
    for target in ("Q8_0", "Q4_K_M"):
        out = os.path.join(tmp, f"mid-{target}.gguf")
        convert_to_gguf(src, out, target)
        models[target] = load_transformer(out)
    x = torch.randn(1, 16, 64, 64)
    img, ids, _ = tok.kontext_tokens(x, [torch.randn(1, 16, 64, 64)])
    args = (img, ids, torch.randn(1, 128, 4096), torch.zeros(1, 128, 3), torch.tensor([0.6]), torch.randn(1, 768),
            torch.tensor([2.5]))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(*args)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(*args)
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["bf16"])
    print(f"forward, mid config, threads {torch.get_num_threads()}")
    print("| weights | median forward (s) | ratio to bf16 |")
    print("|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f}x |")


def write_q4k_file(path: str, gb: float) -> int:
    h = 1536
    per_block = 2 * 18 * h * h * 144 / 256  # a double block's Q4_K bytes (approx.)
    depth = max(1, int(gb * 2**30 * 0.6 / per_block))
    params = FluxParams(hidden_size=h, num_heads=12, depth=depth, depth_single_blocks=depth * 2, axes_dim=(16, 56, 56))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
    rng = np.random.default_rng(0)

    def make(name, shape, q):
        if q.name == "Q4_K":
            blocks = nbytes_for(q, shape) // block_info(q)[1]
            b = rng.integers(0, 256, size=(blocks, 144), dtype=np.uint8)
            b[:, 0:2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
            b[:, 2:4] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
            return b.reshape(shape[0], -1)
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    items = []
    for name, shape in shapes.items():
        q = choose_qtype(name, shape, "Q4_K_M")
        q = type(q).Q4_K if q.name in ("Q6_K", "Q4_K") else q  # all block weights Q4_K (a pure-Q4_K file)
        items.append((name, (lambda n=name, s=shape, qq=q: make(n, s, qq)), q, shape))
    write_gguf(path, items)
    return os.path.getsize(path)


def bench_load(gb: float) -> None:
    path = os.path.join(tempfile.mkdtemp(), "q4k.gguf")
    t0 = time.perf_counter()
    size = write_q4k_file(path, gb)
    print(f"\nQ4_K file: {size / 2**20:.0f} MiB, written in {time.perf_counter() - t0:.1f} s")
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), path], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print("| load (s) | load + read every byte (s) | peak RSS over baseline (MiB) | peak RSS / file size |")
    print("|---|---|---|---|")
    print(f"| {r['load_s']:.3f} | {r['read_s']:.3f} | {r['peak_mb']:.0f} | {r['peak_mb'] / (size / 2**20):.3f}x |")
    os.remove(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    a = ap.parse_args()
    if not a.skip_forward:
        bench_forward(a.repeats)
    if not a.skip_load:
        bench_load(a.gb)


if __name__ == "__main__":
    main()
