"""The machine a plan is made for: a table of common GPUs, auto-detection of the local GPU and system RAM.

Where the numbers come from (all *dense* tensor throughput; vendors' headline figures are usually with 2:4
sparsity, i.e. twice these):
- GeForce cards: SM count x boost clock x tensor FLOP per SM per clock, the method (and the per-SM rates) of
  NVIDIA's architecture whitepapers: "NVIDIA Ampere GA102 GPU Architecture", "NVIDIA Ada GPU Architecture",
  "NVIDIA RTX Blackwell GPU Architecture". GeForce parts run FP16/BF16 matmul with FP32 accumulation (what
  PyTorch uses) at half the FP16-accumulate rate: 512 FLOP/SM/clk on GA10x, AD10x and GB20x, and FP8 with FP32
  accumulation at 1024 FLOP/SM/clk on AD10x and GB20x (Ampere has no FP8). Check: RTX 4090 = 128 SMs x 2.52 GHz
  x 512 = 165 TFLOP/s bf16, the whitepaper's "165.2 / 330.4" (dense / sparse); RTX 5090 = 170 x 2.407 x 512 =
  209.5, the whitepaper's figure. SM counts, boost clocks, memory bandwidth and PCIe links are from NVIDIA's
  product spec pages. Laptop GPUs use the maximum boost clock of the highest power setting (NVIDIA's "up to");
  thin laptops run lower. For RTX 50 laptop GPUs NVIDIA publishes "AI TOPS" (FP4, sparse) instead of clocks;
  their clock below is that figure / (SMs x 8192), the FP4-sparse rate per SM per clock of GB20x.
- Data-center and workstation cards: the vendor datasheets ("NVIDIA A100 Tensor Core GPU", "H100", "H200",
  "L4", "L40S", "A10", "RTX 6000 Ada Generation", "RTX A6000"), which print "dense | sparse*"; the dense value is
  used. These parts run FP32 accumulation at full rate.
- PCIe: per-lane rate per direction 0.985 GB/s (3.0), 1.969 (4.0), 3.938 (5.0), from the PCI-SIG specifications.
  Which link a card has: its spec page (RTX 3050, 4060, 4060 Ti, 5060, 5060 Ti and the 4050/4060/4070/5060/5070
  laptop GPUs are x8 parts).
- fp8 matmul needs compute capability >= 8.9 (Ada, Hopper, Blackwell): `torch._scaled_mm`'s requirement.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

from .errors import InputError

GiB = 2**30
PCIE_LANE_GBPS = {3: 0.985, 4: 1.969, 5: 3.938}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    vram_gib: float
    bf16_tflops: float  # dense, FP32 accumulation
    fp8_tflops: float  # dense, FP32 accumulation; 0 where the GPU has no fp8 matmul
    mem_gbps: float  # device memory bandwidth
    compute_capability: tuple[int, int]
    pcie_gen: int
    pcie_lanes: int
    laptop: bool = False

    @property
    def fp8_matmul(self) -> bool:
        return self.compute_capability >= (8, 9) and self.fp8_tflops > 0

    @property
    def link_gbps(self) -> float:
        """Theoretical host -> device bandwidth of the link, GB/s (one direction)."""
        return PCIE_LANE_GBPS[self.pcie_gen] * self.pcie_lanes

    def describe(self) -> str:
        fp8 = f"{self.fp8_tflops:.0f} fp8" if self.fp8_matmul else "no fp8 matmul"
        return (f"{self.name}: {self.vram_gib:g} GiB, cc {self.compute_capability[0]}.{self.compute_capability[1]}, "
                f"{self.bf16_tflops:.0f} bf16 / {fp8} dense TFLOP/s, {self.mem_gbps:.0f} GB/s memory, "
                f"PCIe {self.pcie_gen}.0 x{self.pcie_lanes}")


# FLOP per SM per clock, dense, FP32 accumulation (whitepapers, see above): (bf16, fp8)
_PER_SM = {"ampere": (512, 0), "ada": (512, 1024), "blackwell": (512, 1024)}
_CC = {"ampere": (8, 6), "ada": (8, 9), "blackwell": (12, 0)}
_GEN = {"ampere": 4, "ada": 4, "blackwell": 5}


def _geforce(name, arch, vram, sms, boost_ghz, mem_gbps, lanes=16, laptop=False) -> GPUSpec:
    bf16, fp8 = _PER_SM[arch]
    rate = sms * boost_ghz * 1e9 / 1e12
    return GPUSpec(name, vram, round(rate * bf16, 1), round(rate * fp8, 1), mem_gbps, _CC[arch], _GEN[arch], lanes,
                   laptop)


def _tops_clock(ai_tops: float, sms: int) -> float:
    """RTX 50 laptop GPUs: boost clock implied by NVIDIA's "AI TOPS" (FP4 sparse, 8192 per SM per clock)."""
    return ai_tops / (sms * 8192) * 1e3


GPUS: dict[str, GPUSpec] = {g.name: g for g in (
    # --- GeForce RTX 30 (Ampere), desktop:           VRAM SMs boost  GB/s  lanes
    _geforce("RTX 3050", "ampere", 8, 20, 1.777, 224, lanes=8),
    _geforce("RTX 3060", "ampere", 12, 28, 1.777, 360),
    _geforce("RTX 3060 Ti", "ampere", 8, 38, 1.665, 448),
    _geforce("RTX 3070", "ampere", 8, 46, 1.725, 448),
    _geforce("RTX 3070 Ti", "ampere", 8, 48, 1.770, 608),
    _geforce("RTX 3080", "ampere", 10, 68, 1.710, 760),
    _geforce("RTX 3080 12GB", "ampere", 12, 70, 1.710, 912),
    _geforce("RTX 3080 Ti", "ampere", 12, 80, 1.665, 912),
    _geforce("RTX 3090", "ampere", 24, 82, 1.695, 936),
    _geforce("RTX 3090 Ti", "ampere", 24, 84, 1.860, 1008),
    # laptop
    _geforce("RTX 3060 Laptop", "ampere", 6, 30, 1.703, 336, laptop=True),
    _geforce("RTX 3070 Laptop", "ampere", 8, 40, 1.620, 448, laptop=True),
    _geforce("RTX 3080 Laptop", "ampere", 16, 48, 1.710, 448, laptop=True),
    # --- GeForce RTX 40 (Ada), desktop
    _geforce("RTX 4060", "ada", 8, 24, 2.460, 272, lanes=8),
    _geforce("RTX 4060 Ti", "ada", 8, 34, 2.535, 288, lanes=8),
    _geforce("RTX 4060 Ti 16GB", "ada", 16, 34, 2.535, 288, lanes=8),
    _geforce("RTX 4070", "ada", 12, 46, 2.475, 504),
    _geforce("RTX 4070 Super", "ada", 12, 56, 2.475, 504),
    _geforce("RTX 4070 Ti", "ada", 12, 60, 2.610, 504),
    _geforce("RTX 4070 Ti Super", "ada", 16, 66, 2.610, 672),
    _geforce("RTX 4080", "ada", 16, 76, 2.505, 717),
    _geforce("RTX 4080 Super", "ada", 16, 80, 2.550, 736),
    _geforce("RTX 4090", "ada", 24, 128, 2.520, 1008),
    # laptop
    _geforce("RTX 4050 Laptop", "ada", 6, 20, 2.370, 192, lanes=8, laptop=True),
    _geforce("RTX 4060 Laptop", "ada", 8, 24, 2.370, 256, lanes=8, laptop=True),
    _geforce("RTX 4070 Laptop", "ada", 8, 36, 2.175, 256, lanes=8, laptop=True),
    _geforce("RTX 4080 Laptop", "ada", 12, 58, 2.280, 432, laptop=True),
    _geforce("RTX 4090 Laptop", "ada", 16, 76, 2.040, 576, laptop=True),
    # --- GeForce RTX 50 (Blackwell), desktop
    _geforce("RTX 5060", "blackwell", 8, 30, 2.497, 448, lanes=8),
    _geforce("RTX 5060 Ti", "blackwell", 8, 36, 2.572, 448, lanes=8),
    _geforce("RTX 5060 Ti 16GB", "blackwell", 16, 36, 2.572, 448, lanes=8),
    _geforce("RTX 5070", "blackwell", 12, 48, 2.512, 672),
    _geforce("RTX 5070 Ti", "blackwell", 16, 70, 2.452, 896),
    _geforce("RTX 5080", "blackwell", 16, 84, 2.617, 960),
    _geforce("RTX 5090", "blackwell", 32, 170, 2.407, 1792),
    # laptop (clock from AI TOPS: 572, 798, 992, 1334, 1824)
    _geforce("RTX 5060 Laptop", "blackwell", 8, 26, _tops_clock(572, 26), 384, lanes=8, laptop=True),
    _geforce("RTX 5070 Laptop", "blackwell", 8, 36, _tops_clock(798, 36), 384, lanes=8, laptop=True),
    _geforce("RTX 5070 Ti Laptop", "blackwell", 12, 46, _tops_clock(992, 46), 672, laptop=True),
    _geforce("RTX 5080 Laptop", "blackwell", 16, 60, _tops_clock(1334, 60), 896, laptop=True),
    _geforce("RTX 5090 Laptop", "blackwell", 24, 82, _tops_clock(1824, 82), 896, laptop=True),
    # --- workstation and data center (datasheets, dense values)
    GPUSpec("RTX A6000", 48, 154.8, 0, 768, (8, 6), 4, 16),
    GPUSpec("RTX 6000 Ada", 48, 364.2, 728.5, 960, (8, 9), 4, 16),
    GPUSpec("A10", 24, 125, 0, 600, (8, 6), 4, 16),
    GPUSpec("A100 40GB", 40, 312, 0, 1555, (8, 0), 4, 16),
    GPUSpec("A100 80GB", 80, 312, 0, 2039, (8, 0), 4, 16),
    GPUSpec("L4", 24, 121, 242.5, 300, (8, 9), 4, 16),
    GPUSpec("L40S", 48, 362, 733, 864, (8, 9), 4, 16),
    GPUSpec("H100 PCIe", 80, 756, 1513, 2000, (9, 0), 5, 16),
    GPUSpec("H100", 80, 989, 1979, 3350, (9, 0), 5, 16),  # SXM
    GPUSpec("H200", 141, 989, 1979, 4800, (9, 0), 5, 16),  # SXM
)}


