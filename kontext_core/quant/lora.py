"""LoRA on top of any weight storage (plain, fp8, GGUF), applied on the fly.

A LoRA never touches the stored weights: each patched layer gets a callable in `weight_patches` that adds
strength · (alpha / rank) · up @ down to the weight after it was cast or dequantized for the forward pass, so a
quantized model stays quantized and the strength can change between runs.

Key formats understood (what Kontext LoRAs are shipped in):
  - BFL / ComfyUI names, PEFT or kohya tensors: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`,
    `…lora_B.weight`, `….lora_down.weight` / `….lora_up.weight` / `….alpha`
  - kohya flattened: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
  - diffusers: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` … (q, k, v and the single blocks' MLP
    input land in row slices of BFL's fused `qkv` / `linear1`)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..weights.flux_layout import DIFFUSERS_DOUBLE_BLOCK, DIFFUSERS_TOP_LEVEL, describe_keys

_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
          (".lora.down.weight", ".lora.up.weight"))
_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.", "lora_unet_")


@dataclass
class LoraPart:
    rows: tuple[int, int] | None  # row slice of the target weight, None = whole weight
    down: Tensor  # (r, in)
    up: Tensor  # (out_rows, r)
    scale: float  # alpha / r
    swap_halves: bool = False  # diffusers norm_out (scale, shift) -> BFL (shift, scale)


@dataclass
class LoraPatch:
    """weight_patches entry: w -> w + strength · Σ parts (in w's dtype, on w's device)."""

    parts: list[LoraPart]
    strength: float = 1.0

    def delta(self, shape, dtype, device) -> Tensor:
        d = torch.zeros(shape, dtype=dtype, device=device)
        for p in self.parts:
            up, down = p.up.to(device=device, dtype=dtype), p.down.to(device=device, dtype=dtype)
            upd = (up @ down) * p.scale
            if p.swap_halves:
                a, b = upd.chunk(2, dim=0)
                upd = torch.cat([b, a], dim=0)
            if p.rows is None:
                d += upd
            else:
                d[p.rows[0]:p.rows[1]] += upd
        return d

    def __call__(self, w: Tensor) -> Tensor:
        if self.strength == 0:
            return w
        return w + self.strength * self.delta(w.shape, w.dtype, w.device)


@dataclass
class LoraHandle:
    """What `apply_lora` attached; `set_strength` changes it live, `remove` detaches it."""

    patches: dict[str, LoraPatch] = field(default_factory=dict)
    model: nn.Module | None = None
    unmatched: list[str] = field(default_factory=list)

    def set_strength(self, strength: float) -> None:
        for p in self.patches.values():
            p.strength = strength

    def remove(self) -> None:
        for name, p in self.patches.items():
            mod = self.model.get_submodule(name)
            mod.weight_patches = [q for q in mod.weight_patches if q is not p]
        self.patches.clear()


def _diffusers_target(name: str, hidden: int, mlp: int) -> tuple[str, tuple[int, int] | None, bool] | None:
    """diffusers module name -> (BFL module, row slice, swap halves)."""
    if name in DIFFUSERS_TOP_LEVEL:
        return DIFFUSERS_TOP_LEVEL[name], None, False
    if name == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", None, True
    h = hidden
    qkv = {"q": (0, h), "k": (h, 2 * h), "v": (2 * h, 3 * h)}
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m:
        b, rest = f"double_blocks.{m.group(1)}.", m.group(2)
        if rest in DIFFUSERS_DOUBLE_BLOCK:
            return b + DIFFUSERS_DOUBLE_BLOCK[rest], None, False
        if (q := re.fullmatch(r"attn\.to_([qkv])", rest)):
            return b + "img_attn.qkv", qkv[q.group(1)], False
        if (q := re.fullmatch(r"attn\.add_([qkv])_proj", rest)):
            return b + "txt_attn.qkv", qkv[q.group(1)], False
        return None
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", name)
    if m:
        b, rest = f"single_blocks.{m.group(1)}.", m.group(2)
        if (q := re.fullmatch(r"attn\.to_([qkv])", rest)):
            return b + "linear1", qkv[q.group(1)], False
        table = {"proj_mlp": ("linear1", (3 * h, 3 * h + mlp)), "proj_out": ("linear2", None),
                 "norm.linear": ("modulation.lin", None)}
        if rest in table:
            mod, rows = table[rest]
            return b + mod, rows, False
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    for down_sfx, up_sfx in _PAIRS:
        if key.endswith(down_sfx):
            return key[: -len(down_sfx)], "down"
        if key.endswith(up_sfx):
            return key[: -len(up_sfx)], "up"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


def parse_lora(lora: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, list[LoraPart]], list[str]]:
    """Map a LoRA state dict onto the model's BFL-named Linear layers: ({module: parts}, unmatched keys)."""
    linear_names = {n for n, mod in model.named_modules() if hasattr(mod, "weight_patches")}
    flat = {n.replace(".", "_"): n for n in linear_names}
    hidden = model.params.hidden_size
    mlp = int(hidden * model.params.mlp_ratio)
    groups: dict[str, dict[str, Tensor]] = {}
    unmatched: list[str] = []
    for key, t in lora.items():
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        base, kind = split
        groups.setdefault(base, {})[kind] = t
    targets: dict[str, list[LoraPart]] = {}
    for base, g in groups.items():
        if "down" not in g or "up" not in g:
            unmatched.append(base)
            continue
        name = base
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        rows, swap = None, False
        if name in linear_names:
            target = name
        elif name in flat:
            target = flat[name]
        elif (d := _diffusers_target(name, hidden, mlp)) is not None and d[0] in linear_names:
            target, rows, swap = d
        else:
            unmatched.append(base)
            continue
        down, up = g["down"], g["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise CheckpointError(f"LoRA '{base}': down {tuple(down.shape)} and up {tuple(up.shape)} do not form a "
                                  "low-rank pair.")
        rank = down.shape[0]
        alpha = float(g["alpha"]) if "alpha" in g else float(rank)
        w_shape = tuple(getattr(model.get_submodule(target).weight, "logical_shape",
                                model.get_submodule(target).weight.shape))
        want_rows = (rows[1] - rows[0]) if rows else w_shape[0]
        if up.shape[0] != want_rows or down.shape[1] != w_shape[1]:
            raise CheckpointError(f"LoRA '{base}' is for a {up.shape[0]}x{down.shape[1]} weight but '{target}' "
                                  f"needs {want_rows}x{w_shape[1]}: the LoRA was made for a different model.")
        targets.setdefault(target, []).append(LoraPart(rows, down, up, alpha / rank, swap))
    return targets, unmatched


def apply_lora(model: nn.Module, lora: Mapping[str, Tensor], strength: float = 1.0) -> LoraHandle:
    """Attach a LoRA to a model whose Linear layers support `weight_patches` (the engine's own ops)."""
    targets, unmatched = parse_lora(lora, model)
    if not targets:
        raise CheckpointError(f"no LoRA weight matches a layer of this FLUX model (keys like {describe_keys(lora.keys())}). "
                              "Is it a LoRA for FLUX.1 / Kontext?")
    handle = LoraHandle(model=model, unmatched=unmatched)
    for name, parts in targets.items():
        patch = LoraPatch(parts, strength)
        model.get_submodule(name).weight_patches.append(patch)
        handle.patches[name] = patch
    return handle
