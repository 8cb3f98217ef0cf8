"""Weight layers that keep storage and compute dtypes apart.

`CastOps.Linear` stores its weight in whatever dtype the checkpoint has (bf16, fp16, fp8, fp32) and casts it
to the activation's dtype and device at each call, multiplying by a per-tensor `scale_weight` when the file is
scaled-fp8. `weight_patches` (callables w -> w) let LoRA modify the weight on the fly without touching
storage. This is the standalone engine's counterpart of the casting layers a host such as ComfyUI supplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CastLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_weight: Tensor | None = None  # scaled-fp8: real weight = stored * scale_weight
        self.weight_patches: list = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "scale_weight"
        if key in state_dict:
            self.scale_weight = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_weight(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        w = self.weight.to(device=device, dtype=dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(device=device, dtype=dtype)
        for patch in self.weight_patches:
            w = patch(w)
        return w

    def forward(self, x: Tensor) -> Tensor:
        w = self.get_weight(x.dtype, x.device)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)


class CastOps:
    """`operations` namespace for the engine: casting Linear, everything else from torch.nn."""

    Linear = CastLinear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding
