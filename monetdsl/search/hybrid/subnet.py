"""The sub-network of one block, in canonical local names: what the block MILP solves.

A block (:mod:`.decompose`) is cut out of the network with two stand-ins for the rest:

* a **source** op ``src`` at the front produces the block's inputs (the forward tensors of
  earlier blocks that it reads). They are kept from the forward pass and never
  recomputed, and the source's backward op, the last stage, reads them together with
  every gradient the block passes on to earlier blocks. So the inputs stay resident
  through the block's backward (as in Rotor, the checkpoint a block starts from is held
  until the block is done), and the gradients of the inputs live from their first writer
  to the end of the block, as they do in the whole network. Inputs that are views get a
  second never-recomputed op ``srcv`` making them views of their base.
* a **sink** op ``sink`` at the end reads the block's outputs (what later blocks read) and
  produces an empty network output; its backward op, the first stage, writes the
  gradients that later blocks have produced by the time this block's backward starts
  (the gradients of the outputs, and any other gradient the block reads or adds to). The
  sink's stage may not recompute anything: in the whole network there is no such stage.

Every name is replaced by a canonical one (ops ``o0, o1, ...`` in forward order, tensors
``t0, t1, ...`` in order of first use, parameters ``p0, ...``), so two blocks with the same
structure, sizes and costs give the *same* sub-network, and the same :attr:`BlockNet.fingerprint`:
the hybrid engine solves each fingerprint once and maps the options back through
:attr:`BlockNet.to_global`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ...graph import index, storage_root
from ...ir import BackwardImpl, BackwardOp, ForwardImpl, ForwardOp, Network, Tensor, TensorKind
from ...validate import ResolvedConstraints
from .decompose import Block

__all__ = ["BlockNet", "block_network", "SOURCE", "SOURCE_VIEWS", "SINK", "SubnetError"]

SOURCE = "src"
SOURCE_VIEWS = "srcv"
SINK = "sink"


class SubnetError(ValueError):
    """The block cannot be cut out on its own (its stage order differs from the network's)."""


@dataclass
class BlockNet:
    """A block's sub-network and how its names map to the whole network's.

    ``stage_order``: the sub-network's backward order: the sink's stage, the block's
    backward ops (local names, in the network's canonical order), the source's stage.
    ``pins``/``never``/``keep``: what the block MILP must honour (local names): the user's
    constraints, no in-place write over an input, inputs kept and never recomputed.
    ``pinned``: the user's constraints forbid recomputing something in the block (the
    chain DP then never re-runs the block's forward).
    """

    block: Block
    network: Network
    fingerprint: str
    to_global: dict[str, str]  # local name (op or tensor) -> global name
    to_local: dict[str, str]  # global tensor name -> local name
    inputs: tuple[str, ...]  # local names of the source's outputs (bases and views)
    stage_order: tuple[str, ...]
    pins: dict[str, tuple[str, ...]] = field(default_factory=dict)
    never: frozenset[str] = frozenset()
    keep: frozenset[str] = frozenset()
    pinned: bool = False

    @property
    def block_ops(self) -> tuple[str, ...]:
        """Local names of the block's own forward ops, in forward order."""
        return tuple(op.name for op in self.network.forward_ops if op.name not in (SOURCE, SOURCE_VIEWS, SINK))

    def constraints(self) -> ResolvedConstraints:
        return ResolvedConstraints(None, None, self.keep, self.never, dict(self.pins))


class _Namer:
    def __init__(self):
        self.local: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, prefix: str) -> str:
        if name not in self.local:
            k = self.counts.get(prefix, 0)
            self.counts[prefix] = k + 1
            self.local[name] = f"{prefix}{k}"
        return self.local[name]


