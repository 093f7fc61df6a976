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

from ..graph import index
from ..ir import Network

__all__ = ["cheapest_impls", "no_recompute_compute_us"]


def cheapest_impls(network: Network, allowed: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """The cheapest no-recompute implementation of every op (forward and backward).

    ``allowed`` restricts ops to the listed implementations (constraints' pins).
    """
    allowed = allowed or {}
    idx = index(network)
    chosen: dict[str, str] = {}
    derived_available: set[str] = set()

    def usable(op) -> list:
        names = allowed.get(op.name, op.impl_names)
        return [op.impl(n) for n in op.impl_names if n in names]

    for name in idx.forward_order:
        op = idx.forward_ops[name]
        candidates = usable(op)
        out_of_place = [i for i in candidates if i.overwrites is None]
        candidates = out_of_place or candidates
        attached = [idx.backward_ops[b] for b in idx.backward_of.get(name, ())]
        best = None
        for order, impl in enumerate(candidates):
            produced = set(impl.derived)
            total = impl.time_us
            picks = {}
            feasible = True
            for bop in attached:
                options = [
                    b for b in usable(bop)
                    if all(_available(r, network, idx, produced | derived_available) for r in b.reads)
                ]
                if not options:
                    feasible = False
                    break
                pick = min(options, key=lambda b: b.time_us)
                picks[bop.name] = pick.name
                total += pick.time_us
            if not feasible:
                continue
            key = (total, order)
            if best is None or key < best[0]:
                best = (key, impl, picks)
        if best is None:  # nothing satisfies every attached backward: fall back to the first usable impls
            impl = candidates[0]
            picks = {b.name: usable(b)[0].name for b in attached}
        else:
            _, impl, picks = best
        chosen[name] = impl.name
        derived_available.update(impl.derived)
        chosen.update(picks)
    for bop in network.backward_ops:
        if bop.name in chosen:
            continue
        options = usable(bop)
        ready = [b for b in options if all(_available(r, network, idx, derived_available) for r in b.reads)]
        chosen[bop.name] = min(ready or options, key=lambda b: b.time_us).name
    return chosen


def _available(name: str, network: Network, idx, derived: set[str]) -> bool:
    if name in idx.derived_by:
        return name in derived
    return True


def no_recompute_compute_us(network: Network, impls: dict[str, str] | None = None) -> float:
    """Total time of running every op once with ``impls`` (default: the cheapest)."""
    impls = impls if impls is not None else cheapest_impls(network)
    total = 0.0
    for op in itertools.chain(network.forward_ops, network.backward_ops):
        total += op.impl(impls.get(op.name, op.impls[0].name)).time_us
    return total
