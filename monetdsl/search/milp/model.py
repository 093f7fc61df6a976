"""The joint MILP: keep, recompute and implementation choice, exact to the simulator.

The formulation is written out with its proofs of exactness in ``docs/milp.md``; the
names below follow that page. In short, over stages ``t = 0..T`` (0 = the forward pass,
``t >= 1`` = the canonical backward order) and slots ``k`` (the forward position of a
(re)computed op, or the backward step):

* decisions (binary): ``y[i,p]`` forward implementation, ``z[b,q]`` backward
  implementation, ``R[t,i]`` op ``i`` recomputed in stage ``t``, ``C[t,x]`` tensor ``x``
  carried through stage ``t`` (forward ``keep`` for ``t = 0``; stage ``keep``/``free``
  are the changes of ``C``);
* auxiliaries (continuous, pinned by their rows once the decisions are integral):
  ``W[t,i,p] = R[t,i] AND y[i,p]``; per storage ``g`` and stage: ``sigma`` (a new storage
  that outlives its step), ``Q`` (a later step still needs the storage: a suffix OR over
  the storage's events), ``F`` (the storage is released after this step: the Checkmate
  FREE, made exact); per gradient and stage ``alive``; the running activation memory
  ``U[t,k]`` (one column per active slot, one equality row: ``U[t,k+] = U[t,k] +
  new storages - released storages``), which keeps the non-zeros near O(T x tensors)
  instead of MONeT's dense O(T V^2) memory rows.

Every step's memory is ``fixed + G[t] + U[t,k] + new outputs + workspace`` and is bounded
by the budget (or by the peak variable when peak is the objective).

Columns are created only where the graph allows a non-zero value: ``R[t,i]`` only when an
output of ``i`` can still be read at stage ``t`` or later, ``C[t,x]`` only when ``x`` can
be read after stage ``t``; implementation pins, ``keep`` and ``never recompute`` become
constants. Constants fold away (see :mod:`.linear`).

Two modelling conventions restrict the schedules the MILP considers; both only remove
schedules another schedule of the MILP matches or beats (``docs/milp.md`` has the
arguments and the brute-force tests check them): a view is carried only while its base
tensor is carried, and no stage recomputes an op whose outputs were all carried into it.
Two spec features are refused with a clear error because no exact linear model of them is
given here: recompute reads of a tensor produced by a later op, and in-place
implementations whose output is smaller than the tensor they overwrite.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...errors import SpecError
from ...graph import index, storage_root
from ...ir import Network, TensorKind
from ...validate import ResolvedConstraints
from .linear import INF, Expr, ModelBuilder, total

__all__ = ["MIB", "Slot", "JointModel", "BuildTimeout", "build_model"]

#: memory unit inside the model; a power of two, so scaling is exact in floating point
MIB = float(1 << 20)
ZERO = Expr()
ONE = Expr(1.0)


@dataclass
class Slot:
    """One step the schedule may run: its run indicator and its memory (MiB, without fixed)."""

    stage: int
    kind: str  # "forward", "recompute" or "backward"
    op: str
    run: Expr
    memory: Expr


@dataclass
class JointModel:
    """The built model plus everything needed to decode and encode schedules."""

    network: Network
    builder: ModelBuilder
    stage_order: tuple[str, ...]
    forward_order: tuple[str, ...]
    tensors: tuple[str, ...]
    y: dict[tuple[str, str], Expr]
    z: dict[tuple[str, str], Expr]
    recompute: dict[tuple[int, str], Expr]
    carry: dict[tuple[int, str], Expr]
    slots: list[Slot]
    compute: Expr
    fixed_bytes: int
    objective: str
    peak: Expr | None = None
    memory_cap_bytes: int | None = None
    stats: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stage_order)


class BuildTimeout(Exception):
    """Building the model went past its deadline (large networks: the model grows with
    stages times tensors, and building it alone can take minutes)."""


def _refuse(message: str) -> SpecError:
    return SpecError(f"the exact MILP cannot model this spec: {message}; use another --method")


class _Builder:
    """Builds one :class:`JointModel`; one method per family of the formulation."""

    def __init__(
        self,
        network: Network,
        constraints: ResolvedConstraints | None,
        pins: dict[str, tuple[str, ...]] | None,
        objective: str,
        memory_budget: int | None,
        max_overhead: float | None,
        baseline_us: float | None,
        no_recompute_stages: frozenset[int] = frozenset(),
        forward_keep_cap: int | None = None,
        forward_keep_exempt: frozenset[str] = frozenset(),
        deadline: float | None = None,
    ):
        self.net = network
        self.deadline = deadline
        self.no_recompute_stages = frozenset(no_recompute_stages)
        self.forward_keep_cap = forward_keep_cap
        self.forward_keep_exempt = frozenset(forward_keep_exempt)
        self.idx = index(network)
        self.tensors = network.tensors
        self.m = ModelBuilder()
        self.objective = objective
        self.memory_budget = memory_budget
        self.max_overhead = max_overhead
        self.baseline_us = baseline_us
        allowed = dict(constraints.allowed_impls) if constraints is not None else {}
        for op, names in (pins or {}).items():
            allowed[op] = tuple(n for n in allowed.get(op, names) if n in names) or tuple(names)
        self.allowed = allowed
        self.keep = set(constraints.keep) if constraints is not None else set()
        self.never = set(constraints.never_recompute) if constraints is not None else set()
        self.order = self.idx.forward_order
        self.pos = self.idx.position
        self.stages = self.idx.backward_order
        self.T = len(self.stages)
        self.n = len(self.order)
        self.outputs = set(network.outputs)

    # ------------------------------------------------------------------ set-up
    def impls_of(self, op):
        names = self.allowed.get(op.name, op.impl_names)
        return [impl for impl in op.impls if impl.name in names]

    def is_act(self, name: str) -> bool:
        """A forward-produced tensor (main output or derived); the only ones with decisions."""
        return self.idx.is_forward_tensor(name)

    def prepare(self) -> None:
        idx, tensors = self.idx, self.tensors
        self.fops = {name: idx.forward_ops[name] for name in self.order}
        self.fimpls = {name: self.impls_of(op) for name, op in self.fops.items()}
        self.bimpls = {name: self.impls_of(idx.backward_ops[name]) for name in self.stages}
        self.acts = sorted(
            (t for t in tensors if self.is_act(t)),
            key=lambda t: (self.pos.get(idx.producing_op(t), -1), t),
        )
        self.producer = {t: idx.producing_op(t) for t in self.acts}
        self.rr_readers: dict[str, list[tuple[str, str]]] = {}
        for name, impls in self.fimpls.items():
            for impl in impls:
                for r in impl.recompute_reads:
                    if not self.is_act(r):
                        continue
                    if self.pos[self.producer[r]] > self.pos[name]:
                        raise _refuse(
                            f"recomputing {name} ({impl.name}) reads {r}, which the later op {self.producer[r]} produces"
                        )
                    self.rr_readers.setdefault(r, []).append((name, impl.name))
                if impl.overwrites is not None:
                    out = tensors[self.fops[name].outputs[0]]
                    target = tensors[impl.overwrites]
                    if out.nbytes != target.storage_bytes:
                        raise _refuse(
                            f"{name} ({impl.name}) overwrites {target.name} ({target.storage_bytes} B) with the smaller"
                            f" {out.name} ({out.nbytes} B)"
                        )
        # storages: a non-view forward tensor owns one; its views share it
        self.root = {}
        for t in self.acts:
            r = storage_root(self.net, t)
            if self.is_act(r) and tensors[r].storage_bytes > 0:
                self.root[t] = r
        self.members: dict[str, list[str]] = {}
        for t in self.acts:
            if t in self.root:
                self.members.setdefault(self.root[t], []).append(t)
        self.size = {r: tensors[r].storage_bytes / MIB for r in self.members}
        self.useful_sets()

    def useful_sets(self) -> None:
        """Which tensors a stage can possibly read (any implementation): fixes columns to 0."""
        useful = []
        for b in self.stages:
            seed = {r for impl in self.bimpls[b] for r in impl.reads if self.is_act(r)}
            seen: set[str] = set()
            stack = list(seed)
            while stack:
                t = stack.pop()
                if t in seen:
                    continue
                seen.add(t)
                op = self.producer[t]
                for inp in self.fops[op].inputs:
                    if self.is_act(inp):
                        stack.append(inp)
                for impl in self.fimpls[op]:
                    stack.extend(r for r in impl.recompute_reads if self.is_act(r))
            useful.append(seen)
        # after[t] = tensors some stage > t may read; from_[t] = some stage >= t (t >= 1)
        self.read_after = [set() for _ in range(self.T + 1)]
        acc: set[str] = set()
        for t in range(self.T, 0, -1):
            acc = acc | useful[t - 1]
            self.read_after[t - 1] = set(acc)
        self.read_from = {t: self.read_after[t - 1] for t in range(1, self.T + 1)}

    # ------------------------------------------------------------------ decisions
    def decisions(self) -> None:
        m = self.m
        self.y: dict[tuple[str, str], Expr] = {}
        for name, op in self.fops.items():
            self._one_hot(name, op, self.fimpls[name], self.y, "y")
        self.z: dict[tuple[str, str], Expr] = {}
        for name in self.stages:
            self._one_hot(name, self.idx.backward_ops[name], self.bimpls[name], self.z, "z")
        kept_producers = {self.producer[t] for t in self.keep if t in self.producer}
        self.R: dict[tuple[int, str], Expr] = {}
        for t in range(1, self.T + 1):
            self.check_time()
            if t in self.no_recompute_stages:
                continue
            for name in self.order:
                if name in self.never or name in kept_producers:
                    continue
                outs = set(self.fops[name].outputs) | {d for impl in self.fimpls[name] for d in impl.derived}
                if outs & self.read_from[t]:
                    self.R[t, name] = m.binary(f"R[{t},{name}]")
        self.C: dict[tuple[int, str], Expr] = {}
        for t in range(0, self.T + 1):
            self.check_time()
            for x in self.acts:
                if x in self.outputs:
                    self.C[t, x] = ONE
                elif t == 0 and x in self.keep:
                    self.C[t, x] = ONE
                elif x in self.read_after[t] and self._producible(x):
                    self.C[t, x] = m.binary(f"C[{t},{x}]")
        self.W: dict[tuple[int, str, str], Expr] = {}
        for (t, name), r in self.R.items():
            impls = self.fimpls[name]
            if len(impls) == 1:
                self.W[t, name, impls[0].name] = r
                continue
            parts = []
            for impl in impls:
                yv = self.y[name, impl.name]
                w = m.product_column(r, yv, f"W[{t},{name},{impl.name}]")
                m.le(w, yv, f"W<=y[{t},{name},{impl.name}]")
                parts.append(w)
                self.W[t, name, impl.name] = w
            m.eq(total(parts), r, f"sumW[{t},{name}]")

    def _one_hot(self, name, op, impls, table, letter) -> None:
        if len(impls) == 1:
            for impl in op.impls:
                table[name, impl.name] = ONE if impl.name == impls[0].name else ZERO
            return
        chosen = [impl.name for impl in impls]
        parts = []
        for impl in op.impls:
            if impl.name in chosen:
                table[name, impl.name] = self.m.binary(f"{letter}[{name},{impl.name}]")
                parts.append(table[name, impl.name])
            else:
                table[name, impl.name] = ZERO
        self.m.eq(total(parts), 1.0, f"one {letter}[{name}]")

    def _producible(self, x: str) -> bool:
        if x not in self.idx.derived_by:
            return True
        op = self.producer[x]
        return any(x in impl.derived for impl in self.fimpls[op])

    # ------------------------------------------------------------------ helpers
    def rho(self, t: int, name: str) -> Expr:
        return ONE if t == 0 else self.R.get((t, name), ZERO)

    def w(self, t: int, name: str, impl: str) -> Expr:
        if t == 0:
            return self.y[name, impl]
        return self.W.get((t, name, impl), ZERO)

    def carried(self, t: int, x: str) -> Expr:
        if t < 0:
            return ZERO
        return self.C.get((t, x), ZERO)

    def produced(self, t: int, x: str) -> Expr:
        op = self.producer[x]
        if x in self.idx.derived_by:
            return total(self.w(t, op, impl.name) for impl in self.fimpls[op] if x in impl.derived)
        return self.rho(t, op)

    def check_time(self) -> None:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise BuildTimeout(f"building the MILP of {self.n} forward ops did not finish in time")

    # ------------------------------------------------------------------ legality
    def legality(self) -> None:
        m = self.m
        for t in range(0, self.T + 1):
            self.check_time()
            for name in self.order:
                run = self.rho(t, name)
                if run.is_zero():
                    continue
                op = self.fops[name]
                if t >= 1:
                    for x in op.inputs:
                        if self.is_act(x):
                            m.le(run, self.carried(t - 1, x) + self.produced(t, x), f"input[{t},{name},{x}]")
                    for impl in self.fimpls[name]:
                        wv = self.w(t, name, impl.name)
                        for x in impl.recompute_reads:
                            if self.is_act(x) and x not in op.inputs:
                                earlier = self.pos[self.producer[x]] < self.pos[name]
                                avail = self.carried(t - 1, x) + (self.produced(t, x) if earlier else ZERO)
                                m.le(wv, avail, f"rread[{t},{name},{x}]")
                        outs = list(op.outputs) + list(impl.derived)
                        present = total(self.carried(t - 1, x) for x in outs)
                        if present.const + sum(1 for _ in present.terms) >= len(outs):
                            m.le(wv + present, float(len(outs)), f"useful[{t},{name},{impl.name}]")
            if t >= 1:
                b = self.stages[t - 1]
                reads: dict[str, list[Expr]] = {}
                for impl in self.bimpls[b]:
                    for x in impl.reads:
                        if self.is_act(x):
                            reads.setdefault(x, []).append(self.z[b, impl.name])
                for x, zs in reads.items():
                    m.le(total(zs), self.carried(t - 1, x) + self.produced(t, x), f"bread[{t},{b},{x}]")
        for (t, x), c in self.C.items():
            if c.is_const():
                continue
            m.le(c, self.carried(t - 1, x) + self.produced(t, x), f"carry[{t},{x}]")
            r = self.root.get(x)  # None for a view of fixed memory: free to carry
            if r is not None and r != x:
                m.le(c, self.carried(t, r), f"view[{t},{x}]")

    # ------------------------------------------------------------------ memory
    def memory(self) -> None:
        m = self.m
        self.slots: list[Slot] = []
        grad = self.gradients()
        u_prev: Expr = ZERO
        for t in range(0, self.T + 1):
            self.check_time()
            events = self.storage_events(t)
            created: dict[int, list[Expr]] = {}
            released: dict[int, list[Expr]] = {}
            for r, ev in events.items():
                created.setdefault(ev["pos"], []).append(self.size[r] * ev["sigma"])
                for k, f in ev["free"].items():
                    released.setdefault(k, []).append(self.size[r] * f)
            if t >= 1:
                u_prev = u_prev - total(self.size[r] * ev["drop"] for r, ev in events.items())
            active = [k for k, name in enumerate(self.order) if not self.rho(t, name).is_zero()]
            if t >= 1:
                active.append(self.n)
            for k in active:
                u = m.defined(u_prev, f"U[{t},{k}]")
                g = grad[t]
                if k < self.n:
                    name = self.order[k]
                    op = self.fops[name]
                    step = ZERO
                    for impl in self.fimpls[name]:
                        alloc = 0
                        for j, x in enumerate((*op.outputs, *impl.derived)):
                            if self.tensors[x].view_of is not None or (j == 0 and impl.overwrites is not None):
                                continue
                            alloc += self.tensors[x].storage_bytes
                        step = step + self.w(t, name, impl.name) * ((alloc + impl.workspace) / MIB)
                    kind = "forward" if t == 0 else "recompute"
                    self.slots.append(Slot(t, kind, name, self.rho(t, name), g + u + step))
                    delta = total(created.get(k, ()))
                else:
                    b = self.stages[t - 1]
                    bop = self.idx.backward_ops[b]
                    new = total(self.z[b, impl.name] * ((bop.new_output_bytes(impl, self.tensors) + impl.workspace) / MIB)
                                for impl in self.bimpls[b])
                    self.slots.append(Slot(t, "backward", b, ONE, g + u + new))
                    delta = ZERO
                delta = delta - total(released.get(k, ()))
                u_prev = u + delta
            u_prev = m.defined(u_prev, f"U[{t},end]")

    def storage_events(self, t: int) -> dict[str, dict]:
        """Per storage in stage ``t``: its events, release indicators and suffix ORs.

        An *event* of storage ``r`` at slot ``k`` is a step that reads one of its tensors
        (``r`` or a view of it), or the step that creates it as a storage that outlives the
        step (``sigma``). ``Q[k]`` = some event at a slot >= k; ``F[k]`` = the storage is
        released after step ``k`` (event at ``k``, none later, not carried); ``drop`` = it
        was carried in, has no event and is not carried on, so it goes before step 0.
        """
        m = self.m
        result = {}
        bname = self.stages[t - 1] if t >= 1 else None
        for r, members in self.members.items():
            self.check_time()
            readers: dict[int, set[str] | None] = {}  # slot -> impls that read (None: all)
            for x in members:
                for j in self.idx.forward_readers.get(x, ()):
                    if not self.rho(t, j).is_zero():
                        readers[self.pos[j]] = None
                if t >= 1:
                    for j, impl in self.rr_readers.get(x, ()):
                        k = self.pos[j]
                        if k in readers and readers[k] is None:
                            continue
                        readers.setdefault(k, set()).add(impl)
                    qs = {impl.name for impl in self.bimpls[bname] if x in impl.reads}
                    if qs:
                        readers.setdefault(self.n, set()).update(qs)
            reads: dict[int, Expr] = {}
            for k, impls in readers.items():
                if k == self.n:
                    reads[k] = total(self.z[bname, q] for q in sorted(impls))
                elif impls is None:
                    reads[k] = self.rho(t, self.order[k])
                else:
                    reads[k] = total(self.w(t, self.order[k], p) for p in sorted(impls))
            act = dict(reads)
            sigma = m.and_not(self.produced(t, r), [self.carried(t - 1, r)], f"sigma[{t},{r}]")
            pos_r = self.pos[self.producer[r]]
            if not sigma.is_zero():
                # reads at the creating step are recompute reads of a carried-in copy, so
                # they exclude sigma (which needs the storage not carried in): a plain sum
                act[pos_r] = act.get(pos_r, ZERO) + sigma
            slots = sorted(k for k, v in act.items() if not v.is_zero())
            carry = self.carried(t, r)
            q_next = ZERO
            free: dict[int, Expr] = {}
            q_at: dict[int, Expr] = {}
            for k in reversed(slots):
                f = m.and_not(act[k], [q_next, carry], f"F[{t},{r},{k}]")
                if not f.is_zero():
                    free[k] = f
                q_next = m.either([act[k], q_next], f"Q[{t},{r},{k}]")
                q_at[k] = q_next
            drop = m.and_not(self.carried(t - 1, r), [q_next, carry], f"F[{t},{r},drop]") if t >= 1 else ZERO
            self.strengthen(t, r, reads, sigma, pos_r, slots, free, drop, carry)
            result[r] = {"sigma": sigma, "pos": pos_r, "free": free, "drop": drop, "q": q_at, "slots": slots}
        self.events_by_stage[t] = result
        return result

    def strengthen(self, t, r, reads, sigma, pos_r, slots, free, drop, carry) -> None:
        """Valid rows that integral solutions satisfy anyway but that tighten the LP.

        ``alive(k) = C[t-1,r] - drop + sigma(before k) - sum F(before k)`` is 1 exactly
        when the storage exists before step ``k``. Every read needs it (``alive(k) >=
        reads(k)``), and at the end of the stage it exists exactly when carried
        (``alive(end) = C[t,r]``: conservation of the storage). Without them the LP counts
        a tensor that is half carried and half recomputed at half its size.
        """
        m = self.m
        alive = self.carried(t - 1, r) - drop
        for k in slots:
            if k in reads and not reads[k].is_zero():
                m.le(reads[k], alive, f"alive[{t},{r},{k}]")
            if k == pos_r:
                alive = alive + sigma
            if k in free:
                alive = alive - free[k]
            if len(alive.terms) > 6:
                alive = m.defined(alive, f"A[{t},{r},{k}]", upper=1.0)
        m.eq(alive, carry, f"conserve[{t},{r}]")

    def gradients(self) -> list[Expr]:
        """Gradient memory during each stage's steps (MiB); exact liveness per gradient."""
        m = self.m
        idx = self.idx
        grad = [ZERO for _ in range(self.T + 1)]
        seeds = set(idx.seeds())
        for g, tensor in self.tensors.items():
            if tensor.kind is not TensorKind.GRADIENT:
                continue
            self.check_time()
            if tensor.grad_of is not None and self.tensors[tensor.grad_of].is_fixed:
                continue  # a parameter gradient: a temporary of its writer's step
            writers = [s for s in range(1, self.T + 1) if g in idx.backward_ops[self.stages[s - 1]].outputs]
            seed = g in seeds
            if not seed and not writers:
                continue
            size = tensor.storage_bytes / MIB
            if size == 0:
                continue
            touch = {}
            for s in range(1, self.T + 1):
                b = self.stages[s - 1]
                if s in writers:
                    touch[s] = ONE
                else:
                    touch[s] = _exclusive_or([self.z[b, impl.name] for impl in self.bimpls[b] if g in impl.reads])
            if seed:  # the caller holds a seed from the start of the backward to its end
                for t in range(1, self.T + 1):
                    grad[t] = grad[t] + size
                continue
            first = min(writers) + 1
            tau = {self.T + 1: ZERO}
            for s in range(self.T, first - 1, -1):
                tau[s] = m.either([touch[s], tau[s + 1]], f"tau[{g},{s}]")
            for t in range(first, self.T + 1):
                grad[t] = grad[t] + tau[t] * size
        for t in range(1, self.T + 1):
            if len(grad[t].terms) > 1:
                grad[t] = m.defined(grad[t], f"G[{t}]")
        return grad

    # ------------------------------------------------------------------ in place
    def in_place(self) -> None:
        """An in-place step may not destroy a tensor (or a view of it) that is carried
        through the stage or read by a later step of the stage."""
        m = self.m
        for name in self.order:
            self.check_time()
            k = self.pos[name]
            for impl in self.fimpls[name]:
                if impl.overwrites is None:
                    continue
                x = impl.overwrites
                r = self.root.get(x, x)
                for t in range(0, self.T + 1):
                    wv = self.w(t, name, impl.name)
                    if wv.is_zero():
                        continue
                    m.le(wv + self.carried(t, x), 1.0, f"inplace-carry[{t},{name},{x}]")
                    ev = self.events_by_stage[t].get(r)
                    later = [s for s in ev["slots"] if s > k] if ev is not None else []
                    if later:
                        m.le(wv + ev["q"][later[0]], 1.0, f"inplace-read[{t},{name},{x}]")

    # ------------------------------------------------------------------ objective
    def objective_rows(self) -> None:
        m = self.m
        # one sum over every term: adding term by term copies the growing expression each
        # time, which on a 1,000-node graph (250,000 recomputation columns) took 90 s
        parts: list[Expr] = []
        for name in self.order:
            self.check_time()
            for impl in self.fimpls[name]:
                parts.append(self.y[name, impl.name] * impl.time_us)
                rtime = impl.effective_recompute_time_us
                for t in range(1, self.T + 1):
                    wv = self.w(t, name, impl.name)
                    if not wv.is_zero():
                        parts.append(wv * rtime)
        for name in self.stages:
            for impl in self.bimpls[name]:
                parts.append(self.z[name, impl.name] * impl.time_us)
        compute = total(parts)
        self.compute = compute
        fixed = self.net.fixed_bytes
        self.peak = None
        cap = None
        if self.memory_budget is not None:
            cap = (self.memory_budget - fixed) / MIB
            if cap < 0:
                cap = -1.0  # nothing fits: the rows below make the model infeasible
        if self.objective == "memory":
            self.peak = m.maximum("peak", upper=INF if cap is None else max(cap, 0.0))
        for slot in self.slots:
            if self.peak is not None:
                m.bound_below(self.peak, slot.memory, f"peak[{slot.stage},{slot.op}]")
            if cap is not None:
                m.le(slot.memory, cap, f"budget[{slot.stage},{slot.op}]")
        if cap is not None and cap < 0:
            m.conflicts.append("the budget is below the fixed memory")
        if self.max_overhead is not None and self.baseline_us is not None:
            limit = (1.0 + self.max_overhead + 1e-12) * self.baseline_us
            m.le(compute, limit, "overhead")
        if self.forward_keep_cap is not None:
            kept = total(
                self.size[r] * self.C[0, r]
                for r in self.members
                if r not in self.forward_keep_exempt and (0, r) in self.C and not self.C[0, r].is_const()
            )
            cap = self.forward_keep_cap / MIB
            if not kept.is_const():
                m.le(kept, cap, "forward keep cap")
        m.minimise(self.peak if self.peak is not None else compute)


