"""Which implementation each op uses when nothing is recomputed.

The *baseline* against which every overhead is measured is the cheapest schedule that
recomputes nothing: every op runs once, with the implementations that minimise total
time. Implementations interact only through derived tensors (a mask costs forward time
and saves backward time), so the choice is made per forward op together with the
backward ops attached to it. In-place implementations are left out when an
out-of-place one exists: overwriting is a memory optimisation, never a speed-up worth
its legality constraints in a no-recompute schedule.

    >>> from monetdsl.grammar.parser import parse_spec
    >>> spec = parse_spec('''
    ... network n
    ...   tensor x f32[8] input
    ...   op relu (x) -> y f32[8]
    ...     impl plain time 4us
    ...     impl mask -> y.mask u1[8] time 5us
    ...     backward reads (grad(y)) -> grad(x)
    ...       impl from_output reads (y) time 9us
    ...       impl from_mask reads (y.mask) time 3us
    ...   output y
    ... ''')
    >>> cheapest_impls(spec.network)
    {'relu': 'mask', 'relu.backward': 'from_mask'}
"""
from __future__ import annotations

import itertools
import math

from ..graph import index
from ..ir import Network

__all__ = ["cheapest_impls", "first_impls", "no_recompute_compute_us", "undominated_backward_impls"]


def first_impls(network: Network) -> dict[str, str]:
    """Every op's first implementation: PyTorch's own, what autograd does."""
    return {op.name: op.impls[0].name for op in (*network.forward_ops, *network.backward_ops)}


