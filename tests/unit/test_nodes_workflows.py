"""Static checks of the shipped workflows (no ComfyUI needed): twins in sync, only known nodes, no local paths,
a Note saying which files go where, sensible defaults. tests/host loads and runs them in a real ComfyUI."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WF = ROOT / "workflows"
API = WF / "api"
NAMES = sorted(p.name[:-len(".api.json")] for p in API.glob("*.api.json"))
OUR_NODES = {"KontextNativeModelLoader", "KontextNativeImageBucket", "KontextNativeReferenceEncoder",
             "KontextNativeSampler", "KontextNativeSaveConditioning", "KontextNativeLoadConditioning",
             "KontextNativeGGUFLoader", "KontextNativeVRAMPlan", "KontextNativeTinyLoader",
             "KontextNativeTinyPrompt", "KontextNativeTinyScene", "KontextNativeKeepUnchanged"}
BUNDLED = {"kontext_tiny"}  # runs the bundled Kontext-Tiny: nothing to download, its own step count


def _builder():
    spec = importlib.util.spec_from_file_location("build_workflows", WF / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _graphs() -> dict:
    return {g.name: g for g in (build() for build in _builder().WORKFLOWS)}


def _ui(name: str) -> dict:
    b = _builder()
    return json.loads(b.ui_path(_graphs()[name]).read_text())


def _api(name: str) -> dict:
    return json.loads((API / f"{name}.api.json").read_text())


def test_expected_workflows_exist():
    assert NAMES == sorted(["single_edit", "edit_chain_3_turns", "two_reference_composition", "text_replacement",
                            "kontext_official_basic", "low_vram_gguf_chain", "kontext_tiny"])
    for g in _graphs().values():
        assert _builder().ui_path(g).is_file()


def test_served_folder_holds_only_ui_workflows_and_their_thumbnails():
    """ComfyUI lists every top-level *.json of workflows/ as a template and serves that folder (the first of
    example_workflows, example, examples, workflow, workflows that exists), so: no folder before it, no API file
    or other JSON at its top level, a .jpg thumbnail beside each UI file."""
    assert not [d for d in ("example_workflows", "example", "examples", "workflow") if (ROOT / d).exists()]
    b = _builder()
    uis = {b.ui_path(g).name for g in _graphs().values()}
    assert {p.name for p in WF.glob("*.json")} == uis
    for g in _graphs().values():
        thumb = b.thumbnail_path(g)
        assert thumb.is_file(), f"no thumbnail {thumb.name}: render it with tests/host/frontend.py"
        data = thumb.read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and len(data) < 60_000, f"{thumb.name}: not a small JPEG"


def test_files_are_what_the_builder_writes():
    b = _builder()
    for g in _graphs().values():
        assert json.loads(b.ui_path(g).read_text()) == g.ui(), f"{g.title}.json is stale: rerun the builder"
        assert json.loads(b.api_path(g).read_text()) == g.api(), f"{g.name}.api.json is stale"


def boxes(ui: dict, title_h: int) -> list[tuple[int, float, float, float, float]]:
    """(id, x0, y0, x1, y1) of each node as the frontend draws it: the title bar sits above pos."""
    return [(n["id"], n["pos"][0], n["pos"][1] - title_h, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in ui["nodes"]]


def overlaps(bs) -> list[tuple[int, int]]:
    return [(a[0], b[0]) for i, a in enumerate(bs) for b in bs[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def test_overlap_check_sees_title_bars():
    ui = {"nodes": [{"id": 1, "pos": [0, 30], "size": [100, 50]}, {"id": 2, "pos": [50, 100], "size": [100, 50]}]}
    assert overlaps(boxes(ui, 0)) == [] and overlaps(boxes(ui, 30)) == [(1, 2)]


@pytest.mark.parametrize("name", NAMES)
def test_no_two_node_boxes_overlap(name):
    b = _builder()
    ui = _ui(name)
    assert overlaps(boxes(ui, b.TITLE_H)) == []
    for n in ui["nodes"]:  # the frontend enlarges smaller nodes on load, which is how overlaps appeared
        min_w, min_h = b.MIN_SIZES[n["type"]]
        assert n["size"][0] >= min_w and n["size"][1] >= min_h, (n["type"], n["size"])


@pytest.mark.parametrize("name", NAMES)
def test_loaders_name_their_downloads(name):
    from nodes import model_sources

    b = _builder()
    for n in _ui(name)["nodes"]:
        files = [v for w, v in zip(b.SPECS[n["type"]][2], n["widgets_values"]) if w in b.FILE_WIDGETS.get(n["type"], [])]
        if not files:
            continue
        models = n["properties"].get("models", [])
        assert {m["name"] for m in models} == {f for f in files if model_sources.SOURCES[f]["url"]}
        for m in models:
            assert m == {"name": m["name"], "url": model_sources.SOURCES[m["name"]]["url"],
                         "directory": model_sources.SOURCES[m["name"]]["directory"]}
    note = next(n for n in _ui(name)["nodes"] if n["type"] == "Note")["widgets_values"][0]
    for n in _api(name).values():  # the Note says where every file comes from
        for w in b.FILE_WIDGETS.get(n["class_type"], []):
            assert n["inputs"][w] in note and model_sources.SOURCES[n["inputs"][w]]["page"] in note


def test_api_titles_are_what_the_frontend_shows():
    b = _builder()
    for name in NAMES:
        api = _api(name)
        for n in _ui(name)["nodes"]:
            if n["type"] != "Note":
                assert api[str(n["id"])]["_meta"]["title"] == n.get("title", b.DISPLAY_NAMES[n["type"]])
    assert _api("single_edit")["2"]["_meta"]["title"] == "Load Kontext Model (native)"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_content(name):
    ui = _ui(name)
    api = _api(name)
    text = json.dumps(ui) + json.dumps(api)
    assert not re.search(r"(/home/|/Users/|/work/|/tmp/|[A-Za-z]:\\\\)", text), "local path in workflow"
    assert ui["version"] == 0.4 and isinstance(ui["links"], list)
    b = _builder()
    for node in api.values():
        assert node["class_type"] in b.SPECS and node["class_type"] != "Note"
        assert node["class_type"] in OUR_NODES or not node["class_type"].startswith("KontextNative")
    assert not {"UNETLoader", "CheckpointLoaderSimple"} & {n["class_type"] for n in api.values()}
    note = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(note) == 1
    needles = (("nothing to download", "Kontext-Tiny") if name in BUNDLED else
               ("models/diffusion_models", "models/text_encoders", "models/vae", "ae.safetensors",
                "flux1-kontext-dev", "t5xxl", "clip_l"))
    for needle in needles:
        assert needle in note[0]["widgets_values"][0]
    for node in api.values():
        i = node["inputs"]
        if node["class_type"] in ("KontextNativeSampler", "KSampler") and name not in BUNDLED:
            assert 20 <= i["steps"] <= 28
        if node["class_type"] == "KontextNativeSampler":
            assert i["guidance"] == 2.5 and i["true_cfg"] == 1.0
        if node["class_type"] == "FluxGuidance":
            assert i["guidance"] == 2.5
        if node["class_type"] == "LoadImage":  # the image every ComfyUI install has in input/
            assert i["image"] == "example.png"


def test_official_graph_only_swaps_the_loader():
    api = _api("kontext_official_basic")
    types = sorted(n["class_type"] for n in api.values())
    assert types == sorted(["KontextNativeModelLoader", "DualCLIPLoader", "CLIPTextEncode", "VAELoader", "LoadImage",
                            "FluxKontextImageScale", "VAEEncode", "ReferenceLatent", "FluxGuidance",
                            "ConditioningZeroOut", "KSampler", "VAEDecode", "SaveImage"])
    ks = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    assert (ks["sampler_name"], ks["scheduler"], ks["cfg"], ks["steps"]) == ("euler", "simple", 1.0, 20)
    clip = next(n for n in api.values() if n["class_type"] == "DualCLIPLoader")["inputs"]
    assert clip["type"] == "flux" and {clip["clip_name1"], clip["clip_name2"]} == {
        "clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"}  # the official template's files
    model = next(n for n in api.values() if n["class_type"] == "KontextNativeModelLoader")["inputs"]
    assert model["model_name"] == "flux1-dev-kontext_fp8_scaled.safetensors"


@pytest.mark.parametrize("name", ["edit_chain_3_turns", "low_vram_gguf_chain"])
def test_chains_stay_in_latent_space_and_are_anchored(name):
    """Every turn's context is the previous turn's Keep Unchanged LATENT (no decode/encode between turns), each Keep
    Unchanged continues the previous one's chain (the first starts from the bucketed original) and takes its own
    turn's sampler output; the images shown are Keep Unchanged's, never a plain decode."""
    api = _api(name)
    of = lambda t: sorted((k for k, n in api.items() if n["class_type"] == t), key=int)
    samplers, keeps, refs = of("KontextNativeSampler"), of("KontextNativeKeepUnchanged"), of("KontextNativeReferenceEncoder")
    assert len(samplers) == len(keeps) == len(refs) >= 2
    assert "latent" not in api[refs[0]]["inputs"]
    assert [api[r]["inputs"]["latent"] for r in refs[1:]] == [[k, 0] for k in keeps[:-1]]
    assert api[keeps[0]]["inputs"]["image"][0] == of("KontextNativeImageBucket")[0]
    assert [api[k]["inputs"].get("previous") for k in keeps[1:]] == [[k, 0] for k in keeps[:-1]]
    assert [api[k]["inputs"]["samples"] for k in keeps] == [[s, 0] for s in samplers]
    assert [api[s]["inputs"]["positive"] for s in samplers] == [[r, 0] for r in refs]
    assert not of("VAEDecode") and not of("VAEEncode")
    shown = [n["inputs"]["images"][0] for n in api.values() if n["class_type"] in ("PreviewImage", "SaveImage")]
    assert shown == keeps


def test_pack_root_defines_nothing_outside_comfyui():
    spec = importlib.util.spec_from_file_location("kontext_native_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not hasattr(mod, "comfy_entrypoint") and not hasattr(mod, "NODE_CLASS_MAPPINGS")


def test_requirements_exclude_torch():
    reqs = [l.split(">")[0].split("=")[0].strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    assert "torch" not in reqs and {"safetensors", "einops", "numpy", "pillow", "gguf"} <= set(reqs)
