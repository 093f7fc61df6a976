"""The dynamic program across the chain of blocks: Rotor's persistent recursion with menus.

Beaumont et al.'s optimal checkpointing for heterogeneous chains, extended to a menu of
options per block (as Rockmate's rk-rotor does), over discretised memory. Its state is a
call ``C(s, t, m)``: blocks ``s..t`` still have to be differentiated; the checkpoint before
block ``s`` (every tensor crossing that cut) is held; the gradients flowing into block
``t`` exist; nothing of blocks ``s..t`` is kept; ``m`` memory units are available. The
call's first *traversal* runs forward through the blocks: in the forward pass when ``t``
is the last block, otherwise as recomputations in the stage of block ``t``'s first
backward op. Its value is the least compute, over three choices:

* **base** (``s == t``): the last block runs option ``o`` with its forward in the forward
  pass (``t`` = last block: any option), or, inside a recomputation, a *fresh* option,
  which needs only the checkpoint (its first backward stage re-runs what it needs);
* **keep a block** (case A): run block ``s``'s forward with option ``o``, keeping what
  ``o`` keeps (``ha`` bytes beyond what the inner call counts), solve ``C(s+1, t, m - ha)``,
  then run ``s``'s backward stages;
* **checkpoint further on** (case B): run blocks ``s..s'-1`` keeping nothing of them,
  keep the checkpoint before ``s'`` (``hb``: what of the old checkpoint the inner call does
  not count), solve ``C(s', t, m - hb)``, then ``C(s, s'-1, m)``, which re-runs them.

Every memory check is "the highest memory of this step, relative to what the enclosing
calls hold, fits in ``m``"; the numbers (in whole units, rounded up by the caller) are
precomputed in a :class:`ChainProblem`. The recursion is exact for that problem:
:func:`enumerate_plans` lists every plan of a small problem and :func:`evaluate_plan`
computes each one's compute and memory independently of the table, and the tests compare.

Two kernels fill the table ``C[s, t, m]``: :func:`fill_numba` (``@njit``, loops over
memory) and :func:`fill_numpy` (vectorised over memory). Both give the same table; which
one is faster is measured in ``benchmarks/hybrid.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChainProblem",
    "fill_numba",
    "fill_numpy",
    "solve_chain",
    "reconstruct",
    "evaluate_plan",
    "enumerate_plans",
    "Plan",
]

INF = np.inf

#: a plan: ("single", t, o) | ("keep", s, t, o, inner) | ("checkpoint", s, t, s2, right, left)
Plan = tuple


@dataclass
class ChainProblem:
    """The chain of ``L`` blocks, memory in whole units (``0..S``), compute in us.

    Per block ``j`` and option ``o`` (arrays ``[L, Omax]``, ``nopt[j]`` valid entries):
    ``a0``/``ar``: memory while running the block's forward keeping the option's tensors,
    in the forward pass / as a recomputation (``ar`` without the gradients ``g``);
    ``bm``: memory during the block's backward stages; ``ha``: what the option holds
    during the inner call beyond the next checkpoint; ``ca0``/``car``/``cb``: compute of
    that forward, of that re-run, of the backward stages; ``fresh``: usable as a base case
    inside a recomputation. Per range ``[s, s2)`` of blocks run keeping nothing (arrays
    ``[L, L + 1]``): ``fn0``/``fnr`` the highest memory, ``cfn0``/``cfnr`` the compute, in
    the forward pass / as recomputations; ``hb[s, s2]``: the part of the checkpoint
    before ``s`` that the checkpoint before ``s2`` does not contain. ``g[t]``: memory held
    while a recomputation runs in block ``t``'s first stage (gradients, outputs).
    ``pinned[j]``: the block may not be re-run (the user forbids recomputing something
    in it).
    """

    L: int
    S: int
    nopt: np.ndarray
    a0: np.ndarray
    ar: np.ndarray
    bm: np.ndarray
    ha: np.ndarray
    ca0: np.ndarray
    car: np.ndarray
    cb: np.ndarray
    fresh: np.ndarray
    fn0: np.ndarray
    fnr: np.ndarray
    hb: np.ndarray
    cfn0: np.ndarray
    cfnr: np.ndarray
    g: np.ndarray
    pinned: np.ndarray

    def arrays(self):
        return (
            self.nopt, self.a0, self.ar, self.bm, self.ha, self.ca0, self.car, self.cb, self.fresh,
            self.fn0, self.fnr, self.hb, self.cfn0, self.cfnr, self.g, self.pinned,
        )


def _fill_python(L, S, nopt, a0, ar, bm, ha, ca0, car, cb, fresh, fn0, fnr, hb, cfn0, cfnr, g, pinned, C):  # pragma: no cover - compiled
    for length in range(L):
        for s in range(L - length):
            t = s + length
            stage0 = t == L - 1
            gt = 0 if stage0 else g[t]
            for m in range(S + 1):
                best = INF
                if s == t:
                    for o in range(nopt[t]):
                        if stage0:
                            if a0[t, o] <= m and bm[t, o] <= m:
                                c = ca0[t, o] + cb[t, o]
                                if c < best:
                                    best = c
                        elif fresh[t, o] and not pinned[t] and bm[t, o] <= m:
                            c = cb[t, o]
                            if c < best:
                                best = c
                else:
                    if stage0 or not pinned[s]:
                        for o in range(nopt[s]):
                            fm = a0[s, o] if stage0 else ar[s, o] + gt
                            if fm > m or bm[s, o] > m:
                                continue
                            mm = m - ha[s, o]
                            if mm < 0:
                                continue
                            inner = C[s + 1, t, mm]
                            if inner == INF:
                                continue
                            c = (ca0[s, o] if stage0 else car[s, o]) + cb[s, o] + inner
                            if c < best:
                                best = c
                    for s2 in range(s + 1, t + 1):
                        if pinned[s2 - 1]:
                            break
                        fm = fn0[s, s2] if stage0 else fnr[s, s2] + gt
                        if fm > m:
                            continue
                        mm = m - hb[s, s2]
                        if mm < 0:
                            continue
                        right = C[s2, t, mm]
                        if right == INF:
                            continue
                        left = C[s, s2 - 1, m]
                        if left == INF:
                            continue
                        c = (cfn0[s, s2] if stage0 else cfnr[s, s2]) + right + left
                        if c < best:
                            best = c
                C[s, t, m] = best


_compiled = None


def _kernel():
    global _compiled
    if _compiled is None:
        from numba import njit

        _compiled = njit(cache=True, nogil=True)(_fill_python)
    return _compiled


def _table(problem: ChainProblem) -> np.ndarray:
    return np.full((problem.L, problem.L, problem.S + 1), INF)


def fill_numba(problem: ChainProblem) -> np.ndarray:
    """The table ``C[s, t, m]`` (``inf``: infeasible), compiled loops."""
    C = _table(problem)
    _kernel()(problem.L, problem.S, *problem.arrays(), C)
    return C


def fill_numpy(problem: ChainProblem) -> np.ndarray:
    """The same table, vectorised over the memory axis with numpy."""
    L, S = problem.L, problem.S
    C = _table(problem)
    p = problem
    for length in range(L):
        for s in range(L - length):
            t = s + length
            stage0 = t == L - 1
            gt = 0 if stage0 else int(p.g[t])
            best = np.full(S + 1, INF)
            if s == t:
                for o in range(p.nopt[t]):
                    if stage0:
                        thr, c = max(p.a0[t, o], p.bm[t, o]), p.ca0[t, o] + p.cb[t, o]
                    elif p.fresh[t, o] and not p.pinned[t]:
                        thr, c = p.bm[t, o], p.cb[t, o]
                    else:
                        continue
                    if thr <= S:
                        np.minimum(best[thr:], c, out=best[thr:])
            else:
                if stage0 or not p.pinned[s]:
                    for o in range(p.nopt[s]):
                        fm = p.a0[s, o] if stage0 else p.ar[s, o] + gt
                        h = p.ha[s, o]
                        thr = max(fm, p.bm[s, o], h, 0)
                        if thr > S:
                            continue
                        c = (p.ca0[s, o] if stage0 else p.car[s, o]) + p.cb[s, o]
                        np.minimum(best[thr:], c + C[s + 1, t, thr - h: S + 1 - h], out=best[thr:])
                for s2 in range(s + 1, t + 1):
                    if p.pinned[s2 - 1]:
                        break
                    fm = p.fn0[s, s2] if stage0 else p.fnr[s, s2] + gt
                    h = p.hb[s, s2]
                    thr = max(fm, h, 0)
                    if thr > S:
                        continue
                    c = p.cfn0[s, s2] if stage0 else p.cfnr[s, s2]
                    np.minimum(best[thr:], c + C[s2, t, thr - h: S + 1 - h] + C[s, s2 - 1, thr:], out=best[thr:])
            C[s, t] = best
    return C


def solve_chain(problem: ChainProblem, backend: str = "numba") -> np.ndarray:
    """Fill the table with ``backend`` (``"numba"`` or ``"numpy"``)."""
    if backend == "numba":
        return fill_numba(problem)
    if backend == "numpy":
        return fill_numpy(problem)
    raise ValueError(f"unknown DP backend {backend!r}")


def _candidates(p: ChainProblem, C: np.ndarray, s: int, t: int, m: int):
    """Every choice at ``C(s, t, m)`` with its compute (infeasible ones left out)."""
    L = p.L
    stage0 = t == L - 1
    gt = 0 if stage0 else int(p.g[t])
    if s == t:
        for o in range(p.nopt[t]):
            if stage0 and p.a0[t, o] <= m and p.bm[t, o] <= m:
                yield p.ca0[t, o] + p.cb[t, o], ("single", t, o)
            elif not stage0 and p.fresh[t, o] and not p.pinned[t] and p.bm[t, o] <= m:
                yield p.cb[t, o], ("single", t, o)
        return
    if stage0 or not p.pinned[s]:
        for o in range(p.nopt[s]):
            fm = p.a0[s, o] if stage0 else p.ar[s, o] + gt
            mm = m - p.ha[s, o]
            if fm > m or p.bm[s, o] > m or mm < 0 or C[s + 1, t, mm] == INF:
                continue
            yield (p.ca0[s, o] if stage0 else p.car[s, o]) + p.cb[s, o] + C[s + 1, t, mm], ("keep", s, t, o, (s + 1, t, mm))
    for s2 in range(s + 1, t + 1):
        if p.pinned[s2 - 1]:
            break
        fm = p.fn0[s, s2] if stage0 else p.fnr[s, s2] + gt
        mm = m - p.hb[s, s2]
        if fm > m or mm < 0 or C[s2, t, mm] == INF or C[s, s2 - 1, m] == INF:
            continue
        c = (p.cfn0[s, s2] if stage0 else p.cfnr[s, s2]) + C[s2, t, mm] + C[s, s2 - 1, m]
        yield c, ("checkpoint", s, t, s2, (s2, t, mm), (s, s2 - 1, m))


def reconstruct(problem: ChainProblem, C: np.ndarray, m: int, s: int = 0, t: int | None = None) -> Plan | None:
    """The plan achieving ``C[s, t, m]`` (None when it is infinite)."""
    t = problem.L - 1 if t is None else t
    m = min(m, problem.S)
    if m < 0 or C[s, t, m] == INF:
        return None
    best = None
    for cost, choice in _candidates(problem, C, s, t, m):
        if best is None or cost < best[0] - 1e-9 * max(1.0, abs(cost)):
            best = (cost, choice)
    choice = best[1]
    if choice[0] == "single":
        return choice
    if choice[0] == "keep":
        _, s_, t_, o, (a, b, mm) = choice
        return ("keep", s_, t_, o, reconstruct(problem, C, mm, a, b))
    _, s_, t_, s2, (a, b, mm), (c, d, m2) = choice
    return ("checkpoint", s_, t_, s2, reconstruct(problem, C, mm, a, b), reconstruct(problem, C, m2, c, d))


def evaluate_plan(problem: ChainProblem, plan: Plan) -> tuple[float, int]:
    """(compute, memory units the plan needs), computed from the plan alone.

    The memory a plan needs is the least ``m`` for which every one of its checks holds;
    it does not look at the table, so it checks :func:`fill_numba` and :func:`fill_numpy`.
    """
    p = problem
    kind = plan[0]
    if kind == "single":
        _, t, o = plan
        if t == p.L - 1:
            return p.ca0[t, o] + p.cb[t, o], int(max(p.a0[t, o], p.bm[t, o]))
        if not p.fresh[t, o] or p.pinned[t]:
            raise ValueError("only a fresh option of an unpinned block can start inside a recomputation")
        return p.cb[t, o], int(p.bm[t, o])
    if kind == "keep":
        _, s, t, o, inner = plan
        stage0 = t == p.L - 1
        if p.pinned[s] and not stage0:
            raise ValueError("a pinned block cannot be re-run")
        cost, need = evaluate_plan(p, inner)
        fm = p.a0[s, o] if stage0 else p.ar[s, o] + p.g[t]
        return (p.ca0[s, o] if stage0 else p.car[s, o]) + p.cb[s, o] + cost, int(max(fm, p.bm[s, o], p.ha[s, o] + need, p.ha[s, o]))
    _, s, t, s2, right, left = plan
    stage0 = t == p.L - 1
    if any(p.pinned[s:s2]):
        raise ValueError("a pinned block cannot be re-run")
    rc, rn = evaluate_plan(p, right)
    lc, ln = evaluate_plan(p, left)
    fm = p.fn0[s, s2] if stage0 else p.fnr[s, s2] + p.g[t]
    return (p.cfn0[s, s2] if stage0 else p.cfnr[s, s2]) + rc + lc, int(max(fm, p.hb[s, s2] + rn, p.hb[s, s2], ln))


def enumerate_plans(problem: ChainProblem, s: int = 0, t: int | None = None):
    """Every valid plan of ``C(s, t)`` (exponentially many: for tests on tiny chains)."""
    p = problem
    t = p.L - 1 if t is None else t
    stage0 = t == p.L - 1
    if s == t:
        for o in range(p.nopt[t]):
            if stage0 or (p.fresh[t, o] and not p.pinned[t]):
                yield ("single", t, o)
        return
    if stage0 or not p.pinned[s]:
        for o in range(p.nopt[s]):
            for inner in enumerate_plans(p, s + 1, t):
                yield ("keep", s, t, o, inner)
    for s2 in range(s + 1, t + 1):
        if p.pinned[s2 - 1]:
            break
        for right in enumerate_plans(p, s2, t):
            for left in list(enumerate_plans(p, s, s2 - 1)):
                yield ("checkpoint", s, t, s2, right, left)
