"""Runs API-format prompts through a real ComfyUI's own executor, in-process, headless on CPU.

Started by tests/host (with ComfyUI's interpreter, cwd = the ComfyUI checkout):

    python comfy_driver.py --comfyui COMFYUI_PATH --base BASE_DIR --jobs jobs.json --out results.json

BASE_DIR is a `--base-directory` with custom_nodes/<pack> (a link to this repository) and tiny models. Each job
is {"name", "prompt", "mode"} (or {"name", "check", ...}: one of the direct checks in CHECKS, some of them in
core_flux_checks.py); modes:
    normal     validate_prompt + PromptExecutor.execute, as the /prompt queue worker does;
    lowvram    the same, with ComfyUI's NO_VRAM loading forced for our model (see `watch_loads`);
    budget     the same, with a weight budget of job["budget"] x the model size (partial loading, a mix);
    interrupt  ComfyUI's interrupt flag is raised after the first sampling step.
Results (per job): success, validation/execution errors, UI outputs (saved files), progress events, and the
loading facts of our models (`model_facts`; under "lowvram": the last load's, and "loads": every load).
Nothing here imports torch before ComfyUI's main module (it must come first).
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


def _ours(patcher) -> bool:
    return type(getattr(patcher, "model", None)).__name__.startswith("KontextNative")


def model_facts(patcher) -> dict:
    """What ComfyUI's memory manager did with one of our models, read right after load_models_gpu."""
    import comfy.model_base
    import comfy.model_management as mm

    model = patcher.model
    dit = model.diffusion_model
    castable = [mod for mod in dit.modules() if hasattr(mod, "comfy_cast_weights")]
    facts = {"model_class": type(model).__name__, "patcher_class": type(patcher).__name__,
             "model_lowvram": bool(model.model_lowvram), "castable_modules": len(castable),
             "casting_modules": len([m for m in castable if m.comfy_cast_weights]),
             "lowvram_modules": len([m for m in castable if hasattr(m, "prev_comfy_cast_weights")]),
             "loaded_weight_memory": int(model.model_loaded_weight_memory), "model_size": int(patcher.model_size()),
             "lowvram_patch_counter": int(model.lowvram_patch_counter)}
    if hasattr(model, "gguf_reserve_bytes"):
        params = dict(dit.named_parameters())
        shape = [1, 16, 4, 4]
        facts.update(
            dit_bytes=int(mm.module_size(dit)),
            quantized_params=sorted(k for k, p in params.items() if type(p).__name__ == "GGMLTensor"),
            dense_params=len([p for p in params.values() if type(p).__name__ != "GGMLTensor"]),
            live_patches=sorted(getattr(model, "gguf_live_patches", {})),
            host_patched=sorted(n for n, m in dit.named_modules() if any(
                type(f).__name__ == "LowVramPatch" for f in (getattr(m, "weight_function", None) or []))),
            reserve_bytes=int(model.gguf_reserve_bytes()), largest_numel=int(model.gguf_largest_numel),
            memory_required_extra=int(model.memory_required(shape)
                                      - comfy.model_base.BaseModel.memory_required(model, shape)),
            compute_dtype=str(model.compute_dtype()))
    return facts


@contextlib.contextmanager
def watch_loads(stats: dict, mode: str, budget: float | None = None):
    """Record `model_facts` at every load of our model; in mode "lowvram" / "budget", force partial loading.

    lowvram: make `load_models_gpu` treat the CPU like a GPU with no free VRAM (ComfyUI's --novram path). On a
    CPU device ComfyUI always loads models fully (VRAMState.DISABLED), so partial loading cannot happen by
    itself here. With the device not treated as CPU and VRAMState.NO_VRAM, load_models_gpu computes
    lowvram_model_memory = 0.1 bytes and ModelPatcher.partially_load / load(lowvram_model_memory=...) switch
    every casting layer to comfy_cast_weights=True: each layer's weights are cast/moved by
    comfy.ops.cast_bias_weight at every use, exactly as on a GPU that is short of memory.
    budget: `LoadedModel.model_load` gets a weight budget of `budget` x the model's size instead of "all": the
    largest layers that fit are loaded regularly (weights patched at load), the others are handled per use -
    a mix, as on a GPU with some free VRAM.
    """
    import comfy.model_management as mm
    import comfy.ops

    orig_load, orig_is_cpu, orig_cast = mm.load_models_gpu, mm.is_device_cpu, comfy.ops.cast_bias_weight
    orig_model_load = mm.LoadedModel.model_load
    cast_ids: set[int] = set()
    stats.update(cast_calls=0, load_calls=0, loads=[])

    def load(models, *args, **kwargs):
        if not any(_ours(m) for m in models):
            return orig_load(models, *args, **kwargs)
        saved = mm.vram_state
        if mode == "lowvram":
            mm.vram_state = mm.VRAMState.NO_VRAM
            mm.is_device_cpu = lambda device: False
        try:
            result = orig_load(models, *args, **kwargs)
        finally:
            mm.is_device_cpu = orig_is_cpu
            mm.vram_state = saved
        for m in models:
            if _ours(m):
                dit = m.model.diffusion_model
                cast_ids.update(id(mod) for mod in dit.modules() if getattr(mod, "comfy_cast_weights", False))
                facts = model_facts(m)
                stats["loads"].append(facts)
                stats.update(load_calls=stats["load_calls"] + 1, **facts)
        return result

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        if mode == "budget" and _ours(self.model):
            lowvram_model_memory = max(1, int(budget * self.model.model_size()))
        return orig_model_load(self, lowvram_model_memory, force_patch_weights=force_patch_weights)

    def cast(s, *args, **kwargs):
        if id(s) in cast_ids:
            stats["cast_calls"] += 1
        return orig_cast(s, *args, **kwargs)

    mm.load_models_gpu, comfy.ops.cast_bias_weight, mm.LoadedModel.model_load = load, cast, model_load
    try:
        yield
    finally:
        mm.load_models_gpu, comfy.ops.cast_bias_weight = orig_load, orig_cast
        mm.LoadedModel.model_load = orig_model_load


