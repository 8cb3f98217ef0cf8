"""Dequantization throughput: kontext_core's torch kernels vs gguf-py's reference numpy code, same bytes, same run.

    python benchmarks/bench_gguf_dequant.py [--size 4096] [--threads 1] [--reps 7] [--types Q4_K,Q8_0]

For each type a size x size weight is dequantized; block bytes come from gguf-py's quantizer where it has one
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and are random with finite fp16 scales otherwise (speed does not depend on the
values). Our float32 output is first checked to be identical to gguf-py's. Times are the minimum over
`--reps` interleaved repetitions (ours and the reference alternate, so background load hits both).
Throughput is GB/s of *output*: float32 (4 B/element) for gguf-py and our f32 column, bfloat16 (2 B/element)
for our bf16 column; the ratios are reference time / our time for the same number of elements.

`--threads 1` (the default) compares single-threaded torch with single-threaded numpy; `--threads 0` uses
torch's default thread count. On CPU, setting THP_MEM_ALLOC_ENABLE=1 lets torch's allocator use huge pages
for the temporaries too (our outputs already get them through numpy).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

from kontext_core.quant.gguf_dequant import block_info, dequantize  # noqa: E402

F16_FIELDS = {
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
    QT.IQ4_NL: [0], QT.IQ4_XS: [0],
}
ORDER = [QT.Q8_0, QT.Q5_1, QT.Q5_0, QT.Q4_1, QT.Q4_0, QT.Q6_K, QT.Q5_K, QT.Q4_K, QT.Q3_K, QT.Q2_K, QT.IQ4_XS,
         QT.IQ4_NL, QT.BF16, QT.F16]


def make_bytes(q: QT, n: int, rng) -> np.ndarray:
    if q in F16_FIELDS:
        bs, ts = block_info(q)
        raw = rng.integers(0, 256, (n * n // bs, ts), dtype=np.uint8)
        for off in F16_FIELDS[q]:
            raw[:, off:off + 2] = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16).view(
                np.uint8).reshape(-1, 2)
        return raw.reshape(n, -1)
    w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(w, q)).view(np.uint8).reshape(n, -1)


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--types", default=",".join(q.name for q in ORDER))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n = args.size
    rng = np.random.default_rng(0)
    types = [QT[t.strip().upper()] for t in args.types.split(",") if t.strip()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# GGUF dequantization, {n}x{n} weight ({n * n / 1e6:.1f}M elements), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), numpy {np.__version__} (1 thread), "
          f"{os.cpu_count()} CPUs, load average {load:.2f}; min of {args.reps} interleaved runs\n")
    print("| type | gguf-py ms | gguf-py GB/s (f32 out) | ours f32 ms | ours GB/s (f32 out) | speed-up f32 "
          "| ours bf16 ms | ours GB/s (bf16 out) | speed-up bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    elems = n * n
    for q in types:
        raw = make_bytes(q, n, rng)
        data = torch.from_numpy(raw)
        ref = gguf.quants.dequantize(raw, q).astype(np.float32, copy=False)
        ours = dequantize(data, q, (n, n), torch.float32)
        if not np.array_equal(ours.numpy(), ref):
            print(f"| {q.name} | MISMATCH against gguf-py | | | | | | | |")
            continue
        del ours, ref
        tr = to = tb = float("inf")
        for _ in range(args.reps):
            tr = min(tr, timed(lambda: gguf.quants.dequantize(raw, q)))
            to = min(to, timed(lambda: dequantize(data, q, (n, n), torch.float32)))
            tb = min(tb, timed(lambda: dequantize(data, q, (n, n), torch.bfloat16)))
        print(f"| {q.name} | {tr * 1e3:.1f} | {elems * 4 / tr / 1e9:.2f} | {to * 1e3:.1f} | "
              f"{elems * 4 / to / 1e9:.2f} | {tr / to:.1f}x | {tb * 1e3:.1f} | {elems * 2 / tb / 1e9:.2f} | "
              f"{tr / tb:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
