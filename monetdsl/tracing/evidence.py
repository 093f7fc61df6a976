"""What autograd really keeps, measured on a real step, next to what a spec says.

Used by the tests and ``benchmarks/saved_bytes.py`` to show that a traced spec's
store-all description (the first implementation of every op) keeps exactly the bytes
PyTorch keeps for the backward, op by op and in total.

* **Total**: every tensor autograd packs during the forward, through
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage; parameters,
  buffers and inputs are left out (they are resident anyway).
* **Per op**: the tensors each autograd node saved (its ``_saved_*`` fields), counted per
  storage, for the nodes that save something, in the order they were created.

Storages, not logical sizes, are compared: keeping a view keeps its base alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..graph import storage_root
from ..ir import Network
from .capture import LOSSES, TrainStep

__all__ = ["SavedBytes", "autograd_saved", "spec_saved", "constant_tensors"]


@dataclass
class SavedBytes:
    total: int  # activation storages kept for the backward (fixed memory excluded)
    per_op: list[tuple[str, int]]  # (op or autograd node, storage bytes it keeps, fixed included)
    storages: list[dict] = field(default_factory=list)  # per op: storage key -> bytes


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (st.data_ptr(), st.nbytes())


def autograd_saved(model: nn.Module, inputs, loss="auto") -> SavedBytes:
    """Run one real forward of ``loss(model(*inputs))`` and count what autograd saved."""
    step = TrainStep(model, LOSSES[loss] if isinstance(loss, str) else loss)
    packed: list[torch.Tensor] = []

    def pack(t):
        packed.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step(*inputs)
    fixed = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers()) + list(inputs)}
    storages = {}
    for t in packed:
        key = _storage_key(t)
        if key not in fixed:
            storages[key] = key[1]
    # per op, count what went through the hooks (a Python scalar wrapped as a tensor, e.g.
    # the 4 of ``x / 4``, shows in a node's fields but is not packed: it is not device memory)
    counted = fixed | set(storages)
    nodes = []
    seen = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    per_op = []
    per_op_storages = []
    for node in sorted(nodes, key=lambda n: n._sequence_nr()):
        keys = {}
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001 - a field that cannot be read back
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, torch.Tensor):
                    key = _storage_key(v)
                    if key in counted:
                        keys[key] = key[1]
        if keys:
            per_op.append((type(node).__name__, sum(keys.values())))
            per_op_storages.append(keys)
    _fold_cross_entropy(per_op, per_op_storages)
    return SavedBytes(sum(storages.values()), per_op, per_op_storages)


def _fold_cross_entropy(per_op: list, per_op_storages: list) -> None:
    """Count a log-softmax node followed by an NLL-loss node as one op, as the tracer folds
    the pair (``cross_entropy``): the storages they keep, once (both keep the log-probabilities)."""
    i = 0
    while i + 1 < len(per_op):
        if (per_op[i][0], per_op[i + 1][0]) == ("LogSoftmaxBackward0", "NllLossBackward0"):
            keys = {**per_op_storages[i], **per_op_storages[i + 1]}
            per_op[i : i + 2] = [("CrossEntropy", sum(keys.values()))]
            per_op_storages[i : i + 2] = [keys]
        i += 1


def spec_saved(network: Network) -> SavedBytes:
    """The same counts for a spec whose first implementations run every op once."""
    tensors = network.tensors
    total_roots: dict[str, int] = {}
    per_op = []
    by_forward: dict[str, list] = {}
    for bop in network.backward_ops:
        by_forward.setdefault(bop.of, []).append(bop)
    for op in network.forward_ops:
        roots: dict[str, int] = {}
        for bop in by_forward.get(op.name, []):
            for name in bop.impls[0].reads:
                t = tensors[name]
                if t.grad_of is not None:
                    continue
                root = storage_root(network, name)
                roots[root] = tensors[root].nbytes
                if not tensors[root].is_fixed:
                    total_roots[root] = tensors[root].nbytes
        if roots:
            per_op.append((op.name, sum(roots.values())))
    return SavedBytes(sum(total_roots.values()), per_op)


def constant_tensors(network: Network) -> set[str]:
    """Activations computed from no input, parameter or buffer (``arange`` and what follows).

    Torch decomposes some ops before autograd sees them (bilinear and nearest interpolation
    become index arithmetic); the decomposed backward keeps these small index and weight
    vectors, which the fused eager kernel recomputes internally."""
    constant: set[str] = set()
    for op in network.forward_ops:  # declaration order is a forward order
        if all(name in constant for name in op.inputs):
            constant.update(op.outputs)
    return constant
