"""Layers for the engine's `operations` namespace that run GGUF-quantized weights.

The engine builds every weight layer as `operations.Linear(in_f, out_f, bias=..., dtype=..., device=...)`
(and LayerNorm / Conv2d / GroupNorm / Embedding). With `operations=GGUFOps`:

* `Linear` accepts a `GGMLTensor` for weight and/or bias through `load_state_dict` (with or without
  `assign=True`): the quantized bytes become the parameter as they are (no copy, so a memory-mapped file
  stays memory-mapped), after checking their *logical* shape against (out_features, in_features). Plain
  tensors load exactly as in torch. Strict-mode missing/unexpected key reporting is torch's own.
* `forward` dequantizes at use, to the input's dtype and device, then `F.linear`. Weights can live anywhere
  (CPU, GPU, partially offloaded by a host memory manager that moves them with `.to()`).
* `get_weight(dtype, device)` / `get_bias(dtype, device)` return the dense tensors used by forward, after
  applying `self.weight_patches` / `self.bias_patches` (lists of callables `w -> w`; LoRA deltas go here) and
  then any host-provided `weight_function` / `bias_function` lists (ComfyUI's low-VRAM patch hooks use
  those names on its cast ops). Subclasses override these two methods to add behaviour.
* The other layers are torch.nn's, accepting a plain tensor of the right shape (or a GGMLTensor, which is
  dequantized once at load) and casting their weights to the input's dtype/device at use.

`make_gguf_ops(base)` builds the same Linear on top of another namespace's Linear (e.g. ComfyUI's
`comfy.ops.manual_cast`, which supplies the memory-manager hooks) without importing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ggml_tensor import GGMLTensor

__all__ = ["GGUFOps", "GGUFLinearMixin", "make_gguf_ops", "materialize"]


def materialize(t: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Dense `dtype` tensor on `device` from a GGMLTensor (dequantized) or a plain tensor (cast)."""
    if t is None:
        return None
    if isinstance(t, GGMLTensor):
        return t.dequantize(dtype, device=device)
    if t.dtype == dtype and t.device == torch.device(device):
        return t
    return t.to(device=device, dtype=dtype, non_blocking=True)


def _apply_patches(w: torch.Tensor, patches, host_functions) -> torch.Tensor:
    for p in patches:
        w = p(w)
    for f in host_functions or ():
        w = f(w)
    return w


class GGUFLinearMixin:
    """Mix into any `nn.Linear` subclass (first in the bases) to accept quantized weights. See module docs."""

    weight_patches: list
    bias_patches: list

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_patches = []
        self.bias_patches = []

    def reset_parameters(self):
        # The base Linear's own initialisation (torch's, or none for ComfyUI's ops), except on the meta device,
        # where the loaders build the model before assigning the file's tensors: there is nothing to fill.
        if self.weight.device.type != "meta":
            super().reset_parameters()

    # ------------------------------------------------------------------------------------------- loading
    def _expected_shape(self, name: str):
        if name == "weight":
            return (self.out_features, self.in_features)
        return (self.out_features,) if self.bias is not None else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # `state_dict` is this module's own copy (torch builds one per module), so popping keys is safe.
        handled = []
        for name in ("weight", "bias"):
            key = prefix + name
            if key not in state_dict:
                continue
            v = state_dict[key]
            expected = self._expected_shape(name)
            current = self._parameters.get(name)
            if expected is None:  # e.g. a bias for a bias=False layer: torch reports it as unexpected
                continue
            if isinstance(v, GGMLTensor):
                shape = tuple(v.logical_shape)
            elif isinstance(current, GGMLTensor) and isinstance(v, torch.Tensor):
                shape = tuple(v.shape)  # dense weights replacing quantized ones
            else:
                continue  # plain -> plain: torch's own path
            state_dict.pop(key)
            handled.append(key)
            if shape != expected:
                kind = f" ({v.qtype.name})" if isinstance(v, GGMLTensor) else ""
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape}{kind} from "
                                  f"checkpoint, the shape in current model is {expected}.")
                continue
            self._parameters[name] = nn.Parameter(v, requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if handled:
            missing_keys[:] = [k for k in missing_keys if k not in handled]

    # ------------------------------------------------------------------------------------------- compute
    def get_weight(self, dtype: torch.dtype, device) -> torch.Tensor:
        w = materialize(self.weight, dtype, device)
        return _apply_patches(w, self.weight_patches, getattr(self, "weight_function", None))

    def get_bias(self, dtype: torch.dtype, device) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = materialize(self.bias, dtype, device)
        return _apply_patches(b, self.bias_patches, getattr(self, "bias_function", None))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.linear(x, self.get_weight(x.dtype, x.device), self.get_bias(x.dtype, x.device))

    # hosts that route casting layers through this name (ComfyUI's ops) get the same path
    forward_comfy_cast_weights = forward

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, GGMLTensor)


class _DenseOnLoadMixin:
    """Accept a GGMLTensor for any parameter by dequantizing it once at load (these layers are small)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, param in self._parameters.items():
            key = prefix + name
            v = state_dict.get(key)
            if isinstance(v, GGMLTensor):
                dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
                state_dict[key] = v.dequantize(dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _cast_params(module: nn.Module, x: torch.Tensor):
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    w = None if w is None else materialize(w, x.dtype, x.device)
    b = None if b is None else materialize(b, x.dtype, x.device)
    return w, b


class _LayerNorm(_DenseOnLoadMixin, nn.LayerNorm):
    def forward(self, x):
        w, b = _cast_params(self, x)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class _GroupNorm(_DenseOnLoadMixin, nn.GroupNorm):
    def forward(self, x):
        w, b = _cast_params(self, x)
        return F.group_norm(x, self.num_groups, w, b, self.eps)


class _Conv2d(_DenseOnLoadMixin, nn.Conv2d):
    def forward(self, x):
        w, b = _cast_params(self, x)
        return self._conv_forward(x, w, b)


class _Embedding(_DenseOnLoadMixin, nn.Embedding):
    pass


class GGUFOps:
    """`operations` namespace for GGUF checkpoints (default base: torch.nn)."""

    class Linear(GGUFLinearMixin, nn.Linear):
        pass

    LayerNorm = _LayerNorm
    GroupNorm = _GroupNorm
    Conv2d = _Conv2d
    Embedding = _Embedding


def make_gguf_ops(base) -> type:
    """A GGUFOps-like namespace whose Linear subclasses `base.Linear` (e.g. a host's casting ops).

    The other layers are taken from `base` when it has them (wrapped to dequantize GGMLTensors at load),
    otherwise from GGUFOps. Nothing host-specific is imported; `base` only needs a `Linear` attribute.
    """
    name = getattr(base, "__name__", type(base).__name__)
    attrs = {"Linear": type("Linear", (GGUFLinearMixin, base.Linear), {"__module__": __name__}),
             "__doc__": f"GGUF operations built on {name}.", "base": base}
    for layer in ("LayerNorm", "GroupNorm", "Conv2d", "Embedding"):
        cls = getattr(base, layer, None)
        if cls is None:
            attrs[layer] = getattr(GGUFOps, layer)
        else:
            attrs[layer] = type(layer, (_DenseOnLoadMixin, cls), {"__module__": __name__})
    return type(f"GGUFOps_{name}", (), attrs)
