"""Workflow helpers for the host tests: rewrites for tiny test models, and UI-format checks against /object_info.

The rewrites (documented here, applied to copies of workflows/api/*.api.json):
* text encoders: a real T5-XXL + CLIP-L cannot be built in a test, so every DualCLIPLoader is removed and every
  CLIPTextEncode is replaced, under the same node id, by KontextNativeLoadConditioning reading a tiny saved
  conditioning (T5 width 32, pooled 24 = the tiny transformer's context_in_dim / vec_in_dim). Links to the
  encoder's output (slot 0, CONDITIONING) stay valid, so the rest of the graph is untouched.
* image size: the 1 MP Kontext buckets would make the (full-width) test autoencoder take minutes on CPU, so
  Kontext Image Bucket runs in 'keep' mode (the 32-48 px test images keep their size) and core FluxKontextImageScale is bypassed
  (its consumers are linked to its input). Everything else (steps, guidance, solvers, schedulers) is as shipped.
* the model loader reads one of the tiny checkpoints; the GGUF loader one of the tiny GGUF quantizations.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combos whose options are files on the user's machine: their values are placeholders, not checked.
FILE_WIDGETS = {"model_name", "gguf_name", "clip_name1", "clip_name2", "vae_name", "image", "conditioning_file"}


def builder():
    """workflows/build_workflows.py as a module: the graphs, their file paths, the layout constants."""
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def graphs() -> dict:
    """Short name (the API file's) -> Graph, for every shipped workflow."""
    return {g.name: g for g in (build() for build in builder().WORKFLOWS)}


def workflow_names() -> list[str]:
    return sorted(p.name[:-len(".api.json")] for p in (WORKFLOWS / "api").glob("*.api.json"))


def load_api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())


def load_ui(name: str) -> dict:
    return json.loads(builder().ui_path(graphs()[name]).read_text())


def _relink(api: dict, old: tuple[str, int], new) -> None:
    for node in api.values():
        for k, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and (str(v[0]), v[1]) == old:
                node["inputs"][k] = copy.deepcopy(new)


def use_tiny_text(api: dict, cond_files: list[str]) -> dict:
    api = copy.deepcopy(api)
    for nid in [k for k, n in api.items() if n["class_type"] == "DualCLIPLoader"]:
        del api[nid]
    encoders = sorted((k for k, n in api.items() if n["class_type"] == "CLIPTextEncode"), key=int)
    for i, nid in enumerate(encoders):
        api[nid] = {"class_type": "KontextNativeLoadConditioning",
                    "inputs": {"conditioning_file": cond_files[i % len(cond_files)]},
                    "_meta": {"title": f"tiny conditioning for: {api[nid]['inputs'].get('text', '')[:40]}"}}
    for node in api.values():  # nothing may still point at a removed node
        for v in node["inputs"].values():
            if isinstance(v, list) and len(v) == 2:
                assert str(v[0]) in api, f"dangling link to node {v[0]}"
    return api


def use_fast_images(api: dict) -> dict:
    api = copy.deepcopy(api)
    for node in api.values():
        if node["class_type"] == "KontextNativeImageBucket":
            node["inputs"]["mode"] = "keep"
    for nid in [k for k, n in api.items() if n["class_type"] == "FluxKontextImageScale"]:
        source = api[nid]["inputs"]["image"]
        del api[nid]
        _relink(api, (nid, 0), source)
    return api


def set_model(api: dict, model_name: str | None, weight_dtype: str | None = None, gguf_name: str | None = None) -> dict:
    api = copy.deepcopy(api)
    for node in api.values():
        if node["class_type"] == "KontextNativeModelLoader" and model_name is not None:
            node["inputs"]["model_name"] = model_name
            if weight_dtype is not None:
                node["inputs"]["weight_dtype"] = weight_dtype
        if node["class_type"] == "KontextNativeGGUFLoader" and gguf_name is not None:
            node["inputs"]["gguf_name"] = gguf_name
    return api


def use_gguf(api: dict, gguf_name: str, compute_dtype: str = "default") -> dict:
    """Every KontextNativeModelLoader replaced, under the same node id, by the GGUF loader reading `gguf_name`."""
    api = copy.deepcopy(api)
    for nid, node in api.items():
        if node["class_type"] == "KontextNativeModelLoader":
            api[nid] = {"class_type": "KontextNativeGGUFLoader",
                        "inputs": {"gguf_name": gguf_name, "compute_dtype": compute_dtype},
                        "_meta": {"title": "KontextNativeGGUFLoader"}}
    return api


