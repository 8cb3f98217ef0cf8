"""The solvers against independent references: diffusers' flow-matching schedulers on the same sigmas, and the
exact solution of a velocity field whose ODE has a closed form (for the order of convergence).

The field: data x0 ~ N(m, s²) per element, noise ~ N(0, 1), x_t = (1-t)·x0 + t·noise. Its flow-matching velocity
is v(x, t) = -m + (t - (1-t)s²) / σ(t)² · (x - (1-t)m) with σ(t)² = (1-t)²s² + t², and the ODE carries x(1) = z
to x(0) = m + s·z exactly. It depends on both x and t, so it separates first- from second-order methods, unlike
a straight or state-independent flow.
"""

import pytest
import torch

from kontext_core.sampling import flux_sigmas
from kontext_core.sampling.solvers import get_solver

G = torch.Generator().manual_seed(3)
M = torch.randn(2, 16, 3, 5, generator=G, dtype=torch.float64)
S = 0.2 + 1.5 * torch.rand(2, 16, 3, 5, generator=G, dtype=torch.float64)
Z = torch.randn(2, 16, 3, 5, generator=G, dtype=torch.float64)


def velocity(x, t):
    t = float(t)
    return -M + (t - (1 - t) * S ** 2) / ((1 - t) ** 2 * S ** 2 + t ** 2) * (x - (1 - t) * M)


def state_at(t):
    """The exact ODE solution through x(1) = Z at time t."""
    return (1 - t) * M + torch.sqrt((1 - t) ** 2 * S ** 2 + t ** 2) * Z


SCHEDULES = {"shifted": lambda n: flux_sigmas(n, 1024), "linear": lambda n: flux_sigmas(n, None, shift=False),
             "denoise 0.6": lambda n: flux_sigmas(n, 1024, denoise=0.6)}


def run_diffusers(scheduler, sigmas, timesteps, start):
    x = start.clone()
    for i, t in enumerate(timesteps):
        x = scheduler.step(velocity(x, scheduler.sigmas[i]), t, x, return_dict=False)[0]
    return x


def diffusers_dpmpp_2m(sigmas, start):
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                      final_sigmas_type="zero")
    sch.set_timesteps(len(sigmas) - 1)
    # Our schedule replaces the scheduler's own (its flow sigmas stop at 0.999); the update rule is what is compared.
    sch.sigmas = sigmas.clone()
    sch.timesteps = sigmas[:-1] * 1000
    return run_diffusers(sch, sch.sigmas, sch.timesteps, start)


def diffusers_heun(sigmas, start):
    from diffusers import FlowMatchHeunDiscreteScheduler

    sch = FlowMatchHeunDiscreteScheduler()
    sch.set_timesteps(len(sigmas) - 1)
    # Its layout: every inner sigma twice (predictor, corrector); the last interval is a plain Euler step.
    sch.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    sch.timesteps = sch.sigmas[:-1] * 1000
    return run_diffusers(sch, sch.sigmas, sch.timesteps, start)


def diffusers_euler(sigmas, start):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler()
    sch.set_timesteps(sigmas=sigmas[:-1].numpy())
    sch.sigmas = sigmas.clone()
    sch.timesteps = sigmas[:-1] * 1000
    return run_diffusers(sch, sch.sigmas, sch.timesteps, start)


REFERENCES = {"euler": diffusers_euler, "heun": diffusers_heun, "dpmpp_2m": diffusers_dpmpp_2m}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("solver", sorted(REFERENCES))
def test_solver_matches_diffusers_scheduler(solver, schedule):
    sigmas = SCHEDULES[schedule](7)
    start = state_at(float(sigmas[0]))
    ours = get_solver(solver)(velocity, start.clone(), sigmas)
    ref = REFERENCES[solver](sigmas, start)
    # Same fp32 sigmas; diffusers' schedulers step in fp32 (observed max |diff| 3.4e-7 .. 1.2e-6).
    assert (ours - ref).abs().max().item() < 1e-5
    # The comparison is sharp: the result is far from the other solvers' results on the same steps.
    others = [get_solver(n)(velocity, start.clone(), sigmas) for n in REFERENCES if n != solver]
    assert all((ours - o).abs().max().item() > 1e-3 for o in others)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_error_against_the_exact_solution_falls_at_the_solver_order(solver, order):
    errors = []
    for n in (16, 32, 64):
        sigmas = flux_sigmas(n, None, shift=False)
        out = get_solver(solver)(velocity, state_at(1.0), sigmas)
        errors.append((out - state_at(0.0)).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    # Halving the step divides the error by ~2^order. DPM++ 2M's first and last steps are first order (t=1 and
    # t=0 are singular in log-SNR), which costs it some of the factor 4 at these step counts (measured ~3.3);
    # its first-order variants (no correction: Euler, ratio 2.0) stay far below the bound.
    if order == 1:
        assert all(1.8 < r < 2.2 for r in ratios), ratios
    else:
        assert all(r > 3.0 for r in ratios), ratios
    if order == 2:  # and it is more accurate than Euler at every step count
        euler = [(get_solver("euler")(velocity, state_at(1.0), flux_sigmas(n, None, shift=False))
                  - state_at(0.0)).abs().max().item() for n in (16, 32, 64)]
        assert all(e < eu / 4 for e, eu in zip(errors, euler))
