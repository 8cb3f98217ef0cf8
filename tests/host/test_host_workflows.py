"""Every shipped API workflow, plus parity and memory-manager checks, through ComfyUI's own executor.

One ComfyUI process (tests/host/comfy_driver.py) runs all jobs below; the tests then read its results and the
files it saved. How the workflows are adapted to tiny test models is documented in host_workflows.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import host_assets as A
import host_workflows as W
from host_env import job, ok, run_driver, select_jobs, to_model_space
from kontext_core.conditioning import load_embeddings
from kontext_core.images import nearest_bucket
from kontext_core.pipeline import sample
from kontext_core.weights.loader import load_transformer





def tiny(name: str, model: str = A.MODEL_BFL) -> dict:
    return W.for_tiny_models(W.load_api(name), model, A.COND_FILES, gguf_name=A.MODEL_GGUF_Q4KM)


def sampler_settings(api: dict, **widgets) -> dict:
    for nid in W.find(api, "KontextNativeSampler"):
        api[nid]["inputs"].update(widgets)
    return api



def parity_true_cfg() -> dict:
    api = sampler_settings(tiny("single_edit"), steps=4, seed=3, true_cfg=2.0, solver="heun")
    neg = W.add_node(api, "KontextNativeLoadConditioning", {"conditioning_file": A.COND_FILES[2]})
    api[W.find(api, "KontextNativeSampler")[0]]["inputs"]["negative"] = [neg, 0]
    return W.with_saved_latents(api, "parity_true_cfg")


def ksampler_vs_ours(sampler: str = "euler", shifted: bool = False) -> dict:
    size = (LATENT_HW[1] * 8, LATENT_HW[0] * 8) if shifted else None
    return W.add_ours_beside_ksampler(tiny("kontext_official_basic"), "vs", sampler, size)


def bucket_job() -> dict:
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "scene.png"}}}
    for i, mode in enumerate(["stretch", "crop", "pad", "keep"]):
        b = W.add_node(api, "KontextNativeImageBucket", {"image": ["1", 0], "mask": ["1", 1], "mode": mode})
        W.add_node(api, "SaveImage", {"images": [b, 0], "filename_prefix": f"bucket/{mode}"})
    return api


def vram_plan_job() -> dict:
    api = {"1": {"class_type": "KontextNativeModelLoader", "inputs": {"model_name": A.MODEL_BFL,
                                                                      "weight_dtype": "default"}}}
    W.add_node(api, "KontextNativeVRAMPlan", {"model": ["1", 0], "gpu": "RTX 3080", "vram_gb": 9.5, "ram_gb": 16.0,
                                              "text_encoder": "fp16", "free_text_encoder": False, "width": 512,
                                              "height": 512, "references": 2})
    return api


def save_conditioning_job() -> dict:
    return {"1": {"class_type": "KontextNativeLoadConditioning", "inputs": {"conditioning_file": A.COND_FILES[0]}},
            "2": {"class_type": "KontextNativeSaveConditioning",
                  "inputs": {"conditioning": ["1", 0], "filename_prefix": "kontext_conditioning/roundtrip"}}}


def with_lora(api: dict, strength: float) -> dict:
    W.insert_lora(api, "KontextNativeModelLoader", A.LORA_NAME, strength)
    return api


def img2img() -> dict:
    api = sampler_settings(tiny("single_edit"), steps=10, seed=5, denoise=0.6, scheduler="kontext")
    ref = W.find(api, "KontextNativeReferenceEncoder")[0]
    api[W.find(api, "KontextNativeSampler")[0]]["inputs"]["latent"] = [ref, 1]
    return W.with_saved_latents(api, "parity_img2img")


def disable_guidance() -> dict:
    api = tiny("kontext_official_basic")
    for nid in W.find(api, "FluxGuidance"):
        api[nid] = {"class_type": "FluxDisableGuidance", "inputs": {"conditioning": api[nid]["inputs"]["conditioning"]}}
    return api


TINY_KINDS = ("recolour", "remove", "add", "move", "size", "background", "text", "style", "character")
TINY_SCENE_SEED = 11  # one scene per edit type, the same for every run (not chosen by the model's results)


def tiny_edit_job(kind: str) -> dict:
    """The shipped Kontext-Tiny workflow, unchanged but for the Scene node's choice and the matching prompt."""
    from kontext_core.tiny.edits import scene_triple

    api = W.load_api("kontext_tiny")
    api[W.find(api, "KontextNativeTinyScene")[0]]["inputs"].update(seed=TINY_SCENE_SEED, edit_type=kind)
    api[W.find(api, "KontextNativeTinyPrompt")[0]]["inputs"]["text"] = scene_triple(TINY_SCENE_SEED, kind).instruction
    return api


