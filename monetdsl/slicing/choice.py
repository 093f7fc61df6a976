"""Which runs to turn into batch-sliced segments: the widest blocks, within a time allowance.

A segment cannot keep anything inside its run, so its backward always recomputes the run's
forward: slicing costs that forward's time whatever the search then does. The segments
worth that price are the blocks that hold a network's largest step (VGG-16's first block,
where one op holds its 2.1 GiB input and output at once). :func:`widest_blocks` takes the
candidate blocks (:func:`.runs.blocks` of every per-sample run) by the size of their largest
single-op step, the largest first, while their recomputed forwards fit in ``allowance_us``
(the benchmark gives it the whole overhead cap: the search then spends what is left of the
cap on checkpointing the rest) and while the block is wider than every op that no block
holds (a batch norm between two convolutions holds its input and output too: slicing
blocks narrower than that cannot lower the floor, only cost their recomputation).
:func:`with_widest_segments` applies that choice to a spec with the default allowance, 10 %
of the spec's no-recompute time: what ``monetdsl trace`` writes unless told not to, and
what ``monetdsl slice`` writes without ``--segments``.
"""
from __future__ import annotations

import math
from typing import Callable

from ..ir import Network, Spec
from .runs import Run, block_width, blocks, per_sample_runs
from .segment import DEFAULT_KERNEL_FEE_US, sliced_spec

__all__ = ["DEFAULT_ALLOWANCE", "fastest_step_us", "widest_blocks", "with_widest_segments", "op_by_op_bound"]

#: the recomputation the default choice may force, as a fraction of the no-recompute time
DEFAULT_ALLOWANCE = 0.10


def widest_blocks(network: Network, allowance_us: float, max_blocks: int | None = None,
                  accept: Callable[[Run], bool] | None = None) -> list[Run]:
    """Blocks to slice, widest first, whose forwards together take at most ``allowance_us``.

    Stops at the first block that does not fit (a narrower one would not lower the floor
    the wider one sets), at the first no wider than an op outside every block, and after
    ``max_blocks``. ``accept``: which candidate blocks the caller can run as segments (the
    runtime's lowering: :mod:`monetdsl.runtime.segment_steps`); the others stay op by op
    and count among the ops outside every block."""
    candidates = [piece for run in per_sample_runs(network) for piece in blocks(network, run)
                  if accept is None or accept(piece)]
    candidates.sort(key=lambda run: -block_width(network, run))
    in_blocks = {name for run in candidates for name in run.ops}
    floor = max((_op_width(network, op) for op in network.forward_ops if op.name not in in_blocks), default=0)
    chosen: list[Run] = []
    spent = 0.0
    for run in candidates:
        if (max_blocks is not None and len(chosen) >= max_blocks) or block_width(network, run) <= floor:
            break
        forward_us = sum(network.op(name).impls[0].time_us for name in run.ops)
        if spent + forward_us > allowance_us:
            break
        chosen.append(run)
        spent += forward_us
    chosen.sort(key=lambda run: [op.name for op in network.forward_ops].index(run.ops[0]))
    return chosen


def with_widest_segments(spec: Spec, allowance: float = DEFAULT_ALLOWANCE, slice_counts=None,
                         kernel_fee_us: float = DEFAULT_KERNEL_FEE_US,
                         accept: Callable[[Run], bool] | None = None) -> tuple[Spec, list[Run]]:
    """``spec`` with :func:`widest_blocks` (within ``allowance`` of its no-recompute time,
    among the blocks ``accept`` lets through) as batch-sliced segments offering
    ``slice_counts`` (default: :func:`.segment.offered_costs`' choice) at ``kernel_fee_us``
    per op and extra slice, and those blocks; ``spec`` itself when no block qualifies."""
    runs = widest_blocks(spec.network, allowance * fastest_step_us(spec.network), accept=accept)
    return (sliced_spec(spec, runs, slice_counts, kernel_fee_us), runs) if runs else (spec, [])


def fastest_step_us(network: Network) -> float:
    """The time of a training step that recomputes nothing, every op at its fastest
    implementation: the base of the allowance. (The searches' own no-recompute baseline
    also repairs choices whose derived tensors do not match; that is at least this, so
    the allowance never lets more recomputation through than the caps the searches see.)"""
    return math.fsum(min(impl.time_us for impl in op.impls) for op in (*network.forward_ops, *network.backward_ops))


def _op_width(network: Network, op) -> int:
    """Bytes of an op's non-fixed inputs and outputs: what its step holds at least."""
    tensors = network.tensors
    return sum(tensors[name].storage_bytes for name in (*op.inputs, *op.outputs) if not tensors[name].is_fixed)


def op_by_op_bound(network: Network) -> int:
    """A lower bound, above fixed memory, of every schedule of ``network``'s ops: each op
    holds its non-fixed inputs (a backward op: its implementation's reads), its outputs
    and its workspace at once, with the implementation that needs least. A budget below
    it needs a segment (whose op holds one slice's working set)."""
    tensors = network.tensors

    def held(op, impl) -> int:
        reads = op.inputs if hasattr(op, "inputs") else impl.reads
        return sum(tensors[n].storage_bytes for n in (*reads, *op.outputs) if not tensors[n].is_fixed) + impl.workspace

    return max(min(held(op, impl) for impl in op.impls) for op in (*network.forward_ops, *network.backward_ops))
