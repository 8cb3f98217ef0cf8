"""`GGMLTensor`: the raw bytes of one GGML-quantized weight, as a torch.Tensor that host code can move around.

Host memory managers (ComfyUI's ModelPatcher, `Module.to`, `load_state_dict(assign=True)`) treat weights as
ordinary tensors: they call `.to(device)`, `.cuda()`, `.detach()`, wrap them in `nn.Parameter`, read `.data`,
`copy_` into them. A GGMLTensor is a plain uint8 tensor for all of those operations (so sizes, devices and
byte counts are right), and it keeps two attributes through every one of them:

* `qtype`: the `gguf.GGMLQuantizationType` of the bytes,
* `logical_shape`: the torch.Size of the dequantized weight (torch order, e.g. (out_features, in_features)).

`.shape` is the packed byte shape; use `logical_shape` / `logical_numel` for the weight's. Nothing ever
reinterprets the bytes as numbers: `.to(device)` / `.to(device, torch.uint8)` move the bytes and keep the
attributes, while a floating dtype (`.to(torch.float32)`, `.to(dev, torch.bfloat16)`, `.float()`,
`.half()`, `.bfloat16()`, `.type(torch.float16)`) returns the *dequantized* weight as a plain tensor of
`logical_shape` - so generic host code that casts a weight to compute dtype (e.g. to merge a LoRA) gets
correct values. `dense.copy_(ggml)` dequantizes into a destination of the weight's shape and refuses any
other shape. `Module.to(dtype)` leaves the bytes alone (torch only casts floating parameters). Any other
torch operation returns a plain tensor (a slice of block bytes is not a quantized weight).
`.dequantize(dtype, device)` is the direct way to get the weight.
"""

from __future__ import annotations

import copy
import math

import torch

from .gguf_dequant import dequantize as _dequantize
from .gguf_dequant import block_info, qtype_of

__all__ = ["GGMLTensor", "is_quantized"]


def _names(*names):
    out = set()
    for n in names:
        f = getattr(torch.Tensor, n, None)
        if f is not None:
            out.add(f)
    return out


# Operations whose result holds the same bytes (moved, copied or re-wrapped): the result keeps the attributes.
_PRESERVING = _names("to", "cuda", "cpu", "xpu", "detach", "clone", "contiguous", "pin_memory",
                     "requires_grad_", "share_memory_", "detach_", "copy_", "type") | {
    torch.Tensor.data.__get__, torch.clone, torch.detach}
_DEQUANTIZING = {getattr(torch.Tensor, n): d for n, d in
                 (("float", torch.float32), ("half", torch.float16), ("bfloat16", torch.bfloat16),
                  ("double", torch.float64))}


def _first_ggml(args, kwargs):
    for a in args:
        if isinstance(a, GGMLTensor):
            return a
    for a in kwargs.values():
        if isinstance(a, GGMLTensor):
            return a
    return None


def _split_to_args(args, kwargs):
    """Split `t.to(...)` arguments into (requested dtype, args/kwargs for a dtype-free `.to`).

    Positional forms: to(dtype, non_blocking, copy), to(device, dtype, non_blocking, copy),
    to(other, non_blocking, copy) - the trailing booleans are non_blocking and copy.
    """
    self, rest = args[0], list(args[1:])
    kwargs = dict(kwargs)
    flags = []
    while rest and isinstance(rest[-1], bool):
        flags.insert(0, rest.pop())
    non_blocking = kwargs.pop("non_blocking", flags[0] if flags else False)
    copy_ = kwargs.pop("copy", flags[1] if len(flags) > 1 else False)
    device, dtype, _nb, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
    new_kwargs = {"non_blocking": bool(non_blocking), "copy": bool(copy_)}
    if device is not None:
        new_kwargs["device"] = device
    if memory_format is not None:
        new_kwargs["memory_format"] = memory_format
    return dtype, (self,), new_kwargs


def _convert(t: "GGMLTensor", dtype: torch.dtype, device) -> torch.Tensor:
    if not dtype.is_floating_point:
        raise TypeError(f"cannot convert a quantized {t.qtype.name} weight to {dtype}; only floating dtypes "
                        "(dequantization) or torch.uint8 (the raw bytes) make sense")
    return t.dequantize(dtype, device=device)


