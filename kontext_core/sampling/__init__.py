from .schedule import flux_sigmas, mu_for_tokens, time_shift
from .solvers import SOLVERS, get_solver

__all__ = ["flux_sigmas", "mu_for_tokens", "time_shift", "SOLVERS", "get_solver"]
