"""Batch throughput: items/s of the one-machine runner (the reference, measured in the same run) and of the Ray
Data mode with 1..N model workers on a local Ray instance. Kontext-Tiny, 64x64 scene edits.

    python benchmarks/bench_batch.py --items 24 --steps 4 --workers 1 2

Each run starts from an empty output folder. "job" counts the whole run, loading the model(s) and starting the
workers included: what a user waits for. "steady" is the rate after the first wave (one batch per worker) was
written, up to the last output (from the files' times): what a long job converges to. The Ray instance is
started once, before the timed runs (on a real cluster it is already running). On CPU each worker runs torch
with one thread, and so does the reference, so the ratio shows what more workers buy; it can only
exceed 1 where there are free cores (or GPUs) for them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "batch"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if args.items <= args.batch_size * max(args.workers):
        ap.error("--items must exceed --batch-size x the most workers (the steady rate needs a second wave)")

    import torch

    from batch_jobs import make_job
    from kontext_core.batch import Defaults, ModelSpec, load_job, run_local

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench_batch_")
    manifest, _ = make_job(work, args.items)
    model = ModelSpec(device="cpu")
    job = load_job(manifest, model, Defaults(steps=args.steps))
    print(f"{args.items} Kontext-Tiny edits, 64x64, {args.steps} steps, batch size {args.batch_size}; "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start)")

    def timed(label, run, workers=1):
        out = os.path.join(work, label.replace(" ", "_"))
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        report = run(out)
        dt = time.perf_counter() - t0
        assert len(report.done) == args.items and not report.failed, report.summary()
        stamps = sorted(os.stat(os.path.join(out, o)).st_mtime for o in report.done)
        # The first wave (one batch per worker) lands around stamps[0]: count only the items after it, over the
        # time after stamps[0]. Workers that start late make this an underestimate, never an overestimate.
        first_wave = args.batch_size * workers
        return args.items / dt, (len(stamps) - first_wave) / max(stamps[-1] - stamps[0], 1e-9)

    ref = timed("local", lambda out: run_local(job, out, model, batch_size=args.batch_size, progress=False))
    rows = [("one machine (reference)", ref)]
    try:
        import ray

        from kontext_core.batch_ray import run_ray
    except ImportError:
        print("ray is not installed: only the reference was measured (pip install '.[scale]')")
    else:
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        for w in args.workers:
            rows.append((f"ray, {w} worker{'s' * (w > 1)}",
                         timed(f"ray {w}", lambda out: run_ray(job, out, model, batch_size=args.batch_size,
                                                               workers=w, progress=False), w)))
        ray.shutdown()
    print(f"{'mode':<26}{'job items/s':>12}{'vs ref':>8}{'steady items/s':>16}{'vs ref':>8}")
    for label, (rate, steady) in rows:
        print(f"{label:<26}{rate:>12.3f}{rate / ref[0]:>7.2f}x{steady:>16.3f}{steady / ref[1]:>7.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
