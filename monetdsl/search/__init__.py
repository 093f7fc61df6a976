"""Search: the simulator (the referee), implementation choice, baselines and solvers."""
from .baselines import chen_sqrt, recompute_all, store_all
from .checkmate import checkmate, checkmate_lp
from .chen import chen_greedy
from .outcome import MethodOutcome, SearchContext
from .progress import ProgressInfo, StderrProgress
from .revolve import revolve
from .impl_choice import cheapest_impls, no_recompute_compute_us
from .schedule_builder import build_schedule
from .simulator import Simulation, Step, chosen_impls, simulate
from .solve import METHODS, SEARCHERS, SolveResult, register_method, solve

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
    "chen_greedy",
    "revolve",
    "checkmate",
    "checkmate_lp",
    "SearchContext",
    "MethodOutcome",
    "ProgressInfo",
    "StderrProgress",
    "SEARCHERS",
    "solve",
    "SolveResult",
    "METHODS",
    "register_method",
]
