"""Running HiGHS: ``scipy.optimize.milp`` as the plain path, ``highspy`` for the rest.

scipy's wrapper is the simplest way to call HiGHS, but it takes no MIP start, reports no
progress and, when the time limit ends the search before an incumbent exists, returns no
dual bound either (``x`` and the bound are both ``None``). highspy has all three, so it is
the default backend; ``backend="scipy"`` gives the plain path (and is what the tests
compare against).

Both return a :class:`MilpRun` with the status, the solution, the incumbent value, the
dual bound, the gap, seconds and nodes, in the model's own units.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .linear import ModelBuilder

__all__ = ["MilpRun", "run_highs", "BACKENDS", "UNINTERRUPTIBLE_PASSES"]

BACKENDS = ("highspy", "scipy")
#: integrality and row tolerance of MIP solutions. Memory is in MiB inside the model, so
#: HiGHS's default (1e-6) would let a schedule one byte over the budget pass
FEASIBILITY_TOL = 1e-9

#: HiGHS's MIP passes besides presolve that check neither its time limit nor a callback,
#: turned off with ``run_highs(uninterruptible=False)``. On ResNet-50's model under
#: Checkmate's pins (735,000 rows) with presolve off, a run limited to 7 s took 31 s:
#: the feasibility jump 15 s of it, symmetry detection 8 s
UNINTERRUPTIBLE_PASSES = ("mip_heuristic_run_feasibility_jump", "mip_detect_symmetry")

#: ``progress(elapsed_s, incumbent, bound, gap)``; incumbent/gap are None before one exists
Progress = Callable[[float, float | None, float | None, float | None], None]


@dataclass
class MilpRun:
    """The outcome of one HiGHS run.

    ``status``: ``optimal`` (proved within the gap), ``time_limit`` (stopped by the limit;
    ``x`` is the incumbent or None), ``infeasible``, or ``error`` (``message`` says why).
    """

    status: str
    x: np.ndarray | None
    objective: float | None
    bound: float | None
    gap: float | None
    seconds: float
    nodes: int | None
    backend: str
    message: str = ""
    #: False when the caller judged the time too short to start HiGHS (``message`` says why)
    started: bool = True


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1: highspy prints its banner with C ``printf`` when a
    ``Highs`` object is created (and scipy's HiGHS a debug line on some solves), which
    would corrupt ``--json`` output."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (e.g. captured): nothing to protect
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _gap(objective: float | None, bound: float | None) -> float | None:
    if objective is None or bound is None or not math.isfinite(objective) or not math.isfinite(bound):
        return None
    return max(0.0, objective - bound) / max(abs(objective), 1e-12)


def run_highs(
    builder: ModelBuilder,
    *,
    time_limit: float,
    rel_gap: float = 1e-4,
    abs_gap: float = 1e-9,
    start: np.ndarray | None = None,
    progress: Progress | None = None,
    backend: str = "highspy",
    relax: bool = False,
    seed: int = 0,
    stop=None,
    lp_solver: str | None = None,
    uninterruptible: bool = True,
) -> MilpRun:
    """Solve the model built by ``builder`` (minimisation), within ``time_limit`` seconds
    of this call: turning the model into HiGHS's matrix and passing it over (seconds on a
    large model) count against the limit, and HiGHS gets what is left of it.

    ``start`` is a complete feasible column vector (highspy only); ``relax`` drops
    integrality (the LP relaxation); ``lp_solver`` is HiGHS's ``solver`` option for an LP
    (``"ipm"``, ``"simplex"``; highspy only; None lets HiGHS choose). ``abs_gap`` is in
    objective units. ``uninterruptible=False`` turns off HiGHS's passes that stop for
    neither a time limit nor a callback (highspy only; :data:`UNINTERRUPTIBLE_PASSES`): on
    a large model any one of them alone can take longer than the time left. ``stop`` (anything with ``is_set()``) interrupts HiGHS at
    its next callback once set; the run then ends as at a time limit, with the incumbent
    (highspy only; scipy runs to its limit).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    until = time.perf_counter() + time_limit
    c, a, rl, ru, cl, cu, integrality = builder.matrix()
    if relax:
        integrality = np.zeros_like(integrality)
    offset = builder.offset
    if progress is not None and offset:
        inner = progress

        def progress(elapsed, incumbent, bound, gap):
            inner(elapsed, None if incumbent is None else incumbent + offset, None if bound is None else bound + offset,
                  _gap(None if incumbent is None else incumbent + offset, None if bound is None else bound + offset))

    if backend == "scipy":
        run = _run_scipy(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap)
    else:
        run = _run_highspy(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap, start, progress, seed, stop, lp_solver, uninterruptible)
        if start is not None and integrality.any() and run.status == "optimal" and _start_came_back(c, run, start):
            run = _verified_without_start(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap, progress, seed, run, stop,
                                         uninterruptible)
    if run.objective is not None:
        run.objective += offset
    if run.bound is not None:
        run.bound += offset
    if run.objective is not None and run.bound is not None and run.status != "optimal":
        run.gap = _gap(run.objective, run.bound)
    return run


