"""The search space restricted to each op's first implementation (PyTorch's own).

A spec lists an op's implementations with PyTorch's first (what autograd keeps); the rest
are the alternatives the joint search may choose. Every schedule of the restricted space
is a schedule of the full one, so the full search should never end worse than the
restricted one. The exact MILP guarantees this by itself; a time-limited heuristic search
over a larger space does not (its block MILPs are larger, so fewer of them finish), which
is why the hybrid engine runs the restricted search as one member of its portfolio and
passes what it found to the full search (:mod:`.hybrid.engine`).

:func:`first_impl_pins` says what the restricted search may use; :func:`reduced_spec`
writes the restricted space as a spec of its own (the "PyTorch only" spec that
benchmarks compare with).

    >>> from monetdsl.grammar.parser import parse_spec
    >>> spec = parse_spec('''
    ... network n
    ...   tensor x f32[64] input
    ...   op pool (x) -> y f32[16]
    ...     impl indices -> y.indices i64[16] time 6us
    ...     impl plain time 5us workspace 256B
    ...     backward reads (grad(y)) -> grad(x)
    ...       impl from_indices reads (y.indices) time 4us
    ...       impl from_input reads (x) time 7us
    ...   output y
    ... ''')
    >>> first_impl_pins(spec.network, {})
    {'pool': ('indices',), 'pool.backward': ('from_indices',)}
    >>> [i.name for i in reduced_spec(spec).network.op("pool").impls], "y.indices" in reduced_spec(spec).network.tensors
    (['indices'], True)
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import Network, Spec

__all__ = ["first_impl_pins", "reduced_spec", "has_alternatives"]


def has_alternatives(network: Network, allowed: dict[str, tuple[str, ...]]) -> bool:
    """Whether some op may run more than one implementation under ``allowed``."""
    ops = (*network.forward_ops, *network.backward_ops)
    return any(len([n for n in op.impl_names if n in allowed.get(op.name, op.impl_names)]) > 1 for op in ops)


def first_impl_pins(network: Network, allowed: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Pins that restrict every op with a choice under ``allowed`` to its first allowed
    implementation (ops that have no choice are absent).

    One exception keeps the restricted space inside ``allowed`` when ``allowed`` has
    dropped dominated backward implementations (:func:`.impl_choice.undominated_backward_impls`):
    a backward op whose first implementation is not allowed is pinned to the allowed ones
    that dominate it (read no more, as fast, allocate no more), which can replace it in any
    schedule without making it slower or larger.
    """
    from .impl_choice import _time_then_bytes

    pins: dict[str, tuple[str, ...]] = {}
    for op in network.forward_ops:
        usable = [n for n in op.impl_names if n in allowed.get(op.name, op.impl_names)]
        if len(usable) > 1:
            pins[op.name] = (usable[0],)
    for bop in network.backward_ops:
        usable = [bop.impl(n) for n in bop.impl_names if n in allowed.get(bop.name, bop.impl_names)]
        if len(usable) < 2:
            continue
        first = bop.impls[0]
        if any(i.name == first.name for i in usable):
            pins[bop.name] = (first.name,)
            continue
        cost = _time_then_bytes(bop, first, network)
        better = [i.name for i in usable
                  if i.reads <= first.reads and all(a <= b for a, b in zip(_time_then_bytes(bop, i, network), cost))]
        pins[bop.name] = tuple(better) or (usable[0].name,)
    return pins


def reduced_spec(spec: Spec) -> Spec:
    """``spec`` with every op reduced to its first implementation: the derived tensors
    only the dropped implementations made are gone, constraints are kept (a pin naming a
    dropped implementation then fails validation, as in a hand-reduced spec)."""
    from ..grammar.parser import parse_spec
    from ..grammar.printer import format_spec

    network = spec.network
    forward = tuple(replace(op, impls=op.impls[:1]) for op in network.forward_ops)
    backward = tuple(replace(op, impls=op.impls[:1]) for op in network.backward_ops)
    dropped = {d for op in network.forward_ops for impl in op.impls[1:] for d in impl.derived}
    dropped -= {d for op in forward for d in op.impls[0].derived}
    tensors = {name: t for name, t in network.tensors.items() if name not in dropped}
    reduced = Network(network.name, tensors, forward, backward, network.outputs, network.fixed)
    return parse_spec(format_spec(replace(spec, network=reduced)), path=spec.path)