class GGMLTensor(torch.Tensor):
    """Raw GGML block bytes (uint8) of one quantized weight; see the module docstring."""

    qtype: object
    logical_shape: torch.Size

    @staticmethod
    def __new__(cls, data: torch.Tensor, qtype, logical_shape):
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
            raise TypeError(f"GGMLTensor needs a uint8 tensor of raw block bytes, got "
                            f"{getattr(data, 'dtype', type(data).__name__)}")
        if type(data) is not torch.Tensor:
            data = data.as_subclass(torch.Tensor)
        t = torch.Tensor._make_subclass(cls, data, False)
        t.qtype = qtype_of(qtype)
        t.logical_shape = torch.Size(int(s) for s in logical_shape)
        return t

    def __init__(self, *args, **kwargs):  # attributes are set in __new__
        super().__init__()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DEQUANTIZING and isinstance(args[0], GGMLTensor):
            return args[0].dequantize(_DEQUANTIZING[func])
        if func is torch.Tensor.to and isinstance(args[0], GGMLTensor):
            dtype, args, kwargs = _split_to_args(args, kwargs)
            if dtype is not None and dtype != torch.uint8:
                return _convert(args[0], dtype, kwargs.get("device"))
        elif func is torch.Tensor.type and isinstance(args[0], GGMLTensor) and len(args) + len(kwargs) > 1:
            dst = args[1] if len(args) > 1 else kwargs.get("dtype")
            if isinstance(dst, str):
                raise TypeError("GGMLTensor.type(name) is not supported; use .dequantize(dtype)")
            if dst != torch.uint8:
                return _convert(args[0], dst, None)
        elif func is torch.Tensor.copy_ and not isinstance(args[0], GGMLTensor):
            other = args[1] if len(args) > 1 else kwargs.get("src")
            if isinstance(other, GGMLTensor) and args[0].dtype != torch.uint8:
                # a dense destination (e.g. torch.empty_like(w, dtype=...) then copy_) gets the weight's
                # values when it has the weight's shape; copying packed bytes into floats is refused
                dst = args[0]
                if tuple(dst.shape) != tuple(other.logical_shape):
                    raise TypeError(
                        f"cannot copy a quantized {other.qtype.name} weight (logical shape "
                        f"{tuple(other.logical_shape)}) into a {dst.dtype} tensor of shape {tuple(dst.shape)}; "
                        "dequantize it first (GGMLTensor.dequantize)")
                with torch._C.DisableTorchFunctionSubclass():
                    return dst.copy_(other.dequantize(dst.dtype, device=dst.device))
        src = _first_ggml(args, kwargs) if func in _PRESERVING else None
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if src is None:
            return out
        if func is torch.Tensor.copy_:
            # dst.copy_(src): the bytes now are src's; so is their meaning, when src is quantized too
            dst = args[0]
            other = args[1] if len(args) > 1 else kwargs.get("src")
            if isinstance(dst, GGMLTensor) and isinstance(other, GGMLTensor):
                dst.qtype, dst.logical_shape = other.qtype, other.logical_shape
            return out
        if isinstance(out, GGMLTensor):
            if not hasattr(out, "qtype"):
                out.qtype, out.logical_shape = src.qtype, src.logical_shape
            return out
        if isinstance(out, torch.Tensor) and out.dtype == torch.uint8:
            return GGMLTensor(out, src.qtype, src.logical_shape)
        return out

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def logical_numel(self) -> int:
        return math.prod(self.logical_shape)

    def dequantize(self, dtype: torch.dtype = torch.float16, device=None) -> torch.Tensor:
        """The weight as a dense `logical_shape` tensor of `dtype` (on `device`, default: where the bytes are)."""
        data = self.as_subclass(torch.Tensor)
        if device is not None and data.device != torch.device(device):
            data = data.to(device, non_blocking=True)
        # Rows are stored as the byte shape says; the logical shape may differ (a converter reshaped the
        # tensor, e.g. a conv kernel flattened to 2-D), so decode in stored rows and view as logical.
        bs, ts = block_info(self.qtype)
        row_bytes = data.shape[-1] if data.dim() else data.numel()
        if row_bytes == 0 or row_bytes % ts:
            row_bytes = data.numel()
        stored = (data.numel() // max(row_bytes, 1), row_bytes // ts * bs)
        if math.prod(stored) != self.logical_numel:
            stored = tuple(self.logical_shape)  # let the dequantizer report the mismatch
        return _dequantize(data, self.qtype, stored, dtype).view(self.logical_shape)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = GGMLTensor(self.as_subclass(torch.Tensor).clone(), self.qtype, self.logical_shape)
        for k, v in self.__dict__.items():  # e.g. nn.Parameter's _is_param marker
            if k not in ("qtype", "logical_shape"):
                setattr(new, k, copy.deepcopy(v, memo))
        memo[id(self)] = new
        return new

    def __repr__(self, *, tensor_contents=None):
        q = getattr(self, "qtype", None)
        qn = getattr(q, "name", str(q))
        return (f"GGMLTensor(type={qn}, logical_shape={tuple(getattr(self, 'logical_shape', ()))}, "
                f"bytes={self.as_subclass(torch.Tensor).numel()}, device={self.device})")


def is_quantized(t) -> bool:
    """True for a GGMLTensor (or an nn.Parameter wrapping one)."""
    return isinstance(t, GGMLTensor)
