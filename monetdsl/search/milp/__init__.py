"""The joint MILP: MONeT's keep/recompute/implementation problem, exact to the simulator.

One module per job:

* :mod:`.linear` - expressions, and a model builder whose auxiliary columns carry their
  own definitions (rows for HiGHS, exact evaluation for encoding and accounting);
* :mod:`.model` - the formulation (``docs/milp.md`` states it);
* :mod:`.codec` - solution -> schedule (decode), schedule -> MIP start (encode), the
  model's own accounting of a schedule (evaluate);
* :mod:`.highs` - HiGHS through highspy (MIP start, bound, progress) or scipy (plain);
* :mod:`.engine` - the search method: heuristics as MIP start, solve, decode, fall back,
  exact minimum feasible budget.
"""
from .codec import Accounting, canonical, decode, encode, evaluate
from .engine import DEFAULT_GAP, DEFAULT_TIME_LIMIT, MinimumBudget, certify_minimum, minimum_budget, solve_joint
from .highs import BACKENDS, MilpRun, run_highs
from .model import MIB, JointModel, build_model

__all__ = [
    "build_model",
    "JointModel",
    "MIB",
    "decode",
    "encode",
    "evaluate",
    "canonical",
    "Accounting",
    "run_highs",
    "MilpRun",
    "BACKENDS",
    "solve_joint",
    "minimum_budget",
    "certify_minimum",
    "MinimumBudget",
    "DEFAULT_TIME_LIMIT",
    "DEFAULT_GAP",
]
