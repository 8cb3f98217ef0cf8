"""Batch editing on a Ray cluster (Ray Data), the same job, outputs and resume rule as `batch.run_local`.

    validated items ─► from_items ─► decode (tasks) ─► edit (actor pool: one model per actor, per GPU)
                                                          ─► write (tasks: PNG + sidecar, atomic) ─► report

Ray Data schedules, streams and retries; nothing here schedules work itself. A worker that dies is restarted
and its batch is retried by Ray (actors are created with unlimited restarts and task retries). Outputs are
written only by the write stage, under their final names by rename, so a retried batch rewrites the same
complete files: nothing is lost, duplicated or half-written. The manifest is read and checked by the driver
(`batch.load_job`), so a bad row stops the job before the cluster does any work.

Ray is an optional extra (`pip install 'comfyui-kontext-native[scale]'`); nothing else imports this module.
The output folder must be one that every node sees (a shared file system) when the cluster has several nodes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from .batch import (DEFAULT_BATCH_SIZE, EDIT_ERRORS, Item, ModelSpec, Report, failure, plan_job, read_picture,
                    write_result)
from .errors import KontextError

CPU_WORKERS = 2  # model replicas on a cluster without GPUs, unless --workers says otherwise
# Decode / write tasks are light and must never wait for the CPUs the model actors hold (on a CPU-only cluster
# the actors may hold them all): they claim none, and as many run at once as there are workers.
LIGHT_TASK_CPUS = 0


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow, pandas)
    except ImportError as e:
        raise KontextError(f"--ray needs Ray Data, which is not installed ({e}); install it with "
                           "pip install 'comfyui-kontext-native[scale]' (or pip install 'ray[data]'), or run "
                           "without --ray on this machine") from None
    return ray


def item_to_json(item: Item) -> str:
    return json.dumps(dataclasses.asdict(item))


def item_from_json(text: str) -> Item:
    d = json.loads(text)
    d["size"] = tuple(d["size"])
    d["text_shape"] = tuple(d["text_shape"]) if d["text_shape"] is not None else None
    return Item(**d)


def decode_batch(batch: dict) -> dict:
    """Stage 1 (tasks): each picture decoded at its working size; a corrupt file becomes that row's error."""
    pixels, errors = [], []
    for text in batch["item"]:
        item = item_from_json(text)
        try:
            pixels.append(read_picture(item).tobytes())
            errors.append("")
        except KontextError as e:
            pixels.append(b"")
            errors.append(failure(item, e))
    return {**batch, "pixels": np.array(pixels, dtype=object), "error": np.array(errors, dtype=object)}


class EditWorker:
    """Stage 2 (actor pool): loads the model once, edits each group of its batch as one model batch.

    crash_once=(output, marker file) is a fault drill for the tests: the worker process exits abruptly when it
    meets that output and the marker does not exist yet (it creates the marker first, so the retry succeeds)."""

    def __init__(self, model: ModelSpec, guidance: float, crash_once: tuple[str, str] | None = None):
        self.editor = model.load()
        self.guidance = guidance
        self.crash_once = crash_once

    def __call__(self, batch: dict) -> dict:
        items = [item_from_json(t) for t in batch["item"]]
        self._maybe_crash(items)
        errors = list(batch["error"])
        out = [b""] * len(items)
        seconds = [0.0] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            if not errors[i]:
                groups.setdefault(it.group, []).append(i)
        for rows in groups.values():
            pictures = [np.frombuffer(batch["pixels"][i], np.uint8).reshape(items[i].size[1], items[i].size[0], 3)
                        for i in rows]
            start = time.time()
            try:
                results = self.editor.edit([items[i] for i in rows], pictures, self.guidance)
            except EDIT_ERRORS as e:
                for i in rows:
                    errors[i] = failure(items[i], e)
                continue
            for i, pixels in zip(rows, results):
                out[i] = np.ascontiguousarray(pixels).tobytes()
                seconds[i] = (time.time() - start) / len(rows)
        return {"item": batch["item"], "request": batch["request"], "pixels": np.array(out, dtype=object),
                "error": np.array(errors, dtype=object), "seconds": np.array(seconds)}

    def _maybe_crash(self, items: list[Item]) -> None:
        if self.crash_once is None:
            return
        output, marker = self.crash_once
        if any(it.output == output for it in items) and not os.path.exists(marker):
            open(marker, "w").write(str(os.getpid()))
            os._exit(1)  # as a killed process would: no exception, no clean-up


