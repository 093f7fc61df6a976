"""Cut a network into a chain of blocks at cheap cuts.

The hybrid engine solves each block (each *kind* of block, see :mod:`.subnet`) with the
exact MILP and joins the blocks with a dynamic program over the chain
(:mod:`.chain_dp`), so the cuts decide both how small the sub-problems are and how much
memory a checkpoint between two blocks costs.

**Cuts.** The cut after forward position ``k`` is crossed by every forward tensor
produced at or before ``k`` that a later step reads: a later forward op (as an input or a
recompute read), or a backward op that belongs to a later block (a backward op belongs to
the forward op it differentiates; a plain-DAG backward op to the latest forward op whose
output it reads). A chain is cut at a single tensor, a residual network at the sum of a
residual block; a UNet's long skips cross many positions, and there the cheapest cuts
simply carry several tensors: a checkpoint of such a cut holds all of them.

**Blocks.** A segmentation of the forward order into contiguous blocks is chosen by a
dynamic program over cut positions that minimises the bytes crossing the chosen cuts
(relative to the median cut) plus a penalty on blocks far from ``target_ops``; blocks
keep between ``min_ops`` and ``max_ops`` forward ops. Repeated structure (transformer
layers, residual stages) has equally cheap cuts at the same places, so repeated blocks
come out identical and are solved once.

Two properties every block must have, enforced by merging neighbours when needed:

* its backward ops form one contiguous run of the canonical backward order, later blocks
  first (the chain DP processes blocks in that order);
* no op may be forced to overwrite a tensor of an earlier block in place (a block's
  inputs are checkpoints, which must survive; in-place implementations over them are
  excluded, and a cut that would leave an op only such implementations is not used).

    >>> from monetdsl.grammar import load_spec
    >>> import pathlib
    >>> spec = load_spec(pathlib.Path(__file__).parents[3] / "specs" / "tiny_gpt.monet")
    >>> parts = decompose(spec.network, target_ops=8)
    >>> sorted(op for b in parts.blocks for op in b.forward_ops) == sorted(o.name for o in spec.network.forward_ops)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...graph import index, storage_root
from ...ir import Network

__all__ = ["Block", "Decomposition", "decompose", "decompose_at", "CutInfo", "cut_info", "DEFAULT_TARGET_OPS"]

#: forward ops per block the segmentation aims at (blocks keep 2-10): small enough that
#: every grid point of every block menu is solved within the menus' share of a 60 s
#: limit, large enough to leave each block real choices. With 10, ResNet-50's blocks of
#: 10-15 ops left about 70 of 140 menu grid points unsolved in 60 s and most block MILPs
#: stopped at their per-solve cap; with 5 its 34 blocks (22 kinds) finish every point
#: and the menus cost less time (docs/search.md, benchmarks/results/monet_table.md)
DEFAULT_TARGET_OPS = 5


@dataclass(frozen=True)
class Block:
    """A contiguous range of forward ops with the backward ops that belong to them.

    ``inputs``: forward tensors produced by earlier blocks that the block reads (forward
    inputs, recompute reads, backward reads of any implementation). ``outputs``: tensors
    the block produces that later blocks read. ``crossing``: every forward tensor crossing
    the cut after the block (its outputs and older tensors passing by), in forward order.
    """

    index: int
    forward_ops: tuple[str, ...]
    backward_ops: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    crossing: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.forward_ops)


@dataclass(frozen=True)
class Decomposition:
    """Blocks in forward order (block ``i`` has ``index == i``)."""

    blocks: tuple[Block, ...]

    def block_of(self, op: str) -> int:
        for block in self.blocks:
            if op in block.forward_ops or op in block.backward_ops:
                return block.index
        raise KeyError(op)

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass
class CutInfo:
    """Per forward tensor: producer position and last position that needs it; per cut
    position ``k`` (after forward op ``k``): the crossing tensors and their storage bytes."""

    first: dict[str, int]
    last: dict[str, int]
    anchor: dict[str, int]  # backward op -> forward position it belongs to
    crossing: list[list[str]]
    width: list[int]
    forced_overwrite: list[bool]  # cut k would force an in-place write over an earlier block


def _backward_anchor(network: Network, idx, bop) -> int:
    if bop.of is not None and bop.of in idx.position:
        return idx.position[bop.of]
    reads = set().union(*(impl.reads for impl in bop.impls)) if bop.impls else set()
    positions = [idx.position[idx.producing_op(r)] for r in reads if idx.producing_op(r) in idx.position]
    return max(positions) if positions else len(idx.forward_order) - 1


def cut_info(network: Network) -> CutInfo:
    """Crossing sets and widths of every cut position (see the module docstring)."""
    idx = index(network)
    n = len(idx.forward_order)
    tensors = network.tensors
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for name in network.tensors:
        producer = idx.producing_op(name)
        if producer is not None and producer in idx.position:
            first[name] = idx.position[producer]
            last[name] = first[name]
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        pos = idx.position[name]
        for impl_reads in (op.inputs, *(impl.recompute_reads for impl in op.impls)):
            for t in impl_reads:
                if t in first:
                    last[t] = max(last[t], pos)
    anchor = {}
    for bop in network.backward_ops:
        a = _backward_anchor(network, idx, bop)
        anchor[bop.name] = a
        for impl in bop.impls:
            for t in impl.reads:
                if t in first:
                    last[t] = max(last[t], a)
    # a view keeps its base's storage: the base is needed as long as any view is
    for name in list(first):
        root = storage_root(network, name)
        if root != name and root in last:
            last[root] = max(last[root], last[name])
    starts: list[list[str]] = [[] for _ in range(max(n - 1, 0))]
    for t in sorted(first, key=lambda x: (first[x], x)):
        for k in range(first[t], min(last[t], n - 1)):
            starts[k].append(t)
    width = []
    for names in starts:
        roots = {storage_root(network, t) for t in names}
        width.append(sum(tensors[r].storage_bytes for r in roots if not tensors[r].is_fixed))
    forced = [False] * max(n - 1, 0)
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        pos = idx.position[name]
        targets = {impl.overwrites for impl in op.impls}
        if None in targets or not targets:
            continue  # an out-of-place implementation exists
        for target in targets:
            if target in first:
                for k in range(first[target], pos):
                    forced[k] = True
    return CutInfo(first, last, anchor, starts, width, forced)


def _cut_costs(network: Network, idx, info: CutInfo, target: int) -> list[float]:
    """Relative cost of each cut: bytes over the cheapest cut within ``target`` positions
    (0 for a locally cheapest cut), plus a little for every in-place implementation the
    cut rules out (a block may not overwrite its inputs)."""
    n1 = len(info.width)
    disables = [0] * n1
    for name in idx.forward_order:
        pos = idx.position[name]
        for impl in idx.forward_ops[name].impls:
            target_t = impl.overwrites
            if target_t is not None and target_t in info.first:
                for k in range(info.first[target_t], pos):
                    disables[k] += 1
    costs = []
    for k in range(n1):
        window = [w for w in info.width[max(0, k - target): k + target + 1] if w > 0]
        local = min(window) if window else 0
        if info.width[k] == 0:
            rel = 0.0
        else:
            rel = info.width[k] / local - 1.0 if local > 0 else 1.0
        costs.append(rel + 0.05 * disables[k])
    return costs


def _segment(n: int, info: CutInfo, costs: list[float], target: int, low: int, high: int) -> list[int]:
    """Block end positions (exclusive) chosen by a DP over cut positions."""
    inf = math.inf
    best = [inf] * (n + 1)
    back = [0] * (n + 1)
    best[0] = 0.0
    for k in range(1, n + 1):
        for j in range(max(0, k - high), k - low + 1 if k < n else k):
            if best[j] == inf:
                continue
            size = k - j
            if size < 1:
                continue
            if j > 0:
                if info.forced_overwrite[j - 1]:
                    continue
                cut = costs[j - 1]
            else:
                cut = 0.0
            cost = best[j] + cut + ((size - target) / target) ** 2
            if cost < best[k] - 1e-12:
                best[k], back[k] = cost, j
    if best[n] == inf:  # no valid segmentation (e.g. forced in-place everywhere): one block
        return [n]
    ends = []
    k = n
    while k > 0:
        ends.append(k)
        k = back[k]
    return sorted(ends)


def _interleaved(idx, info: CutInfo, ends: list[int]) -> tuple[int, int] | None:
    """Blocks ``(lo, hi)`` whose backward ops interleave in the canonical order, or None.

    The order must visit blocks from last to first, each in one run: the sequence of
    block numbers along the backward order never increases.
    """
    block_of_pos = []
    start = 0
    for b, end in enumerate(ends):
        block_of_pos.extend([b] * (end - start))
        start = end
    seq = [block_of_pos[info.anchor[name]] for name in idx.backward_order]
    low = math.inf
    for b in seq:
        if b > low:
            return int(low), b
        low = min(low, b)
    return None


def decompose(
    network: Network,
    *,
    target_ops: int = DEFAULT_TARGET_OPS,
    min_ops: int | None = None,
    max_ops: int | None = None,
) -> Decomposition:
    """Partition the forward order into a chain of blocks of about ``target_ops`` ops."""
    idx = index(network)
    order = idx.forward_order
    n = len(order)
    if n == 0:
        return Decomposition(())
    target = max(1, target_ops)
    low = max(1, min_ops if min_ops is not None else max(1, target // 2))
    high = max(low, max_ops if max_ops is not None else 2 * target)
    info = cut_info(network)
    ends = _segment(n, info, _cut_costs(network, idx, info, target), target, low, high) if n > high else [n]
    return decompose_at(network, ends, info=info)


def decompose_at(network: Network, ends: list[int], *, info: CutInfo | None = None) -> Decomposition:
    """Blocks ending at the forward positions ``ends`` (exclusive; the last is the op count),
    after merging blocks whose backward ops interleave in the canonical order and blocks
    without backward ops (the chain DP runs each block's recomputations in the stage of its
    first backward op)."""
    idx = index(network)
    info = info if info is not None else cut_info(network)
    ends = sorted(set(ends))
    while len(ends) > 1:
        bad = _interleaved(idx, info, ends)
        if bad is None:
            bare = _without_backward(info, ends)
            if bare is None:
                break
            del ends[bare if bare < len(ends) - 1 else bare - 1]
            continue
        lo, hi = bad
        del ends[lo:hi]  # blocks lo..hi become one
    return Decomposition(tuple(_blocks(network, idx, info, ends)))


def _without_backward(info: CutInfo, ends: list[int]) -> int | None:
    """The first block that no backward op belongs to, or None."""
    has = [False] * len(ends)
    for pos in info.anchor.values():
        for b, end in enumerate(ends):
            if pos < end:
                has[b] = True
                break
    for b, ok in enumerate(has):
        if not ok:
            return b
    return None


def _blocks(network: Network, idx, info: CutInfo, ends: list[int]) -> list[Block]:
    n = len(idx.forward_order)
    bounds = [0, *ends]
    block_of_pos = {}
    for b, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        for pos in range(start, stop):
            block_of_pos[pos] = b
    backward: dict[int, list[str]] = {}
    for name in idx.backward_order:
        backward.setdefault(block_of_pos[info.anchor[name]], []).append(name)
    blocks = []
    for b, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        ops = idx.forward_order[start:stop]
        inside: set[str] = set()
        reads: list[str] = []
        for name in ops:
            op = idx.forward_ops[name]
            inside.update(op.outputs)
            for impl in op.impls:
                inside.update(impl.derived)
            reads.extend(op.inputs)
            for impl in op.impls:
                reads.extend(sorted(impl.recompute_reads))
        for bname in backward.get(b, ()):
            for impl in idx.backward_ops[bname].impls:
                reads.extend(sorted(impl.reads))
        inputs = tuple(dict.fromkeys(r for r in reads if r in info.first and r not in inside))
        after = info.crossing[stop - 1] if stop - 1 < n - 1 else []
        outputs = tuple(t for t in after if t in inside)
        blocks.append(Block(b, tuple(ops), tuple(backward.get(b, ())), inputs, outputs, tuple(after)))
    return blocks
