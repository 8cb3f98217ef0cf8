"""The GPU measurement suite's dry run: every section on CPU at a tiny size, written to JSON and Markdown.

CI has no GPU; this keeps the suite runnable the day one is lent (same code path, tiny FluxParams/AE, budgets)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def read(out: Path):
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def rows(data, section, **match):
    return [r for r in data["sections"][section]["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_dry_run_writes_every_section(tmp_path):
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--budget-min", "10"]) == 0
    data, md = read(tmp_path)
    assert list(data["sections"]) == list(gpu_suite.SECTIONS)
    for name, sec in data["sections"].items():
        assert sec["status"] == "done", (name, sec["note"])
        assert sec["rows"], name
        assert f"## {name}\n\nstatus: **done**" in md
    # the CUDA tests ran in their own process and were skipped here (no CUDA), not failed
    tests = data["sections"]["cuda_tests"]["rows"][0]
    assert tests["files"] >= 2 and tests["rc"] == 0 and "skipped" in tests["summary"]
    # ours vs diffusers on the same (converted) weights: a real parity number, bf16 rounding only
    ratio = rows(data, "diffusers", implementation="ratio ours/diffusers")[0]
    assert ratio["s_per_forward"] > 0 and ratio["rel_rms_delta"] < 0.05
    bf16 = data["sections"]["bf16"]["rows"][0]
    assert bf16["finite"] and bf16["s_per_step"] > 0 and bf16["x_floor"] > 0
    assert bf16["flops_exact"] > 0 and bf16["floor_s"] > 0
    assert bf16["pred_peak_bytes"] > 0 and bf16["planner_error"] is None
    assert {r["what"].split()[0] for r in data["sections"]["ae"]["rows"]} == {"encode", "decode"}
    fp8 = {r["path"]: r for r in data["sections"]["fp8"]["rows"]}
    assert set(fp8) == {"upcast to bf16", "_scaled_mm"}
    assert fp8["_scaled_mm"]["unavailable"] and fp8["_scaled_mm"]["scaled_mm_calls"] == 0  # CPU: said, not faked
    assert 0 < fp8["upcast to bf16"]["rel_rms_vs_bf16"] < 0.1
    gguf = {r["target"]: r for r in data["sections"]["gguf"]["rows"]}
    assert 0 < gguf["Q8_0"]["rel_rms_vs_bf16"] < gguf["Q4_K_M"]["rel_rms_vs_bf16"] < 0.2
    assert all(r["dequant_gb_per_s"] > 0 and r["quantize_s"] > 0 for r in gguf.values())
    for storage in ("bf16", "Q4_K_M"):
        runs = [r for r in rows(data, "streaming", storage=storage) if "s_per_step" in r]
        streamed = [r for r in runs if r["resident"] < r["blocks"]]
        assert streamed, storage  # the small budgets really stream
        for r in runs:
            assert r["resident"] == r["pred_resident"]  # streaming keeps what the planner planned
            assert r["weights_peak_bytes"] <= r["weight_budget_bytes"]
            if storage == "bf16":
                assert r["rel_rms_vs_bf16"] == 0  # streaming does not change the result
    assert "| storage | tokens | weights_bytes | s_per_step |" in md


def test_a_spent_budget_skips_sections_and_says_why(tmp_path):
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--budget-min", "0"]) == 0
    data, md = read(tmp_path)
    secs = data["sections"]
    assert secs["environment"]["status"] == "done"  # always recorded: it says what the numbers mean
    for name in gpu_suite.SECTIONS[1:]:
        assert secs[name]["status"] == "skipped" and secs[name]["note"], name
    assert "budget left" in secs["cuda_tests"]["note"]
    assert md.count("status: **skipped**") == len(gpu_suite.SECTIONS) - 1
