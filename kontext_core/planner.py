"""VRAM planner: predicted peak device memory and speed of a Kontext edit per weight storage type and budget.

Model of memory (bytes on the GPU at the peak of sampling):
    resident weights        non-block tensors + the blocks kept on the device (as stored: bf16, fp8, GGUF)
  + streamed-block buffers  for blocks that do not fit: the largest streamed block, twice (one running, one
                            being prefetched) — the same arithmetic as `kontext_core.streaming.plan_residency`
  + dequant scratch         for fp8/GGUF: the largest Linear weight upcast to the compute dtype (one at a time)
  + activations             `kontext_core.memory.activation_bytes` for text + target + context tokens
  + runtime reserve         CUDA context, allocator slack and kernels' workspaces (default 0.6 GiB)
The AE decode runs after the DiT is offloaded; its peak (AE weights + decoder activations at full resolution,
memory-efficient attention) is planned separately and tiled when it does not fit.

Model of speed per step (documented assumptions, all overridable):
    compute   = FLOPs(step) / (tflops × 1e12)       FLOPs = 2·params·tokens + 4·tokens²·hidden·blocks
    dequant   = dequantized bytes per step / dequant_gbps (GGUF and fp8 upcast; 0 for bf16 or fp8 matmul)
    transfer  = streamed bytes per step / pcie_gbps
    step      = compute + dequant + max(0, transfer - overlap · compute)
(prefetch on a side stream hides transfers behind compute, but not perfectly: `overlap` = 0.7 by default).
Host RAM must hold every weight that is not resident (the file is memory-mapped; pinned copies double that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .memory import activation_bytes, human_bytes, tokens_for
from .model.flux import Flux, FluxParams

GiB = 2**30
STORAGES = ("bf16", "fp8_e4m3fn", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
BUDGETS_GB = (7, 8, 12, 16, 24)


@dataclass
class Assumptions:
    tflops: float = 150.0  # dense bf16 throughput actually reached (an RTX 4090 class GPU)
    fp8_matmul: bool = False  # fp8 weights multiplied in fp8 (compute capability >= 8.9): 2x tflops, no upcast
    pcie_gbps: float = 10.0  # host -> device copy bandwidth (PCIe 4.0 x16 from pageable memory; ~20 pinned)
    overlap: float = 0.7  # fraction of the compute time that can hide transfers
    dequant_gbps: float = 300.0  # output bytes/s of per-layer dequantization on the GPU
    reserve_bytes: int = int(0.6 * GiB)
    compute_dtype: torch.dtype = torch.bfloat16


@dataclass
class StorageLayout:
    storage: str
    fixed_bytes: int  # non-block tensors (embedders, final layer)
    block_bytes: list[int]  # per double then single block, as stored
    dequant_bytes: int  # bytes produced by upcasting/dequantizing every weight once (0 when none)
    largest_upcast: int  # the largest single Linear weight in the compute dtype

    @property
    def total(self) -> int:
        return self.fixed_bytes + sum(self.block_bytes)


@dataclass
class Plan:
    storage: str
    vram_bytes: int
    fits: bool
    mode: str  # "full", "partial", "does not fit"
    resident_blocks: int
    total_blocks: int
    peak_bytes: int
    weights_bytes: int
    streamed_bytes: int
    step_seconds: float
    ae_tile: int | None  # None: AE decodes untiled
    notes: list[str] = field(default_factory=list)


def _shapes(params: FluxParams) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = Flux(params)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _block_index(name: str, params: FluxParams) -> int | None:
    if name.startswith("double_blocks."):
        return int(name.split(".")[1])
    if name.startswith("single_blocks."):
        return params.depth + int(name.split(".")[1])
    return None


def _tensor_bytes(name: str, shape: tuple[int, ...], storage: str) -> tuple[int, bool]:
    """(stored bytes, whether it is upcast/dequantized at use) for one tensor under a storage choice."""
    n = 1
    for d in shape:
        n *= d
    if storage in ("bf16", "fp16"):
        return 2 * n, False
    if storage.startswith("fp8"):
        from .weights.fp8 import is_fp8_candidate

        # fp8 weights carry a per-tensor fp32 scale (scaled-fp8 scheme)
        return (n + 4, True) if is_fp8_candidate(name, shape) else (2 * n, False)
    from .quant.gguf_dequant import nbytes_for
    from .quant.gguf_quantize import choose_qtype

    qt = choose_qtype(name, shape, storage)
    return nbytes_for(qt, shape), True


def storage_layout(params: FluxParams, storage: str, compute_dtype=torch.bfloat16) -> StorageLayout:
    shapes = _shapes(params)
    fixed = 0
    blocks = [0] * (params.depth + params.depth_single_blocks)
    dequant = 0
    cb = torch.empty((), dtype=compute_dtype).element_size()
    largest = 0
    for name, shape in shapes.items():
        nbytes, upcast = _tensor_bytes(name, shape, storage)
        if upcast:
            numel = 1
            for d in shape:
                numel *= d
            dequant += numel * cb
            largest = max(largest, numel * cb)
        i = _block_index(name, params)
        if i is None:
            fixed += nbytes
        else:
            blocks[i] += nbytes
    return StorageLayout(storage, fixed, blocks, dequant, largest)


def step_flops(params: FluxParams, n_tokens: int) -> float:
    shapes = _shapes(params)
    block_params = sum(_numel(s) for k, s in shapes.items() if k.startswith(("double_blocks.", "single_blocks.")))
    blocks = params.depth + params.depth_single_blocks
    return 2.0 * block_params * n_tokens + 4.0 * n_tokens**2 * params.hidden_size * blocks


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ae_decode_tile(width: int, height: int, budget: int, dtype=torch.bfloat16) -> tuple[int | None, int]:
    """(tile in latent cells or None for untiled, peak bytes) of the AE decode within `budget`."""
    from .model.autoencoder import AutoEncoderParams
    from .model.tiling import estimate_tile_bytes, tile_size_for_budget

    p = AutoEncoderParams()
    ae_weights = 83_819_683 * torch.empty((), dtype=dtype).element_size()
    full = max(-(-height // 8), -(-width // 8))
    need = ae_weights + estimate_tile_bytes(full, p, dtype, "decode", efficient_attention=True)
    if need <= budget:
        return None, need
    tile = tile_size_for_budget(max(0, budget - ae_weights), p, dtype, "decode", efficient_attention=True)
    return tile, ae_weights + estimate_tile_bytes(tile, p, dtype, "decode", efficient_attention=True)


def plan(params: FluxParams, storage: str, vram_bytes: int, width: int = 1024, height: int = 1024, refs: int = 1,
         assumptions: Assumptions | None = None, layout: StorageLayout | None = None) -> Plan:
    from .streaming import plan_residency, streaming_peak

    a = assumptions or Assumptions()
    layout = layout or storage_layout(params, storage, a.compute_dtype)
    _, n_tokens = tokens_for(width, height, refs)
    acts = activation_bytes(params, n_tokens, a.compute_dtype)
    scratch = layout.largest_upcast if not (storage.startswith("fp8") and a.fp8_matmul) else 0
    weight_budget = vram_bytes - acts - a.reserve_bytes - scratch
    notes: list[str] = []
    try:
        resident = plan_residency(layout.block_bytes, layout.fixed_bytes, weight_budget)
    except ValueError:
        resident = None
    nblocks = len(layout.block_bytes)
    if resident is None:
        ae_tile, _ = ae_decode_tile(width, height, vram_bytes - a.reserve_bytes, a.compute_dtype)
        return Plan(storage, vram_bytes, False, "does not fit", 0, nblocks, 0, layout.total, 0, float("inf"), ae_tile,
                    [f"needs at least the non-block weights + 2 blocks + activations ({human_bytes(acts)})"])
    streamed = [b for b, r in zip(layout.block_bytes, resident) if not r]
    peak = streaming_peak(layout.block_bytes, layout.fixed_bytes, resident) + scratch + acts + a.reserve_bytes
    tflops = a.tflops * (2.0 if storage.startswith("fp8") and a.fp8_matmul else 1.0)
    compute = step_flops(params, n_tokens) / (tflops * 1e12)
    dequant = 0.0 if (storage.startswith("fp8") and a.fp8_matmul) else layout.dequant_bytes / (a.dequant_gbps * 1e9)
    transfer = sum(streamed) / (a.pcie_gbps * 1e9)
    step = compute + dequant + max(0.0, transfer - a.overlap * compute)
    if transfer > a.overlap * compute:
        notes.append("transfer-bound: streaming dominates the step")
    ae_tile, _ = ae_decode_tile(width, height, vram_bytes - a.reserve_bytes, a.compute_dtype)
    mode = "full" if not streamed else "partial"
    return Plan(storage, vram_bytes, True, mode, sum(resident), nblocks, peak, layout.total, sum(streamed), step,
                ae_tile, notes)


def recommend(plans: list[Plan]) -> Plan | None:
    """Fastest plan that fits; among near-equal speeds (within 5 %) the higher-precision storage wins."""
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None
    best = min(p.step_seconds for p in fitting)
    near = [p for p in fitting if p.step_seconds <= best * 1.05]
    return min(near, key=lambda p: STORAGES.index(p.storage) if p.storage in STORAGES else 99)


def report(params: FluxParams, width: int, height: int, refs: int, vram_gb: list[float],
           storages=STORAGES, assumptions: Assumptions | None = None) -> str:
    a = assumptions or Assumptions()
    _, n = tokens_for(width, height, refs)
    layouts = {s: storage_layout(params, s, a.compute_dtype) for s in storages}
    lines = [f"Edit {width}x{height}, {refs} reference(s): {n} tokens; activations "
             f"{human_bytes(activation_bytes(params, n, a.compute_dtype))}; reserve {human_bytes(a.reserve_bytes)}; "
             f"assumed {a.tflops:g} TFLOP/s, PCIe {a.pcie_gbps:g} GB/s, dequant {a.dequant_gbps:g} GB/s"
             f"{', fp8 matmul' if a.fp8_matmul else ''}", "",
             "| storage | weights | " + " | ".join(f"{g:g} GB" for g in vram_gb) + " |",
             "|---|---|" + "---|" * len(vram_gb)]
    best_per_budget = []
    for s in storages:
        cells = []
        for g in vram_gb:
            p = plan(params, s, int(g * 1e9), width, height, refs, a, layouts[s])
            cells.append("—" if not p.fits else
                         f"{p.mode} {p.resident_blocks}/{p.total_blocks}, peak {p.peak_bytes / 1e9:.1f} GB, "
                         f"~{p.step_seconds:.2f} s/step")
        lines.append(f"| {s} | {layouts[s].total / 1e9:.2f} GB | " + " | ".join(cells) + " |")
    lines.append("")
    for g in vram_gb:
        plans = [plan(params, s, int(g * 1e9), width, height, refs, a, layouts[s]) for s in storages]
        best = recommend(plans)
        if best is None:
            best_per_budget.append(f"{g:g} GB: nothing fits at this size; use a smaller size or more VRAM")
        else:
            ae = "untiled" if best.ae_tile is None else f"tiled ({best.ae_tile * 8}px tiles)"
            best_per_budget.append(f"{g:g} GB: {best.storage}, {best.mode} load ({best.resident_blocks}/{best.total_blocks} "
                                   f"blocks resident), ~{best.step_seconds:.2f} s/step, peak {best.peak_bytes / 1e9:.1f} GB; "
                                   f"AE decode {ae}")
    lines.append("Recommended:")
    lines += [f"  {b}" for b in best_per_budget]
    return "\n".join(lines)