def for_tiny_models(api: dict, model_name: str, cond_files: list[str], gguf_name: str | None = None) -> dict:
    return set_model(use_fast_images(use_tiny_text(api, cond_files)), model_name, gguf_name=gguf_name)


def set_images(api: dict, by_title: dict[str, str]) -> dict:
    """LoadImage nodes, found by their title, read other images (the shipped ones all start on example.png)."""
    api = copy.deepcopy(api)
    for title, image in by_title.items():
        found = [n for n in api.values() if n["class_type"] == "LoadImage" and n["_meta"]["title"] == title]
        assert len(found) == 1, f"no single LoadImage titled {title!r}"
        found[0]["inputs"]["image"] = image
    return api


def add_node(api: dict, class_type: str, inputs: dict) -> str:
    nid = str(max(int(k) for k in api) + 1)
    api[nid] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}
    return nid


def find(api: dict, class_type: str) -> list[str]:
    return sorted((k for k, n in api.items() if n["class_type"] == class_type), key=int)


def output_files(result: dict, node_id: str, kind: str) -> list[dict]:
    return result.get("outputs", {}).get(str(node_id), {}).get(kind, [])


# ------------------------------------------------------------------------------------------------ UI checks

def _inputs_in_order(spec: dict) -> list[tuple[str, object, dict]]:
    out = []
    order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            entry = spec["input"][group][name]
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ) -> bool:
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _widget_slots(spec: dict) -> list[tuple[str, object, dict]]:
    """The frontend's widgets_values layout for a node type: one per widget input, plus the extra value after
    a seed with control_after_generate and LoadImage's upload widget."""
    slots = []
    for name, typ, opts in _inputs_in_order(spec):
        if not _is_widget(typ) or opts.get("forceInput"):
            continue
        slots.append((name, typ, opts))
        if opts.get("control_after_generate"):
            slots.append(("$control_after_generate", "COMBO", {"options": ["fixed", "increment", "decrement", "randomize"]}))
        if opts.get("image_upload"):
            slots.append(("$upload", "UPLOAD", {}))
    return slots


def _options(typ, opts) -> list | None:
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return opts.get("options")
    return None


