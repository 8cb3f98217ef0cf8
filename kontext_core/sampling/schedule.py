"""The resolution-shifted flow-matching schedule used by FLUX.1 (and Kontext).

Time runs from t=1 (pure noise) to t=0 (data). Larger images need more time at high noise, so the uniform
grid is warped by exp(mu) / (exp(mu) + (1/t - 1)), with mu linear in the number of *target* image tokens
(context tokens do not count): 0.5 at 256 tokens (256²) up to 1.15 at 4096 tokens (1024²), unclamped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from ..validation import schedule_length

BASE_TOKENS, MAX_TOKENS = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def mu_for_tokens(n_tokens: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT,
                  base_tokens: int = BASE_TOKENS, max_tokens: int = MAX_TOKENS) -> float:
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (n_tokens - base_tokens)


def time_shift(mu: float, t: Tensor) -> Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)); exact 0 at t=0 and 1 at t=1."""
    t = t.double()
    e = math.exp(mu)
    safe = torch.where(t > 0, t, torch.ones_like(t))
    out = e / (e + (1.0 / safe - 1.0))
    return torch.where(t > 0, out, torch.zeros_like(out))


def flux_sigmas(steps: int, n_tokens: int | None, shift: bool = True, denoise: float = 1.0) -> Tensor:
    """steps+1 decreasing times ending at 0, float32.

    denoise < 1 keeps the last `steps` intervals of a schedule made for round(steps/denoise) steps, so the
    sampler starts from a partly noised input (the usual img2img convention).
    """
    total = schedule_length(steps, denoise)
    # The last steps+1 points of linspace(1, 0, total+1) are k/total for k = steps..0: computed directly, so a
    # tiny denoise never materialises the full schedule.
    t = torch.arange(steps, -1, -1, dtype=torch.float64) / total
    if shift:
        if n_tokens is None:
            raise InputError("the shifted schedule needs the number of target tokens")
        t = time_shift(mu_for_tokens(n_tokens), t)
    return t.float()
