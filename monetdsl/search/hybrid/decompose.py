"""Cut a network into a chain of blocks, and find blocks that are the same.

The hybrid engine solves each *kind* of block once with the exact MILP and joins the
blocks with a dynamic program, so the cuts decide both how small the sub-problems are and
how much memory crosses between them. A cut after forward position ``k`` is crossed by
every forward tensor produced at or before ``k`` that a later step reads: a later forward
op, or a backward op attached to a later forward op. A chain cuts at a single tensor; a
residual block at its sum; a UNet's long skips cross many cuts, and those cuts simply
carry several tensors.

Blocks are contiguous ranges of the forward order, built front to back: each block ends at
the cut, among those that leave it between ``min_ops`` and ``max_ops`` forward ops, that
carries the fewest bytes (then the fewest tensors, then the one nearest ``target_ops``).
Repeated structure (transformer layers, residual stages) has equally cheap cuts at the
same places, so repeated blocks come out identical and are solved once.

    >>> from monetdsl.grammar import load_spec
    >>> import pathlib
    >>> spec = load_spec(pathlib.Path(__file__).parents[3] / "specs" / "tiny_gpt.monet")
    >>> parts = decompose(spec.network, target_ops=8)
    >>> sum(len(b.forward_ops) for b in parts.blocks) == len(spec.network.forward_ops)
    True
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ...graph import index
from ...ir import Network

__all__ = ["Block", "Decomposition", "decompose", "crossing_tensors"]


@dataclass(frozen=True)
class Block:
    """A contiguous range of forward ops with their backward ops.

    ``inputs`` are forward tensors produced before the block that the block reads;
    ``outputs`` are tensors the block produces that later blocks read; ``crossing`` are all
    tensors alive across the cut after the block (its outputs and older ones passing by).
    """

    index: int
    forward_ops: tuple[str, ...]
    backward_ops: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    crossing: tuple[str, ...]
    signature: str = field(compare=False, default="")


@dataclass(frozen=True)
class Decomposition:
    """Blocks in forward order, and which blocks are identical (same ``kind``)."""

    blocks: tuple[Block, ...]
    kinds: tuple[int, ...]  # kinds[i] = index of the first block identical to block i

    def block_of(self, op: str) -> int:
        for block in self.blocks:
            if op in block.forward_ops or op in block.backward_ops:
                return block.index
        raise KeyError(op)

    @property
    def distinct(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.kinds)))


def _users(network: Network) -> dict[str, int]:
    """For each forward tensor, the last forward position that needs it (forward or backward)."""
    idx = index(network)
    last: dict[str, int] = {}
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        pos = idx.position[name]
        for tensor in op.inputs:
            last[tensor] = max(last.get(tensor, -1), pos)
        for impl in op.impls:
            for tensor in impl.recompute_reads:
                last[tensor] = max(last.get(tensor, -1), pos)
    for bop in network.backward_ops:
        anchor = idx.position.get(bop.of, -1) if bop.of is not None else -1
        reads = set().union(*(impl.reads for impl in bop.impls))
        if anchor < 0:  # a plain-DAG backward op belongs where its latest forward read is produced
            anchor = max((idx.position[idx.producing_op(r)] for r in reads if idx.producing_op(r) in idx.position), default=-1)
        for tensor in reads:
            last[tensor] = max(last.get(tensor, -1), anchor)
    return last


def crossing_tensors(network: Network) -> list[list[str]]:
    """``result[k]``: forward tensors alive across the cut after forward position ``k``."""
    idx = index(network)
    last = _users(network)
    n = len(idx.forward_order)
    starts: list[list[str]] = [[] for _ in range(n)]
    for tensor, end in last.items():
        producer = idx.producing_op(tensor)
        if producer is None:
            continue
        begin = idx.position[producer]
        for k in range(begin, min(end, n)):
            starts[k].append(tensor)
    return starts


def _cut_bytes(network: Network, crossing: list[list[str]]) -> list[int]:
    tensors = network.tensors
    result = []
    for names in crossing:
        roots = set()
        total = 0
        for name in names:
            root = name
            while tensors[root].view_of is not None and not tensors[tensors[root].view_of].is_fixed:
                root = tensors[root].view_of
            if root not in roots and not tensors[root].is_fixed:
                roots.add(root)
                total += tensors[root].storage_bytes
        result.append(total)
    return result


def decompose(network: Network, *, target_ops: int = 24, min_ops: int | None = None, max_ops: int | None = None) -> Decomposition:
    """Partition the forward order into blocks of about ``target_ops`` forward ops.

    Every block but the last has between ``min_ops`` (default ``target_ops // 2``) and
    ``max_ops`` (default ``2 * target_ops``) forward ops and ends at the cheapest cut in
    that range (fewest bytes, then fewest tensors, then nearest the target size).
    """
    idx = index(network)
    order = idx.forward_order
    n = len(order)
    if n == 0:
        return Decomposition((), ())
    low = max(1, min_ops if min_ops is not None else target_ops // 2)
    high = max(low, max_ops if max_ops is not None else 2 * target_ops)
    crossing = crossing_tensors(network)
    widths = _cut_bytes(network, crossing)
    cuts: list[int] = []
    start = 0
    while n - start > high:
        # the cheapest cut within reach: fewest bytes, then fewest tensors, then nearest the target
        window = range(start + low, min(start + high, n - low) + 1)
        if not window:
            window = range(start + low, start + high + 1)
        cut = min(window, key=lambda k: (widths[k - 1], len(crossing[k - 1]), abs(k - start - target_ops), k))
        cuts.append(cut)
        start = cut
    bounds = [0, *cuts, n]
    block_of_pos = {}
    for b, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        for pos in range(start, stop):
            block_of_pos[pos] = b
    backward_by_block: dict[int, list[str]] = {}
    last = _users(network)
    for bop in network.backward_ops:
        if bop.of is not None:
            pos = idx.position[bop.of]
        else:
            reads = set().union(*(impl.reads for impl in bop.impls))
            pos = max((idx.position[idx.producing_op(r)] for r in reads if idx.producing_op(r) in idx.position), default=0)
        backward_by_block.setdefault(block_of_pos[pos], []).append(bop.name)
    blocks = []
    for b, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        ops = order[start:stop]
        inside = set()
        for name in ops:
            op = idx.forward_ops[name]
            inside.update(op.outputs)
            for impl in op.impls:
                inside.update(impl.derived)
        reads: list[str] = []
        for name in ops:
            op = idx.forward_ops[name]
            reads.extend(op.inputs)
            for impl in op.impls:
                reads.extend(sorted(impl.recompute_reads))
        for bname in backward_by_block.get(b, ()):
            for impl in idx.backward_ops[bname].impls:
                reads.extend(sorted(impl.reads))
        inputs = tuple(dict.fromkeys(r for r in reads if idx.is_forward_tensor(r) and r not in inside))
        after = crossing[stop - 1] if stop - 1 < n - 1 else []
        outputs = tuple(t for t in after if t in inside) + tuple(o for o in network.outputs if o in inside and o not in after)
        blocks.append(
            Block(b, tuple(ops), tuple(backward_by_block.get(b, ())), inputs, outputs, tuple(after))
        )
    del last
    signed = [_with_signature(network, block) for block in blocks]
    first: dict[str, int] = {}
    kinds = tuple(first.setdefault(block.signature, block.index) for block in signed)
    return Decomposition(tuple(signed), kinds)


def _with_signature(network: Network, block: Block) -> Block:
    """A block with a hash of its structure, sizes and costs, with every name abstracted."""
    local: dict[str, str] = {}

    def name(tensor: str) -> str:
        if tensor in local:
            return local[tensor]
        t = network.tensors[tensor]
        if t.is_fixed:
            label = f"fixed:{t.kind.value}:{t.dtype}:{t.shape}:{t.nbytes}"
        elif tensor in block.inputs:
            label = f"in{block.inputs.index(tensor)}:{t.dtype}:{t.shape}:{t.nbytes}"
        elif t.grad_of is not None:
            return f"grad({name(t.grad_of)})"
        else:
            label = f"t{len(local)}:{t.kind.value}:{t.dtype}:{t.shape}:{t.nbytes}:{t.view_of is not None}"
        local[tensor] = label
        return label

    parts: list[str] = []
    for op_name in block.forward_ops:
        op = network.op(op_name)
        parts.append("op(" + ",".join(name(i) for i in op.inputs) + ")->" + ",".join(name(o) for o in op.outputs))
        for impl in op.impls:
            parts.append(
                f" impl {impl.name} {impl.time_us!r} {impl.workspace} {name(impl.overwrites) if impl.overwrites else '-'}"
                f" {','.join(name(d) for d in impl.derived)} {impl.recompute_time_us!r}"
                f" {','.join(sorted(name(r) for r in impl.recompute_reads))}"
            )
    for op_name in block.backward_ops:
        bop = network.op(op_name)
        local_name = bop.local_name if bop.of is not None else "-"
        parts.append(f"bwd {local_name} ->" + ",".join(name(o) for o in bop.outputs))
        for impl in bop.impls:
            parts.append(f" impl {impl.name} {impl.time_us!r} {impl.workspace} {','.join(sorted(name(r) for r in impl.reads))}")
    parts.append("out:" + ",".join(name(o) for o in block.outputs))
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Block(block.index, block.forward_ops, block.backward_ops, block.inputs, block.outputs, block.crossing, digest)