def write_batch(batch: dict, out_dir: str) -> dict:
    """Stage 3 (tasks): PNG then sidecar per edited item, each by rename; the status of every row."""
    outputs, errors = [], []
    for text, req, pixels, error, seconds in zip(batch["item"], batch["request"], batch["pixels"], batch["error"],
                                                 batch["seconds"]):
        item = item_from_json(text)
        if not error:
            w, h = item.size
            try:
                write_result(out_dir, item, json.loads(req), np.frombuffer(pixels, np.uint8).reshape(h, w, 3),
                             float(seconds))
            except OSError as e:
                error = failure(item, e)
        outputs.append(item.output)
        errors.append(error)
    return {"output": np.array(outputs, dtype=object), "error": np.array(errors, dtype=object)}


def run_ray(job, out_dir: str, model: ModelSpec, guidance: float | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, address: str | None = None, workers: int | None = None,
            progress: bool = True, crash_once: tuple[str, str] | None = None) -> Report:
    """Edit the job on Ray: the running cluster at `address` ('auto', 'HOST:6379'), the
    one ray.init already connected to, or else a local Ray instance started (and stopped) here."""
    from .tiny import DEFAULT_GUIDANCE
    from .tiny.progress import Progress
    from .validation import check_batch_size, check_int

    ray = require_ray()
    batch_size = check_batch_size(batch_size, "--batch-size")
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    plan = plan_job(job, out_dir, model, DEFAULT_GUIDANCE if guidance is None else guidance)
    report = Report(total=len(job.items), skipped=len(plan.finished), model_hashes=plan.model_hashes)
    started = False
    try:
        if plan.todo:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
                started = True
            gpus = int(ray.cluster_resources().get("GPU", 0))
            workers = check_int(workers or gpus or CPU_WORKERS, "--workers", 1)
            ds = _pipeline(ray, plan, out_dir, model, batch_size, workers, gpus > 0, crash_once)
            bar = Progress(len(plan.todo), f"batch (ray, {workers} workers)", every_s=5.0) if progress else None
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for output, error in zip(b["output"], b["error"]):
                    if error:
                        report.failed[str(output)] = str(error)
                    else:
                        report.done.append(str(output))
                if bar:
                    bar.update(len(b["output"]), failed=len(report.failed))
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        if started:
            ray.shutdown()
        report.seconds = time.time() - t0
        report.save(out_dir)
    return report


def _pipeline(ray, plan, out_dir, model, batch_size, workers, use_gpus, crash_once):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts items, not blocks
    rows = [{"item": item_to_json(it), "request": json.dumps(plan.requests[it.output])} for it in plan.todo]
    # Blocks of one model batch each, in group order: equal sizes reach the workers together.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    light = {"num_cpus": LIGHT_TASK_CPUS, "compute": ray.data.TaskPoolStrategy(size=workers)}
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", **light)
    edit_resources = {"num_gpus": 1} if use_gpus else {"num_cpus": 1}
    ds = ds.map_batches(EditWorker, fn_constructor_kwargs={"model": model, "guidance": plan.guidance,
                                                           "crash_once": crash_once},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), **edit_resources)
    return ds.map_batches(write_batch, fn_kwargs={"out_dir": out_dir}, batch_size=batch_size,
                          batch_format="numpy", **light)
