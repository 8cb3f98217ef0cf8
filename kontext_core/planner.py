"""VRAM planner: will an edit fit this machine, how fast will it run, and at what quality cost, per storage type.

    m = machine("RTX 4060 Laptop", ram_gib=16)          # or machine() to detect the local GPU and RAM
    p = plan(KONTEXT_DEV, "Q4_K_M", m, width=1024, height=1024, refs=1, text_encoder="fp8")
    p.fits, p.peak_bytes, p.peak_ram_bytes, p.step_seconds, p.output_error, p.reasons

GPU memory at the peak of sampling (bytes):
    resident weights        non-block tensors + the blocks kept on the device, as stored (bf16, fp8, GGUF)
  + streamed-block buffers  the largest streamed block, twice (one running, one being prefetched): the
                            arithmetic of `kontext_core.streaming.plan_residency`
  + dequant scratch         fp8/GGUF: the largest weight in the compute dtype, plus GGUF's fp32 decode buffer
                            (fp8: its upcast and the scaled copy); none with fp8 matmul
  + activations             `kontext_core.memory.activation_bytes` for text + target + context tokens
  + runtime reserve         CUDA context, allocator slack, kernel workspaces (`Assumptions.reserve_bytes`)
The text encoders run before the transformer and leave the GPU before it loads; the AE decode runs after the
transformer is offloaded and is planned on its own (tiled when the whole image does not fit).

System RAM, the larger of two phases:
    text encoding   host reserve + T5 + CLIP-L + AE
    sampling        host reserve + the host copy of every streamed block (pinned when `pinned`) + AE
                    + T5 + CLIP-L unless `free_text_encoder` (ComfyUI keeps offloaded encoders in RAM)
Weights of resident blocks are memory-mapped file pages the OS can drop once they are on the GPU; streamed
blocks are read every step and must stay in RAM (or be re-read from disk each step). A plan whose RAM peak is
above the machine's RAM does not fit: it would swap.

Time per step on the machine's GPU (documented assumptions, `Assumptions`):
    compute    per block: linear FLOPs / (bf16 or fp8 dense TFLOP/s x efficiency)
                          + attention FLOPs (4 N^2 H) / (bf16 TFLOP/s x efficiency)
               linear FLOPs = 2 x weight elements x the tokens that pass through them (image tokens through
               the double blocks' img_* weights, text tokens through txt_*, all through the single blocks)
    dequant    per block: weight elements x memory traffic per element of its type (DEQUANT_TRAFFIC) /
               (memory GB/s x mem_efficiency); 0 for fp8 weights multiplied in fp8
    transfer   per streamed block: its bytes / (PCIe lane rate x lanes x link_efficiency). The copy is
               prefetched while the blocks since the previous streamed one run; only `overlap` of their time
               can hide it: exposed = max(0, copy - overlap x window)
    step       sum of compute + dequant over all blocks + the exposed transfers
Quality: OUTPUT_ERROR, the relative RMS error of one forward against the fp32 model, measured by the parity
tests on a small model (tests/parity/test_gguf_model.py, tests/unit/test_fp8.py) until a quality table for
editing exists. `recommend` takes the lowest-error plan that is at most `max_slowdown` x the fastest one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .errors import InputError
from .hardware import GPUS, GPUSpec, GiB, detect_gpu, find_gpu, system_ram_bytes
from .memory import (params_key, activation_bytes, ae_param_count, flux_shapes, human_bytes, text_encoder_bytes,
                     tokens_for)
from .model.flux import FluxParams

STORAGES = ("bf16", "fp8_e4m3fn", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")

# Relative RMS error of the transformer's output vs fp32 (one forward, small random model; real weights are
# smoother): GGUF types from tests/parity/test_gguf_model.py, bf16 from the same test's BF16 conversion, fp8
# (per-tensor scaled e4m3) from tests/unit/test_fp8.py. README "Parity" and docs/nodes.md show the same numbers.
OUTPUT_ERROR = {"bf16": 0.0042, "fp8_e4m3fn": 0.03, "Q8_0": 0.0085, "Q6_K": 0.030, "Q5_K_M": 0.067,
                "Q4_K_M": 0.099, "Q3_K_M": 0.27, "Q2_K": 0.40}

# Device-memory traffic per weight element to turn a stored weight into a bf16 one on the GPU, counted from the
# elementwise passes of the engine's kernels (reads + writes; GGUF decodes into fp32, then casts): fp8 = 1 B
# read + 2 B written, then the scale multiply (2 + 2); Q8_0 = int8 -> fp32 (1 + 4), scale (4 + 4), cast (4 + 2);
# the K types add nibble/bit unpacking planes (~10-20 B). Estimates, to be calibrated by the GPU suite.
DEQUANT_TRAFFIC = {"fp8": 7, "F16": 4, "BF16": 4, "F32": 6, "Q8_0": 19, "Q6_K": 32, "Q5_K": 38, "Q4_K": 31,
                   "Q3_K": 35, "Q2_K": 35, "Q5_0": 30, "Q5_1": 30, "Q4_0": 26, "Q4_1": 26}
TXT_TOKENS = 512  # T5 sequence length of the Kontext pipelines


@dataclass
class Assumptions:
    efficiency: float = 0.5  # share of the dense tensor throughput the transformer reaches (matmuls + attention)
    mem_efficiency: float = 0.7  # share of the memory bandwidth the elementwise dequant kernels reach
    fp8_matmul: bool = False  # fp8 weights multiplied in fp8 where the GPU can (enable_fp8_matmul)
    pinned: bool = False  # streamed weights in pinned host memory (stream_model(pin_memory=True))
    link_efficiency: float | None = None  # share of the PCIe rate copies reach; None: 0.8 pinned, 0.5 pageable
    overlap: float | None = None  # share of compute a prefetched copy hides behind; None: 0.9 pinned, 0.5 pageable
    link_gbps: float | None = None  # measured host -> device GB/s; overrides the link model
    reserve_bytes: int = int(0.6 * GiB)  # GPU: CUDA context, allocator slack, workspaces
    # RAM: OS and desktop (~2.5 GiB), the browser tab with the UI (~0.5), Python with torch, the CUDA runtime and
    # the host app (~1)
    host_reserve_bytes: int = 4 * GiB
    free_text_encoder: bool = False  # text encoders freed after encoding (else kept in RAM, ComfyUI's default)
    max_slowdown: float = 1.25  # recommend: best quality among plans at most this much slower than the fastest
    compute_dtype: torch.dtype = torch.bfloat16

    def link(self, gpu: GPUSpec) -> float:
        """Host -> device GB/s that copies of streamed blocks reach."""
        if self.link_gbps is not None:
            return self.link_gbps
        eff = self.link_efficiency if self.link_efficiency is not None else (0.8 if self.pinned else 0.5)
        return gpu.link_gbps * eff

    def hidden_share(self) -> float:
        return self.overlap if self.overlap is not None else (0.9 if self.pinned else 0.5)


@dataclass(frozen=True)
class Machine:
    gpu: GPUSpec
    vram_bytes: int
    ram_bytes: int

    def describe(self, a: Assumptions | None = None) -> str:
        a = a or Assumptions()
        return (f"{self.gpu.describe()}{' (laptop)' if self.gpu.laptop else ''}; planning for "
                f"{human_bytes(self.vram_bytes)} VRAM, {human_bytes(self.ram_bytes)} RAM; host->device "
                f"{a.link(self.gpu):.1f} GB/s ({'pinned' if a.pinned else 'pageable'})")


def machine(gpu: str | GPUSpec | None = None, vram_gib: float | None = None, ram_gib: float | None = None) -> Machine:
    """Resolve a machine: `gpu` by name from the table (None: detect the local CUDA GPU), its VRAM unless
    `vram_gib` says otherwise (e.g. less, to leave room for the desktop), `ram_gib` (None: this machine's RAM)."""
    if gpu is None:
        spec = detect_gpu()
        if spec is None:
            raise InputError("no CUDA GPU found to plan for; name one with --gpu (node: gpu), e.g. 'RTX 4060 "
                             f"Laptop' or 'RTX 3090' ({len(GPUS)} cards: `python -m kontext_core plan --list-gpus`).")
    else:
        spec = gpu if isinstance(gpu, GPUSpec) else find_gpu(gpu)
    for what, v in (("vram", vram_gib), ("ram", ram_gib)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{what} must be a positive number of GiB, got {v!r}.")
    vram = int((vram_gib if vram_gib is not None else spec.vram_gib) * GiB)
    if ram_gib is not None:
        ram = int(ram_gib * GiB)
    else:
        found = system_ram_bytes()
        if found is None:
            raise InputError("could not read this machine's RAM size; pass it with --ram GB (node: ram_gb).")
        ram = found
    return Machine(spec, vram, ram)


# --- the transformer under a storage type --------------------------------------------------------------------

@dataclass(frozen=True)
class StorageLayout:
    storage: str
    fixed_bytes: int  # non-block tensors (embedders, final layer)
    block_bytes: tuple[int, ...]  # per double then single block, as stored
    fixed_traffic: int  # dequant memory traffic per forward of the non-block tensors (bytes)
    block_traffic: tuple[int, ...]  # ... of each block
    largest_upcast_numel: int  # elements of the largest weight that is upcast/dequantized at use

    @property
    def total(self) -> int:
        return self.fixed_bytes + sum(self.block_bytes)


def _tensor_storage(name: str, shape: tuple[int, ...], storage: str) -> tuple[int, str | None]:
    """(stored bytes, dequant type or None when used as stored) of one tensor under a storage choice."""
    n = math.prod(shape)
    if storage == "bf16":
        return 2 * n, None
    if storage.startswith("fp8"):
        from .weights.fp8 import is_fp8_candidate

        # fp8 weights carry a per-tensor fp32 scale (scaled-fp8 scheme); the rest stays bf16
        return (n + 4, "fp8") if is_fp8_candidate(name, shape) else (2 * n, None)
    from .quant.gguf_dequant import nbytes_for, qtype_name
    from .quant.gguf_quantize import choose_qtype

    qt = choose_qtype(name, shape, storage)
    return nbytes_for(qt, shape), qtype_name(qt)


def _check_storage(storage: str) -> None:
    from .quant.gguf_quantize import TARGETS

    if storage not in STORAGES and storage not in TARGETS:
        raise InputError(f"storage '{storage}' is not known to the planner; choose one of {', '.join(STORAGES)} "
                         f"(or another GGUF target of the converter: {', '.join(TARGETS)}).")


@lru_cache(maxsize=64)
def _layout(key: tuple, storage: str) -> StorageLayout:
    params = FluxParams(**dict(key))
    nblocks = params.depth + params.depth_single_blocks
    fixed = fixed_traffic = largest = 0
    blocks, traffic = [0] * nblocks, [0] * nblocks
    for name, shape in flux_shapes(params).items():
        nbytes, dq = _tensor_storage(name, shape, storage)
        moved = 0
        if dq is not None:
            moved = math.prod(shape) * DEQUANT_TRAFFIC.get(dq, 35)
            if len(shape) == 2:
                largest = max(largest, math.prod(shape))
        i = _block_index(name, params)
        if i is None:
            fixed += nbytes
            fixed_traffic += moved
        else:
            blocks[i] += nbytes
            traffic[i] += moved
    return StorageLayout(storage, fixed, tuple(blocks), fixed_traffic, tuple(traffic), largest)


def storage_layout(params: FluxParams, storage: str) -> StorageLayout:
    """Bytes per block (and dequant traffic) of the transformer stored as `storage`; cached per architecture."""
    _check_storage(storage)
    return _layout(params_key(params), storage)


def _block_index(name: str, params: FluxParams) -> int | None:
    if name.startswith("double_blocks."):
        return int(name.split(".")[1])
    if name.startswith("single_blocks."):
        return params.depth + int(name.split(".")[1])
    return None


@lru_cache(maxsize=256)
def _block_flops(key: tuple, n_img: int, n_txt: int) -> tuple[tuple[float, float], ...]:
    params = FluxParams(**dict(key))
    n = n_img + n_txt
    lin = [0.0] * (params.depth + params.depth_single_blocks)
    for name, shape in flux_shapes(params).items():
        i = _block_index(name, params)
        if i is None or len(shape) != 2:
            continue
        part = name.split(".")[2]
        if "mod" in part:
            tokens = 1  # modulation acts on the pooled vector
        elif part.startswith("img_"):
            tokens = n_img
        elif part.startswith("txt_"):
            tokens = n_txt
        else:
            tokens = n  # single blocks: every token
        lin[i] += 2.0 * math.prod(shape) * tokens
    attn = 4.0 * n * n * params.hidden_size  # q k^T and (softmax) v, per block
    return tuple((f, attn) for f in lin)


def block_flops(params: FluxParams, n_img: int, n_txt: int = TXT_TOKENS) -> list[tuple[float, float]]:
    """(linear FLOPs, attention FLOPs) of each block for one forward over n_img image (target + context) and
    n_txt text tokens."""
    return list(_block_flops(params_key(params), n_img, n_txt))


def step_flops(params: FluxParams, n_tokens: int, n_txt: int = TXT_TOKENS) -> float:
    return sum(a + b for a, b in block_flops(params, n_tokens - n_txt, n_txt))


@lru_cache(maxsize=64)
def ae_decode_tile(width: int, height: int, budget: int, dtype=torch.bfloat16) -> tuple[int | None, int]:
    """(tile in latent cells or None for untiled, peak bytes) of the AE decode within `budget`."""
    from .model.autoencoder import AutoEncoderParams
    from .model.tiling import estimate_tile_bytes, tile_size_for_budget

    p = AutoEncoderParams()
    ae_weights = ae_param_count(p) * dtype.itemsize
    full = max(-(-height // 8), -(-width // 8))
    need = ae_weights + estimate_tile_bytes(full, p, dtype, "decode", efficient_attention=True)
    if need <= budget:
        return None, need
    tile = tile_size_for_budget(max(0, budget - ae_weights), p, dtype, "decode", efficient_attention=True)
    return tile, ae_weights + estimate_tile_bytes(tile, p, dtype, "decode", efficient_attention=True)


# --- one plan ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    storage: str
    gpu: str
    vram_bytes: int
    ram_bytes: int
    fits: bool  # fits both the GPU memory and the system RAM
    mode: str  # "full", "partial", "does not fit"
    resident_blocks: int
    total_blocks: int
    peak_bytes: int  # predicted GPU memory peak while sampling (0 when the weights cannot be placed)
    peak_ram_bytes: int  # predicted system RAM peak
    weights_bytes: int
    streamed_bytes: int  # copied host -> device per step
    compute_seconds: float
    dequant_seconds: float
    transfer_seconds: float  # all copies of one step
    exposed_transfer_seconds: float  # the part of the copies compute does not hide
    step_seconds: float  # compute + dequant + exposed transfer (inf when it does not fit the GPU)
    output_error: float | None  # relative RMS output error vs fp32 (OUTPUT_ERROR); None if unmeasured
    ae_tile: int | None  # None: AE decodes untiled
    reasons: list[str] = field(default_factory=list)  # why it does not fit
    notes: list[str] = field(default_factory=list)
    weight_budget_bytes: int = 0  # device memory left for weights (what `stream_model` is given as its budget)


def _check_size(width, height, refs) -> None:
    for what, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or not 16 <= v <= 16384:
            raise InputError(f"{what} must be a whole number of pixels between 16 and 16384, got {v!r}.")
    if not isinstance(refs, int) or isinstance(refs, bool) or not 0 <= refs <= 16:
        raise InputError(f"refs (reference images) must be a whole number from 0 to 16, got {refs!r}.")


def plan(params: FluxParams, storage: str, machine: Machine, width: int = 1024, height: int = 1024, refs: int = 1,
         *, text_encoder: str = "fp8", assumptions: Assumptions | None = None) -> Plan:
    """Predicted GPU memory peak, RAM peak, seconds per step and quality of one edit on `machine` with the
    transformer stored as `storage` (see the module docstring for the model)."""
    from .streaming import plan_residency, streaming_peak

    _check_storage(storage)
    _check_size(width, height, refs)
    a = assumptions or Assumptions()
    gpu = machine.gpu
    layout = storage_layout(params, storage)
    _, n_tokens = tokens_for(width, height, refs, txt_tokens=TXT_TOKENS)
    acts = activation_bytes(params, n_tokens, a.compute_dtype)
    fp8_mm = storage.startswith("fp8") and a.fp8_matmul and gpu.fp8_matmul
    cb = a.compute_dtype.itemsize
    if storage == "bf16" or fp8_mm:
        scratch = 0
    else:
        scratch = layout.largest_upcast_numel * (2 * cb if storage.startswith("fp8") else cb + 4)
    te_bytes = text_encoder_bytes(text_encoder)
    ae_host = ae_param_count() * 4  # ae.safetensors is distributed in fp32
    notes: list[str] = []
    if storage.startswith("fp8") and a.fp8_matmul and not gpu.fp8_matmul:
        notes.append(f"{gpu.name} has no fp8 matmul (compute capability "
                     f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]} < 8.9): fp8 weights are upcast")

    ae_tile, _ = ae_decode_tile(width, height, machine.vram_bytes - a.reserve_bytes, a.compute_dtype)
    weight_budget = machine.vram_bytes - acts - a.reserve_bytes - scratch
    try:
        resident = plan_residency(layout.block_bytes, layout.fixed_bytes, weight_budget)
    except InputError:
        resident = None
    nblocks = len(layout.block_bytes)
    if resident is None:
        text_ram = a.host_reserve_bytes + te_bytes + ae_host
        return Plan(storage, gpu.name, machine.vram_bytes, machine.ram_bytes, False, "does not fit", 0, nblocks, 0,
                    text_ram, layout.total, 0, 0.0, 0.0, 0.0, 0.0, float("inf"), OUTPUT_ERROR.get(storage), ae_tile,
                    [f"VRAM: the non-block weights, two blocks and the activations "
                     f"({human_bytes(acts)}) do not fit {human_bytes(machine.vram_bytes)}"], notes, weight_budget)

    # time
    flops = _block_flops(params_key(params), n_tokens - TXT_TOKENS, TXT_TOKENS)
    lin_rate = (gpu.fp8_tflops if fp8_mm else gpu.bf16_tflops) * 1e12 * a.efficiency
    attn_rate = gpu.bf16_tflops * 1e12 * a.efficiency
    mem_rate = gpu.mem_gbps * 1e9 * a.mem_efficiency
    compute = [lf / lin_rate + af / attn_rate for lf, af in flops]
    dequant = [0.0 if fp8_mm else t / mem_rate for t in layout.block_traffic]
    fixed_dequant = 0.0 if fp8_mm else layout.fixed_traffic / mem_rate
    link = a.link(gpu) * 1e9
    streamed_idx = [i for i, r in enumerate(resident) if not r]
    copies = {i: layout.block_bytes[i] / link for i in streamed_idx}
    exposed = 0.0
    for k, i in enumerate(streamed_idx):
        prev = streamed_idx[k - 1]  # the copy of block i starts when the previous streamed block starts running
        span = range(prev, i) if prev < i else [*range(prev, nblocks), *range(0, i)]
        window = sum(compute[j] + dequant[j] for j in span)
        exposed += max(0.0, copies[i] - a.hidden_share() * window)
    step = sum(compute) + sum(dequant) + fixed_dequant + exposed
    transfer = sum(copies.values())
    if streamed_idx and exposed > 0.25 * step:
        notes.append(f"transfer-bound: {exposed:.2f} s/step of copies are not hidden by compute")

    # memory
    streamed = sum(layout.block_bytes[i] for i in streamed_idx)
    peak = streaming_peak(layout.block_bytes, layout.fixed_bytes, resident) + scratch + acts + a.reserve_bytes
    text_ram = a.host_reserve_bytes + te_bytes + ae_host
    sample_ram = a.host_reserve_bytes + streamed + ae_host + (0 if a.free_text_encoder else te_bytes)
    peak_ram = max(text_ram, sample_ram)
    reasons = []
    if peak_ram > machine.ram_bytes:
        parts = [f"reserve {human_bytes(a.host_reserve_bytes)}"]
        if streamed:
            parts.append(f"streamed blocks {human_bytes(streamed)}")
        if te_bytes and (not a.free_text_encoder or text_ram >= sample_ram):
            parts.append(f"text encoders {human_bytes(te_bytes)}")
        parts.append(f"AE {human_bytes(ae_host)}")
        reasons.append(f"RAM: needs {human_bytes(peak_ram)} ({' + '.join(parts)}), has "
                       f"{human_bytes(machine.ram_bytes)}; it would swap")
    elif peak_ram > 0.9 * machine.ram_bytes:
        notes.append(f"RAM is tight: {human_bytes(peak_ram)} of {human_bytes(machine.ram_bytes)}; other programs "
                     "may push it into swap")
    mode = "full" if not streamed_idx else "partial"
    return Plan(storage, gpu.name, machine.vram_bytes, machine.ram_bytes, not reasons, mode, sum(resident), nblocks,
                peak, peak_ram, layout.total, streamed, sum(compute), sum(dequant) + fixed_dequant, transfer, exposed,
                step, OUTPUT_ERROR.get(storage), ae_tile, reasons, notes, weight_budget)


# --- choosing ------------------------------------------------------------------------------------------------

@dataclass
class Recommendation:
    plan: Plan
    fastest: Plan
    tradeoff: str


def recommend(plans: list[Plan], max_slowdown: float = 1.25) -> Recommendation | None:
    """The lowest-error plan that fits and is at most `max_slowdown` x as slow as the fastest fitting plan."""
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None
    fastest = min(fitting, key=lambda p: (p.step_seconds, _error(p)))
    near = [p for p in fitting if p.step_seconds <= fastest.step_seconds * max_slowdown]
    best = min(near, key=lambda p: (_error(p), p.step_seconds))
    limit = f"within {100 * (max_slowdown - 1):.0f} % of the fastest"
    if best is fastest:
        text = f"the fastest that fits, and no plan {limit} has a lower error"
    else:
        text = (f"{100 * (best.step_seconds / fastest.step_seconds - 1):.0f} % slower than the fastest "
                f"({fastest.storage}, {fastest.step_seconds:.2f} s/step, error {_pct(fastest.output_error)}) for "
                f"error {_pct(best.output_error)}: the lowest error {limit}")
    return Recommendation(best, fastest, text)


def _error(p: Plan) -> float:
    return p.output_error if p.output_error is not None else 1.0


def _pct(e: float | None) -> str:
    return "n/a" if e is None else f"{100 * e:.2g} %"


def report(params: FluxParams, machine: Machine, width: int = 1024, height: int = 1024, refs: int = 1,
           text_encoder: str = "fp8", assumptions: Assumptions | None = None, storages=STORAGES) -> str:
    """The plans for every storage type on `machine` as markdown, and the recommendation with its trade-off."""
    a = assumptions or Assumptions()
    _check_size(width, height, refs)
    plans = [plan(params, s, machine, width, height, refs, text_encoder=text_encoder, assumptions=a) for s in storages]
    _, n = tokens_for(width, height, refs)
    te = text_encoder_bytes(text_encoder)
    te_text = ("no T5 (saved conditioning), CLIP-L" if text_encoder == "none" else f"T5 {text_encoder} + CLIP-L")
    lines = [f"Machine: {machine.describe(a)}",
             f"Edit {width}x{height}, {refs} reference(s): {n} tokens; activations "
             f"{human_bytes(activation_bytes(params, n, a.compute_dtype))}; text encoders {te_text} "
             f"{human_bytes(te)}, {'freed after encoding' if a.free_text_encoder else 'kept in RAM while sampling'}; "
             f"assumed {a.efficiency:g} of peak TFLOP/s{', fp8 matmul' if a.fp8_matmul else ''}", "",
             "| storage | weights | blocks on GPU | VRAM peak | RAM peak | s/step (compute + dequant + copies) "
             "| output error | fits |", "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        if p.mode == "does not fit":
            row = (f"| {p.storage} | {human_bytes(p.weights_bytes)} | — | — | — | — | {_pct(p.output_error)} "
                   "| no: VRAM |")
        else:
            why = "yes" if p.fits else "no: " + "; ".join(r.split(":")[0] for r in p.reasons)
            row = (f"| {p.storage} | {human_bytes(p.weights_bytes)} | {p.resident_blocks}/{p.total_blocks} | "
                   f"{human_bytes(p.peak_bytes)} | {human_bytes(p.peak_ram_bytes)} | {p.step_seconds:.2f} "
                   f"({p.compute_seconds:.2f} + {p.dequant_seconds:.2f} + {p.exposed_transfer_seconds:.2f}) | "
                   f"{_pct(p.output_error)} | {why} |")
        lines.append(row)
    lines.append("")
    rec = recommend(plans, a.max_slowdown)
    if rec is None:
        lines.append("Recommended: nothing fits (reasons below). Use a smaller size, a smaller T5 (fp8 or GGUF), "
                     "free the text encoders after encoding (save the conditioning), or a machine with more memory.")
    else:
        p = rec.plan
        ae = "untiled" if p.ae_tile is None else f"tiled ({p.ae_tile * 8}px tiles)"
        lines.append(f"Recommended: {p.storage}, {p.mode} load ({p.resident_blocks}/{p.total_blocks} blocks on the "
                     f"GPU), ~{p.step_seconds:.2f} s/step, VRAM peak {human_bytes(p.peak_bytes)}, RAM peak "
                     f"{human_bytes(p.peak_ram_bytes)}, output error {_pct(p.output_error)}; AE decode {ae}.")
        lines.append(f"Trade-off: {rec.tradeoff}.")
    for p in plans:
        for r in p.reasons:
            lines.append(f"- {p.storage}: {r}")
        for note in p.notes:
            lines.append(f"- {p.storage}: {note}")
    return "\n".join(lines)
