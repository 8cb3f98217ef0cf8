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
NAMES = sorted(p.name[:-len(".api.json")] for p in WF.glob("*.api.json"))
OUR_NODES = {"KontextNativeModelLoader", "KontextNativeImageBucket", "KontextNativeReferenceEncoder",
             "KontextNativeSampler", "KontextNativeSaveConditioning", "KontextNativeLoadConditioning",
             "KontextNativeGGUFLoader", "KontextNativeVRAMPlan"}


def _builder():
    spec = importlib.util.spec_from_file_location("build_workflows", WF / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expected_workflows_exist():
    assert NAMES == sorted(["single_edit", "edit_chain_3_turns", "two_reference_composition", "text_replacement",
                            "kontext_official_basic", "low_vram_gguf_chain"])
    for n in NAMES:
        assert (WF / f"{n}.json").is_file()


def test_files_are_what_the_builder_writes():
    b = _builder()
    for build in b.WORKFLOWS:
        g = build()
        assert json.loads((WF / f"{g.name}.json").read_text()) == g.ui(), f"{g.name}.json is stale: rerun the builder"
        assert json.loads((WF / f"{g.name}.api.json").read_text()) == g.api(), f"{g.name}.api.json is stale"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_content(name):
    ui = json.loads((WF / f"{name}.json").read_text())
    api = json.loads((WF / f"{name}.api.json").read_text())
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
    for needle in ("models/diffusion_models", "models/text_encoders", "models/vae", "ae.safetensors",
                   "flux1-kontext-dev", "t5xxl", "clip_l"):
        assert needle in note[0]["widgets_values"][0]
    for node in api.values():
        i = node["inputs"]
        if node["class_type"] in ("KontextNativeSampler", "KSampler"):
            assert 20 <= i["steps"] <= 28
        if node["class_type"] == "KontextNativeSampler":
            assert i["guidance"] == 2.5 and i["true_cfg"] == 1.0
        if node["class_type"] == "FluxGuidance":
            assert i["guidance"] == 2.5
        if node["class_type"] == "LoadImage":
            assert i["image"].endswith(".png") and "/" not in i["image"]


def test_official_graph_only_swaps_the_loader():
    api = json.loads((WF / "kontext_official_basic.api.json").read_text())
    types = sorted(n["class_type"] for n in api.values())
    assert types == sorted(["KontextNativeModelLoader", "DualCLIPLoader", "CLIPTextEncode", "VAELoader", "LoadImage",
                            "FluxKontextImageScale", "VAEEncode", "ReferenceLatent", "FluxGuidance",
                            "ConditioningZeroOut", "KSampler", "VAEDecode", "SaveImage"])
    ks = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    assert (ks["sampler_name"], ks["scheduler"], ks["cfg"], ks["steps"]) == ("euler", "simple", 1.0, 20)
    clip = next(n for n in api.values() if n["class_type"] == "DualCLIPLoader")["inputs"]
    assert clip["type"] == "flux" and {clip["clip_name1"], clip["clip_name2"]} == {"clip_l.safetensors",
                                                                                   "t5xxl_fp16.safetensors"}


def test_chain_stays_in_latent_space():
    api = json.loads((WF / "edit_chain_3_turns.api.json").read_text())
    samplers = sorted((k for k, n in api.items() if n["class_type"] == "KontextNativeSampler"), key=int)
    refs = [n for n in api.values() if n["class_type"] == "KontextNativeReferenceEncoder"]
    assert len(samplers) == 3
    fed = [r["inputs"]["latent"][0] for r in refs if "latent" in r["inputs"]]
    assert fed == samplers[:2]
    assert all(api[s]["inputs"]["positive"][0] in {k for k, n in api.items()
                                                  if n["class_type"] == "KontextNativeReferenceEncoder"}
               for s in samplers)


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
