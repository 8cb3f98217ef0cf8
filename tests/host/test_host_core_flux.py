"""Our MODEL behaves like core's Flux under what users combine it with: ComfyUI's attention backend (and
attention overrides, masks), `patches_replace` block patches and `post_input` patches, core ControlNets and core's
EasyCache. Core's Flux on the same tiny weights is the reference (tests/host/core_flux_checks.py builds it); one
ComfyUI process runs every check."""

from __future__ import annotations

import pytest

import host_assets as A
from host_env import ok, run_driver

SAME = 2e-5  # fp32 on CPU: the two implementations differ in rounding only (plain forwards agree to ~1e-6)
EASYCACHE_STEPS = 12


@pytest.fixture(scope="module")
def driver(host_assets):
    jobs = [{"name": "patches", "check": "core_flux_patches", "model": A.MODEL_BFL},
            {"name": "controlnet", "check": "core_flux_controlnet", "model": A.MODEL_BFL},
            {"name": "easycache", "check": "core_flux_easycache", "model": A.MODEL_BFL, "threshold": 0.3,
             "steps": EASYCACHE_STEPS}]
    return {"results": run_driver(host_assets, jobs)["jobs"], "log": "driver.log"}


def test_plain_forward_matches_core(driver):
    assert ok(driver, "patches")["plain_diff"] < SAME


def test_block_and_post_input_patches_act_as_on_core(driver):
    r = ok(driver, "patches")
    assert r["patch_effect"] > 1e-2, "the patches must change core's output, or the comparison proves nothing"
    assert r["patched_diff"] < SAME
    # the same patches called in the same order with the same arguments (shapes, keys)
    assert r["patch_calls"]["ours"] == r["patch_calls"]["core"]
    names = [c[0] for c in r["patch_calls"]["core"]]
    assert names == ["post_input", "double_0", "double_1", "single_1"]


def test_attention_mask_acts_as_on_core(driver):
    r = ok(driver, "patches")
    assert r["mask_effect"] > 1e-3
    assert r["mask_diff"] < SAME


def test_attention_backend_is_called_as_core_calls_it(driver):
    calls = ok(driver, "patches")["attention_calls"]
    assert len(calls["core"]) == 3  # 2 double + 2 single blocks, less the single block its patch skips
    assert calls["ours"] == calls["core"]
    assert all(c["skip_reshape"] is True and c["mask"] == [1, 20, 20] and c["out_shape"] == [1, 20, 64]
               for c in calls["ours"])
    # the transformer_options a block patch hands to the original block are the ones its attention gets
    assert [c["options"] for c in calls["ours"]] == ["forward's", ["marked", "patches_replace"], "forward's"]


def test_attention_override_applies_as_on_core(driver):
    r = ok(driver, "patches")
    assert r["override_calls"]["ours"] == r["override_calls"]["core"] and len(r["override_calls"]["core"]) == 4
    assert r["override_effect"] > 1e-3
    assert r["override_diff"] < SAME


def test_core_controlnet_acts_as_on_core(driver):
    r = ok(driver, "controlnet")
    assert r["effect"] > 1e-2, "the ControlNet must change core's result"
    assert r["diff"] < 1e-4  # six sampling steps
    outs = r["control_outputs"]
    assert outs["ours"] == outs["core"] and outs["core"] and {"input", "output"} <= set(outs["core"][0])


def test_core_easycache_skips_the_same_steps_with_the_same_result(driver):
    r = ok(driver, "easycache")
    ours, core = r["runs"]["ours"], r["runs"]["core"]
    assert 0 < len(core["evaluated_sigmas"]) < EASYCACHE_STEPS, "EasyCache must skip some steps but not all"
    assert ours["evaluated_sigmas"] == core["evaluated_sigmas"]
    assert core["cache_effect"] > 1e-4
    assert r["diff"] < 1e-4