def _start_came_back(c: np.ndarray, run: MilpRun, start: np.ndarray) -> bool:
    """HiGHS claims optimality for a point no better than the MIP start, or returns
    columns not worth the objective it reports.

    With presolve on, HiGHS 1.16 given a MIP start has been seen to do both on 46-column
    models whose optimum it finds without the start (``tests/test_milp_exact.py``): the
    start's own value proved "optimal" (61 us, the optimum 56), and the optimum's
    objective reported with the start's columns (61 against 76). Either way the start
    came back as the answer, which a run without the start can confirm or correct."""
    if run.x is None or run.objective is None:
        return False
    worth = float(c @ run.x)
    scale = 1e-6 * max(1.0, abs(worth))
    return abs(worth - run.objective) > scale or worth >= float(c @ start) - scale


def _verified_without_start(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap, progress, seed, first: MilpRun, stop=None,
                            uninterruptible: bool = True) -> MilpRun:
    """Solve again without the start in the time left (until ``until``, a
    ``time.perf_counter()`` instant): its optimum, when it proves one; else the better of
    the two points (the first run's claim is then unconfirmed)."""
    again = _run_highspy(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap, None, progress, seed, stop, None, uninterruptible)
    again.seconds += first.seconds
    if again.status == "optimal":
        return again
    if again.x is not None and float(c @ again.x) < float(c @ first.x):
        return again
    return first


def _seconds_until(until: float) -> float:
    """HiGHS's own time limit when it must stop by ``until`` (a ``time.perf_counter()``
    instant): its clock starts when it starts solving, after the model was passed."""
    return max(until - time.perf_counter(), 1e-3)


def _run_scipy(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap) -> MilpRun:
    from scipy.optimize import Bounds, LinearConstraint, milp

    begin = time.perf_counter()
    constraints = [LinearConstraint(a, rl, ru)] if a.shape[0] else []
    options = {
        "time_limit": _seconds_until(until),
        "mip_rel_gap": rel_gap,
        "disp": False,
        "presolve": True,
        # not in scipy's documented list; scipy hands it to HiGHS (with a warning)
        "mip_feasibility_tolerance": FEASIBILITY_TOL,
        "mip_abs_gap": abs_gap,
    }
    with _quiet_stdout(), warnings.catch_warnings():  # HiGHS 1.12 prints a debug line on some solves
        warnings.simplefilter("ignore", RuntimeWarning)
        res = milp(c, integrality=integrality, bounds=Bounds(cl, cu), constraints=constraints, options=options)
    seconds = time.perf_counter() - begin
    bound = getattr(res, "mip_dual_bound", None)
    if not integrality.any() and res.status == 0:
        bound = res.fun
    if res.status == 0:
        return MilpRun("optimal", res.x, res.fun, bound, _gap(res.fun, bound) or 0.0, seconds, getattr(res, "mip_node_count", None), "scipy")
    if res.status == 1:
        return MilpRun("time_limit", res.x, res.fun, bound, _gap(res.fun, bound), seconds, getattr(res, "mip_node_count", None), "scipy", res.message)
    if res.status == 2:
        return MilpRun("infeasible", None, None, None, None, seconds, getattr(res, "mip_node_count", None), "scipy", res.message)
    return MilpRun("error", None, None, None, None, seconds, None, "scipy", res.message)


def _run_highspy(c, a, rl, ru, cl, cu, integrality, until, rel_gap, abs_gap, start, progress, seed, stop=None,
                 lp_solver: str | None = None, uninterruptible: bool = True) -> MilpRun:
    import highspy

    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", float(rel_gap))
    h.setOptionValue("mip_abs_gap", float(abs_gap))
    h.setOptionValue("random_seed", int(seed))
    h.setOptionValue("mip_feasibility_tolerance", FEASIBILITY_TOL)
    if lp_solver is not None and not integrality.any():
        h.setOptionValue("solver", lp_solver)
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_ = len(c)
    lp.num_row_ = a.shape[0]
    lp.col_cost_ = c
    lp.col_lower_ = cl
    lp.col_upper_ = cu
    lp.row_lower_ = np.where(np.isfinite(rl), rl, -inf)
    lp.row_upper_ = np.where(np.isfinite(ru), ru, inf)
    csc = a.tocsc()
    csc.sort_indices()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_ = len(c)
    lp.a_matrix_.num_row_ = a.shape[0]
    lp.a_matrix_.start_ = csc.indptr.astype(np.int32)
    lp.a_matrix_.index_ = csc.indices.astype(np.int32)
    lp.a_matrix_.value_ = csc.data.astype(float)
    is_mip = bool(integrality.any())
    if is_mip:
        lp.integrality_ = [highspy.HighsVarType.kInteger if v else highspy.HighsVarType.kContinuous for v in integrality]
    h.passModel(lp)
    if start is not None and is_mip:
        solution = highspy.HighsSolution()
        solution.col_value = [float(v) for v in start]
        solution.value_valid = True
        h.setSolution(solution)
    h.setOptionValue("time_limit", float(_seconds_until(until)))
    if not uninterruptible:
        h.setOptionValue("presolve", "off")
        if is_mip:
            for option in UNINTERRUPTIBLE_PASSES:
                h.setOptionValue(option, False)
    begin = time.perf_counter()

    def past_limit() -> bool:
        """HiGHS checks its own limit only now and then (not within presolve's long
        passes): each callback checks the instant too."""
        return (stop is not None and stop.is_set()) or time.perf_counter() > until

    if is_mip:

        def report(event) -> None:
            if past_limit():
                event.data_in.user_interrupt = True
            if progress is None:
                return
            data = event.data_out
            incumbent = data.mip_primal_bound if math.isfinite(data.mip_primal_bound) else None
            bound = data.mip_dual_bound if math.isfinite(data.mip_dual_bound) else None
            progress(time.perf_counter() - begin, incumbent, bound, _gap(incumbent, bound))

        h.cbMipInterrupt += report

    def interrupt(event) -> None:
        if past_limit():
            event.data_in.user_interrupt = True

    # an LP (checkmate-lp's relaxation, a MIP's root relaxation) calls these
    h.cbSimplexInterrupt += interrupt
    h.cbIpmInterrupt += interrupt
    h.run()
    seconds = time.perf_counter() - begin
    status = h.getModelStatus()
    info = h.getInfo()
    ms = highspy.HighsModelStatus
    has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.array(h.getSolution().col_value) if has_solution else None
    objective = info.objective_function_value if has_solution else None
    bound = info.mip_dual_bound if is_mip else objective
    if bound is not None and not math.isfinite(bound):
        bound = None
    nodes = int(info.mip_node_count) if is_mip else None
    if status == ms.kOptimal:
        return MilpRun("optimal", x, objective, bound, _gap(objective, bound) or 0.0, seconds, nodes, "highspy")
    if status in (ms.kInfeasible, ms.kUnboundedOrInfeasible):
        return MilpRun("infeasible", None, None, bound, None, seconds, nodes, "highspy")
    if status in (ms.kTimeLimit, ms.kInterrupt, ms.kIterationLimit, ms.kSolutionLimit):
        return MilpRun("time_limit", x, objective, bound, _gap(objective, bound), seconds, nodes, "highspy", h.modelStatusToString(status))
    return MilpRun("error", x, objective, bound, None, seconds, nodes, "highspy", h.modelStatusToString(status))
