"""Runs API-format prompts through a real ComfyUI's own executor, in-process, headless on CPU.

Started by tests/host (with ComfyUI's interpreter, cwd = the ComfyUI checkout):

    python comfy_driver.py --comfyui COMFYUI_PATH --base BASE_DIR --jobs jobs.json --out results.json

BASE_DIR is a `--base-directory` with custom_nodes/<pack> (a link to this repository) and tiny models. Each job
is {"name", "prompt", "mode"}; modes:
    normal     validate_prompt + PromptExecutor.execute, as the /prompt queue worker does;
    lowvram    the same, with ComfyUI's NO_VRAM loading forced for our model (see `force_lowvram`);
    interrupt  ComfyUI's interrupt flag is raised after the first sampling step.
Results (per job): success, validation/execution errors, UI outputs (saved files), progress events, and for
lowvram the loading facts. Nothing here imports torch before ComfyUI's main module (it must come first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import traceback
import uuid


class StubServer:
    """The parts of PromptServer the executor uses."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        if isinstance(data, dict):
            self.events.append((str(event), {k: v for k, v in data.items() if isinstance(v, (str, int, float, list))}))

    def queue_updated(self):
        pass


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        return repr(x)


def boot(comfyui: str, base: str):
    sys.argv = [os.path.join(comfyui, "main.py"), "--cpu", "--base-directory", base, "--disable-api-nodes",
                "--preview-method", "latent2rgb", "--database-url", "sqlite:///:memory:"]
    sys.path.insert(0, comfyui)
    os.chdir(comfyui)
    import main  # noqa: F401  (ComfyUI's startup: args, paths, prestartup scripts; no server)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))


@contextlib.contextmanager
def force_lowvram(stats: dict):
    """Make `load_models_gpu` treat the CPU like a GPU with no free VRAM (ComfyUI's --novram path) for our model.

    On a CPU device ComfyUI always loads models fully (VRAMState.DISABLED), so partial loading cannot happen
    by itself here. With the device not treated as CPU and VRAMState.NO_VRAM, load_models_gpu computes
    lowvram_model_memory = 0.1 bytes and ModelPatcher.partially_load / load(lowvram_model_memory=...) switch
    every casting layer to comfy_cast_weights=True: each layer's weights are cast/moved by
    comfy.ops.cast_bias_weight at every use, exactly as on a GPU that is short of memory.
    """
    import comfy.model_management as mm
    import comfy.ops

    orig_load, orig_is_cpu, orig_cast = mm.load_models_gpu, mm.is_device_cpu, comfy.ops.cast_bias_weight
    cast_ids: set[int] = set()
    stats.update(cast_calls=0, load_calls=0)

    def ours(patcher):
        return type(getattr(patcher, "model", None)).__name__ == "KontextNativeFlux"

    def load(models, *args, **kwargs):
        if not any(ours(m) for m in models):
            return orig_load(models, *args, **kwargs)
        saved = mm.vram_state
        mm.vram_state = mm.VRAMState.NO_VRAM
        mm.is_device_cpu = lambda device: False
        try:
            result = orig_load(models, *args, **kwargs)
        finally:
            mm.is_device_cpu = orig_is_cpu
            mm.vram_state = saved
        for m in models:
            if ours(m):
                dit = m.model.diffusion_model
                castable = [mod for mod in dit.modules() if hasattr(mod, "comfy_cast_weights")]
                casting = [mod for mod in castable if mod.comfy_cast_weights]
                cast_ids.update(id(mod) for mod in casting)
                stats.update(load_calls=stats["load_calls"] + 1, model_lowvram=bool(m.model.model_lowvram),
                             castable_modules=len(castable), casting_modules=len(casting),
                             loaded_weight_memory=int(m.model.model_loaded_weight_memory),
                             model_size=int(m.model_size()))
        return result

    def cast(s, *args, **kwargs):
        if id(s) in cast_ids:
            stats["cast_calls"] += 1
        return orig_cast(s, *args, **kwargs)

    mm.load_models_gpu, comfy.ops.cast_bias_weight = load, cast
    try:
        yield
    finally:
        mm.load_models_gpu, comfy.ops.cast_bias_weight = orig_load, orig_cast


def run_job(job: dict) -> dict:
    import comfy.model_management as mm
    import comfy.ops
    import comfy.utils
    import execution
    import nodes
    from comfy_execution.utils import get_executing_context

    prompt = job["prompt"]
    mode = job.get("mode", "normal")
    res: dict = {"name": job["name"], "mode": mode}
    mm.unload_all_models()
    mm.cleanup_models_gc()

    progress: list[dict] = []
    interrupt_after = 1 if mode == "interrupt" else None

    def hook(value, total, preview, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        nid = node_id or (ctx.node_id if ctx is not None else None)
        cls = prompt.get(str(nid), {}).get("class_type") if nid is not None else None
        progress.append({"node": nid, "class_type": cls, "value": value, "total": total,
                         "preview": preview is not None,
                         "preview_size": list(preview[1].size) if preview is not None and len(preview) > 1 else None})
        if interrupt_after is not None and cls == "KontextNativeSampler" and value >= interrupt_after:
            nodes.interrupt_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)

    # Count weight casts at use for every job: with full loading on CPU (fp32) there should be none.
    calls = {"n": 0}
    orig_cast = comfy.ops.cast_bias_weight

    def counting_cast(*a, **k):
        calls["n"] += 1
        return orig_cast(*a, **k)

    pid = str(uuid.uuid4())
    t0 = time.time()
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    res["valid"] = bool(valid[0])
    if not valid[0]:
        res.update(success=False, validation_error=_jsonable(valid[1]), node_errors=_jsonable(valid[3]))
        return res
    server = StubServer()
    executor = execution.PromptExecutor(server)
    stats: dict = {}
    ctx = force_lowvram(stats) if mode == "lowvram" else contextlib.nullcontext()
    comfy.ops.cast_bias_weight = counting_cast
    try:
        with ctx:
            executor.execute(prompt, pid, {}, valid[2])
    finally:
        comfy.ops.cast_bias_weight = orig_cast
        comfy.utils.set_progress_bar_global_hook(None)
        nodes.interrupt_processing(False)
    res.update(success=bool(executor.success), seconds=round(time.time() - t0, 2),
               outputs=_jsonable(executor.history_result.get("outputs", {})),
               messages=[[ev, _jsonable(data)] for ev, data in executor.status_messages],
               progress=progress, lowvram=stats, cast_calls_total=calls["n"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    jobs = json.loads(open(a.jobs).read())
    out_path = os.path.abspath(a.out)
    results: dict = {"boot": None, "jobs": {}}
    try:
        boot(os.path.abspath(a.comfyui), os.path.abspath(a.base))
        import nodes

        results["boot"] = {"ok": True, "our_nodes": sorted(k for k in nodes.NODE_CLASS_MAPPINGS
                                                           if k.startswith("KontextNative"))}
    except Exception:
        results["boot"] = {"ok": False, "error": traceback.format_exc()}
        open(out_path, "w").write(json.dumps(results, indent=1))
        return 1
    for job in jobs:
        try:
            results["jobs"][job["name"]] = run_job(job)
        except Exception:
            results["jobs"][job["name"]] = {"name": job["name"], "success": False, "driver_error": traceback.format_exc()}
        open(out_path, "w").write(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
