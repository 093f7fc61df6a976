"""The chain of blocks as the DP sees it, and a DP plan as a schedule of the whole network.

:class:`ChainModel` measures, in bytes, everything the recursion of :mod:`.chain_dp`
checks, from the decomposition, the block sub-networks and their menus:

* what is held around a block: the checkpoint before block ``j`` (the storages crossing
  that cut), of which the block's own inputs are already counted inside the block's
  option, so only the rest (tensors passing by to later blocks) is added;
* what an option keeps beyond the next checkpoint (``ha``), what an old checkpoint holds
  beyond a newer one (``hb``): set differences of storages, so a tensor crossing several
  cuts (a UNet skip) is counted once;
* gradients alive during a block's backward that the block's sub-network does not model
  (produced by later blocks for earlier ones: a long skip's gradient) and the gradients
  alive when a recomputation runs at the start of a block's backward; the network outputs,
  which the caller holds to the end;
* a reserve for the tensors that a re-run of a block's forward reads back and cannot
  recompute (saved statistics, dropout seeds), counted everywhere: tiny, and safe.

:meth:`ChainModel.problem` rounds every quantity up to whole memory units, so the DP's
accounting is an upper bound up to the rounding; the simulator measures the schedule
:meth:`ChainModel.schedule` composes from a plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...graph import index, storage_root
from ...ir import Network, Schedule, TensorKind
from .chain_dp import ChainProblem, Plan
from .compose import schedule_from_recomputes
from .decompose import Decomposition
from .menus import BlockMenu, Option
from .subnet import BlockNet

__all__ = ["ChainModel", "PlanChoice"]


@dataclass
class PlanChoice:
    """A plan unrolled: the option of every block and the re-runs of block forwards."""

    options: list[int]
    reruns: list[tuple[int, int, str]]  # (stage index, block, "all" | "none")


class ChainModel:
    """Byte-level data of the chain (see the module docstring)."""

    def __init__(self, network: Network, decomposition: Decomposition, nets: list[BlockNet], menus: dict[str, BlockMenu]):
        self.network = network
        self.idx = index(network)
        self.blocks = decomposition.blocks
        self.nets = nets
        self.L = len(self.blocks)
        self.options: list[list[Option]] = [list(menus[bn.fingerprint].options) for bn in nets]
        self.fixed = network.fixed_bytes
        tensors = network.tensors
        self._root_cache: dict[str, str | None] = {}

        self.cut: list[frozenset[str]] = [self.roots(b.crossing) for b in self.blocks]  # after block j
        self.inputs: list[frozenset[str]] = []
        for bn in nets:
            names = [bn.to_global[t] for t in bn.inputs]
            self.inputs.append(self.roots(names))
        self.before = [frozenset()] + self.cut[:-1]  # checkpoint before block j
        order = self.idx.backward_order
        where = {b: i for i, b in enumerate(order)}
        self.first_stage = [where[b.backward_ops[0]] for b in self.blocks]
        self.last_stage = [where[b.backward_ops[-1]] for b in self.blocks]
        # network outputs: held by the caller from their production to the end
        produced_in = {}
        for j, b in enumerate(self.blocks):
            for op in b.forward_ops:
                for o in self.idx.forward_ops[op].outputs:
                    produced_in[o] = j
        outs = [(o, produced_in.get(o, self.L - 1)) for o in network.outputs]
        out_size = {o: tensors[storage_root(network, o)].storage_bytes for o, _ in outs}
        self.outputs_total = sum(out_size.values())
        self.out_before = [sum(out_size[o] for o, j in outs if j < k) for k in range(self.L)]
        self.out_elsewhere = [sum(out_size[o] for o, j in outs if j != k) for k in range(self.L)]
        self._gradients(order, where)
        self.reserve = sum(max((o.sticky_bytes for o in opts), default=0) for opts in self.options)
        self.passing = [self.nbytes(self.before[j] - self.inputs[j]) for j in range(self.L)]

    # ------------------------------------------------------------------ helpers
    def root(self, name: str) -> str | None:
        if name not in self._root_cache:
            r = storage_root(self.network, name)
            t = self.network.tensors[r]
            self._root_cache[name] = None if t.is_fixed or t.storage_bytes == 0 else r
        return self._root_cache[name]

    def roots(self, names) -> frozenset[str]:
        return frozenset(r for r in (self.root(n) for n in names) if r is not None)

    def nbytes(self, roots) -> int:
        return sum(self.network.tensors[r].storage_bytes for r in roots)

    def _gradients(self, order, where) -> None:
        """Gradient liveness (first writer to last toucher, any implementation) per block."""
        net = self.network
        tensors = net.tensors
        seeds = set(self.idx.seeds())
        touch: dict[str, list[int]] = {}
        writers: dict[str, list[int]] = {}
        for i, name in enumerate(order):
            bop = self.idx.backward_ops[name]
            for o in bop.outputs:
                writers.setdefault(o, []).append(i)
                touch.setdefault(o, []).append(i)
            for impl in bop.impls:
                for r in impl.reads:
                    if tensors[r].kind is TensorKind.GRADIENT:
                        touch.setdefault(r, []).append(i)
        intervals = []
        for g, ts in touch.items():
            t = tensors[g]
            if t.grad_of is not None and tensors[t.grad_of].is_fixed:
                continue  # parameter gradients: temporaries of their writer's step
            if t.storage_bytes == 0:
                continue
            born = -1 if g in seeds else min(writers.get(g, [max(ts)]))
            intervals.append((born, max(ts), t.storage_bytes, set(ts)))
        self.grad_pass = []
        self.grad_start = []
        for j in range(self.L):
            lo, hi = self.first_stage[j], self.last_stage[j]
            inside = set(range(lo, hi + 1))
            passing = sum(size for born, end, size, ts in intervals if born < lo and end > hi and not (ts & inside))
            start = sum(size for born, end, size, ts in intervals if born < lo and end >= lo)
            self.grad_pass.append(passing)
            self.grad_start.append(start)

    # ------------------------------------------------------------------ the DP's numbers
    def _saved_roots(self, j: int, option: Option) -> frozenset[str]:
        bn = self.nets[j]
        return self.roots(bn.to_global[t] for t in option.keep)

    def quantities(self) -> dict:
        """Every memory figure of the DP in bytes (before rounding), and the compute."""
        L = self.L
        omax = max((len(o) for o in self.options), default=1)
        q = {k: np.zeros((L, max(omax, 1)), dtype=np.int64) for k in ("a0", "ar", "bm", "ha")}
        c = {k: np.zeros((L, max(omax, 1))) for k in ("ca0", "car", "cb")}
        fresh = np.zeros((L, max(omax, 1)), dtype=bool)
        none_peak0 = np.zeros(L, dtype=np.int64)
        none_peakr = np.zeros(L, dtype=np.int64)
        none_t0 = np.zeros(L)
        none_tr = np.zeros(L)
        passing = self.passing
        for j, opts in enumerate(self.options):
            for o, opt in enumerate(opts):
                q["a0"][j, o] = passing[j] + opt.fwd_peak + self.out_before[j]
                q["ar"][j, o] = passing[j] + opt.fwd_peak + 2 * opt.sticky_bytes
                q["bm"][j, o] = passing[j] + opt.bwd_peak + self.grad_pass[j] + self.out_elsewhere[j]
                q["ha"][j, o] = self.nbytes((self.before[j] | self._saved_roots(j, opt)) - self.cut[j])
                c["ca0"][j, o] = opt.fwd_time
                c["car"][j, o] = opt.reforward_time
                c["cb"][j, o] = opt.bwd_time
                fresh[j, o] = opt.fresh
            if opts:
                none_peak0[j] = max(o.none_peak for o in opts)
                none_peakr[j] = max(o.none_peak + 2 * o.sticky_bytes for o in opts)
                none_t0[j] = max(o.fwd_time for o in opts)
                none_tr[j] = max(o.none_reforward_time for o in opts)
        fn0 = np.zeros((L, L + 1), dtype=np.int64)
        fnr = np.zeros((L, L + 1), dtype=np.int64)
        hb = np.zeros((L, L + 1), dtype=np.int64)
        cfn0 = np.zeros((L, L + 1))
        cfnr = np.zeros((L, L + 1))
        for s in range(L):
            m0 = mr = 0
            t0 = tr = 0.0
            for s2 in range(s + 1, L + 1):
                k = s2 - 1
                held = self.nbytes((self.before[s] | self.before[k]) - self.inputs[k])
                m0 = max(m0, held + none_peak0[k] + self.out_before[k])
                mr = max(mr, held + none_peakr[k])
                t0 += none_t0[k]
                tr += none_tr[k]
                fn0[s, s2], fnr[s, s2], cfn0[s, s2], cfnr[s, s2] = m0, mr, t0, tr
                hb[s, s2] = self.nbytes(self.before[s] - self.before[s2]) if s2 < L else 0
        g = np.array([self.grad_start[t] + self.outputs_total for t in range(L)], dtype=np.int64)
        pinned = np.array([bn.pinned for bn in self.nets], dtype=bool)
        nopt = np.array([len(o) for o in self.options], dtype=np.int64)
        return dict(nopt=nopt, **q, **c, fresh=fresh, fn0=fn0, fnr=fnr, hb=hb, cfn0=cfn0, cfnr=cfnr, g=g, pinned=pinned)

    def problem(self, unit: int, slots: int, data: dict | None = None) -> ChainProblem:
        """The DP's problem with memory in units of ``unit`` bytes, rounded up."""
        data = data if data is not None else self.quantities()

        def units(a):
            return np.ceil(np.asarray(a, dtype=np.float64) / unit).astype(np.int64)

        return ChainProblem(
            L=self.L, S=slots, nopt=data["nopt"],
            a0=units(data["a0"]), ar=units(data["ar"]), bm=units(data["bm"]), ha=units(data["ha"]),
            ca0=data["ca0"], car=data["car"], cb=data["cb"], fresh=data["fresh"],
            fn0=units(data["fn0"]), fnr=units(data["fnr"]), hb=units(data["hb"]),
            cfn0=data["cfn0"], cfnr=data["cfnr"], g=units(data["g"]), pinned=data["pinned"],
        )

    # ------------------------------------------------------------------ plan -> schedule
    def unroll(self, plan: Plan) -> PlanChoice:
        options = [-1] * self.L
        reruns: list[tuple[int, int, str]] = []

        def walk(node, stage: int | None) -> None:
            kind = node[0]
            if kind == "single":
                _, t, o = node
                options[t] = o
                return
            if kind == "keep":
                _, s, t, o, inner = node
                options[s] = o
                if stage is not None:
                    reruns.append((stage, s, "all"))
                walk(inner, stage)
                return
            _, s, t, s2, right, left = node
            if stage is not None:
                reruns.extend((stage, k, "none") for k in range(s, s2))
            walk(right, stage)
            walk(left, self.first_stage[s2 - 1])

        walk(plan, None)
        if any(o < 0 for o in options):  # pragma: no cover - every plan covers every block
            raise ValueError("a plan left a block without an option")
        return PlanChoice(options, reruns)

    def schedule(self, plan: Plan, *, spec_path: str, fingerprint: str) -> Schedule:
        """The whole network's schedule for ``plan`` (carries by liveness)."""
        choice = self.unroll(plan)
        impls: dict[str, str] = {}
        lists: list[list[str]] = [[] for _ in self.idx.backward_order]
        for j, o in enumerate(choice.options):
            bn, opt = self.nets[j], self.options[j][o]
            for op, impl in opt.impls:
                impls[bn.to_global[op]] = impl
            for k, ops in enumerate(opt.recomputes):
                lists[self.first_stage[j] + k].extend(bn.to_global[x] for x in ops)
        for stage, k, mode in choice.reruns:
            bn, opt = self.nets[k], self.options[k][choice.options[k]]
            ops = opt.reforward_ops if mode == "all" else opt.none_reforward_ops
            lists[stage].extend(bn.to_global[x] for x in ops)
        return schedule_from_recomputes(self.network, impls, lists, spec_path=spec_path, fingerprint=fingerprint)

    def targets(self, problem: ChainProblem, plan: Plan, m: int, unit: int) -> dict[str, tuple[BlockNet, list]]:
        """Per block kind, the (sub-network budget, saved cap, fresh) that ``plan`` at ``m``
        units leaves each of its blocks: the budgets at which a block option would fit
        exactly where the plan uses the block (the engine solves them and runs the DP again).
        """
        requests: dict[str, tuple[BlockNet, list]] = {}

        def ask(j: int, room: int, cap: int | None, fresh: bool) -> None:
            bn = self.nets[j]
            if room <= 0:
                return
            entry = requests.setdefault(bn.fingerprint, (bn, []))
            item = (bn.network.fixed_bytes + room, cap, fresh)
            if item not in entry[1]:
                entry[1].append(item)

        def walk(node, m: int) -> None:
            kind = node[0]
            avail = m * unit
            if kind == "single":
                _, t, o = node
                bwd = avail - self.passing[t] - self.grad_pass[t] - self.out_elsewhere[t]
                if t == self.L - 1:
                    ask(t, min(bwd, avail - self.passing[t] - self.out_before[t]), None, False)
                else:
                    ask(t, bwd, None, True)
                return
            if kind == "keep":
                _, s, t, o, inner = node
                opt = self.options[s][o]
                bwd = avail - self.passing[s] - self.grad_pass[s] - self.out_elsewhere[s]
                if t == self.L - 1:
                    fwd = avail - self.passing[s] - self.out_before[s]
                else:
                    fwd = avail - self.passing[s] - int(problem.g[t]) * unit - 2 * opt.sticky_bytes
                ask(s, min(bwd, fwd), opt.saved, False)
                walk(inner, m - int(problem.ha[s, o]))
                return
            _, s, t, s2, right, left = node
            walk(right, m - int(problem.hb[s, s2]))
            walk(left, m)

        walk(plan, m)
        return requests

    def predicted_peak(self, need_units: int, unit: int) -> int:
        return self.fixed + self.reserve + need_units * unit

    @staticmethod
    def unit_for(span: int, slots: int) -> int:
        """Bytes per memory unit so that ``slots`` units cover ``span`` bytes."""
        return max(1, int(math.ceil(max(span, 1) / slots)))
