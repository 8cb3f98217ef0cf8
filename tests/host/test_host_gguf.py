"""GGUF transformers inside a real ComfyUI: the GGUF loader node, parity with the engine, partial loading, LoRA
at use, core KSampler, and bad files. One ComfyUI process (tests/host/comfy_driver.py) runs every job below.

The GGUF files are the tiny test transformer converted by the engine (host_assets.write_gguf_assets): Q8_0
quantizes every block weight, Q4_K_M the MLP down projections (Q4_K) with the rest F16/F32 - so quantized
and float tensors both go through the layers and the LoRA patches.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import host_assets as A
import host_workflows as W
from host_env import job, ok, run_driver, to_model_space
from kontext_core.conditioning import load_embeddings
from kontext_core.pipeline import sample
from kontext_core.quant.lora import apply_lora
from kontext_core.weights.gguf_file import read_gguf
from kontext_core.weights.loader import load_transformer

STEPS, SEED = 6, 11
Q8, Q4 = A.MODEL_GGUF_Q8, A.MODEL_GGUF_Q4KM
SAMPLER = dict(steps=STEPS, seed=SEED, guidance=2.5, true_cfg=1.0, solver="euler", scheduler="kontext", denoise=1.0,
               width=0, height=0, batch_size=1)
LORA_LAYERS = sorted(f"diffusion_model.{k}.weight" for k in A.GGUF_LORA_KEYS)
PARITY_TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 on CPU; same as the safetensors parity tests
SAME_TOL = dict(rtol=0, atol=1e-6)  # the same computation reached by another loading path




def gguf_edit(gguf: str, tag: str, lora: float | None = None) -> dict:
    """single_edit on the GGUF loader (short schedule), optionally through core LoraLoaderModelOnly, with the
    reference and output latents saved."""
    api = W.use_gguf(W.for_tiny_models(W.load_api("single_edit"), A.MODEL_BFL, A.COND_FILES), gguf)
    for nid in W.find(api, "KontextNativeSampler"):
        api[nid]["inputs"].update(SAMPLER)
    if lora is not None:
        with_lora(api, lora)
    return W.with_saved_latents(api, tag)


def with_lora(api: dict, strength: float) -> str:
    return W.insert_lora(api, "KontextNativeGGUFLoader", A.GGUF_LORA_NAME, strength)



def lora_switch() -> dict:
    """Three samplers in a row on one loaded GGUF model: with the LoRA, without it (unpatched), with it again.
    Each takes the previous output only for its size (denoise 1), so all three sample the same edit."""
    api = W.use_gguf(W.for_tiny_models(W.load_api("single_edit"), A.MODEL_BFL, A.COND_FILES), Q8)
    s1 = W.find(api, "KontextNativeSampler")[0]
    api[s1]["inputs"].update(SAMPLER)
    loader = W.find(api, "KontextNativeGGUFLoader")[0]
    lora = with_lora(api, 1.0)
    positive = api[s1]["inputs"]["positive"]
    s2 = W.add_node(api, "KontextNativeSampler", {"model": [loader, 0], "positive": positive, "latent": [s1, 0],
                                                  **SAMPLER})
    W.add_node(api, "KontextNativeSampler", {"model": [lora, 0], "positive": positive, "latent": [s2, 0], **SAMPLER})
    return W.with_saved_latents(api, "gguf_switch")


def ksampler_vs_ours() -> dict:
    api = W.for_tiny_models(W.load_api("kontext_official_basic"), A.MODEL_BFL, A.COND_FILES)
    return W.add_ours_beside_ksampler(W.use_gguf(api, Q4), "gguf_vs")


def bad_file(kind: str) -> dict:
    return W.use_gguf(W.for_tiny_models(W.load_api("single_edit"), A.MODEL_BFL, A.COND_FILES), A.BAD_GGUF[kind])


def build_jobs() -> list[dict]:
    jobs = [
        {"name": "q8", "prompt": gguf_edit(Q8, "q8")},
        {"name": "q4km", "prompt": gguf_edit(Q4, "q4km")},
        {"name": "q8_budget", "mode": "budget", "budget": 0.5, "prompt": gguf_edit(Q8, "q8_budget")},
        {"name": "q8_lowvram", "mode": "lowvram", "prompt": gguf_edit(Q8, "q8_lowvram")},
        {"name": "lora", "prompt": gguf_edit(Q8, "lora", 1.0)},
        {"name": "lora_off", "prompt": gguf_edit(Q8, "lora_off", 0.0)},
        {"name": "lora_budget", "mode": "budget", "budget": 0.5, "prompt": gguf_edit(Q8, "lora_budget", 1.0)},
        {"name": "lora_lowvram", "mode": "lowvram", "prompt": gguf_edit(Q8, "lora_lowvram", 1.0)},
        {"name": "lora_q4km", "prompt": gguf_edit(Q4, "lora_q4km", 0.7)},
        {"name": "lora_switch", "prompt": lora_switch()},
        {"name": "ksampler_vs_ours", "prompt": ksampler_vs_ours()},
    ]
    jobs += [{"name": f"bad_{kind}", "prompt": bad_file(kind)} for kind in A.BAD_GGUF]
    jobs.append({"name": "lifecycle", "check": "gguf_lora_lifecycle", "gguf": Q8, "lora": A.GGUF_LORA_NAME})
    return jobs


@pytest.fixture(scope="module")
def driver(host_assets):
    jobs = build_jobs()
    results = run_driver(host_assets, jobs)
    return {"jobs": {j["name"]: j.get("prompt", {}) for j in jobs}, "results": results["jobs"], "base": host_assets.base,
            "log": results["log"]}






def latent(driver, name: str, prefix_part: str) -> torch.Tensor:
    prompt = driver["jobs"][name]
    for nid in W.find(prompt, "SaveLatent"):
        if prompt[nid]["inputs"]["filename_prefix"].endswith(prefix_part):
            files = W.output_files(job(driver, name), nid, "latents")
            assert files, f"{name}: node {nid} saved nothing"
            return load_file(str(driver["base"] / "output" / files[0]["subfolder"] / files[0]["filename"]))["latent_tensor"]
    raise KeyError(prefix_part)


def out(driver, name: str, index: int = 0) -> torch.Tensor:
    ok(driver, name)
    return latent(driver, name, "out_" + W.find(driver["jobs"][name], "KontextNativeSampler")[index])


def facts(driver, name: str) -> dict:
    loads = ok(driver, name)["lowvram"]["loads"]
    assert loads, f"{name}: our model was never loaded"
    return loads[-1]


def engine_result(driver, name: str, gguf: str, lora_strength: float | None = None) -> torch.Tensor:
    """The engine alone: load_transformer(gguf) (+ apply_lora) and `sample` with the job's reference latent."""
    prompt = driver["jobs"][name]
    ref = W.find(prompt, "KontextNativeReferenceEncoder")[0]
    refs = [to_model_space(latent(driver, name, f"ref_{ref}"))]
    t5, pooled, _ = load_embeddings(driver["base"] / "models" / "kontext_conditioning" / A.COND_FILES[0])
    model = load_transformer(driver["base"] / "models" / "diffusion_models" / gguf)
    if lora_strength is not None:
        apply_lora(model, load_file(str(driver["base"] / "models" / "loras" / A.GGUF_LORA_NAME)), lora_strength)
    x, _ = sample(model, prompt_embeds=t5, pooled_prompt_embeds=pooled, references=refs, steps=STEPS,
                  guidance=2.5, seed=SEED, layout="offset", solver="euler", shift=True, device="cpu",
                  dtype=torch.float32)
    return x


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name,gguf", [("q8", Q8), ("q4km", Q4)])
def test_gguf_sampler_matches_engine(driver, name, gguf):
    ours = to_model_space(out(driver, name))
    engine = engine_result(driver, name, gguf)
    assert ours.shape == engine.shape
    torch.testing.assert_close(ours, engine, **PARITY_TOL)