def check_ui_workflow(ui: dict, object_info: dict) -> list[str]:
    """Problems that would stop the frontend from loading or queueing a UI-format workflow."""
    problems = []
    if ui.get("version") != 0.4:
        problems.append(f"version is {ui.get('version')}, expected 0.4")
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui["links"]}
    for n in ui["nodes"]:
        for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"):
            if key not in n and not (key in ("inputs", "outputs") and n["type"] in FRONTEND_ONLY):
                problems.append(f"node {n.get('id')} lacks '{key}'")
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        spec = object_info.get(t)
        if spec is None:
            problems.append(f"node {n['id']}: unknown node type {t}")
            continue
        slots = _widget_slots(spec)
        values = n.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"node {n['id']} ({t}): {len(values)} widget values, the node has {len(slots)} "
                            f"({[s[0] for s in slots]})")
        else:
            for (name, typ, opts), v in zip(slots, values):
                choices = _options(typ, opts)
                if name in FILE_WIDGETS or choices is None:
                    if typ == "INT" and not isinstance(v, int):
                        problems.append(f"node {n['id']} ({t}) {name}={v!r} is not an int")
                    if typ == "FLOAT" and not isinstance(v, (int, float)):
                        problems.append(f"node {n['id']} ({t}) {name}={v!r} is not a number")
                    for bound, ok in (("min", lambda a, b: a >= b), ("max", lambda a, b: a <= b)):
                        if typ in ("INT", "FLOAT") and bound in opts and not ok(v, opts[bound]):
                            problems.append(f"node {n['id']} ({t}) {name}={v} outside {bound} {opts[bound]}")
                    continue
                if v not in choices:
                    problems.append(f"node {n['id']} ({t}) {name}={v!r} not one of {choices[:8]}")
        spec_inputs = {name: (typ, opts) for name, typ, opts in _inputs_in_order(spec)}
        required = set(spec["input"].get("required", {}))
        for inp in n["inputs"]:
            if inp["name"] not in spec_inputs:
                problems.append(f"node {n['id']} ({t}): no input named {inp['name']}")
                continue
            typ = spec_inputs[inp["name"]][0]
            if inp.get("link") is None:
                continue
            link = links.get(inp["link"])
            if link is None:
                problems.append(f"node {n['id']} ({t}): input {inp['name']} uses missing link {inp['link']}")
                continue
            _, src, slot, dst, _, ltype = link
            if dst != n["id"]:
                problems.append(f"link {link[0]} ends at {dst}, not node {n['id']}")
            src_node = nodes.get(src)
            if src_node is None or src_node["type"] not in object_info:
                problems.append(f"link {link[0]} starts at unknown node {src}")
                continue
            out_type = object_info[src_node["type"]]["output"][slot]
            if not (out_type == typ == ltype or (isinstance(typ, list) and out_type == "COMBO")):
                problems.append(f"link {link[0]}: {src_node['type']} output {slot} ({out_type}) -> {t}.{inp['name']} "
                                f"({typ}), link type {ltype}")
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        for name in required:
            typ = spec_inputs[name][0]
            if not _is_widget(typ) and name not in linked:
                problems.append(f"node {n['id']} ({t}): required input {name} is not connected")
    for l in ui["links"]:
        lid, src, slot, dst, dslot, _ = l
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid} connects missing nodes {src}->{dst}")
            continue
        outs = nodes[src]["outputs"]
        if slot >= len(outs) or lid not in (outs[slot].get("links") or []):
            problems.append(f"link {lid} is not listed on node {src}'s output {slot}")
    return problems


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend queues for a UI workflow (widgets by name, links as [node, slot])."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        spec = object_info[n["type"]]
        inputs = {}
        for (name, _, _), v in zip(_widget_slots(spec), n["widgets_values"]):
            if not name.startswith("$"):
                inputs[name] = v
        for inp in n["inputs"]:
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def with_saved_latents(api: dict, tag: str) -> dict:
    """SaveLatent after every reference encoder (its LATENT output) and every sampler."""
    for nid in find(api, "KontextNativeReferenceEncoder"):
        add_node(api, "SaveLatent", {"samples": [nid, 1], "filename_prefix": f"{tag}/ref_{nid}"})
    for nid in find(api, "KontextNativeSampler"):
        add_node(api, "SaveLatent", {"samples": [nid, 0], "filename_prefix": f"{tag}/out_{nid}"})
    return api


def insert_lora(api: dict, loader_type: str, lora_name: str, strength: float) -> str:
    """LoraLoaderModelOnly between the (first) `loader_type` node and every Kontext sampler; returns its id."""
    loader = find(api, loader_type)[0]
    lora = add_node(api, "LoraLoaderModelOnly", {"model": [loader, 0], "lora_name": lora_name,
                                                 "strength_model": strength})
    for nid in find(api, "KontextNativeSampler"):
        api[nid]["inputs"]["model"] = [lora, 0]
    return lora


def add_ours_beside_ksampler(api: dict, prefix: str, sampler: str = "euler",
                             flux_shift_size: tuple[int, int] | None = None) -> dict:
    """Our sampler on the KSampler's model, conditioning, latent, seed, steps and scheduler; both latents saved.

    sampler: the algorithm both run (core's name = the engine's solver name: euler, heun). flux_shift_size:
    (width, height) in pixels; the KSampler then gets core's ModelSamplingFlux (the resolution shift) and our
    sampler its own shifted schedule `kontext` instead of core's scheduler on the unpatched model."""
    ks = find(api, "KSampler")[0]
    k = api[ks]["inputs"]
    k["sampler_name"] = sampler
    scheduler = k["scheduler"]
    model = k["model"]
    if flux_shift_size is not None:
        width, height = flux_shift_size
        k["model"] = [add_node(api, "ModelSamplingFlux", {"model": model, "max_shift": 1.15, "base_shift": 0.5,
                                                           "width": width, "height": height}), 0]
        scheduler = "kontext"
    ours = add_node(api, "KontextNativeSampler", {
        "model": model, "positive": k["positive"], "latent": k["latent_image"], "seed": k["seed"],
        "steps": k["steps"], "guidance": 2.5, "true_cfg": 1.0, "solver": sampler, "scheduler": scheduler,
        "denoise": 1.0, "width": 0, "height": 0, "batch_size": 1})
    add_node(api, "SaveLatent", {"samples": [ks, 0], "filename_prefix": f"{prefix}/ksampler"})
    add_node(api, "SaveLatent", {"samples": [ours, 0], "filename_prefix": f"{prefix}/ours"})
    return api
