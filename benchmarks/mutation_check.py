"""Mutation check: plant one plausible bug at a time in a temporary copy of the checkout and run the CPU tests.

A mutant is *caught* when the tests fail with it planted. A mutant that survives marks numeric code whose tests
would not notice that bug. Each mutant is a one-line edit (`old` -> `new`, the n-th occurrence of `old` in one
file); the script refuses a mutant whose `old` text is no longer in the file, so the list cannot go stale
silently.

    python benchmarks/mutation_check.py                  # every mutant (~20-40 min on 2 busy cores; not in CI)
    python benchmarks/mutation_check.py --ref f06014b    # the same mutants against an older commit's code + tests
    python benchmarks/mutation_check.py --list
    python benchmarks/mutation_check.py --only dpm_no_correction img2img_swapped
    python benchmarks/mutation_check.py --tests tests/unit tests/parity   # one wider subset for every mutant

The last line is the summary: "mutation check: N planted, C caught, S survived (...)".
To stay affordable each mutant runs only the CPU test files that cover its module (its `tests`, from
tests/unit and tests/parity; stopping at the first failure), not the whole suite; tests/tiny and tests/host
are left out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...]  # the test files that cover this code (missing ones are skipped, e.g. with --ref)
    occurrence: int = 1  # which occurrence of `old` to replace (1-based)


SOLVER_TESTS = ("tests/unit/test_schedule.py", "tests/unit/test_nodes_logic.py", "tests/parity/test_solver_parity.py")
SAMPLE_TESTS = ("tests/unit/test_schedule.py", "tests/unit/test_nodes_logic.py", "tests/parity/test_pipeline_parity.py")
PLANNER_TESTS = ("tests/unit/test_planner.py", "tests/unit/test_memory.py")

MUTANTS = [
    # sampling: solvers
    Mutant("euler_step_sign", "kontext_core/sampling/solvers.py", "x = x + (t_next - t) * v",
           "x = x + (t - t_next) * v", "Euler steps the wrong way",
           tests=SOLVER_TESTS),
    Mutant("dpm_no_correction", "kontext_core/sampling/solvers.py",
           "d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0", "d = x0",
           "DPM++ 2M without its second-order correction (becomes DPM++ 1S)",
           tests=SOLVER_TESTS),
    Mutant("dpm_ratio_inverted", "kontext_core/sampling/solvers.py", "r = prev_h / h", "r = h / prev_h",
           "DPM++ 2M step-size ratio inverted",
           tests=SOLVER_TESTS),
    Mutant("dpm_first_step_data", "kontext_core/sampling/solvers.py", "x = (t_next / t) * x - (1 - t_next)",
           "x = (t_next / t) * x - (1 - t)", "DPM++ 2M: the data coefficient uses alpha(t) instead of alpha(t_next)",
           tests=SOLVER_TESTS),
    Mutant("heun_weights", "kontext_core/sampling/solvers.py", "0.5 * (v + v2)", "(0.4 * v + 0.6 * v2)",
           "Heun's trapezoid weights unbalanced (first order, small error constant)",
           tests=SOLVER_TESTS),
    Mutant("heun_corrector_time", "kontext_core/sampling/solvers.py", "v2 = velocity(x_pred, t_next)",
           "v2 = velocity(x_pred, t)", "Heun evaluates the corrector at the old time",
           tests=SOLVER_TESTS),
    # sampling: schedule and img2img start
    Mutant("mu_no_base", "kontext_core/sampling/schedule.py", "base_shift + slope * (n_tokens - base_tokens)",
           "base_shift + slope * n_tokens", "resolution shift forgets the 256-token base",
           tests=("tests/unit/test_schedule.py", "tests/parity/test_pipeline_parity.py")),
    Mutant("img2img_swapped", "kontext_core/pipeline.py", "x = s0 * x + (1.0 - s0) * init_latent",
           "x = (1.0 - s0) * x + s0 * init_latent", "img2img start: noise and init weights swapped",
           tests=SAMPLE_TESTS),
    Mutant("img2img_next_sigma", "kontext_core/pipeline.py", "s0 = float(sigmas[0])", "s0 = float(sigmas[1])",
           "img2img start noised to the second time of the schedule",
           tests=SAMPLE_TESTS),
    # guidance, tokens, AE scaling (controls: the diffusers parity tests should catch these)
    Mutant("guidance_scaled", "kontext_core/model/flux.py", "timestep_embedding(guidance, 256)",
           "timestep_embedding(guidance * 0.5, 256)", "guidance embedded at half strength",
           tests=("tests/parity/test_transformer_parity.py",)),
    Mutant("context_ids_index", "kontext_core/tokens.py", "ids[..., 0] = index", "ids[..., 0] = 0",
           "context tokens lose their index",
           tests=("tests/unit/test_tokens.py", "tests/parity/test_transformer_parity.py")),
    Mutant("ae_shift_sign", "kontext_core/model/autoencoder.py", "return z / self.scale_factor + self.shift_factor",
           "return z / self.scale_factor - self.shift_factor", "AE decode subtracts the shift",
           tests=("tests/parity/test_autoencoder_parity.py",)),
    # memory model and planner
    Mutant("acts_no_fp32_qk", "kontext_core/memory.py", " + 2 * h * 4", "",
           "activation formula drops the fp32 rotated q/k",
           tests=PLANNER_TESTS),
    Mutant("acts_linear1_narrow", "kontext_core/memory.py", "(3 * h + m) * b", "(2 * h + m) * b",
           "activation formula: linear1 output without v",
           tests=PLANNER_TESTS),
    Mutant("planner_fp8_no_scale", "kontext_core/planner.py", 'return (n + 4, "fp8")', 'return (n, "fp8")',
           "planner forgets the fp8 per-tensor scale",
           tests=("tests/unit/test_planner.py",)),
    Mutant("planner_gguf_no_fp32_scratch", "kontext_core/planner.py", "else cb + 4)", "else cb)",
           "planner's GGUF scratch forgets the fp32 decode buffer",
           tests=PLANNER_TESTS),
    Mutant("planner_gguf_base_type", "kontext_core/planner.py", "qt = choose_qtype(name, shape, storage)",
           "qt = choose_qtype(name, shape, storage.replace('_M', '_S'))",
           "planner sizes _M targets without their higher type for sensitive tensors",
           tests=("tests/unit/test_planner.py",)),
    Mutant("streaming_one_buffer", "kontext_core/streaming.py", "reserve = buffers * max(streamed)",
           "reserve = max(streamed)", "streaming peak counts one buffer instead of two",
           tests=("tests/unit/test_streaming.py", "tests/unit/test_planner.py")),
    # edit chain and LoRA
    Mutant("chain_round_trip", "kontext_core/pipeline.py",
           "refs += [r if not isinstance(r, Tensor) or r.ndim != 3 else r.unsqueeze(0) for r in latents]",
           "refs += [ae.encode(ae.decode(r)) if ae is not None else r for r in latents]",
           "context latents sent through an AE decode -> encode round trip",
           tests=("tests/unit/test_chain.py", "tests/parity/test_pipeline_parity.py")),
    Mutant("lora_alpha_ignored", "kontext_core/quant/lora.py", "LoraPart(rows, down, up, alpha / rank, swap)",
           "LoraPart(rows, down, up, 1.0, swap)", "LoRA scale ignores alpha / rank",
           tests=("tests/unit/test_lora.py",)),
    Mutant("lora_alpha_inverted", "kontext_core/quant/lora.py", "LoraPart(rows, down, up, alpha / rank, swap)",
           "LoraPart(rows, down, up, rank / alpha, swap)", "LoRA scale inverted (rank / alpha)",
           tests=("tests/unit/test_lora.py",)),
    # weights (controls)
    Mutant("fp8_scale_divided", "kontext_core/model/ops.py",
           "w = w * _scale_for_rows(self.scale_weight", "w = w / _scale_for_rows(self.scale_weight",
           "scaled-fp8 weights divided by their scale",
           tests=("tests/unit/test_fp8.py",)),
    Mutant("rmsnorm_eps", "kontext_core/model/layers.py", "F.rms_norm(x, scale.shape, scale, eps=1e-6)",
           "F.rms_norm(x, scale.shape, scale, eps=1e-1)", "RMSNorm epsilon grown 1e5 x (fp32 path)",
           tests=("tests/parity/test_transformer_parity.py",)),
]


def copy_checkout(dest: Path, ref: str | None) -> None:
    """The files of commit `ref`, or the tracked and untracked-but-not-ignored files of the checkout."""
    if ref is not None:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def plant(text: str, m: Mutant) -> str:
    start = -1
    for _ in range(m.occurrence):
        start = text.find(m.old, start + 1)
        if start < 0:
            raise SystemExit(f"mutant {m.name}: '{m.old}' (occurrence {m.occurrence}) is not in {m.path}; "
                             "update the mutant to the current code")
    return text[:start] + m.new + text[start + len(m.old):]


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, str]:
    """(verdict: "passed" | "failed" | "timeout", last summary line)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("COMFYUI_PATH", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"timed out after {timeout:.0f} s (neither caught nor survived)"
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    return ("passed" if r.returncode == 0 else "failed"), (lines[-1] if lines else r.stderr.strip()[-200:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    ap.add_argument("--tests", nargs="*", help="test paths run for every mutant (default: each mutant's own list)")
    ap.add_argument("--ref", help="check the code and tests of this commit instead of the working tree (a 'before')")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutant run")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--baseline", action="store_true", help="also run the unmutated copy first (must pass)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        raise SystemExit(f"unknown mutant(s): {sorted(set(args.only) - {m.name for m in MUTANTS})}")
    if args.list:
        for m in chosen:
            print(f"{m.name:30s} {m.path}: {m.what}")
        return 0
    survived, timed_out = [], []
    with tempfile.TemporaryDirectory(prefix="kontext-mutants-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy, args.ref)
        if args.baseline:
            every = sorted({t for m in chosen for t in (args.tests or m.tests) if (copy / t.split("::")[0]).exists()})
            verdict, summary = run_tests(copy, every, args.timeout)
            print(f"baseline: {verdict}: {summary}", flush=True)
            if verdict != "passed":
                raise SystemExit("the unmutated tests do not pass; fix them before a mutation check")
        for m in chosen:
            target = copy / m.path
            original = target.read_text()
            tests = [t for t in (args.tests or m.tests) if (copy / t.split("::")[0]).exists()]
            target.write_text(plant(original, m))
            t0 = time.perf_counter()
            try:  # no test file (e.g. --ref with a commit that has none of this mutant's files): it survives
                verdict, summary = run_tests(copy, tests, args.timeout) if tests else ("passed", "no test file")
            finally:
                target.write_text(original)
            label = {"passed": "SURVIVED", "failed": "caught", "timeout": "TIMEOUT"}[verdict]
            if verdict == "passed":
                survived.append(m.name)
            elif verdict == "timeout":
                timed_out.append(m.name)
            print(f"{label:8s} {m.name:30s} {time.perf_counter() - t0:5.0f} s  {summary}  [{' '.join(tests)}]",
                  flush=True)
    n = len(chosen)
    caught = n - len(survived) - len(timed_out)
    print(f"mutation check: {n} planted, {caught} caught, {len(survived)} survived"
          + (f" ({', '.join(survived)})" if survived else "")
          + (f", {len(timed_out)} timed out ({', '.join(timed_out)})" if timed_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
