"""Forward steps written inline in a pass's generated code, each view derived once.

A forward step that is one captured call (:class:`~monetdsl.lowering.program.DirectCall`)
still cost a Python call of its own, and each of its arguments was re-derived from the
tensor owning its storage (the tracer keeps owners only) on every use. Where the model
slices one tensor many times, that second cost is the larger one: an unrolled GRU reads
each time step of its input projection as ``unbind(x, 1)[t]`` split into three gates, and
deriving that path once per reader made 32 views per read in the forward and, under
autograd, one ``UnbindBackward`` per read in the backward, each stacking 31 zero
gradients with the one it had (3362 zero tensors per step: x4 of eager's backward).
Eager PyTorch unbinds once.

:class:`ViewLocals` writes each step's call straight into the pass (``r = op(a, b)``)
with its arguments as local variables: a view's path is applied once per owner and
prefix (``w3 = unbind(x, 1)``, ``w4 = w3[5]``, ...) and every later reader of the same
view uses the local. The locals are views: they hold no memory of their own, but they
keep their owner's storage alive, so the pass drops them wherever the owner is released,
replaced or entered anew (:meth:`ViewLocals.forget`), and all of them where grad mode
changes (a view taken with grad off carries no autograd edge to use under grad).

Each call enters aten through the operator's Python binding (``torch.add``,
``Tensor.view``) where the overload has one that the captured arguments resolve to the
same overload (:data:`PYTHON_BINDINGS`), else through the overload's boxed C++ entry
(:func:`~monetdsl.lowering.step_source.kernel_of`), which costs 0.3-0.7 us more a call.

>>> import torch
>>> from monetdsl.lowering.graphs import ArgPath
>>> views = ViewLocals({})
>>> path = ArgPath("x", (("call", torch.ops.aten.unbind.int, (0,), {}), ("getitem", 1)))
>>> lines = []
>>> views.argument(path, "env['x']", lines)
'w1'
>>> lines
["    w0 = V0(env['x'], 0)", '    w1 = w0[1]']
>>> views.ns["V0"] is torch.unbind
True
>>> views.argument(path, "env['x']", lines), len(lines)
('w1', 2)
>>> views.forget("env['x']")
['    w0 = w1 = None']
"""
from __future__ import annotations

import torch

from ..lowering.graphs import ArgPath
from ..lowering.program import DirectCall
from ..lowering.step_source import kernel_of

__all__ = ["ViewLocals", "PYTHON_BINDINGS", "entry_of"]

_VF = torch._C._VariableFunctions

#: aten overload -> its Python binding, for overloads whose binding, given the captured
#: call's arguments (tensors, ints, int lists, scalars where the schema has them), parses
#: to that same overload: the binding's other signatures take other types (``split``'s
#: size list, ``view``'s dtype, ``select``'s dimension name)
PYTHON_BINDINGS = {
    "aten::add.Tensor": _VF.add, "aten::sub.Tensor": _VF.sub, "aten::mul.Tensor": _VF.mul, "aten::div.Tensor": _VF.div,
    "aten::sigmoid": _VF.sigmoid, "aten::tanh": _VF.tanh, "aten::relu": _VF.relu,
    "aten::addmm": _VF.addmm, "aten::mm": _VF.mm, "aten::bmm": _VF.bmm,
    "aten::split.Tensor": _VF.split, "aten::unbind.int": _VF.unbind, "aten::t": _VF.t,
    "aten::transpose.int": _VF.transpose, "aten::select.int": _VF.select, "aten::unsqueeze": _VF.unsqueeze,
    "aten::permute": _VF.permute, "aten::clone": _VF.clone, "aten::embedding": _VF.embedding,
    "aten::view": torch.Tensor.view, "aten::expand": torch.Tensor.expand,
}


def entry_of(target):
    """How a pass calls ``target``: its Python binding when :data:`PYTHON_BINDINGS` has
    one, else :func:`~monetdsl.lowering.step_source.kernel_of`."""
    if isinstance(target, torch._ops.OpOverload) and target.name() in PYTHON_BINDINGS:
        return PYTHON_BINDINGS[target.name()]
    return kernel_of(target)


class ViewLocals:
    """The view locals of one generated pass, and the lines that make and call them.

    ``namespace`` is the pass's globals: constants and kernels are bound in it (``V0``,
    ``C3``). A view is known by the expression of its owner's value (``env['x']``,
    ``al['x']``, ``fixed['w']``) and its path prefix."""

    def __init__(self, namespace: dict):
        self.ns = namespace
        self.local_of: dict[tuple, str] = {}  # (owner expression, path prefix) -> local
        self.of_owner: dict[str, list[str]] = {}  # owner expression -> its view locals
        self.count = 0

    def _bind(self, value, hint: str) -> str:
        """A literal for ints, bools, strings and None; else a name bound to ``value``."""
        if value is None or type(value) in (int, bool, str):
            return repr(value)
        name = f"{hint}{len(self.ns)}"
        self.ns[name] = value
        return name

    def argument(self, path: ArgPath, owner: str, lines: list[str]) -> str:
        """The expression of ``path`` applied to the value ``owner`` (an expression), with
        the lines making any view not yet made appended to ``lines``."""
        value = owner
        for k, step in enumerate(path.steps):
            key = (owner, _frozen(path.steps[:k + 1]))
            local = self.local_of.get(key)
            if local is None:
                local = f"w{self.count}"
                self.count += 1
                if step[0] == "getitem":
                    lines.append(f"    {local} = {value}[{step[1]!r}]")
                else:
                    _, target, args, kwargs = step
                    parts = [value, *(self._bind(a, "C") for a in args), *(f"{k}={self._bind(v, 'C')}" for k, v in kwargs.items())]
                    lines.append(f"    {local} = {self._bind(entry_of(target), 'V')}({', '.join(parts)})")
                self.local_of[key] = local
                self.of_owner.setdefault(owner, []).append(local)
            value = local
        return value

    def call(self, direct: DirectCall, value_of, lines: list[str]) -> str:
        """The expression calling ``direct``, its tensor arguments read through
        ``value_of(owner name) -> expression`` and made views of."""
        def expression(a) -> str:
            if isinstance(a, ArgPath):
                return self.argument(a, value_of(a.owner), lines)
            if isinstance(a, (list, tuple)) and any(isinstance(b, ArgPath) for b in a):
                inner = "".join(expression(b) + ", " for b in a)
                return f"[{inner}]" if isinstance(a, list) else f"({inner})"
            return self._bind(a, "C")

        parts = [expression(a) for a in direct.args] + [f"{k}={expression(v)}" for k, v in direct.kwargs.items()]
        return f"{self._bind(entry_of(direct.target), 'K')}({', '.join(parts)})"

    def forget(self, owner: str) -> list[str]:
        """Lines dropping the views of ``owner`` (it is released or replaced)."""
        locals_ = self.of_owner.pop(owner, [])
        if not locals_:
            return []
        self.local_of = {key: v for key, v in self.local_of.items() if key[0] != owner}
        return [f"    {' = '.join(locals_)} = None"]

    def forget_all(self) -> list[str]:
        """Lines dropping every view (grad mode changes, or the pass ends)."""
        lines = []
        for owner in list(self.of_owner):
            lines += self.forget(owner)
        return lines


def _frozen(value):
    """``value`` (a path's steps: tuples, lists, dicts, constants) as a hashable key."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return value