ANCHORED_TURNS = ("recolour", "add")  # edits of the anchored Kontext-Tiny chain (TINY_SCENE_SEED's scene)


def tiny_anchored_chain_job() -> dict:
    """The shipped Kontext-Tiny workflow continued for a second turn, both turns through Kontext Keep Unchanged
    (turn 1 from the scene, turn 2 from turn 1's chain), each sampler's latent saved."""
    from kontext_core.tiny.edits import scene_triple

    api = W.load_api("kontext_tiny")
    scene, loader = W.find(api, "KontextNativeTinyScene")[0], W.find(api, "KontextNativeTinyLoader")[0]
    api[scene]["inputs"].update(seed=TINY_SCENE_SEED, edit_type=ANCHORED_TURNS[0])
    api[W.find(api, "KontextNativeTinyPrompt")[0]]["inputs"]["text"] = scene_triple(TINY_SCENE_SEED, ANCHORED_TURNS[0]).instruction
    s1 = W.find(api, "KontextNativeSampler")[0]
    keep1 = W.add_node(api, "KontextNativeKeepUnchanged", {"samples": [s1, 0], "vae": [loader, 1], "image": [scene, 0],
                                                          "estimator": "pixels", "threshold": 0.0, "feather": 2,
                                                          "colour_match": True})
    api[W.find(api, "SaveImage")[0]]["inputs"]["images"] = [keep1, 1]
    text2 = W.add_node(api, "KontextNativeTinyPrompt", {"text_encoder": [loader, 2],
                                                       "text": scene_triple(TINY_SCENE_SEED, ANCHORED_TURNS[1]).instruction})
    ref2 = W.add_node(api, "KontextNativeReferenceEncoder", {"conditioning": [text2, 0], "latent": [keep1, 0],
                                                            "layout": "offset"})
    s2 = W.add_node(api, "KontextNativeSampler", {**api[s1]["inputs"], "positive": [ref2, 0], "seed": 1})
    keep2 = W.add_node(api, "KontextNativeKeepUnchanged", {**api[keep1]["inputs"], "samples": [s2, 0],
                                                          "previous": [keep1, 0]})
    del api[keep2]["inputs"]["image"]
    W.add_node(api, "SaveImage", {"images": [keep2, 1], "filename_prefix": "anchored/turn2"})
    for k, keep in enumerate((keep1, keep2)):
        as_image = W.add_node(api, "MaskToImage", {"mask": [keep, 2]})
        W.add_node(api, "SaveImage", {"images": [as_image, 0], "filename_prefix": f"anchored/mask{k + 1}"})
    return W.with_saved_latents(api, "anchored")