def _pack_module(suffix: str):
    """One of our modules as ComfyUI imported it (the pack's package name is the custom_nodes folder name)."""
    names = [k for k in sys.modules if k.endswith(suffix) and "kontext" in k.lower()]
    if len(names) != 1:
        raise RuntimeError(f"expected one loaded module ending in {suffix}, found {names}")
    return sys.modules[names[0]]


def check_gguf_lora_lifecycle(job: dict) -> dict:
    """Take a GGUF model with a LoRA through ModelPatcher's states directly (no workflow reaches all of them on
    a CPU): full load, partial unload, both patch kinds on one layer, unpatch, reload. Returns max |diff| of one
    transformer forward in each state against the plain and the fully loaded LoRA model."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    import folder_paths
    import torch

    gm = _pack_module(".nodes.gguf_model")
    plain = gm.load_gguf_model(gm.resolve_gguf_choice(job["gguf"]))
    lora_sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", job["lora"]), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(plain, None, lora_sd, 1.0, 0)
    dit = plain.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    p = dit.params
    x = torch.randn(1, 16, 4, 4, generator=g)
    ctx = torch.randn(1, 8, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)

    def forward():
        with torch.no_grad():
            return dit(x, torch.tensor([0.5]), ctx, y=y, guidance=torch.tensor([2.5]))

    def host_patched():
        return sorted(n for n, m in dit.named_modules() if any(
            isinstance(f, comfy.model_patcher.LowVramPatch) for f in (getattr(m, "weight_function", None) or [])))

    def diff(a, b):
        return float((a - b).abs().max())

    res: dict = {"success": True, "patcher_class": type(patched).__name__,
                 "clone_class": type(patched.clone()).__name__}
    mm.load_models_gpu([plain])
    base = forward()
    mm.load_models_gpu([patched])
    full = forward()
    res.update(lora_effect=diff(full, base), live_full=sorted(plain.model.gguf_live_patches))
    res["freed"] = int(patched.partially_unload(patched.offload_device, memory_to_free=patched.model_size() // 2))
    res.update(live_partial=sorted(plain.model.gguf_live_patches), host_partial=host_patched(),
               partial_vs_full=diff(forward(), full))
    # a layer carrying both a LivePatch and ComfyUI's LowVramPatch for the same key applies the LoRA once
    key = sorted(plain.model.gguf_live_patches)[0]
    layer = patched.gguf_layer(key)
    layer.weight_function = [comfy.model_patcher.LowVramPatch(key, patched.patches)]
    res["both_vs_full"] = diff(forward(), full)
    layer.weight_function = []
    patched.unpatch_model(patched.offload_device, unpatch_weights=True)
    res.update(live_unpatched=sorted(plain.model.gguf_live_patches), host_unpatched=host_patched(),
               unpatched_vs_base=diff(forward(), base))
    mm.load_models_gpu([patched])
    res.update(reloaded_vs_full=diff(forward(), full), live_reloaded=sorted(plain.model.gguf_live_patches))
    return res


CHECKS = {"gguf_lora_lifecycle": check_gguf_lora_lifecycle}
import core_flux_checks  # noqa: E402  (torch-free at import; our MODEL vs core's Flux)

CHECKS.update(core_flux_checks.checks(_pack_module))


def run_job(job: dict) -> dict:
    import comfy.model_management as mm
    import comfy.ops
    import comfy.utils
    import execution
    import nodes
    from comfy_execution.utils import get_executing_context

    if "check" in job:  # a direct check of ComfyUI internals instead of a prompt
        mm.unload_all_models()
        return {"name": job["name"], "mode": "check", **CHECKS[job["check"]](job)}
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
    comfy.ops.cast_bias_weight = counting_cast
    try:
        with watch_loads(stats, mode, job.get("budget")):
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