@pytest.mark.parametrize("name,gguf", [("q8", Q8), ("q4km", Q4)])
def test_gguf_stays_quantized_and_is_budgeted_by_its_bytes(driver, name, gguf):
    f = facts(driver, name)
    assert f["model_class"] == "KontextNativeGGUFFlux" and f["patcher_class"] == "GGUFModelPatcher"
    g = read_gguf(driver["base"] / "models" / "diffusion_models" / gguf)
    quantized = sorted(k for k, q in g.qtypes.items() if q not in ("F32", "F16", "BF16"))
    assert quantized and f["quantized_params"] == quantized  # every quantized tensor is still its GGUF bytes
    stored = sum(t.numel() * t.element_size() for t in g.tensors.values())  # GGMLTensor: uint8 = raw bytes
    logical = sum(getattr(t, "logical_numel", t.numel()) for t in g.tensors.values())
    assert f["dit_bytes"] == stored  # what ComfyUI's module_size counts
    assert f["dit_bytes"] < 4 * logical
    assert f["compute_dtype"] == "torch.float32"  # ComfyUI's choice on CPU
    # the largest layer (single blocks' linear1: 448 x 64) dequantized in fp32 + a fp32 decode buffer
    assert f["largest_numel"] == 448 * 64
    assert f["reserve_bytes"] == f["largest_numel"] * (4 + 4) == f["memory_required_extra"]


def test_partial_loading_gives_the_same_result(driver):
    full = out(driver, "q8")
    budget, low = facts(driver, "q8_budget"), facts(driver, "q8_lowvram")
    assert budget["model_lowvram"] and 0 < budget["lowvram_modules"] < budget["castable_modules"]
    assert 0 < budget["loaded_weight_memory"] < budget["model_size"]
    assert low["model_lowvram"] and low["lowvram_modules"] == low["castable_modules"]
    assert low["loaded_weight_memory"] < low["model_size"]
    torch.testing.assert_close(out(driver, "q8_budget"), full, **SAME_TOL)
    torch.testing.assert_close(out(driver, "q8_lowvram"), full, **SAME_TOL)