def _exclusive_or(terms: list[Expr]) -> Expr:
    """OR of 0/1 expressions that can never be 1 together: their sum (deduplicated)."""
    unique: list[Expr] = []
    for term in terms:
        if term.is_zero():
            continue
        if any(term.terms == u.terms and term.const == u.const for u in unique):
            continue
        unique.append(term)
    if any(u.is_one() for u in unique):
        return ONE
    return total(unique)


def build_model(
    network: Network,
    constraints: ResolvedConstraints | None = None,
    *,
    pins: dict[str, tuple[str, ...]] | None = None,
    objective: str = "compute",
    memory_budget: int | None = None,
    max_overhead: float | None = None,
    baseline_us: float | None = None,
    no_recompute_stages: frozenset[int] | set[int] = frozenset(),
    forward_keep_cap: int | None = None,
    forward_keep_exempt: frozenset[str] | set[str] = frozenset(),
    deadline: float | None = None,
) -> JointModel:
    """Build the joint MILP of ``network``.

    ``pins`` restricts implementations further (the Checkmate baseline pins every op to
    one); ``objective`` is ``"compute"`` (minimise compute; ``memory_budget`` bounds every
    step) or ``"memory"`` (minimise the peak; ``max_overhead`` bounds compute).

    Two restrictions serve the hybrid engine's block menus (``monetdsl.search.hybrid``):
    ``no_recompute_stages`` lists stages (1-based, in the canonical backward order) that may
    not recompute anything, and ``forward_keep_cap`` bounds the bytes of the storages the
    forward pass keeps (``forward_keep_exempt`` storages not counted), which trades what a
    block holds between its forward and its backward against its recomputation.

    ``deadline`` (a ``time.perf_counter()`` value): raise :class:`BuildTimeout` when the
    build runs past it.
    """
    if objective not in ("compute", "memory"):
        raise ValueError(f"unknown objective {objective!r}")
    started = time.perf_counter()
    b = _Builder(
        network, constraints, pins, objective, memory_budget, max_overhead, baseline_us,
        no_recompute_stages=frozenset(no_recompute_stages), forward_keep_cap=forward_keep_cap,
        forward_keep_exempt=frozenset(forward_keep_exempt), deadline=deadline,
    )
    b.prepare()
    b.decisions()
    b.events_by_stage = {}
    b.legality()
    b.memory()
    b.in_place()
    b.objective_rows()
    model = JointModel(
        network=network,
        builder=b.m,
        stage_order=b.stages,
        forward_order=b.order,
        tensors=tuple(b.acts),
        y=b.y,
        z=b.z,
        recompute=b.R,
        carry=b.C,
        slots=b.slots,
        compute=b.compute,
        fixed_bytes=network.fixed_bytes,
        objective=objective,
        peak=b.peak,
        memory_cap_bytes=memory_budget,
    )
    m = b.m
    model.stats = {
        "columns": m.num_cols,
        "binaries": sum(m.integer),
        "rows": m.num_rows,
        "nonzeros": sum(len(r) for r in m.row_cols),
        "stages": b.T + 1,
        "forward_ops": b.n,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    return model
