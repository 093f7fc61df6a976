"""Which forward steps may record PyTorch's own autograd graph instead of running a
hand-lowered backward: those whose graph saves nothing the plan does not keep.

A stretch of stored ops (:mod:`monetdsl.runtime.stretches`) runs its forward with grad
enabled and its backward as one call into autograd's C++ engine, as eager PyTorch does.
Its memory still equals the plan only if autograd saves, for each op, no tensor beyond
what the op's chosen backward implementations read (the catalogue's first, PyTorch's own,
implementation is meant to read exactly that). This module checks it once per op, when
the program is lowered: the step runs on meta tensors shaped like the traced values
(nothing is computed, nothing allocated) under a ``saved_tensors_hooks`` that sees every
tensor autograd saves, and each saved storage is matched to the step's reads and writes.
A saved intermediate (a fused group's inner value) or a read the plan frees keeps the op
out of stretches; it then runs step by step as before.

Running an op on meta tensors can import TorchDynamo (Python meta kernels, one to several
seconds), so a plan read back from the caches takes each verdict from the previous
process (:mod:`monetdsl.planning.kept_verdicts`) under :func:`saves_key`: the op's calls,
the layouts of what it reads and writes, and what it may save.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["TINY_SAVED_BYTES", "saves_only", "saves_key"]

#: saved tensors that are neither a read nor a write of the step (a scalar the formula
#: made) are tolerated up to this size: they are bytes, not activations
TINY_SAVED_BYTES = 256


def _meta_like(example: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(example.shape), tuple(example.stride()), dtype=example.dtype, device="meta")


def saves_only(fn: Callable, reads: tuple[str, ...], writes: tuple[str, ...], examples: dict[str, torch.Tensor],
               wanted: Iterable[str], allowed: set[str]) -> bool:
    """Whether ``fn`` (a forward step: read values in, write values out), run with grad
    enabled and the ``wanted`` reads requiring grad, records a graph that saves only the
    storages of ``allowed`` reads or writes (and tensors of at most
    :data:`TINY_SAVED_BYTES`). ``examples``: a traced value per read. Any failure to run
    on meta tensors answers False (the step then stays out of stretches)."""
    wanted = set(wanted)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    try:
        values = []
        for name in reads:
            value = _meta_like(examples[name])
            if name in wanted and value.is_floating_point():
                value.requires_grad_()
            values.append(value)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = fn(*values)
        if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outs):
            return False  # nothing differentiable: no graph to run
        names = {v.untyped_storage()._cdata: n for n, v in zip(reads, values)}
        names.update({o.untyped_storage()._cdata: n for n, o in zip(writes, outs) if isinstance(o, torch.Tensor)})
        for t in saved:
            name = names.get(t.untyped_storage()._cdata)
            if name is None:
                if t.numel() * t.element_size() > TINY_SAVED_BYTES:
                    return False
            elif name not in allowed:
                return False
        return True
    except Exception:  # noqa: BLE001 - an op that cannot run on meta tensors stays step by step
        return False


def saves_key(calls: Iterable[str], reads: tuple[str, ...], writes: tuple[str, ...], examples: dict[str, torch.Tensor],
              wanted: Iterable[str], allowed: set[str]) -> str:
    """Everything :func:`saves_only`'s verdict on a step depends on, as text: the step's
    calls (``calls``, its aten ops in order), each read's layout (shape, strides, dtype)
    and whether it requires grad, its writes and the storages it may save (the torch
    version and the lowering's code are the kept file's own key)."""
    wanted = set(wanted)
    layouts = [(n, tuple(examples[n].shape), tuple(examples[n].stride()), str(examples[n].dtype), n in wanted) for n in reads]
    return repr((tuple(calls), layouts, tuple(writes), tuple(sorted(allowed))))