def block_network(network: Network, block: Block, constraints: ResolvedConstraints | None = None) -> BlockNet:
    """Cut ``block`` out of ``network`` (see the module docstring)."""
    idx = index(network)
    tensors = network.tensors
    fops = [idx.forward_ops[n] for n in block.forward_ops]
    bops = [idx.backward_ops[n] for n in block.backward_ops]
    in_block_ops = set(block.forward_ops)
    block_bops = set(block.backward_ops)
    produced: set[str] = set()
    for op in fops:
        produced.update(op.outputs)
        for impl in op.impls:
            produced.update(impl.derived)

    # the source's outputs: inputs, plus the storage bases of input views
    inputs = list(block.inputs)
    bases: list[str] = []
    for name in inputs:
        root = storage_root(network, name)
        if root != name and not tensors[root].is_fixed and root not in inputs and root not in bases:
            bases.append(root)
    source_roots = [t for t in bases + inputs if tensors[t].view_of is None]
    source_views = [t for t in inputs if tensors[t].view_of is not None]

    name_of = _Namer()
    local_tensors: dict[str, Tensor] = {}

    def tensor(name: str) -> str:
        if name in name_of.local:
            return name_of.local[name]
        t = tensors[name]
        if t.kind is TensorKind.GRADIENT:
            if t.grad_of is not None and (t.grad_of in produced or t.grad_of in inputs or t.grad_of in bases or tensors[t.grad_of].is_fixed):
                of = tensor(t.grad_of)
                local = f"grad({of})"
                name_of.local[name] = local
            else:
                local, of = name_of(name, "g"), None
            local_tensors[local] = Tensor(local, TensorKind.GRADIENT, t.nbytes, grad_of=of)
            return local
        if t.is_fixed:
            local = name_of(name, "p")
            view = tensor(t.view_of) if t.view_of is not None else None
            local_tensors[local] = Tensor(local, t.kind, t.nbytes, view_of=view)
            return local
        local = name_of(name, "t")
        root = storage_root(network, name)
        view = None
        if t.view_of is not None:
            view = tensor(root) if (root in produced or root in source_roots or tensors[root].is_fixed) else None
        nbytes = t.nbytes if view is not None or t.view_of is None else tensors[root].storage_bytes
        local_tensors[local] = Tensor(local, TensorKind.ACTIVATION, nbytes, view_of=view)
        return local

    for name in source_roots:
        tensor(name)
    for name in source_views:
        tensor(name)

    allowed = dict(constraints.allowed_impls) if constraints is not None else {}
    input_set = set(inputs) | set(bases)
    op_local: dict[str, str] = {}
    local_fops: list[ForwardOp] = []
    pins: dict[str, tuple[str, ...]] = {}
    for k, op in enumerate(fops):
        lname = f"o{k}"
        op_local[op.name] = lname
        ins = tuple(tensor(t) for t in op.inputs)
        outs = tuple(tensor(t) for t in op.outputs)
        impls = []
        for impl in op.impls:
            impls.append(
                ForwardImpl(
                    impl.name,
                    impl.time_us,
                    impl.workspace,
                    tensor(impl.overwrites) if impl.overwrites is not None else None,
                    tuple(tensor(d) for d in impl.derived),
                    impl.recompute_time_us,
                    frozenset(tensor(r) for r in impl.recompute_reads),
                )
            )
        usable = [i.name for i in op.impls if i.name in allowed.get(op.name, op.impl_names)]
        usable_here = [n for n in usable if op.impl(n).overwrites not in input_set]
        if not usable_here:
            raise SubnetError(f"every allowed implementation of {op.name} overwrites an input of its block")
        if len(usable_here) < len(op.impls):
            pins[lname] = tuple(usable_here)
        local_fops.append(ForwardOp(lname, ins, outs, tuple(impls)))

    # gradients: which ones later blocks have written before this block starts, and which
    # ones earlier blocks still need after it
    order = idx.backward_order
    where = {b: i for i, b in enumerate(order)}
    first_here = min((where[b] for b in block.backward_ops), default=len(order))
    last_here = max((where[b] for b in block.backward_ops), default=-1)
    seeds = set(idx.seeds())
    touched: list[str] = []
    for bop in bops:
        for impl in bop.impls:
            for r in sorted(impl.reads):
                if tensors[r].kind is TensorKind.GRADIENT and r not in touched:
                    touched.append(r)
        for o in bop.outputs:
            if o not in touched:
                touched.append(o)
    local_outputs = [o for o in network.outputs if o in produced]
    own_seeds = {f"grad({o})" for o in local_outputs}
    incoming, outgoing = [], []
    for g in touched:
        if tensors[g].grad_of is not None and tensors[tensors[g].grad_of].is_fixed:
            continue  # parameter gradients are temporaries added into fixed memory
        writers = idx.gradient_writers.get(g, ())
        readers = [b.name for b in network.backward_ops if any(g in i.reads for i in b.impls)]
        before = any(where[w] < first_here for w in writers) or (g in seeds and g not in own_seeds)
        after = any(where[x] > last_here for x in (*writers, *readers))
        if before:
            incoming.append(g)
        if after and (before or any(w in block_bops for w in writers)):
            outgoing.append(g)

    sink_out = "sink.out"
    local_tensors[sink_out] = Tensor(sink_out, TensorKind.ACTIVATION, 0)
    sink_ins = tuple(tensor(t) for t in block.outputs)
    sink = ForwardOp(SINK, sink_ins, (sink_out,), (ForwardImpl("default", 0.0),))
    src = ForwardOp(SOURCE, (), tuple(tensor(t) for t in source_roots), (ForwardImpl("default", 0.0),))
    fixed_view_bases = [tensor(tensors[t].view_of) for t in source_views if tensors[storage_root(network, t)].is_fixed]
    srcv = None
    if source_views:
        srcv_inputs = tuple(dict.fromkeys(
            [tensor(storage_root(network, t)) for t in source_views if not tensors[storage_root(network, t)].is_fixed]
            + fixed_view_bases
        ))
        srcv = ForwardOp(SOURCE_VIEWS, srcv_inputs, tuple(tensor(t) for t in source_views), (ForwardImpl("default", 0.0),))

    local_bops: list[BackwardOp] = []
    sink_grads = tuple(tensor(g) for g in incoming)
    local_bops.append(BackwardOp(f"{SINK}.backward", sink_grads, (BackwardImpl("default", frozenset(), 0.0),), of=SINK))
    plain = 0
    for bop in bops:
        if bop.of is not None and bop.of in in_block_ops:
            lname = f"{op_local[bop.of]}.{bop.local_name}"
            of = op_local[bop.of]
        else:
            lname, of = f"b{plain}", None
            plain += 1
        op_local[bop.name] = lname
        impls = tuple(
            BackwardImpl(i.name, frozenset(tensor(r) for r in i.reads), i.time_us, i.workspace,
                         accumulates=frozenset(tensor(r) for r in i.accumulates),
                         overwrites=tensor(i.overwrites) if i.overwrites is not None else None) for i in bop.impls
        )
        local_bops.append(BackwardOp(lname, tuple(tensor(o) for o in bop.outputs), impls, of=of))
        usable = allowed.get(bop.name)
        if usable is not None and len(usable) < len(bop.impls):
            pins[lname] = tuple(usable)
    source_reads = frozenset(tensor(t) for t in (*source_roots, *source_views)) | frozenset(tensor(g) for g in outgoing)
    local_bops.append(BackwardOp(f"{SOURCE}.backward", (), (BackwardImpl("default", source_reads, 0.0),), of=SOURCE))

    forward = [src] + ([srcv] if srcv is not None else []) + local_fops + [sink]
    backward = [local_bops[-1]] + local_bops[:-1]  # declaration order does not decide the stage order
    sub = Network(
        name=f"block{block.index}",
        tensors=dict(local_tensors),
        forward_ops=tuple(forward),
        backward_ops=tuple(backward),
        outputs=tuple([sink_out] + [tensor(o) for o in local_outputs]),
    )
    to_local = dict(name_of.local)  # tensors; ops and tensors may share global names
    to_global = {v: k for k, v in to_local.items()}
    to_global.update({v: k for k, v in op_local.items()})
    keep_global = set(constraints.keep) if constraints is not None else set()
    never_global = set(constraints.never_recompute) if constraints is not None else set()
    user_keep = {name_of.local[t] for t in keep_global if t in produced}
    user_never = {op_local[o] for o in never_global if o in in_block_ops}
    src_outputs = tuple(tensor(t) for t in (*source_roots, *source_views))
    never = frozenset(user_never | {SOURCE} | ({SOURCE_VIEWS} if srcv is not None else set()))
    keep = frozenset(user_keep | set(src_outputs))
    expected = (f"{SINK}.backward", *(op_local[b] for b in block.backward_ops), f"{SOURCE}.backward")
    actual = index(sub).backward_order
    if actual != expected:
        raise SubnetError(f"block {block.index}: its backward order differs from the network's")
    fingerprint = _fingerprint(sub, pins, never, keep)
    return BlockNet(
        block, sub, fingerprint, to_global, to_local, src_outputs, expected, pins, never, keep,
        pinned=bool(user_keep or user_never),
    )


def _fingerprint(sub: Network, pins, never, keep) -> str:
    """Hash of everything the block MILP sees (names are already canonical)."""
    parts: list = []
    for name in sorted(sub.tensors):
        t = sub.tensors[name]
        parts.append(("T", name, t.kind.value, t.nbytes, t.view_of, t.grad_of))
    for op in sub.forward_ops:
        impls = tuple(
            (i.name, repr(i.time_us), i.workspace, i.overwrites, i.derived, repr(i.recompute_time_us), tuple(sorted(i.recompute_reads)))
            for i in op.impls
        )
        parts.append(("F", op.name, op.inputs, op.outputs, impls))
    for bop in sub.backward_ops:
        impls = tuple((i.name, tuple(sorted(i.reads)), repr(i.time_us), i.workspace, tuple(sorted(i.accumulates)), i.overwrites)
                      for i in bop.impls)
        parts.append(("B", bop.name, bop.of, bop.outputs, impls))
    parts.append(("O", sub.outputs))
    parts.append(("P", tuple(sorted((k, tuple(v)) for k, v in pins.items())), tuple(sorted(never)), tuple(sorted(keep))))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]
