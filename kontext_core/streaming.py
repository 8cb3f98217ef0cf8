"""Standalone block streaming: run a FLUX transformer inside a device-memory budget.

    handle = stream_model(model, "cuda", budget_bytes=12 * 2**30, pin_memory=True)
    latent, _ = sample(model, ...)        # Flux.forward is unchanged; hooks move the weights
    handle.peak_device_bytes, handle.plan.streamed_names
    handle.remove()                       # back to a plain model (streamed blocks stay on the host)

The non-block parts (embedders, final layer) and as many double/single blocks as fit stay resident on `device`;
the other blocks stay on the host and are streamed: a forward pre-hook copies a block's weights to `device`
right before it runs and a forward hook releases them right after. With `prefetch=True` the next streamed block
(in execution order, wrapping round to the next step) is copied while the current one runs — on CUDA on a
separate stream, ordered with an event, from pinned host memory if `pin_memory=True` (opt-in: pinning costs
host RAM equal to the streamed weights). On CPU (`device="cpu"`, used by the tests) a streamed block's weights are
real copies made before the block and dropped after it (prefetch copies one block ahead), so all the bookkeeping
runs; only the CUDA stream/event/pinning lines are GPU-only.

The budget arithmetic (shared with the VRAM planner — use these functions, do not re-derive them):
    bytes of a tensor       numel x element_size of the stored tensor (fp8 = 1 byte, bf16 = 2, GGUF = its bytes)
    fixed_bytes             every parameter and buffer outside `double_blocks` / `single_blocks`
    block_bytes[i]          every parameter and buffer of block i, blocks in execution order (double, then single)
    buffers                 streamed blocks on the device at once: 1, or 2 with prefetch (current + next)
    peak(resident)          fixed_bytes + Σ resident block_bytes + buffers x max(streamed block_bytes)
                            (no reserve when every block is resident)
`model_block_bytes(model)` measures (names, block_bytes, fixed_bytes); `plan_residency(block_bytes, fixed_bytes,
budget, buffers=2)` returns the residency (one bool per block) with the most resident bytes whose peak is <= budget
(`streaming_peak` computes that peak); `minimum_budget(block_bytes, fixed_bytes, buffers=2)` is the smallest budget
any plan fits in. Only weights are counted: activations, upcast temporaries and allocator slack are the planner's
to add on top.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .memory import human_bytes

log = logging.getLogger("kontext_core")

BLOCK_LISTS = ("double_blocks", "single_blocks")


class BudgetError(InputError):
    """The memory budget cannot hold the non-block parts plus the blocks that must be on the device at once."""


# --- pure arithmetic (shared with the planner) ------------------------------------------------------------------

def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def streaming_peak(block_bytes: Sequence[int], fixed_bytes: int, resident: Sequence[bool], buffers: int = 2) -> int:
    """Device bytes at the peak of a run with this residency (see the module docstring)."""
    streamed = [b for b, r in zip(block_bytes, resident) if not r]
    reserve = buffers * max(streamed) if streamed else 0
    return fixed_bytes + sum(b for b, r in zip(block_bytes, resident) if r) + reserve


def _candidates(block_bytes: Sequence[int], fixed_bytes: int, buffers: int):
    """(s, base) for each possible largest streamed block size s: blocks larger than s must be resident."""
    for s in sorted(set(block_bytes)):
        yield s, fixed_bytes + buffers * s + sum(b for b in block_bytes if b > s)


def minimum_budget(block_bytes: Sequence[int], fixed_bytes: int, buffers: int = 2) -> int:
    """The smallest budget for which `plan_residency` finds a plan."""
    best = fixed_bytes + sum(block_bytes)
    for _, base in _candidates(block_bytes, fixed_bytes, max(1, buffers)):
        best = min(best, base)
    return best


def _fill(block_bytes: list[int], candidates: list[int], room: int) -> list[int]:
    """Indices among `candidates` to keep resident within `room` bytes, maximising the bytes kept.

    Blocks of equal size are interchangeable, so this enumerates how many of each size to keep (exact for the
    few distinct sizes real models have: FLUX has two); the earliest blocks of a size are the ones kept. Falls
    back to largest-first greedy if the enumeration would be large."""
    groups: dict[int, list[int]] = {}
    for i in candidates:
        groups.setdefault(block_bytes[i], []).append(i)
    sizes = sorted(groups, reverse=True)
    combos = 1
    for sz in sizes:
        combos *= len(groups[sz]) + 1
    if combos > 200_000:
        chosen = []
        for sz in sizes:
            for i in groups[sz]:
                if sz <= room:
                    chosen.append(i)
                    room -= sz
        return chosen
    best_counts, best_bytes = [0] * len(sizes), 0

    def search(k: int, left: int, counts: list[int]):
        nonlocal best_counts, best_bytes
        if k == len(sizes):
            used = room - left
            if used > best_bytes:
                best_counts, best_bytes = list(counts), used
            return
        sz = sizes[k]
        for c in range(min(len(groups[sz]), left // sz) if sz else len(groups[sz]), -1, -1):
            search(k + 1, left - c * sz, counts + [c])

    search(0, room, [])
    return [i for sz, c in zip(sizes, best_counts) for i in groups[sz][:c]]


def plan_residency(block_bytes: Sequence[int], fixed_bytes: int, budget: int, buffers: int = 2) -> list[bool]:
    """One bool per block (execution order): True = resident on the device, False = streamed.

    Maximises the resident bytes (= minimises the bytes copied per step) subject to
    `streaming_peak(...) <= budget`; among equal-size blocks the earlier ones are kept resident. Raises
    BudgetError (naming the minimum budget) when no plan fits.
    """
    block_bytes = [int(b) for b in block_bytes]
    buffers = max(1, int(buffers))
    n = len(block_bytes)
    if fixed_bytes + sum(block_bytes) <= budget:
        return [True] * n
    best: list[bool] | None = None
    best_bytes = -1
    for s, base in _candidates(block_bytes, fixed_bytes, buffers):
        if base > budget:
            continue
        resident = [b > s for b in block_bytes]
        for i in _fill(block_bytes, [i for i in range(n) if block_bytes[i] <= s], budget - base):
            resident[i] = True
        kept = sum(b for b, r in zip(block_bytes, resident) if r)
        if kept > best_bytes:
            best, best_bytes = resident, kept
    if best is None:
        need = minimum_budget(block_bytes, fixed_bytes, buffers)
        raise BudgetError(
            f"a device budget of {human_bytes(budget)} ({budget} bytes) is too small: the non-block parts need "
            f"{human_bytes(fixed_bytes)} and streaming needs room for {buffers} block(s) at once; the minimum is "
            f"{human_bytes(need)} ({need} bytes). Raise the budget"
            + (", or turn prefetch off (one streamed block at a time)" if buffers > 1 else "")
            + ", or store the weights in fp8 / GGUF.")
    return best


# --- the model side -------------------------------------------------------------------------------------------

def _module_tensors(module: nn.Module) -> list[tuple[dict, str, Tensor]]:
    """(container, key, tensor) for every parameter and buffer of `module` and its children (unique tensors)."""
    out, seen = [], set()
    for mod in module.modules():
        for container in (mod._parameters, mod._buffers):
            for key, t in container.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((container, key, t))
    return out


def model_block_bytes(model: nn.Module) -> tuple[list[str], list[int], int]:
    """(block names in execution order, bytes per block, fixed bytes) of a Flux-like model."""
    names, sizes, in_blocks = [], [], set()
    for list_name in BLOCK_LISTS:
        for i, block in enumerate(getattr(model, list_name, ())):
            names.append(f"{list_name}.{i}")
            ts = _module_tensors(block)
            sizes.append(sum(tensor_bytes(t) for _, _, t in ts))
            in_blocks.update(id(t) for _, _, t in ts)
    fixed = sum(tensor_bytes(t) for _, _, t in _module_tensors(model) if id(t) not in in_blocks)
    return names, sizes, fixed


@dataclass
class ResidencyPlan:
    names: list[str]  # blocks in execution order
    block_bytes: list[int]
    resident: list[bool]
    fixed_bytes: int
    budget: int
    buffers: int  # streamed blocks on the device at once

    @property
    def resident_names(self) -> list[str]:
        return [n for n, r in zip(self.names, self.resident) if r]

    @property
    def streamed_names(self) -> list[str]:
        return [n for n, r in zip(self.names, self.resident) if not r]

    @property
    def resident_bytes(self) -> int:
        return self.fixed_bytes + sum(b for b, r in zip(self.block_bytes, self.resident) if r)

    @property
    def peak_bytes(self) -> int:
        return streaming_peak(self.block_bytes, self.fixed_bytes, self.resident, self.buffers)

    @property
    def streamed_bytes_per_step(self) -> int:
        return sum(b for b, r in zip(self.block_bytes, self.resident) if not r)


@dataclass(eq=False)
class _Streamed:
    name: str  # the block's name in the plan (shows in the repr)
    nbytes: int
    slots: list  # (container, key, original tensor, host tensor to copy from)
    copies: list | None = None  # device copies while loaded
    event: object = None  # CUDA event recorded after an asynchronous copy
    active: bool = False  # copies swapped into the module
    hooks: list = field(default_factory=list)


class StreamingHandle:
    """What `stream_model` attached. `plan`, `resident_bytes()`, `peak_device_bytes`, `remove()`.

    While streaming, do not move the model (`.to()`) or replace its parameters: the hooks hold the streamed
    blocks' host tensors. Use it as a context manager to remove it on exit."""

    def __init__(self, model: nn.Module, device: torch.device, plan: ResidencyPlan, prefetch: bool):
        self.model = model
        self.device = device
        self.plan = plan
        self.prefetch = prefetch
        self._streamed: list[_Streamed] = []
        self._current = plan.resident_bytes
        self.peak_device_bytes = self._current
        self.loads = 0  # streamed-block copies made (for tests and benchmarks)
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if (self._cuda and prefetch) else None
        self._removed = False

    # bookkeeping
    def resident_bytes(self) -> int:
        """Bytes kept on the device for the whole run (non-block parts + resident blocks)."""
        return self.plan.resident_bytes

    @property
    def current_device_bytes(self) -> int:
        """Resident bytes plus the streamed blocks loaded right now."""
        return self._current

    def reset_peak(self) -> None:
        self.peak_device_bytes = self._current

    # loading
    def _load(self, st: _Streamed, asynchronous: bool) -> None:
        if st.copies is not None:
            return
        if asynchronous and self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                st.copies = [host.to(self.device, non_blocking=True) for _, _, _, host in st.slots]
                st.event = torch.cuda.Event()
                st.event.record(self._copy_stream)
        elif self._cuda:
            st.copies = [host.to(self.device, non_blocking=True) for _, _, _, host in st.slots]
        elif self.device.type == "cpu":
            st.copies = [host.clone() for _, _, _, host in st.slots]  # real copies, so the bookkeeping is real
        else:
            st.copies = [host.to(self.device) for _, _, _, host in st.slots]
        self.loads += 1
        self._current += st.nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self._current)

    def _activate(self, st: _Streamed) -> None:
        self._load(st, asynchronous=False)
        if st.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(st.event)
            for t in st.copies:
                t.record_stream(compute)  # memory made on the copy stream is used on the compute stream
            st.event = None
        for (container, key, _, _), t in zip(st.slots, st.copies):
            container[key] = t
        st.active = True

    def _release(self, st: _Streamed) -> None:
        if st.active:
            for container, key, original, _ in st.slots:
                container[key] = original
            st.active = False
        if st.copies is not None:
            st.copies = None
            st.event = None
            self._current -= st.nbytes

    # hooks
    def _pre_hook(self, st: _Streamed):
        def hook(module, args):
            for other in self._streamed:
                if other is not st and other.copies is not None:
                    self._release(other)  # stale (a previous run stopped mid-way, or an unused prefetch)
            self._activate(st)
            if self.prefetch and len(self._streamed) > 1:
                nxt = self._streamed[(self._streamed.index(st) + 1) % len(self._streamed)]
                self._load(nxt, asynchronous=True)
        return hook

    def _post_hook(self, st: _Streamed):
        def hook(module, args, output):
            self._release(st)
        return hook

    def remove(self) -> None:
        """Detach the hooks and drop every streamed copy; the model then runs as a plain module again (its
        non-block parts and resident blocks stay on the device, streamed blocks on the host)."""
        if self._removed:
            return
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # no copy from the (pinned) host tensors is still in flight
        for st in self._streamed:
            for h in st.hooks:
                h.remove()
            self._release(st)
            st.slots = []
        self._streamed = []
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def stream_model(model: nn.Module, device, budget_bytes: int, *, pin_memory: bool = False,
                 prefetch: bool = True) -> StreamingHandle:
    """Place `model` within `budget_bytes` of `device` memory, streaming the blocks that do not fit.

    Moves the non-block parts and the resident blocks to `device` and the streamed blocks to the host (CPU), then
    hooks the streamed blocks. Raises BudgetError (with the minimum) if the budget cannot work.
    """
    previous = getattr(model, "_kontext_streaming", None)
    if previous is not None and not previous._removed:
        raise InputError("this model is already streaming: call remove() on its StreamingHandle first")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names, sizes, fixed = model_block_bytes(model)
    buffers = 2 if prefetch else 1
    resident = plan_residency(sizes, fixed, int(budget_bytes), buffers)
    plan = ResidencyPlan(names, sizes, resident, fixed, int(budget_bytes), buffers)
    host = torch.device("cpu")

    for name, child in model.named_children():
        if name not in BLOCK_LISTS:
            child.to(device)
    for container in (model._parameters, model._buffers):  # loose tensors directly on the model (none in Flux)
        for key, t in list(container.items()):
            if t is not None:
                container[key] = t.to(device)
    blocks = [model.get_submodule(n) for n in names]
    for block, keep in zip(blocks, resident):
        block.to(device if keep else host)

    handle = StreamingHandle(model, device, plan, prefetch)
    pin = pin_memory and device.type == "cuda"
    for name, block, keep, nbytes in zip(names, blocks, resident, sizes):
        if keep:
            continue
        slots = []
        for container, key, t in _module_tensors(block):
            src = t.detach()
            if pin and type(src) is torch.Tensor and not src.is_pinned():
                src = src.pin_memory()
            slots.append((container, key, t, src))
        st = _Streamed(name, nbytes, slots)
        st.hooks = [block.register_forward_pre_hook(handle._pre_hook(st)),
                    block.register_forward_hook(handle._post_hook(st))]
        handle._streamed.append(st)
    model._kontext_streaming = handle
    if handle._streamed:
        log.info("streaming %d of %d blocks (%s per step) within %s on %s; resident %s, peak %s",
                 len(handle._streamed), len(names), human_bytes(plan.streamed_bytes_per_step),
                 human_bytes(plan.budget), device, human_bytes(plan.resident_bytes), human_bytes(plan.peak_bytes))
    return handle
