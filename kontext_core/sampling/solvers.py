"""ODE solvers for flow matching: x_t = (1-t)·x0 + t·noise, the model predicts v = noise - x0.

A solver gets `velocity(x, t) -> v` and the decreasing times `sigmas` (last one 0) and integrates from
sigmas[0] to 0. `callback(i, x, x0_estimate)` runs after each step (progress, previews, interrupts).
Register new solvers in SOLVERS.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import InputError

VelocityFn = Callable[[Tensor, float], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None] | None


def euler(velocity: VelocityFn, x: Tensor, sigmas: Tensor, callback: StepCallback = None) -> Tensor:
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, t)
        if callback is not None:
            callback(i, x, x - t * v)
        x = x + (t_next - t) * v
    return x


def heun(velocity: VelocityFn, x: Tensor, sigmas: Tensor, callback: StepCallback = None) -> Tensor:
    """Second order (trapezoidal) predictor-corrector; the step to t=0 is plain Euler. 2 evaluations/step."""
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, t)
        if callback is not None:
            callback(i, x, x - t * v)
        x_pred = x + (t_next - t) * v
        if t_next > 0:
            v2 = velocity(x_pred, t_next)
            x = x + (t_next - t) * 0.5 * (v + v2)
        else:
            x = x_pred
    return x


def dpmpp_2m(velocity: VelocityFn, x: Tensor, sigmas: Tensor, callback: StepCallback = None) -> Tensor:
    """DPM-Solver++(2M) in data prediction for the flow path (alpha = 1 - t, sigma = t), 1 evaluation/step."""
    prev_x0, prev_h = None, None
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, t)
        x0 = x - t * v
        if callback is not None:
            callback(i, x, x0)
        if t_next <= 0:
            x = x0
            break
        if t >= 1.0:  # lambda = -inf at pure noise: the exact first step is the Euler step
            x = x + (t_next - t) * v
            prev_x0, prev_h = x0, None
            continue
        lam, lam_next = torch.log(torch.tensor((1 - t) / t)), torch.log(torch.tensor((1 - t_next) / t_next))
        h = float(lam_next - lam)
        d = x0
        if prev_x0 is not None and prev_h is not None:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (t_next / t) * x - (1 - t_next) * torch.expm1(torch.tensor(-h)).item() * d
        prev_x0, prev_h = x0, h
    return x


SOLVERS: dict[str, Callable] = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise InputError(f"unknown solver '{name}'; available: {', '.join(SOLVERS)}") from None