def build_jobs() -> list[dict]:
    jobs = [{"name": f"wf:{n}", "prompt": tiny(n)} for n in W.workflow_names()]
    jobs += [
        {"name": "parity_single", "prompt": W.with_saved_latents(tiny("single_edit"), "parity_single")},
        {"name": "parity_composition", "prompt": W.with_saved_latents(sampler_settings(
            W.set_images(tiny("two_reference_composition"), {"Scene": "scene.png", "Character": "character.png"}),
            steps=6, seed=7, solver="dpmpp_2m", scheduler="kontext_unshifted"), "parity_composition")},
        {"name": "parity_true_cfg", "prompt": parity_true_cfg()},
        {"name": "parity_img2img", "prompt": img2img()},
        {"name": "lora", "prompt": W.with_saved_latents(with_lora(tiny("single_edit"), 1.0), "lora")},
        {"name": "lora_off", "prompt": W.with_saved_latents(with_lora(tiny("single_edit"), 0.0), "lora_off")},
        {"name": "lora_lowvram", "mode": "lowvram",
         "prompt": W.with_saved_latents(with_lora(tiny("single_edit"), 1.0), "lora_lowvram")},
        {"name": "disable_guidance", "prompt": disable_guidance()},
        {"name": "ksampler_vs_ours", "prompt": ksampler_vs_ours()},
        {"name": "ksampler_vs_ours_heun", "prompt": ksampler_vs_ours("heun")},
        {"name": "ksampler_vs_ours_shifted", "prompt": ksampler_vs_ours(shifted=True)},
        {"name": "lowvram", "mode": "lowvram",
         "prompt": W.with_saved_latents(tiny("single_edit"), "lowvram")},
        {"name": "interrupt", "mode": "interrupt", "prompt": tiny("single_edit")},
        {"name": "wrong_model", "prompt": tiny("single_edit", A.NOT_A_TRANSFORMER)},
        {"name": "buckets", "prompt": bucket_job()},
        {"name": "save_conditioning", "prompt": save_conditioning_job()},
        {"name": "vram_plan", "prompt": vram_plan_job()},
    ]
    jobs += [{"name": f"tiny:{kind}", "prompt": tiny_edit_job(kind)} for kind in TINY_KINDS]
    jobs.append({"name": "tiny_anchored_chain", "prompt": tiny_anchored_chain_job()})
    for layout in ("comfy", "fp8", "diffusers", "scaled_fp8"):
        jobs.append({"name": f"layout_{layout}", "prompt": W.with_saved_latents(
            tiny("single_edit", A.__dict__["MODEL_" + layout.upper()]), f"layout_{layout}")})
    jobs.append({"name": "weight_dtype_fp8", "prompt": W.with_saved_latents(
        W.set_model(tiny("single_edit"), A.MODEL_BFL, "fp8_e4m3fn"), "weight_dtype_fp8")})
    return jobs


@pytest.fixture(scope="module")
def driver(host_assets):
    jobs = select_jobs(build_jobs())
    results = run_driver(host_assets, jobs)
    return {"jobs": {j["name"]: j["prompt"] for j in jobs}, "results": results["jobs"], "boot": results["boot"],
            "base": host_assets.base, "log": results["log"]}






def saved(driver, name: str, node_id: str, kind: str = "latents") -> list:
    files = W.output_files(job(driver, name), node_id, kind)
    assert files, f"{name}: node {node_id} saved nothing"
    return [driver["base"] / "output" / f["subfolder"] / f["filename"] for f in files]


def saved_latent(driver, name: str, prefix_part: str) -> torch.Tensor:
    prompt = driver["jobs"][name]
    for nid in W.find(prompt, "SaveLatent"):
        if prompt[nid]["inputs"]["filename_prefix"].endswith(prefix_part):
            return load_file(str(saved(driver, name, nid)[0]))["latent_tensor"]
    raise KeyError(prefix_part)


def image_sizes(driver, name: str) -> list[tuple[int, int]]:
    prompt = driver["jobs"][name]
    sizes = []
    for nid in W.find(prompt, "SaveImage"):
        for path in saved(driver, name, nid, "images"):
            with Image.open(path) as im:
                sizes.append(im.size)
    return sizes


# ------------------------------------------------------------------------------------------------------ tests

def test_pack_loads_with_all_nodes(driver):
    assert driver["boot"]["our_nodes"] == sorted([
        "KontextNativeModelLoader", "KontextNativeGGUFLoader", "KontextNativeImageBucket", "KontextNativeReferenceEncoder",
        "KontextNativeSampler", "KontextNativeSaveConditioning", "KontextNativeLoadConditioning",
        "KontextNativeVRAMPlan", "KontextNativeTinyLoader", "KontextNativeTinyPrompt", "KontextNativeTinyScene",
        "KontextNativeKeepUnchanged", "KontextNativeTextEncoderGGUFLoader"])


EXAMPLE = A.IMAGES["example.png"]  # placeholder images are used at their own size ('keep', see host_workflows)
LATENT_HW = (EXAMPLE[1] // 8, EXAMPLE[0] // 8)
EXPECTED_SIZES = {  # as shipped every LoadImage reads example.png (parity_composition uses two sizes)
    "single_edit": [EXAMPLE], "text_replacement": [EXAMPLE], "edit_chain_3_turns": [EXAMPLE],
    "kontext_official_basic": [EXAMPLE], "two_reference_composition": [EXAMPLE], "low_vram_gguf_chain": [EXAMPLE],
    "kontext_tiny": [(64, 64)],  # the bundled model as shipped: its own 64x64 scenes
}


@pytest.mark.parametrize("name", W.workflow_names())
def test_shipped_workflow_runs(driver, name):
    ok(driver, f"wf:{name}")
    assert image_sizes(driver, f"wf:{name}") == EXPECTED_SIZES[name]


def test_every_workflow_is_covered():
    assert sorted(EXPECTED_SIZES) == W.workflow_names()


def test_progress_and_previews(driver):
    r = ok(driver, "wf:single_edit")
    ours = [p for p in r["progress"] if p["class_type"] == "KontextNativeSampler"]
    steps = driver["jobs"]["wf:single_edit"][W.find(driver["jobs"]["wf:single_edit"], "KontextNativeSampler")[0]]["inputs"]["steps"]
    assert [p["value"] for p in ours] == list(range(1, steps + 1))
    assert all(p["total"] == steps for p in ours)
    assert all(p["preview"] for p in ours), "every step should send a latent preview"
    # latent2rgb preview of the unpacked 16-channel x0: one pixel per latent cell
    assert ours[0]["preview_size"] == [LATENT_HW[1], LATENT_HW[0]]


def test_edit_chain_stays_in_latent_space(driver):
    prompt = driver["jobs"]["wf:edit_chain_3_turns"]
    samplers = W.find(prompt, "KontextNativeSampler")
    refs = W.find(prompt, "KontextNativeReferenceEncoder")
    keeps = W.find(prompt, "KontextNativeKeepUnchanged")
    assert len(samplers) == 3 and len(refs) == 3 and len(keeps) == 3
    # turns 2 and 3 take the previous turn's anchored LATENT directly (no VAE in between)
    for ref, prev in zip(refs[1:], keeps[:-1]):
        assert prompt[ref]["inputs"]["latent"] == [prev, 0] and "image" not in prompt[ref]["inputs"]
    ok(driver, "wf:edit_chain_3_turns")


def test_gguf_chain_stays_in_latent_space(driver):
    prompt = driver["jobs"]["wf:low_vram_gguf_chain"]
    samplers = W.find(prompt, "KontextNativeSampler")
    refs = W.find(prompt, "KontextNativeReferenceEncoder")
    keeps = W.find(prompt, "KontextNativeKeepUnchanged")
    loader = W.find(prompt, "KontextNativeGGUFLoader")
    assert len(samplers) == 2 and len(refs) == 2 and len(loader) == 1 and len(keeps) == 2
    assert prompt[refs[1]]["inputs"]["latent"] == [keeps[0], 0] and "image" not in prompt[refs[1]]["inputs"]
    assert all(prompt[s]["inputs"]["model"] == [loader[0], 0] for s in samplers)
    r = ok(driver, "wf:low_vram_gguf_chain")
    assert [f["model_class"] for f in r["lowvram"]["loads"]] == ["KontextNativeGGUFFlux"] * 2


def test_anchored_chain_in_comfyui_equals_the_engines_chain(driver):
    """Two Kontext-Tiny turns through Kontext Keep Unchanged in ComfyUI (core VAE object around the engine AE)
    give the images the engine's EditChain gives on the same sampler outputs, and every pixel outside the mask
    the chain reports is the scene's own."""
    import numpy as np

    from kontext_core import tiny
    from kontext_core.chain import EditChain, dilate
    from kontext_core.images import tensor_to_uint8
    from kontext_core.tiny.edits import scene_triple
    from kontext_core.tiny.scene import render

    name = "tiny_anchored_chain"
    ok(driver, name)
    prompt = driver["jobs"][name]
    s1, s2 = W.find(prompt, "KontextNativeSampler")
    saves = [saved(driver, name, nid, "images")[0] for nid in W.find(prompt, "SaveImage")]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in saves if "mask" not in p.name]
    masks = [np.asarray(Image.open(p).convert("L")) > 127 for p in saves if "mask" in p.name]
    assert len(images) == len(masks) == 2
    scene = render(scene_triple(TINY_SCENE_SEED, ANCHORED_TURNS[0]).context).image      # (H, W, 3) uint8
    models = tiny.load()
    pixels = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 127.5 - 1
    chain = EditChain.from_pixels(models.ae, pixels)
    near = lambda m, r: dilate(torch.from_numpy(m)[None, None], r)[0, 0].numpy()
    for nid, got, mask in zip((s1, s2), images, masks):
        chain.step(to_model_space(saved_latent(driver, name, f"out_{nid}")))
        want = tensor_to_uint8(chain.decode())[0]
        union = chain.union[0, 0].numpy()
        # the change threshold is a hard cut: float noise between the two decoders may flip a pixel lying on it
        flipped = mask != union
        assert flipped.mean() < 0.005 and union.any() and not union.all()
        same = ~near(flipped, chain.feather_px + 1)
        assert np.abs(got.astype(int) - want)[same].max() <= 2
        # beyond the feathered seam of the node's own mask, the picture is the scene (SaveImage truncates x * 255:
        # at most one level below) — and so is the engine's beyond its union's seam, exactly
        kept = ~near(mask, chain.feather_px)
        assert kept.any() and np.abs(got[kept].astype(int) - scene[kept]).max() <= 1
        kept = ~near(union, chain.feather_px)
        assert np.array_equal(want[kept], scene[kept])