def cheapest_impls(network: Network, allowed: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """The cheapest no-recompute implementation of every op (forward and backward).

    ``allowed`` restricts ops to the listed implementations (constraints' pins). Between
    equally fast backward implementations the one that allocates less wins, workspace and
    new outputs together (a compute-bound step's roofline time does not see its
    temporaries' traffic). First
    each forward op is chosen together with its attached backward ops; then backward
    ops that read a derived tensor of *another* op are repaired, by switching either the
    backward implementation or the producer's implementation, whichever costs less.
    """
    allowed = allowed or {}
    idx = index(network)

    def usable(op) -> list:
        names = allowed.get(op.name, op.impl_names)
        return [op.impl(n) for n in op.impl_names if n in names]

    def obtainable(name: str, own_op: str, produced: set[str]) -> bool:
        if name not in idx.derived_by:
            return True
        owner, producers = idx.derived_by[name]
        if owner == own_op:
            return name in produced
        return any(i.name in producers for i in usable(idx.forward_ops[owner]))

    chosen: dict[str, str] = {}
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        candidates = usable(op)
        candidates = [i for i in candidates if i.overwrites is None] or candidates
        attached = [idx.backward_ops[b] for b in idx.backward_of.get(name, ())]
        best = None
        for order, impl in enumerate(candidates):
            produced = set(impl.derived)
            total, picks = impl.time_us, {}
            for bop in attached:
                options = [b for b in usable(bop) if all(obtainable(r, name, produced) for r in b.reads)]
                if not options:
                    break
                pick = min(options, key=lambda b: _time_then_bytes(bop, b, network))  # equally fast: the leaner
                picks[bop.name] = pick.name
                total += pick.time_us
            else:
                if best is None or (total, order) < best[0]:
                    best = ((total, order), impl, picks)
        if best is None:  # no combination works locally: the repair below sorts it out
            chosen[name] = candidates[0].name
            chosen.update({b.name: usable(b)[0].name for b in attached})
        else:
            chosen[name] = best[1].name
            chosen.update(best[2])
    for bop in network.backward_ops:
        chosen.setdefault(bop.name, min(usable(bop), key=lambda b: _time_then_bytes(bop, b, network)).name)
    _repair_derived_reads(network, idx, chosen, usable)
    return chosen


def undominated_backward_impls(network: Network, allowed: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """The backward implementations a search needs to consider: for every backward op
    whose usable implementations (``allowed``, else all) include dominated ones, those no
    other dominates. Ops where nothing is dominated are absent.

    ``a`` dominates ``b`` when it reads a subset of what ``b`` reads, takes no more time
    and allocates no more (workspace and new outputs): a schedule running ``b`` stays
    valid with ``a`` in its place (everything ``a`` reads is there) and is no slower and
    no larger at any step (``a``'s step allocates no more, and what only ``b`` read may be
    released earlier). So dropping ``b`` keeps every optimum, and a search over fewer
    alternatives goes further in the same time (an ``into_grad`` weight gradient, as fast
    as the default on the roofline, dominates it). Of identical ones the first stays.

    >>> from monetdsl.grammar import parse_spec
    >>> spec = parse_spec(\"\"\"
    ... network n
    ...   tensor x f32[8] input
    ...   tensor w f32[64] param
    ...   op a (x, w) -> y f32[8] time 1us
    ...     backward wgrad reads (grad(y), x) -> grad(w)
    ...       impl default time 2us
    ...       impl into_grad time 2us workspace 16B accumulates (grad(w))
    ...   output y
    ... \"\"\")
    >>> undominated_backward_impls(spec.network)
    {'a.wgrad': ('into_grad',)}
    """
    allowed = allowed or {}
    result: dict[str, tuple[str, ...]] = {}
    for bop in network.backward_ops:
        names = allowed.get(bop.name, bop.impl_names)
        impls = [bop.impl(n) for n in bop.impl_names if n in names]
        if len(impls) < 2:
            continue
        costs = [_time_then_bytes(bop, i, network) for i in impls]

        def dominates(j: int, k: int) -> bool:
            a, b = impls[j], impls[k]
            if not (a.reads <= b.reads and costs[j][0] <= costs[k][0] and costs[j][1] <= costs[k][1]):
                return False
            return a.reads != b.reads or costs[j] != costs[k] or j < k

        kept = tuple(impls[k].name for k in range(len(impls)) if not any(dominates(j, k) for j in range(len(impls)) if j != k))
        if len(kept) < len(impls):
            result[bop.name] = kept
    return result


def _time_then_bytes(bop, impl, network: Network) -> tuple[float, int]:
    """Sort key of backward implementations: time, then the bytes the step allocates."""
    return impl.time_us, impl.workspace + bop.new_output_bytes(impl, network.tensors)


def _satisfied(reads, idx, chosen: dict[str, str]) -> bool:
    for name in reads:
        if name in idx.derived_by:
            owner, producers = idx.derived_by[name]
            if chosen[owner] not in producers:
                return False
    return True


def _owner_switch(reads, idx, chosen, usable) -> dict | None:
    """Implementations of the producers that make every derived tensor in ``reads`` exist."""
    needs: dict[str, set[str]] = {}
    for name in reads:
        if name in idx.derived_by:
            owner, producers = idx.derived_by[name]
            needs.setdefault(owner, set(producers))
            needs[owner] &= set(producers)
    switch = {}
    for owner, producers in needs.items():
        options = [i for i in usable(idx.forward_ops[owner]) if i.name in producers]
        if not options:
            return None
        options.sort(key=lambda i: (i.overwrites is not None, i.time_us))
        switch[owner] = options[0]
    return switch


def _repair_derived_reads(network: Network, idx, chosen: dict[str, str], usable) -> None:
    for _ in range(len(network.backward_ops) + 1):
        changed = False
        for bop in network.backward_ops:
            if _satisfied(bop.impl(chosen[bop.name]).reads, idx, chosen):
                continue
            options = [b for b in usable(bop) if _satisfied(b.reads, idx, chosen)]
            if options:
                chosen[bop.name] = min(options, key=lambda b: b.time_us).name
                changed = True
                continue
            best = None
            for impl in usable(bop):
                switch = _owner_switch(impl.reads, idx, chosen, usable)
                if switch is None:
                    continue
                extra = sum(new.time_us - idx.forward_ops[o].impl(chosen[o]).time_us for o, new in switch.items())
                if best is None or impl.time_us + extra < best[0]:
                    best = (impl.time_us + extra, impl, switch)
            if best is not None:
                chosen[bop.name] = best[1].name
                chosen.update({owner: impl.name for owner, impl in best[2].items()})
                changed = True
        if not changed:
            return


def no_recompute_compute_us(network: Network, impls: dict[str, str] | None = None) -> float:
    """Total time of running every op once with ``impls`` (default: the cheapest)."""
    impls = impls if impls is not None else cheapest_impls(network)
    ops = itertools.chain(network.forward_ops, network.backward_ops)
    return math.fsum(op.impl(impls.get(op.name, op.impls[0].name)).time_us for op in ops)
