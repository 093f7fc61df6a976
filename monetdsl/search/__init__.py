"""Search: the simulator (the referee), implementation choice, baselines and solvers."""
from .baselines import chen_sqrt, recompute_all, store_all
from .impl_choice import cheapest_impls, no_recompute_compute_us
from .schedule_builder import build_schedule
from .simulator import Simulation, Step, chosen_impls, simulate
from .solve import METHODS, SolveResult, register_method, solve

__all__ = [
    "simulate",
    "Simulation",
    "Step",
    "chosen_impls",
    "cheapest_impls",
    "no_recompute_compute_us",
    "build_schedule",
    "store_all",
    "recompute_all",
    "chen_sqrt",
    "solve",
    "SolveResult",
    "METHODS",
    "register_method",
]
