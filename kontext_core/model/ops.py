"""Weight layers that keep storage and compute dtypes apart.

`CastOps.Linear` stores its weight in whatever dtype the checkpoint has (bf16, fp16, fp8, fp32) and casts it
to the activation's dtype and device at each call. `weight_patches` (callables w -> w) let LoRA modify the
weight on the fly without touching storage. This is the standalone engine's counterpart of the casting layers a
host such as ComfyUI supplies.

fp8 storage
-----------
* Plain fp8 (float8_e4m3fn / float8_e5m2 weights, no scale): the weight is upcast to the compute dtype per
  call (fp32 on CPU, bf16/fp16 on GPU) — exact, because every fp8 value is representable in those dtypes.
* Scaled fp8 (ComfyUI's scheme): the layer carries a `scale_weight` buffer, a scalar or one value per output row,
  and the real weight is `stored * scale_weight`. An optional `scale_input` (scalar) is the input scale the file
  suggests for fp8 matmul; dequantized compute ignores it. Both are registered buffers, so `.to(device)` moves
  them and `state_dict()` round-trips a scaled-fp8 model.
* fp8 matmul (opt-in: `enable_fp8_matmul(model)` or `CastLinear.fp8_matmul = True`): when the weight is
  float8_e4m3fn, no LoRA patch is attached, the input is on a CUDA device of compute capability >= 8.9 and the
  in/out features are multiples of 16, the input is quantized per tensor to float8_e4m3fn (the file's
  `scale_input`, else a dynamic amax/448 scale) and multiplied with `torch._scaled_mm`. Anywhere else the layer
  falls back to upcast compute and logs the reason once (logger "kontext_core").
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("kontext_core")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448

_logged: set[str] = set()
_capability_cache: dict[int, tuple[int, int]] = {}


def _log_once(key: str, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg)


def _fp8_mm_unsupported_reason(device: torch.device) -> str | None:
    """None if torch._scaled_mm can run fp8 x fp8 on `device`, else why not (one line for the log)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    if device.type != "cuda":
        return f"fp8 matmul needs a CUDA GPU, the input is on {device.type}"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capability_cache:
        _capability_cache[idx] = torch.cuda.get_device_capability(idx)
    cap = _capability_cache[idx]
    if cap < (8, 9):
        return (f"fp8 matmul needs compute capability >= 8.9 (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(idx)} has {cap[0]}.{cap[1]}")
    return None


def _fp8_mm_supported(device: torch.device) -> bool:
    """Whether fp8 matmul can run on `device` (tests monkeypatch this to exercise the math on CPU)."""
    return _fp8_mm_unsupported_reason(device) is None


def _scale_for_rows(scale: Tensor, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scalar or per-output-row scale, shaped to broadcast against an (out, in) weight."""
    s = scale.to(device=device, dtype=dtype)
    if s.numel() == 1:
        return s.reshape(())
    return s.reshape(rows, 1)


def quantize_input_fp8(x: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (any float dtype) -> (float8_e4m3fn tensor, fp32 scalar scale) with x ~= q.float() * scale.

    Without `scale` it is dynamic: amax(|x|) / 448 (1 for an all-zero x). Values beyond the fp8 range saturate.
    """
    if scale is None:
        amax = x.detach().abs().amax().float()
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    else:
        scale = scale.to(device=x.device, dtype=torch.float32).reshape(())
    q = (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class CastLinear(nn.Linear):
    fp8_matmul: bool = False  # opt-in, per class or per instance (see enable_fp8_matmul)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # scaled-fp8: real weight = stored * scale_weight; scale_input is only used by fp8 matmul.
        self.register_buffer("scale_weight", None)
        self.register_buffer("scale_input", None)
        self.weight_patches: list = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The scales are taken as given (dtype and device kept, no copy) rather than copied into existing buffers:
        # their shape (scalar or per row) and presence depend on the file.
        replacing_weight = prefix + "weight" in state_dict
        new = {}
        for name in ("scale_weight", "scale_input"):
            key = prefix + name
            if key in state_dict:
                new[name] = state_dict.pop(key)
            elif replacing_weight:
                new[name] = None  # a new weight without a scale is an unscaled weight
            else:
                new[name] = self._buffers[name]
            self._buffers[name] = None  # hidden from the generic loader (it would report them missing)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._buffers.update(new)

    def get_weight(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        w = self.weight.to(device=device, dtype=dtype)
        if self.scale_weight is not None:
            w = w * _scale_for_rows(self.scale_weight, w.shape[0], dtype, device)
        for patch in self.weight_patches:
            w = patch(w)
        return w

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_matmul and self._can_fp8_mm(x):
            return self._forward_fp8(x)
        w = self.get_weight(x.dtype, x.device)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)

    # --- fp8 matmul -------------------------------------------------------------------------------------------

    def _can_fp8_mm(self, x: Tensor) -> bool:
        wd = self.weight.dtype
        if wd not in FP8_DTYPES:
            return False  # nothing to do for high-precision weights
        if wd != torch.float8_e4m3fn:
            _log_once("e5m2", "fp8 matmul: float8_e5m2 weights are computed by upcasting (the fast path is for "
                              "float8_e4m3fn weights)")
            return False
        if self.weight_patches:
            _log_once("patches", "fp8 matmul: layers with LoRA patches are computed by upcasting so the patches "
                                 "apply")
            return False
        if not _fp8_mm_supported(x.device):
            reason = _fp8_mm_unsupported_reason(x.device) or "not supported here"
            _log_once("device:" + reason, f"fp8 matmul unavailable ({reason}); computing fp8 layers by upcasting "
                                          "the weights instead")
            return False
        if self.in_features % 16 or self.out_features % 16:
            _log_once("dims", "fp8 matmul: layers whose in/out features are not multiples of 16 are computed by "
                              "upcasting")
            return False
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False
        return True

    def _forward_fp8(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq, s_in = quantize_input_fp8(x2, self.scale_input)
        w = self.weight.to(device=x.device)  # (out, in) row-major; .t() is the column-major (in, out) _scaled_mm wants
        row_scale = None
        if self.scale_weight is None:
            s_w = torch.ones((), device=x.device, dtype=torch.float32)
        elif self.scale_weight.numel() == 1:
            s_w = self.scale_weight.to(device=x.device, dtype=torch.float32).reshape(())
        else:  # per-row weight scale: run tensorwise with 1, scale the output columns afterwards
            s_w = torch.ones((), device=x.device, dtype=torch.float32)
            row_scale = self.scale_weight.to(device=x.device, dtype=torch.float32).reshape(-1)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        fuse_bias = bias is not None and row_scale is None and x.dtype in (torch.float16, torch.bfloat16)
        out = torch._scaled_mm(xq, w.t(), scale_a=s_in, scale_b=s_w, bias=bias if fuse_bias else None,
                               out_dtype=torch.float32 if row_scale is not None else x.dtype)
        if row_scale is not None:
            out = (out * row_scale).to(x.dtype)
        if bias is not None and not fuse_bias:
            out = out + bias
        return out.reshape(*lead, self.out_features)


def enable_fp8_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Opt every CastLinear of `model` into (or out of) fp8 matmul; returns how many layers have fp8 weights."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, CastLinear):
            mod.fp8_matmul = enabled
            n += mod.weight.dtype in FP8_DTYPES
    return n


class CastOps:
    """`operations` namespace for the engine: casting Linear, everything else from torch.nn."""

    Linear = CastLinear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding
