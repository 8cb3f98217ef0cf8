import math

import pytest
import torch

from kontext_core.errors import InputError
from kontext_core.sampling import flux_sigmas, mu_for_tokens
from kontext_core.sampling.solvers import SOLVERS, get_solver


def test_mu_endpoints_and_linearity():
    assert mu_for_tokens(256) == pytest.approx(0.5)
    assert mu_for_tokens(4096) == pytest.approx(1.15)
    assert mu_for_tokens(8192) > 1.15  # not clamped
    assert mu_for_tokens(2176) == pytest.approx((0.5 + 1.15) / 2)


@pytest.mark.parametrize("steps,tokens", [(1, 256), (4, 1024), (28, 4096), (20, 8704)])
def test_sigmas_match_closed_form(steps, tokens):
    s = flux_sigmas(steps, tokens)
    mu = mu_for_tokens(tokens)
    for i, v in enumerate(s.tolist()):
        t = 1 - i / steps
        expect = 0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        assert v == pytest.approx(expect, abs=1e-7)
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == steps + 1
    assert torch.all(s[1:] < s[:-1])


def test_unshifted_is_linspace():
    assert torch.allclose(flux_sigmas(4, None, shift=False), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_denoise_takes_tail_of_longer_schedule():
    full = flux_sigmas(8, 1024)
    part = flux_sigmas(4, 1024, denoise=0.5)
    assert torch.allclose(part, full[-5:])
    assert part[0] < 1.0


def test_schedule_errors():
    with pytest.raises(InputError):
        flux_sigmas(0, 256)
    with pytest.raises(InputError):
        flux_sigmas(4, 256, denoise=0.0)
    with pytest.raises(InputError, match="unknown solver"):
        get_solver("ddim")


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_integrate_straight_flow_exactly(name):
    # For v = noise - x0 constant (a straight path), every solver must land exactly on x0.
    x0 = torch.randn(1, 16, 4, 4)
    noise = torch.randn(1, 16, 4, 4)
    sig = flux_sigmas(6, 256)
    out = get_solver(name)(lambda x, t: noise - x0, noise.clone(), sig)
    assert torch.allclose(out, x0, atol=1e-5)


def test_higher_order_solvers_beat_euler_on_curved_flow():
    # x0 depends on t (curved trajectories): 2nd-order methods should have lower error than Euler.
    target = torch.tensor([0.3])

    def exact(t):  # a path with x(1)=1, x(0)=target, curved
        return target + (1 - target) * t ** 2

    def vel(x, t):
        return 2 * (1 - target) * torch.tensor([t]) * torch.ones_like(x)

    sig = flux_sigmas(8, None, shift=False)
    errs = {n: (get_solver(n)(vel, exact(1.0).clone(), sig) - target).abs().item() for n in ("euler", "heun")}
    assert errs["heun"] < errs["euler"] / 4
