"""A real ComfyUI server on 127.0.0.1: /object_info knows our nodes, the UI workflows load, /prompt runs one."""

from __future__ import annotations

import json
import urllib.error

import pytest
from PIL import Image

import host_assets as A
import host_workflows as W
from host_env import ComfyServer

OUR_NODES = ["KontextNativeModelLoader", "KontextNativeGGUFLoader", "KontextNativeImageBucket",
             "KontextNativeReferenceEncoder", "KontextNativeSampler", "KontextNativeSaveConditioning",
             "KontextNativeLoadConditioning", "KontextNativeVRAMPlan", "KontextNativeTextEncoderGGUFLoader"]


@pytest.fixture(scope="module")
def server(host_assets):
    srv = ComfyServer(host_assets.base)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=120)


def test_object_info_lists_our_nodes_with_tooltips(object_info):
    for name in OUR_NODES:
        assert name in object_info, name
        spec = object_info[name]
        for group in ("required", "optional"):
            for inp, entry in spec["input"].get(group, {}).items():
                opts = entry[1] if len(entry) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
    loader = object_info["KontextNativeModelLoader"]["input"]["required"]["model_name"]
    choices = loader[1]["options"] if loader[0] == "COMBO" else loader[0]
    # diffusers folders are listed once (with '/'), the files inside them are not; the VAE file is (it is a
    # .safetensors in diffusion_models) and is rejected when loaded
    assert A.MODEL_DIFFUSERS in choices and A.MODEL_BFL in choices and A.MODEL_COMFY in choices
    assert not [c for c in choices if c.startswith(A.MODEL_DIFFUSERS) and c != A.MODEL_DIFFUSERS]
    assert not [c for c in choices if c.endswith(".gguf")]
    # the GGUF loader lists the .gguf files of the same folders (key unet_gguf), and nothing else
    gguf = object_info["KontextNativeGGUFLoader"]["input"]["required"]["gguf_name"]
    gguf_choices = gguf[1]["options"] if gguf[0] == "COMBO" else gguf[0]
    assert sorted(gguf_choices) == sorted([A.MODEL_GGUF_Q8, A.MODEL_GGUF_Q4KM, *A.BAD_GGUF.values()])


@pytest.mark.parametrize("name", W.workflow_names())
def test_ui_workflow_is_loadable(object_info, name):
    ui = W.load_ui(name)
    assert W.check_ui_workflow(ui, object_info) == []
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    needs_files = any(n["type"] in ("KontextNativeModelLoader", "KontextNativeGGUFLoader") for n in ui["nodes"])
    # a Note says where the files go, or (Kontext-Tiny, bundled) that there is nothing to download
    assert notes and ("models/diffusion_models" if needs_files else "nothing to download") in notes[0]["widgets_values"][0]
    # the API twin is exactly what the frontend would queue for the UI file
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in W.load_api(name).items()}
    assert W.ui_to_api(ui, object_info) == api


def test_prompt_over_http(server, host_assets):
    prompt = W.for_tiny_models(W.load_api("single_edit"), A.MODEL_COMFY, A.COND_FILES)
    hist = server.run_prompt(prompt)
    assert hist["status"]["status_str"] == "success", hist["status"]
    save = W.find(prompt, "SaveImage")[0]
    images = hist["outputs"][save]["images"]
    assert len(images) == 1
    with Image.open(host_assets.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == A.IMAGES["example.png"]


def _rejected(server, prompt: dict) -> dict:
    try:
        server.post("/prompt", {"prompt": prompt, "client_id": "kontext-native-host-test"})
    except urllib.error.HTTPError as e:
        assert e.code == 400
        return json.loads(e.read().decode())
    raise AssertionError("the prompt was accepted")


@pytest.mark.parametrize("loader,name,folder,source", [
    ("KontextNativeModelLoader", "flux1-dev-kontext_fp8_scaled.safetensors", "models/diffusion_models",
     "https://huggingface.co/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/"),
    ("KontextNativeGGUFLoader", "flux1-kontext-dev-Q4_K_M.gguf", "models/diffusion_models (or models/unet)",
     "https://huggingface.co/QuantStack/FLUX.1-Kontext-dev-GGUF"),
])
def test_missing_model_file_is_named_at_validation(server, host_assets, loader, name, folder, source):
    """ComfyUI 0.3.64 does not check V3 combo values; the loaders' validate_inputs must, before anything runs."""
    api = W.for_tiny_models(W.load_api("single_edit"), A.MODEL_BFL, A.COND_FILES)
    if loader == "KontextNativeGGUFLoader":
        api = W.use_gguf(api, name)
    else:
        api = W.set_model(api, name)
    err = _rejected(server, api)
    details = [e["details"] for e in err["node_errors"][W.find(api, loader)[0]]["errors"]]
    assert len(details) == 1 and f"'{name}' was not found in {folder}" in details[0], details
    assert source in details[0] and str(host_assets.models / "diffusion_models") in details[0]
