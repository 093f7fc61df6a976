"""Lower bounds that hold for every schedule, cheap enough for any graph size.

When the exact MILP is too large to run, these are the bounds the hybrid engine reports
(and its gaps are measured against them); they are weak but true:

* **compute**: every forward and every backward op runs at least once, each with some
  implementation, so the sum of each op's fastest implementation bounds the compute of
  any schedule (recomputation only adds);
* **peak**: every forward op runs in the forward pass and every backward op in its stage,
  and at that step its inputs (reads), its outputs and its workspace are all allocated,
  the network outputs produced so far are held, and fixed memory is resident; the least
  such amount over the op's implementations, maximised over the ops, bounds the peak of
  any schedule.

    >>> from monetdsl.grammar import load_spec
    >>> import pathlib
    >>> spec = load_spec(pathlib.Path(__file__).parents[3] / "specs" / "resblock.monet")
    >>> compute_lower_bound(spec.network) <= 9000.0 and peak_lower_bound(spec.network) > spec.network.fixed_bytes
    True
"""
from __future__ import annotations

import math

from ...graph import index, storage_root
from ...ir import Network, TensorKind

__all__ = ["compute_lower_bound", "peak_lower_bound"]


def compute_lower_bound(network: Network, allowed: dict[str, tuple[str, ...]] | None = None) -> float:
    """Sum over ops of the fastest allowed implementation (us)."""
    allowed = allowed or {}
    total = []
    for op in (*network.forward_ops, *network.backward_ops):
        names = allowed.get(op.name, op.impl_names)
        total.append(min(op.impl(n).time_us for n in names))
    return math.fsum(total)


def peak_lower_bound(network: Network, allowed: dict[str, tuple[str, ...]] | None = None) -> int:
    """Fixed memory plus the least memory the most demanding step needs (bytes)."""
    allowed = allowed or {}
    idx = index(network)
    tensors = network.tensors

    def storage(names) -> int:
        roots = set()
        for n in names:
            r = storage_root(network, n)
            t = tensors[r]
            if not t.is_fixed and t.kind is not TensorKind.GRADIENT:
                roots.add(r)
        return sum(tensors[r].storage_bytes for r in roots)

    outputs = list(network.outputs)
    produced_at = {o: idx.position.get(idx.producing_op(o), -1) for o in outputs}
    worst = 0
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        pos = idx.position[name]
        held = [o for o in outputs if produced_at[o] < pos]
        best = None
        for impl in op.impls:
            if impl.name not in allowed.get(name, op.impl_names):
                continue
            alloc = 0
            for j, out in enumerate((*op.outputs, *impl.derived)):
                if tensors[out].view_of is not None or (j == 0 and impl.overwrites is not None):
                    continue
                alloc += tensors[out].storage_bytes
            need = storage([*op.inputs, *held]) + alloc + impl.workspace
            best = need if best is None else min(best, need)
        worst = max(worst, best or 0)
    for bop in network.backward_ops:
        best = None
        for impl in bop.impls:
            if impl.name not in allowed.get(bop.name, bop.impl_names):
                continue
            grads = {r for r in impl.reads if tensors[r].kind is TensorKind.GRADIENT}
            grad_bytes = sum(tensors[g].storage_bytes for g in grads)
            outs = bop.new_output_bytes(impl, tensors)
            need = storage([*impl.reads, *outputs]) + grad_bytes + outs + impl.workspace
            best = need if best is None else min(best, need)
        worst = max(worst, best or 0)
    return network.fixed_bytes + worst