def _engine_run(driver, name: str, cond_file: str, negative_file: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = driver["jobs"][name]
    nid = W.find(prompt, "KontextNativeSampler")[0]
    s = prompt[nid]["inputs"]
    refs = [to_model_space(saved_latent(driver, name, f"ref_{r}")) for r in W.find(prompt, "KontextNativeReferenceEncoder")]
    t5, pooled, _ = load_embeddings(driver["base"] / "models" / "kontext_conditioning" / cond_file)
    neg = load_embeddings(driver["base"] / "models" / "kontext_conditioning" / negative_file) if negative_file else None
    model = load_transformer(driver["base"] / "models" / "diffusion_models" / A.MODEL_BFL)
    init = None
    if "latent" in s:  # img2img from a reference encoder's LATENT output
        init = to_model_space(saved_latent(driver, name, f"ref_{s['latent'][0]}"))
    x, _ = sample(model, prompt_embeds=t5, pooled_prompt_embeds=pooled, references=refs, steps=s["steps"],
                  denoise=s["denoise"], init_latent=init,
                  guidance=s["guidance"], seed=s["seed"], layout="offset", solver=s["solver"],
                  shift=s["scheduler"] == "kontext", true_cfg=s["true_cfg"],
                  negative_prompt_embeds=None if neg is None else neg[0],
                  negative_pooled_prompt_embeds=None if neg is None else neg[1], device="cpu", dtype=torch.float32)
    ours = to_model_space(saved_latent(driver, name, f"out_{nid}"))
    return ours, x


@pytest.mark.parametrize("name,neg", [("parity_single", None), ("parity_composition", None),
                                      ("parity_true_cfg", A.COND_FILES[2]), ("parity_img2img", None)])
def test_sampler_matches_engine(driver, name, neg):
    ok(driver, name)
    ours, engine = _engine_run(driver, name, A.COND_FILES[0], neg)
    assert ours.shape == engine.shape
    if name == "parity_composition":  # the first reference (the scene) sets the output size
        w, h = A.IMAGES["scene.png"]
        assert ours.shape[-2:] == (h // 8, w // 8)
    torch.testing.assert_close(ours, engine, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ksampler_vs_ours", "ksampler_vs_ours_heun", "ksampler_vs_ours_shifted"])
def test_core_ksampler_and_reference_latent_work_with_our_model(driver, name):
    """Core's samplers are the independent reference for ours where the algorithm is the same: KSampler (cfg 1)
    with core's euler / heun on the `simple` schedule, and core's euler on ModelSamplingFlux's resolution shift
    against our own `kontext` schedule. Same model, same CPU noise."""
    ok(driver, name)
    ks = saved_latent(driver, name, "vs/ksampler")
    ours = saved_latent(driver, name, "vs/ours")
    assert ks.shape == ours.shape == (1, 16, *LATENT_HW)
    torch.testing.assert_close(ours, ks, rtol=1e-4, atol=1e-4)
    if name != "ksampler_vs_ours":  # a different algorithm or schedule gives a different latent: the check is sharp
        base = saved_latent(driver, "ksampler_vs_ours", "vs/ksampler")
        assert (base - ks).abs().max().item() > 1e-3


def test_partial_loading_casts_layers_and_keeps_the_result(driver):
    normal = ok(driver, "parity_single")
    low = ok(driver, "lowvram")
    stats = low["lowvram"]
    assert stats["load_calls"] >= 1 and stats["model_lowvram"] is True
    assert stats["castable_modules"] > 0 and stats["casting_modules"] == stats["castable_modules"]
    assert stats["loaded_weight_memory"] < stats["model_size"]
    assert stats["cast_calls"] > 0, "no layer ran with comfy_cast_weights"
    assert normal["cast_calls_total"] == 0  # fully loaded fp32 on CPU: weights are used in place
    a = saved_latent(driver, "parity_single", "out_" + W.find(driver["jobs"]["parity_single"], "KontextNativeSampler")[0])
    b = saved_latent(driver, "lowvram", "out_" + W.find(driver["jobs"]["lowvram"], "KontextNativeSampler")[0])
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_interrupt_stops_sampling_promptly(driver):
    r = job(driver, "interrupt")
    assert r["success"] is False
    assert any(m[0] == "execution_interrupted" for m in r["messages"])
    ours = [p for p in r["progress"] if p["class_type"] == "KontextNativeSampler"]
    assert 1 <= len(ours) <= 2


def test_loader_rejects_a_vae_file(driver):
    r = job(driver, "wrong_model")
    assert r["success"] is False
    err = [m[1] for m in r["messages"] if m[0] == "execution_error"]
    assert err and err[0]["node_type"] == "KontextNativeModelLoader"
    assert "autoencoder" in err[0]["exception_message"] and A.NOT_A_TRANSFORMER in err[0]["exception_message"]


@pytest.mark.parametrize("layout,tol", [("comfy", 0.0), ("diffusers", 1e-5), ("fp8", None), ("scaled_fp8", None)])
def test_checkpoint_layouts(driver, layout, tol):
    ok(driver, f"layout_{layout}")
    base = saved_latent(driver, "parity_single", "out_" + W.find(driver["jobs"]["parity_single"], "KontextNativeSampler")[0])
    p = driver["jobs"][f"layout_{layout}"]
    out = saved_latent(driver, f"layout_{layout}", "out_" + W.find(p, "KontextNativeSampler")[0])
    assert out.shape == base.shape and torch.isfinite(out).all()
    if tol is not None:  # the same weights in another layout: the same result
        torch.testing.assert_close(out, base, rtol=0, atol=tol)
    else:  # fp8-stored weights (cast per layer): close to the fp32 run (a missing scale would be far off)
        rel = float((out - base).norm() / base.norm())
        assert rel < 0.2, rel


def test_fp8_weight_dtype_option(driver):
    ok(driver, "weight_dtype_fp8")
    p = driver["jobs"]["weight_dtype_fp8"]
    out = saved_latent(driver, "weight_dtype_fp8", "out_" + W.find(p, "KontextNativeSampler")[0])
    assert out.shape == (1, 16, *LATENT_HW) and torch.isfinite(out).all()


def test_bucket_modes(driver):
    ok(driver, "buckets")
    w, h = A.IMAGES["scene.png"]
    bucket = nearest_bucket(w, h)
    assert image_sizes(driver, "buckets") == [bucket, bucket, bucket, (w, h)]


def test_conditioning_cache_round_trip(driver):
    r = ok(driver, "save_conditioning")
    files = list((driver["base"] / "output" / "kontext_conditioning").glob("roundtrip_*.safetensors"))
    assert len(files) == 1, r["outputs"]
    a = load_embeddings(files[0])
    b = load_embeddings(driver["base"] / "models" / "kontext_conditioning" / A.COND_FILES[0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def _out(driver, name):
    return saved_latent(driver, name, "out_" + W.find(driver["jobs"][name], "KontextNativeSampler")[0])


def test_core_lora_loader_patches_our_model(driver):
    base, on, off, low = (_out(driver, n) for n in ("parity_single", "lora", "lora_off", "lora_lowvram"))
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)  # strength 0: untouched
    assert float((on - base).norm() / base.norm()) > 1e-3  # the LoRA changes the result
    # partially loaded: the LoRA is applied per use (LowVramPatch) instead of baked in; same result
    assert job(driver, "lora_lowvram")["lowvram"]["cast_calls"] > 0
    torch.testing.assert_close(low, on, rtol=1e-5, atol=1e-5)


def test_flux_disable_guidance_runs(driver):
    ok(driver, "disable_guidance")
    assert image_sizes(driver, "disable_guidance") == [EXAMPLE]


def test_vram_plan_node_reports_the_engine_plan(driver):
    from kontext_core.model.flux import FluxParams
    from kontext_core.planner import STORAGES, machine, report
    from kontext_core.weights.loader import read_transformer, resolve_params

    r = ok(driver, "vram_plan")
    texts = [t for out in r["outputs"].values() for t in out.get("text", [])]
    params = resolve_params(read_transformer(str(driver["base"] / "models" / "diffusion_models" / A.MODEL_BFL)))
    assert isinstance(params, FluxParams)
    assert texts == [report(params, machine("RTX 3080", 9.5, 16.0), 512, 512, 2, "fp16", storages=STORAGES)]
    assert "RTX 3080" in texts[0] and "Recommended:" in texts[0]


# --- Kontext-Tiny: the edit must happen, and be the engine's -------------------------------------------------

def _tiny_output(driver, kind: str):
    import numpy as np

    name = f"tiny:{kind}"
    ok(driver, name)
    (path,) = saved(driver, name, W.find(driver["jobs"][name], "SaveImage")[0], "images")
    return np.asarray(Image.open(path).convert("RGB"))


def test_kontext_tiny_workflow_edits_in_comfyui(driver):
    """Every edit type through the shipped workflow in ComfyUI equals the engine's own edit of the same scene,
    prompt and seed; the shipped workflow's own edit succeeds by the exact scene-based test."""
    import numpy as np

    from kontext_core import tiny
    from kontext_core.tiny.edits import scene_triple
    from kontext_core.tiny.evaluate import edit_triples, score
    from kontext_core.tiny.scene import render

    triples = [scene_triple(TINY_SCENE_SEED, k) for k in TINY_KINDS]
    outputs = [_tiny_output(driver, k) for k in TINY_KINDS]
    models = tiny.load()
    engine = [edit_triples(models, [t], seed=0)[0] for t in triples]  # the workflow's sampler seed is 0
    for t, ours, ref in zip(triples, outputs, engine):
        assert np.abs(ours.astype(int) - ref).max() <= 2, t.instruction  # 8-bit rounding of the same edit
    # the edit happened: the shipped workflow, as a user opens it (its scene was fixed before the model was
    # trained), performs its edit, scored from the scene description (held-out success over all types is 43 %,
    # see MODEL_CARD.md, so the 9 per-type scenes above are compared with the engine, not scored)
    from kontext_core.tiny.edits import DEFAULT_SCENE

    (path,) = saved(driver, "wf:kontext_tiny", W.find(driver["jobs"]["wf:kontext_tiny"], "SaveImage")[0], "images")
    shipped = score(scene_triple(*DEFAULT_SCENE), np.asarray(Image.open(path).convert("RGB")))
    assert shipped.success, shipped