def test_lora_on_gguf_matches_engine_lora(driver):
    base, on = out(driver, "q8"), out(driver, "lora")
    assert float((on - base).norm() / base.norm()) > 1e-2  # the LoRA matters
    torch.testing.assert_close(to_model_space(on), engine_result(driver, "lora", Q8, 1.0), **PARITY_TOL)
    f = facts(driver, "lora")
    # fully loaded: every patched layer got a LivePatch, none was made dense
    assert f["live_patches"] == LORA_LAYERS and f["host_patched"] == []
    assert f["quantized_params"] == facts(driver, "q8")["quantized_params"]
    assert f["reserve_bytes"] == f["largest_numel"] * (4 + 4 + 8)  # + fp32 weight and LoRA delta


def test_lora_on_q4_k_weights_matches_engine(driver):
    got = to_model_space(out(driver, "lora_q4km"))
    torch.testing.assert_close(got, engine_result(driver, "lora_q4km", Q4, 0.7), **PARITY_TOL)
    assert "double_blocks.0.img_mlp.2.weight" in facts(driver, "lora_q4km")["quantized_params"]  # Q4_K


def test_lora_strength_zero_is_no_lora(driver):
    torch.testing.assert_close(out(driver, "lora_off"), out(driver, "q8"), **SAME_TOL)


def test_lora_partially_loaded_equals_fully_loaded(driver):
    on = out(driver, "lora")
    budget, low = facts(driver, "lora_budget"), facts(driver, "lora_lowvram")
    # a mix: loaded layers carry LivePatches, layers left in RAM ComfyUI's LowVramPatch - never both
    assert budget["live_patches"] and budget["host_patched"]
    assert sorted(budget["live_patches"] + ["diffusion_model." + n + ".weight" for n in budget["host_patched"]]) \
        == LORA_LAYERS
    assert low["live_patches"] == [] and len(low["host_patched"]) == len(LORA_LAYERS)
    torch.testing.assert_close(out(driver, "lora_budget"), on, **SAME_TOL)
    torch.testing.assert_close(out(driver, "lora_lowvram"), on, **SAME_TOL)


def test_lora_is_unpatched_for_the_plain_model(driver):
    loads = ok(driver, "lora_switch")["lowvram"]["loads"]
    assert [bool(f["live_patches"]) for f in loads] == [True, False, True]
    first, plain, again = (out(driver, "lora_switch", i) for i in range(3))
    torch.testing.assert_close(first, out(driver, "lora"), **SAME_TOL)
    torch.testing.assert_close(plain, out(driver, "q8"), **SAME_TOL)
    torch.testing.assert_close(again, first, **SAME_TOL)


def test_lora_patcher_states(driver):
    """ModelPatcher states no CPU workflow reaches: a partial unload after a full load, a layer carrying both
    patch kinds, unpatching and reloading (one transformer forward each, fp32)."""
    r = job(driver, "lifecycle")
    assert r["patcher_class"] == r["clone_class"] == "GGUFModelPatcher"
    assert r["lora_effect"] > 1e-2 and r["live_full"] == LORA_LAYERS
    assert r["freed"] > 0 and r["live_partial"] and r["host_partial"]  # the unloaded layers switched kind
    assert sorted(r["live_partial"] + ["diffusion_model." + n + ".weight" for n in r["host_partial"]]) == LORA_LAYERS
    assert r["partial_vs_full"] == 0.0 and r["both_vs_full"] == 0.0  # the LoRA is applied exactly once
    assert r["live_unpatched"] == [] and r["host_unpatched"] == [] and r["unpatched_vs_base"] == 0.0
    assert r["reloaded_vs_full"] == 0.0 and r["live_reloaded"] == LORA_LAYERS


def test_core_ksampler_reference_latent_and_flux_guidance_on_gguf(driver):
    ok(driver, "ksampler_vs_ours")
    ks = latent(driver, "ksampler_vs_ours", "gguf_vs/ksampler")
    ours = latent(driver, "ksampler_vs_ours", "gguf_vs/ours")
    assert ks.shape == ours.shape and torch.isfinite(ks).all()
    torch.testing.assert_close(ours, ks, **PARITY_TOL)


@pytest.mark.parametrize("kind,needle", [("truncated", "truncated"), ("not_flux", "'t5' model"),
                                         ("unsupported", "TQ1_0"), ("renamed", "not a GGUF file")])
def test_bad_gguf_files_report_the_engine_error(driver, kind, needle):
    r = job(driver, f"bad_{kind}")
    assert r["success"] is False
    err = [m[1] for m in r["messages"] if m[0] == "execution_error"]
    assert err and err[0]["node_type"] == "KontextNativeGGUFLoader"
    msg = err[0]["exception_message"]
    assert needle in msg and A.BAD_GGUF[kind] in msg, msg
