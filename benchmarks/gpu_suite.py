"""GPU measurement suite: every GPU claim of the project measured in one run, inside a time budget.

    python benchmarks/gpu_suite.py --budget-min 8 --out OUT_DIR        # on a CUDA machine (full size)
    python benchmarks/gpu_suite.py --dry-run --out OUT_DIR             # the same code path on CPU, tiny, seconds
    bash benchmarks/gpu_suite.sh --budget-min 8 --out OUT_DIR          # installs what is missing first

Full size = the Kontext dev transformer (`KONTEXT_DEV`, 11.9B parameters) and the FLUX AE, with seeded random
weights generated directly on the device (no checkpoint file), editing 1024x1024 with one 1024x1024 reference
(4096 target + 4096 context + 512 text tokens). Sections, in order (each skipped, with the reason recorded, when
what is left of the budget cannot hold its estimated cost):

  environment  torch / device / capability / memory
  cuda_tests   the tests marked `cuda` (pytest -m cuda), in a subprocess
  matmul       measured bf16 matmul throughput and host->device copy bandwidth (pageable and pinned)
  diffusers    diffusers' FluxTransformer2DModel on the same weights (our converter makes the engine's copy):
               s/forward of both, ratio ours/diffusers, max |delta| of one forward
  bf16         s/step (median after warm-up), peak memory, compute floor (exact FLOPs / measured matmul
               throughput) and our s/step as a multiple of it, the planner's prediction
  ae           AE encode of the reference and decode of the result: seconds, peak, the planner's decode estimate
  fp8          scaled fp8 (e4m3fn) with the upcast path and with torch._scaled_mm: s/step, peak, error vs bf16
  gguf         Q8_0 and Q4_K_M quantized on the device with the project's quantizer: s/step, peak, error vs bf16
  streaming    block streaming under 8/12/16/24 GB for bf16 and Q4_K_M: s/step and peak vs the planner

Results are written as they come (JSON + Markdown, rewritten after every row), so a killed run still leaves
everything measured so far; sections not reached show as "pending". GPU memory is freed between sections.
Peak memory is torch.cuda.max_memory_allocated (and _reserved) with only the measured model on the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kontext_core import tokens as tok  # noqa: E402
from kontext_core.memory import activation_bytes, human_bytes, tokens_for  # noqa: E402
from kontext_core.model.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from kontext_core.model.flux import KONTEXT_DEV, Flux, FluxParams  # noqa: E402
from kontext_core.model.ops import CastOps  # noqa: E402

SECTIONS = ("environment", "cuda_tests", "matmul", "diffusers", "bf16", "ae", "fp8", "gguf", "streaming")
GiB = 2**30


# --- configuration ---------------------------------------------------------------------------------------------

@dataclass
class SuiteConfig:
    label: str
    device: str
    dtype: torch.dtype
    flux: FluxParams
    ae: AutoEncoderParams
    width: int
    height: int
    txt_tokens: int
    budgets_gb: tuple[float, ...]  # streaming budgets (GB = 1e9 bytes, as the planner counts)
    # dry run: budgets instead = the planner's non-weight overhead + streaming's minimum weight budget + these
    # fractions of the weights above that minimum (tiny weights are dwarfed by the fixed overheads)
    budget_fracs: tuple[float, ...] = ()
    warmup: int = 1
    steps: int = 3
    stream_steps: int = 2
    matmul_shapes: tuple[tuple[int, int, int], ...] = ((8192, 8192, 8192),)
    copy_bytes: int = GiB
    gguf_targets: tuple[str, ...] = ("Q8_0", "Q4_K_M")
    stream_storages: tuple[str, ...] = ("bf16", "Q4_K_M")
    cost_scale: float = 1.0  # multiplies the fixed part of every section's estimated cost
    dry_run: bool = False


def full_config(device: str = "cuda") -> SuiteConfig:
    return SuiteConfig("full size (Kontext dev, 1024x1024 + one 1024x1024 reference)", device, torch.bfloat16,
                       KONTEXT_DEV, AutoEncoderParams(), 1024, 1024, 512, (8, 12, 16, 24))


# A tiny model of the same family: the dry run exercises every line of the suite on CPU in seconds.
TINY_FLUX = FluxParams(vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=4, depth=2,
                       depth_single_blocks=2, axes_dim=(4, 6, 6))
TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)


def dry_config() -> SuiteConfig:
    return SuiteConfig("dry run (tiny model on CPU)", "cpu", torch.bfloat16, TINY_FLUX, TINY_AE, 64, 64, 8,
                       (), budget_fracs=(0.0, 0.5, 1.5), warmup=1, steps=1, stream_steps=1,
                       matmul_shapes=((64, 64, 64),), copy_bytes=1 << 20, cost_scale=0.0, dry_run=True)


# --- results -------------------------------------------------------------------------------------------------

class Recorder:
    """Rows per section, flushed to `gpu_suite.json` and `gpu_suite.md` after every change."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "gpu_suite.json"
        self.md_path = self.out / "gpu_suite.md"
        self.data = {"meta": meta, "sections": {s: {"status": "pending", "note": "", "rows": []} for s in SECTIONS}}
        self.flush()

    def row(self, section: str, **values) -> None:
        sec = self.data["sections"][section]
        sec["rows"].append({k: _jsonable(v) for k, v in values.items()})
        if sec["status"] == "pending":
            sec["status"] = "running"
        print(f"[{section}] " + ", ".join(f"{k}={_fmt(k, v)}" for k, v in values.items()), flush=True)
        self.flush()

    def status(self, section: str, status: str, note: str = "") -> None:
        sec = self.data["sections"][section]
        sec["status"] = status
        sec["note"] = note
        print(f"[{section}] {status}{': ' + note if note else ''}", flush=True)
        self.flush()

    def flush(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.json_path)
        tmp = self.md_path.with_suffix(".md.tmp")
        tmp.write_text(render_markdown(self.data))
        os.replace(tmp, self.md_path)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    return v