def _norm(name: str) -> str:
    s = name.lower().replace("nvidia", "").replace("geforce", "").replace("gpu", "").replace("generation", "")
    s = s.replace("sxm5", "").replace("sxm4", "").replace("sxm", "").replace("-", " ")
    s = re.sub(r"(\d+)\s*gb", r"\1gb", s)
    return " ".join(s.split())


def find_gpu(name: str) -> GPUSpec:
    """The table entry for `name` ('RTX 4060 Laptop', 'NVIDIA GeForce RTX 4090', 'h100 pcie' ...)."""
    key = _norm(name)
    table = {_norm(k): g for k, g in GPUS.items()}
    # detected names carry form factor and memory words the table may not have ("A100-PCIE-40GB" -> "A100
    # 40GB", "H100 80GB HBM3" -> "H100"): try the name, then without "pcie", dropping trailing words
    for cand in dict.fromkeys((key, " ".join(w for w in key.split() if w != "pcie"))):
        words = cand.split()
        for n in range(len(words), 0, -1):
            g = table.get(" ".join(words[:n]))
            if g is not None and g.laptop == ("laptop" in words):  # never a desktop part for a laptop GPU
                return g
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
    hint = f" Closest: {', '.join(table[c].name for c in close)}." if close else ""
    raise InputError(f"GPU '{name}' is not in the planner's table.{hint} Pass the nearest card by name "
                     f"(`python -m kontext_core plan --list-gpus` lists all {len(GPUS)}), or give --vram and the "
                     "closest card of the same generation.")


def detect_gpu() -> GPUSpec | None:
    """The table entry of CUDA device 0, with its real memory size; None when there is no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    spec = find_gpu(props.name)
    return GPUSpec(spec.name, round(props.total_memory / GiB, 1), spec.bf16_tflops, spec.fp8_tflops, spec.mem_gbps,
                   (props.major, props.minor), spec.pcie_gen, spec.pcie_lanes, spec.laptop)


def system_ram_bytes() -> int | None:
    """Physical memory of this machine (Linux/macOS via sysconf, Windows via GlobalMemoryStatusEx)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:  # Windows
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("avail", ctypes.c_ulonglong), ("total_page", ctypes.c_ulonglong),
                        ("avail_page", ctypes.c_ulonglong), ("total_virtual", ctypes.c_ulonglong),
                        ("avail_virtual", ctypes.c_ulonglong), ("avail_ext", ctypes.c_ulonglong)]

        st = _Status()
        st.length = ctypes.sizeof(_Status)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):  # type: ignore[attr-defined]
            return int(st.total)
    except (AttributeError, OSError):
        pass
    return None


def gpu_table() -> str:
    """The table as markdown (for `plan --list-gpus` and the docs)."""
    lines = ["| GPU | VRAM | bf16 TFLOP/s | fp8 TFLOP/s | memory GB/s | cc | PCIe |", "|---|---|---|---|---|---|---|"]
    for g in GPUS.values():
        lines.append(f"| {g.name} | {g.vram_gib:g} GiB | {g.bf16_tflops:.0f} | "
                     f"{f'{g.fp8_tflops:.0f}' if g.fp8_matmul else '—'} | {g.mem_gbps:.0f} | "
                     f"{g.compute_capability[0]}.{g.compute_capability[1]} | {g.pcie_gen}.0 x{g.pcie_lanes} |")
    return "\n".join(lines)
