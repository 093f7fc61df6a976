"""The hybrid engine for large graphs: blocks solved exactly, joined by a chain DP.

See :mod:`.engine` for the pipeline; each step has its own module: :mod:`.decompose`
(cuts), :mod:`.subnet` (a block's sub-network), :mod:`.menus` (per-block options from the
MILP), :mod:`.chain_dp` (the DP), :mod:`.chain` (the DP's numbers, plans as schedules),
:mod:`.compose` (carries by liveness), :mod:`.bounds` (lower bounds for any size).
"""
from .decompose import Block, Decomposition, decompose
from .engine import hybrid, run_hybrid

__all__ = ["Block", "Decomposition", "decompose", "hybrid", "run_hybrid"]