def _fmt(key: str, v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key.endswith("_bytes") and isinstance(v, (int, float)):
        return human_bytes(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# GPU suite results", "", f"{meta.get('config', '')}; budget {meta.get('budget_s', 0):.0f} s; "
             f"started {meta.get('started', '')}", ""]
    for name, sec in data["sections"].items():
        lines += [f"## {name}", "", f"status: **{sec['status']}**" + (f" — {sec['note']}" if sec["note"] else ""), ""]
        rows = sec["rows"]
        if rows:
            keys: list[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for r in rows:
                lines.append("| " + " | ".join(_fmt(k, r.get(k)).replace("|", "/") for k in keys) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


# --- timing and memory ---------------------------------------------------------------------------------------

class SectionTimeout(Exception):
    """A section ran past the share of the budget it was given."""


class Clock:
    def __init__(self, budget_s: float, t0: float | None = None):
        self.t0 = time.time() if t0 is None else t0
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":  # (a full collection costs ~0.1 s with diffusers imported; the CPU run skips it)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class PeakMeter:
    """max_memory_allocated / _reserved over a region (None on CPU, where torch keeps no such statistics)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated = self.reserved = self.base = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)

    @property
    def increase(self) -> int | None:
        """Peak over what was allocated when the region began (activations of a forward)."""
        return None if self.allocated is None else self.allocated - self.base


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def weight_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def err_pct(predicted, measured):
    if predicted is None or measured is None or not measured:
        return None
    if isinstance(predicted, float) and not math.isfinite(predicted):
        return None
    return 100.0 * (predicted - measured) / measured


# --- the planner, through one adapter ---------------------------------------------------------------------------

def planner_prediction(params: FluxParams, storage: str, vram_bytes: int, width: int, height: int, refs: int = 1,
                       **assume) -> dict:
    """What the planner predicts for one (storage, device memory) pair, as a flat dict.

    The only place that calls the planner (kontext_core/planner.py, being reworked): it reads its results by
    name and tolerates missing ones. `assume` overrides fields of its Assumptions (tflops, pcie_gbps, fp8_matmul
    ...) where they exist. `weight_budget_bytes` is what the planner leaves for weights in `vram_bytes`: the
    budget handed to `stream_model`.
    """
    from kontext_core import planner as P

    out: dict = {}
    try:
        a = None
        A = getattr(P, "Assumptions", None)
        if A is not None:
            names = {f.name for f in fields(A)}
            a = A(**{k: v for k, v in assume.items() if k in names and v is not None})
        if hasattr(P, "machine"):  # the machine-aware planner: this GPU (a named stand-in in the CPU dry run)
            m = P.machine(None if torch.cuda.is_available() else "RTX 4090", vram_gib=int(vram_bytes) / 2 ** 30)
            p = P.plan(params, storage, m, width, height, refs, assumptions=a)
        else:
            p = P.plan(params, storage, int(vram_bytes), width, height, refs, a)

        def get(*names):
            return next((getattr(p, n) for n in names if hasattr(p, n)), None)

        out = dict(fits=get("fits"), mode=get("mode"), pred_peak_bytes=get("peak_bytes"),
                   pred_step_s=get("step_seconds", "seconds_per_step"), pred_resident=get("resident_blocks"),
                   blocks=get("total_blocks"), pred_streamed_bytes=get("streamed_bytes"))
        wb = get("weight_budget_bytes", "weight_budget")
        out["weight_budget_bytes"] = int(wb)
    except Exception as e:  # a reworked planner must not take the measurements down with it
        out["planner_error"] = f"{type(e).__name__}: {e}"
    return out


def planner_flops(params: FluxParams, n_tokens: int) -> float | None:
    from kontext_core import planner as P

    fn = getattr(P, "step_flops", None)
    try:
        return float(fn(params, n_tokens)) if fn else None
    except Exception:
        return None


def planner_ae_decode_peak(width: int, height: int, dtype: torch.dtype) -> int | None:
    from kontext_core import planner as P

    fn = getattr(P, "ae_decode_tile", None)
    try:
        return int(fn(width, height, 1 << 60, dtype)[1]) if fn else None
    except Exception:
        return None


# --- models with seeded random weights --------------------------------------------------------------------------

@torch.no_grad()
def seeded_fill_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights with finite activations through all blocks and every block mattering: matrices
    N(0, (0.5/sqrt(fan_in))^2); 1-D weights/scales (norms) N(1, 0.1^2); biases N(0, 0.2^2), so modulation gates
    are ~0.2, not ~0. The rule reads only dimensions and suffixes, so both key layouts get the same distribution.
    Generated where the parameters live (on the GPU: no host copy)."""
    for i, (name, p) in enumerate(sorted(module.named_parameters(), key=lambda kv: kv[0])):
        g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if p.ndim >= 2:
            p.normal_(0.0, 0.5 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.2, generator=g)
        else:
            p.normal_(1.0, 0.1, generator=g)
    return module


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A module built on the meta device -> real storage on `device` in `dtype`, seeded values."""
    module = module.to(dtype=dtype).to_empty(device=device)
    return seeded_fill_(module, seed).eval().requires_grad_(False)


def diffusers_config(p: FluxParams) -> dict:
    head = p.hidden_size // p.num_heads
    return dict(in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                attention_head_dim=head, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=tuple(p.axes_dim))


def build_diffusers(cfg: SuiteConfig, device: torch.device, seed: int):
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting a freshly built model with .to(dtype)

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**diffusers_config(cfg.flux))
    return materialize(ref, device, cfg.dtype, seed)


def engine_from_diffusers(ref: nn.Module, cfg: SuiteConfig, device: torch.device) -> Flux:
    """The engine's model on the same weights: its loader converts diffusers keys (sharing unchanged tensors)."""
    from kontext_core.weights.loader import load_transformer

    return load_transformer(ref.state_dict(), params=cfg.flux, dtype=cfg.dtype, device=device)


def build_engine(cfg: SuiteConfig, device: torch.device, seed: int) -> Flux:
    with torch.device("meta"):
        m = Flux(cfg.flux, operations=CastOps)
    return materialize(m, device, cfg.dtype, seed)


def step_flops_exact(model: Flux, n_img: int, n_txt: int) -> float:
    """FLOPs of one forward: every Linear at the token count it really sees (image-stream weights on image
    tokens, text-stream on text, single blocks on both, modulation and embedders of the vector on 1 token)
    plus attention (QK^T and AV: 4 N^2 H per block over the joint sequence)."""
    n_all = n_img + n_txt
    total = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name.startswith(("time_in.", "vector_in.", "guidance_in.")) or "_mod." in name \
                or ".modulation." in name or ".adaLN_modulation." in name:
            tokens = 1
        elif name.startswith(("img_in", "final_layer")) or ".img_" in name:
            tokens = n_img
        elif name.startswith("txt_in") or ".txt_" in name:
            tokens = n_txt
        else:  # single blocks
            tokens = n_all
        total += 2.0 * mod.in_features * mod.out_features * tokens
    blocks = len(model.double_blocks) + len(model.single_blocks)
    return total + 4.0 * n_all**2 * model.params.hidden_size * blocks


# --- the suite ---------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    x: torch.Tensor  # target latent (1, 16, h, w)
    ctx: torch.Tensor  # context latent
    txt: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    g: torch.Tensor

    @property
    def n_img(self) -> int:
        return 2 * (self.x.shape[-2] // 2) * (self.x.shape[-1] // 2)

    @property
    def n_txt(self) -> int:
        return self.txt.shape[1]


@dataclass
class Suite:
    cfg: SuiteConfig
    rec: Recorder
    clock: Clock
    device: torch.device
    state: dict = field(default_factory=dict)

    # -- plumbing
    def run(self, section: str, need_s: float, fn: Callable[[], None]) -> None:
        left = self.clock.left()
        if left < need_s:
            self.rec.status(section, "skipped", f"needs ~{need_s:.0f} s, {max(left, 0):.0f} s of the budget left")
            return
        self.rec.status(section, "running")
        t0 = time.time()
        try:
            fn()
            self.rec.status(section, "done", f"{time.time() - t0:.1f} s")
        except SectionTimeout as e:
            self.rec.status(section, "stopped", str(e))
        except Exception as e:  # one failure (an OOM, a missing package) must not cost the other sections
            tail = traceback.format_exc().strip().splitlines()[-6:]
            self.rec.status(section, "error", f"{type(e).__name__}: {e} | " + " / ".join(tail))
        finally:
            free_memory(self.device)

    def step_estimate(self) -> float:
        return self.state.get("bf16_step_s") or self.state.get("floor_step_s", 1.0) * 3

    def inputs(self) -> Inputs:
        if "inputs" not in self.state:
            cfg, dev = self.cfg, self.device
            f = cfg.ae.downscale
            g = torch.Generator().manual_seed(0)
            h, w = cfg.height // f, cfg.width // f
            self.state["inputs"] = Inputs(
                torch.randn(1, 16, h, w, generator=g).to(dev, cfg.dtype),
                torch.randn(1, 16, h, w, generator=g).to(dev, cfg.dtype),
                torch.randn(1, cfg.txt_tokens, cfg.flux.context_in_dim, generator=g).to(dev, cfg.dtype),
                torch.randn(1, cfg.flux.vec_in_dim, generator=g).to(dev, cfg.dtype),
                # t*1000 and g*1000 exact in bf16: diffusers scales after casting to the compute dtype, we before
                torch.tensor([0.5], device=dev, dtype=cfg.dtype), torch.tensor([2.0], device=dev, dtype=cfg.dtype))
        return self.state["inputs"]

    def step_fn(self, model: Flux) -> Callable[[], torch.Tensor]:
        """One sampling step's DiT call: [target ‖ context] tokens, the target part back as a latent."""
        i = self.inputs()

        def step():
            with torch.inference_mode():
                return model.forward_latent(i.x, i.t, i.txt, i.y, i.g, [i.ctx])
        return step

    def measure_steps(self, model: nn.Module, runs: int | None = None) -> tuple[torch.Tensor, dict]:
        """(output of the first step, timings): warm-up steps (the first one's output kept), then timed steps;
        the peak covers them all."""
        step = self.step_fn(model)
        with PeakMeter(self.device) as pm:
            out = step()
            times = time_runs(step, self.device, self.cfg.warmup - 1, runs or self.cfg.steps)
        return out, dict(s_per_step=statistics.median(times), steps_timed=len(times), peak_alloc_bytes=pm.allocated,
                         peak_reserved_bytes=pm.reserved)

    def vram_total(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return 1 << 40

    def calibrated(self) -> dict:
        return dict(tflops=self.state.get("tflops"), pcie_gbps=self.state.get("pcie_gbps"))

    def resident_prediction(self, storage: str, measured: dict | None = None, **extra) -> dict:
        """Planner prediction with all the device's memory (full residency): default and calibrated speed
        (this GPU's matmul throughput and copy bandwidth, plus any `measured` assumption such as dequant_gbps)."""
        cfg = self.cfg
        d = planner_prediction(cfg.flux, storage, self.vram_total(), cfg.width, cfg.height, 1, **extra)
        c = planner_prediction(cfg.flux, storage, self.vram_total(), cfg.width, cfg.height, 1,
                               **{**extra, **self.calibrated(), **(measured or {})})
        return dict(pred_peak_bytes=d.get("pred_peak_bytes"), pred_step_default_s=d.get("pred_step_s"),
                    pred_step_calibrated_s=c.get("pred_step_s"), planner_error=d.get("planner_error"))

    def compare(self, out: torch.Tensor) -> dict:
        ref = self.state.get("bf16_out")
        if ref is None:
            return dict(rel_rms_vs_bf16=None, max_abs_vs_bf16=None)
        return dict(rel_rms_vs_bf16=rel_rms(out.float().cpu(), ref),
                    max_abs_vs_bf16=(out.float().cpu() - ref).abs().max().item())

    # -- sections
    def environment(self) -> None:
        cfg, dev = self.cfg, self.device
        info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                    device=str(dev), dry_run=cfg.dry_run, config=cfg.label, compute_dtype=str(cfg.dtype),
                    params=sum(p.numel() for p in Flux(cfg.flux, device="meta").parameters()))
        if dev.type == "cuda":
            prop = torch.cuda.get_device_properties(dev)
            info.update(gpu=prop.name, capability=f"{prop.major}.{prop.minor}", total_memory_bytes=prop.total_memory)
        try:
            info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip() or None
        except Exception:
            info["commit"] = None
        self.rec.row("environment", **info)

    def cuda_tests(self) -> None:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                       if "mark.cuda" in p.read_text(errors="ignore"))
        if not files:
            self.rec.row("cuda_tests", files=0, summary="no test marked cuda")
            return
        timeout = max(10.0, min(120.0, self.clock.left() - 30))
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
            text, rc = r.stdout.decode(errors="replace"), r.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode(errors="replace") + f"\n(timed out after {timeout:.0f} s)", None
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        summary = next((ln.strip("= ") for ln in reversed(lines)
                        if any(w in ln for w in (" passed", " failed", " skipped", " deselected", " error"))),
                       lines[-1] if lines else "")
        failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:10]
        self.rec.row("cuda_tests", files=len(files), rc=rc, seconds=time.time() - t0, summary=summary,
                     failures=" ; ".join(failures) or None)
        (self.rec.out / "cuda_tests.log").write_text(text)

    def matmul(self) -> None:
        dev, dt = self.device, self.cfg.dtype
        best = 0.0
        for m, k, n in self.cfg.matmul_shapes + ((self.inputs().n_img + self.inputs().n_txt,
                                                   self.cfg.flux.hidden_size, 4 * self.cfg.flux.hidden_size),):
            a = torch.randn(m, k, device=dev, dtype=dt)
            b = torch.randn(k, n, device=dev, dtype=dt)
            t = statistics.median(time_runs(lambda: torch.mm(a, b), dev, 2, 5))
            tf = 2.0 * m * k * n / t / 1e12
            best = max(best, tf)
            self.rec.row("matmul", what=f"{str(dt).replace('torch.', '')} mm {m}x{k}x{n}", seconds=t, tflops=tf)
            del a, b
        self.state["tflops"] = best
        n_img, n_txt = self.inputs().n_img, self.inputs().n_txt
        with torch.device("meta"):
            flops = step_flops_exact(Flux(self.cfg.flux), n_img, n_txt)
        self.state["floor_step_s"] = flops / (best * 1e12)
        for pinned in (False, True):
            host = torch.empty(self.cfg.copy_bytes, dtype=torch.uint8)
            if pinned and dev.type == "cuda":
                host = host.pin_memory()
            t = statistics.median(time_runs(lambda: host.to(dev, non_blocking=pinned), dev, 1, 3))
            gbps = self.cfg.copy_bytes / t / 1e9
            if not pinned:
                self.state["pcie_gbps"] = gbps  # stream_model copies from pageable memory unless asked to pin
            self.rec.row("matmul", what=f"host->device copy, {'pinned' if pinned else 'pageable'}, "
                                        f"{human_bytes(self.cfg.copy_bytes)}", seconds=t, gb_per_s=gbps)

    def build_models(self) -> None:
        """diffusers' model with seeded weights and the engine's converted copy (or the engine's alone)."""
        if "ours" in self.state:
            return
        try:
            ref = build_diffusers(self.cfg, self.device, seed=1)
        except ImportError as e:
            self.state["diffusers_missing"] = str(e)
            self.state["ours"] = build_engine(self.cfg, self.device, seed=1)
            return
        self.state["ref"] = ref
        self.state["ours"] = engine_from_diffusers(ref, self.cfg, self.device)

    def diffusers(self) -> None:
        self.build_models()
        if "diffusers_missing" in self.state:
            raise ImportError(f"diffusers is not installed ({self.state['diffusers_missing']})")
        ref, ours, i = self.state["ref"], self.state["ours"], self.inputs()
        img, ids, n = tok.kontext_tokens(i.x, [i.ctx])
        txt_ids = tok.text_ids(1, i.n_txt, device=self.device)

        def run_ours():
            with torch.inference_mode():
                return ours(img, ids, i.txt, txt_ids, i.t, i.y, i.g)

        def run_ref():
            with torch.inference_mode():
                return ref(hidden_states=img, encoder_hidden_states=i.txt, pooled_projections=i.y, timestep=i.t,
                           img_ids=ids[0], txt_ids=txt_ids[0], guidance=i.g, return_dict=False)[0]

        a, b = run_ours().float(), run_ref().float()
        delta = (a - b).abs().max().item()
        ratio_rms = rel_rms(a, b)
        del a, b
        peaks = {}
        for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
            with PeakMeter(self.device) as pm:
                fn()
            peaks[name] = pm.increase
        times = {"ours": [], "diffusers": []}
        fns = {"ours": run_ours, "diffusers": run_ref}
        for fn in fns.values():
            time_runs(fn, self.device, self.cfg.warmup, 0)
        for _ in range(self.cfg.steps):  # interleaved: both see the same clocks and temperature
            for k, fn in fns.items():
                times[k] += time_runs(fn, self.device, 0, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, model in (("diffusers", ref), ("ours", ours)):
            wb = weight_bytes(model)
            self.rec.row("diffusers", implementation=k, s_per_forward=med[k], weights_bytes=wb,
                         activation_peak_bytes=peaks[k], peak_alloc_bytes=None if peaks[k] is None else wb + peaks[k])
        self.rec.row("diffusers", implementation="ratio ours/diffusers", s_per_forward=med["ours"] / med["diffusers"],
                     max_abs_delta=delta, rel_rms_delta=ratio_rms)
        del self.state["ref"], ref

    def bf16(self) -> None:
        self.build_models()
        self.state.pop("ref", None)  # diffusers' copy goes: the engine's model alone on the device
        free_memory(self.device)
        ours = self.state["ours"]
        out, m = self.measure_steps(ours)
        self.state["bf16_out"] = out.float().cpu()
        self.state["bf16_step_s"] = m["s_per_step"]
        i = self.inputs()
        flops = step_flops_exact(ours, i.n_img, i.n_txt)
        n_tokens = i.n_img + i.n_txt
        tflops = self.state.get("tflops")
        floor = flops / (tflops * 1e12) if tflops else None
        pred = self.resident_prediction("bf16")
        self.rec.row("bf16", storage=str(self.cfg.dtype).replace("torch.", ""), tokens=n_tokens,
                     weights_bytes=weight_bytes(ours), **m, finite=bool(torch.isfinite(out).all()),
                     flops_exact=flops, flops_planner=planner_flops(self.cfg.flux, n_tokens),
                     matmul_tflops=tflops, floor_s=floor, x_floor=None if not floor else m["s_per_step"] / floor,
                     **pred, err_peak_pct=err_pct(pred["pred_peak_bytes"], m["peak_alloc_bytes"]),
                     err_step_calibrated_pct=err_pct(pred["pred_step_calibrated_s"], m["s_per_step"]))
        # later sections build their models from these weights; they wait on the host meanwhile
        ours.to("cpu")

    def ae(self) -> None:
        cfg, dev = self.cfg, self.device
        with torch.device("meta"):
            ae = AutoEncoder(cfg.ae)
        ae = materialize(ae, dev, cfg.dtype, seed=2)
        g = torch.Generator().manual_seed(3)
        image = (torch.rand(1, 3, cfg.height, cfg.width, generator=g) * 2 - 1).to(dev, cfg.dtype)
        with torch.inference_mode():
            z = ae.encode(image)
        for what, fn in (("encode", lambda: ae.encode(image)), ("decode", lambda: ae.decode(z))):
            def run(fn=fn):
                with torch.inference_mode():
                    return fn()
            with PeakMeter(dev) as pm:
                t = statistics.median(time_runs(run, dev, cfg.warmup, 2))
            pred = planner_ae_decode_peak(cfg.width, cfg.height, cfg.dtype) if what == "decode" else None
            self.rec.row("ae", what=f"{what} {cfg.width}x{cfg.height}", seconds=t, weights_bytes=weight_bytes(ae),
                         peak_alloc_bytes=pm.allocated, peak_reserved_bytes=pm.reserved, pred_peak_bytes=pred,
                         err_peak_pct=err_pct(pred, pm.allocated))

    def fp8(self) -> None:
        from kontext_core.model import ops
        from kontext_core.weights.loader import load_transformer

        ours = self.state["ours"]
        t0 = time.perf_counter()
        m8 = load_transformer(ours.state_dict(), params=self.cfg.flux, weight_dtype="fp8_e4m3fn", device=self.device)
        sync(self.device)
        quant_s = time.perf_counter() - t0
        reason = ops._fp8_mm_unsupported_reason(self.device)
        for fast in (False, True):
            n = ops.enable_fp8_matmul(m8, fast)
            calls = [0]
            real = getattr(torch, "_scaled_mm", None)
            if real is not None:
                def spy(*a, **k):
                    calls[0] += 1
                    return real(*a, **k)
                torch._scaled_mm = spy
            try:
                out, m = self.measure_steps(m8)
            finally:
                if real is not None:
                    torch._scaled_mm = real
            pred = self.resident_prediction("fp8_e4m3fn", fp8_matmul=fast)
            self.rec.row("fp8", path="_scaled_mm" if fast else "upcast to bf16", fp8_layers=n,
                         scaled_mm_calls=calls[0], unavailable=reason if fast else None, quantize_s=quant_s,
                         weights_bytes=weight_bytes(m8), **m,
                         x_bf16=m["s_per_step"] / self.state["bf16_step_s"] if "bf16_step_s" in self.state else None,
                         **self.compare(out), **pred, err_peak_pct=err_pct(pred["pred_peak_bytes"], m["peak_alloc_bytes"]),
                         err_step_calibrated_pct=err_pct(pred["pred_step_calibrated_s"], m["s_per_step"]))
        ops.enable_fp8_matmul(m8, False)

    def quantize_gguf(self, target: str, deadline: float) -> tuple[Flux, float]:
        """The engine's model in a GGUF target, quantized on the device by the project's quantizer with the
        converter's per-tensor policy (choose_qtype); tensors as `read_gguf` gives them (GGMLTensor or plain)."""
        from gguf import GGMLQuantizationType as QT

        from kontext_core.quant.ggml_tensor import GGMLTensor
        from kontext_core.quant.gguf_ops import GGUFOps
        from kontext_core.quant.gguf_quantize import choose_qtype, quantize_tensor
        from kontext_core.weights.loader import load_transformer

        plain = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
        t0 = time.perf_counter()
        sd = {}
        for name, t in self.state["ours"].state_dict().items():
            if time.time() > deadline:
                raise SectionTimeout(f"quantizing to {target} ran out of its time share at '{name}'")
            q = choose_qtype(name, t.shape, target)
            if q in plain:
                sd[name] = t.to(self.device, plain[q])
            else:
                raw = quantize_tensor(t.reshape(-1, t.shape[-1]), q, device=self.device)
                sd[name] = GGMLTensor(raw, q, t.shape)
        sync(self.device)
        quant_s = time.perf_counter() - t0
        model = load_transformer(sd, params=self.cfg.flux, operations=GGUFOps, device=self.device)
        return model, quant_s

    def dequant_throughput(self, model: nn.Module) -> tuple[float, float]:
        """Seconds to dequantize every quantized weight once (what each step does) and the output GB/s."""
        from kontext_core.quant.ggml_tensor import GGMLTensor

        ws = [p for p in model.parameters() if isinstance(p, GGMLTensor)]

        def run():
            for w in ws:
                w.dequantize(self.cfg.dtype)
        t = statistics.median(time_runs(run, self.device, 1, 2))
        out_bytes = sum(w.logical_numel for w in ws) * torch.empty((), dtype=self.cfg.dtype).element_size()
        return t, out_bytes / t / 1e9

    def gguf(self) -> None:
        targets = self.cfg.gguf_targets
        for k, target in enumerate(targets):
            need = 30 * self.cfg.cost_scale + (self.cfg.warmup + self.cfg.steps) * self.step_estimate() * 2
            left = self.clock.left()
            if left < need:
                self.rec.row("gguf", target=target, skipped=f"needs ~{need:.0f} s, {left:.0f} s left")
                continue
            # a quantization slower than expected must leave time for the other targets and for streaming
            share = max(need, 0.4 * left / (len(targets) - k))
            model, quant_s = self.quantize_gguf(target, deadline=time.time() + share)
            out, m = self.measure_steps(model)
            deq_s, deq_gbps = self.dequant_throughput(model)
            pred = self.resident_prediction(target, measured=dict(dequant_gbps=deq_gbps))
            self.rec.row("gguf", target=target, quantize_s=quant_s, weights_bytes=weight_bytes(model), **m,
                         dequant_all_s=deq_s, dequant_gb_per_s=deq_gbps,
                         x_bf16=m["s_per_step"] / self.state["bf16_step_s"] if "bf16_step_s" in self.state else None,
                         **self.compare(out), **pred, err_peak_pct=err_pct(pred["pred_peak_bytes"], m["peak_alloc_bytes"]),
                         err_step_calibrated_pct=err_pct(pred["pred_step_calibrated_s"], m["s_per_step"]))
            if target in self.cfg.stream_storages:
                model.to("cpu")
                self.state[f"model_{target}"] = model
            del model
            free_memory(self.device)

    def streaming(self) -> None:
        cfg = self.cfg
        for storage in cfg.stream_storages:
            model = self.state["ours"] if storage == "bf16" else self.state.get(f"model_{storage}")
            if model is None:
                self.rec.row("streaming", storage=storage, skipped="no model (its gguf row did not run)")
                continue
            try:
                self.stream_storage(storage, model)
            finally:
                model.to("cpu")
                free_memory(self.device)

    def budgets_gb(self, storage: str, model: nn.Module) -> tuple[float, ...]:
        cfg = self.cfg
        if not cfg.budget_fracs:
            return cfg.budgets_gb
        from kontext_core.streaming import minimum_budget, model_block_bytes

        big = planner_prediction(cfg.flux, storage, self.vram_total(), cfg.width, cfg.height, 1)
        overhead = self.vram_total() - big.get("weight_budget_bytes", self.vram_total())
        _, sizes, fixed = model_block_bytes(model)
        low, total = minimum_budget(sizes, fixed), fixed + sum(sizes)
        return tuple((overhead + low + f * (total - low)) / 1e9 for f in cfg.budget_fracs)

    def stream_storage(self, storage: str, model: nn.Module) -> None:
        from kontext_core.streaming import BudgetError, stream_model

        cfg = self.cfg
        for gb in self.budgets_gb(storage, model):
            vram = int(gb * 1e9)
            pred = planner_prediction(cfg.flux, storage, vram, cfg.width, cfg.height, 1, **self.calibrated())
            default = planner_prediction(cfg.flux, storage, vram, cfg.width, cfg.height, 1)
            row = dict(storage=storage, budget_gb=gb, **{k: pred.get(k) for k in (
                "fits", "weight_budget_bytes", "pred_resident", "blocks", "pred_peak_bytes")},
                pred_step_default_s=default.get("pred_step_s"), pred_step_calibrated_s=pred.get("pred_step_s"),
                planner_error=pred.get("planner_error"))
            if not pred.get("fits") or "weight_budget_bytes" not in pred:
                self.rec.row("streaming", **row, skipped="the planner says it does not fit")
                continue
            step_guess = pred.get("pred_step_s") or self.step_estimate()
            need = (cfg.warmup + cfg.stream_steps + 1) * step_guess * 1.5 + 10 * cfg.cost_scale
            if self.clock.left() < need:
                self.rec.row("streaming", **row, skipped=f"needs ~{need:.0f} s, {self.clock.left():.0f} s left")
                continue
            handle = stream_model(model, self.device, pred["weight_budget_bytes"], pin_memory=False, prefetch=True)
            try:
                free_memory(self.device)
                out, m = self.measure_steps(model, cfg.stream_steps)
                self.rec.row("streaming", **row, resident=sum(handle.plan.resident),
                             streamed_per_step_bytes=handle.plan.streamed_bytes_per_step,
                             weights_peak_bytes=handle.peak_device_bytes, **m,
                             err_peak_pct=err_pct(pred.get("pred_peak_bytes"), m["peak_alloc_bytes"]),
                             err_step_calibrated_pct=err_pct(pred.get("pred_step_s"), m["s_per_step"]),
                             **(self.compare(out) if storage == "bf16" else {}))
            finally:
                handle.remove()
                free_memory(self.device)

    # -- order and estimated costs (seconds; the fixed parts scale with cfg.cost_scale)
    def run_all(self) -> None:
        c = self.cfg.cost_scale
        steps = self.cfg.warmup + self.cfg.steps
        self.run("environment", -math.inf, self.environment)  # always: it says what the other numbers mean
        self.run("cuda_tests", 40 * c, self.cuda_tests)
        self.run("matmul", 5 * c, self.matmul)
        self.run("diffusers", 40 * c + 2 * steps * self.step_estimate(), self.diffusers)
        self.run("bf16", 25 * c + steps * self.step_estimate(), self.bf16)
        if "ours" not in self.state:
            for s in ("ae", "fp8", "gguf", "streaming"):
                self.rec.status(s, "skipped", "no model: the bf16 section did not build it")
            return
        self.run("ae", 10 * c, self.ae)
        self.run("fp8", 20 * c + 2 * steps * self.step_estimate(), self.fp8)
        self.run("gguf", 30 * c + steps * self.step_estimate(), self.gguf)
        self.run("streaming", 20 * c + 3 * self.step_estimate(), self.streaming)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-min", type=float, default=8.0, help="total wall-clock budget in minutes (default 8)")
    ap.add_argument("--out", default="gpu_suite_out", help="folder for gpu_suite.json / gpu_suite.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the suite runs end to end")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 3; dry run 2)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    cfg = dry_config() if args.dry_run else full_config(args.device)
    if args.steps:
        cfg.steps = args.steps
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch: run with --dry-run for the CPU check, or install a CUDA build of "
              "torch (see benchmarks/gpu_suite.sh)", file=sys.stderr)
        return 2
    # the wrapper script passes its own start time, so installing packages counts against the budget
    t0 = float(os.environ["GPU_SUITE_T0"]) if os.environ.get("GPU_SUITE_T0") else None
    clock = Clock(args.budget_min * 60, t0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if cfg.dry_run:
        torch.set_num_threads(1)  # tiny tensors: threading only adds contention on a busy CI machine
    rec = Recorder(Path(args.out), dict(config=cfg.label, budget_s=clock.budget_s,
                                        started=time.strftime("%Y-%m-%d %H:%M:%S")))
    try:
        Suite(cfg, rec, clock, device).run_all()
    finally:
        torch.set_num_threads(threads)
    for name, sec in rec.data["sections"].items():
        if sec["status"] in ("pending", "running"):
            rec.status(name, "not run")
    print(f"results: {rec.json_path} and {rec.md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
