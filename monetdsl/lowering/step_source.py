"""Steps that run PyTorch's own code as one generated Python function each.

A step of a small model costs more in Python than in its kernel: a convolution on a
32x32 batch of 8 takes tens of microseconds, and an interpreted step (rebuild each
argument through a getter, call the captured op through ``OpOverload.__call__``, pick the
outputs, turn argument gradients into owner gradients in a loop) added about as much
again. Eager PyTorch pays none of it in its backward (the autograd engine is C++), so on
such models the runtime's step was slower than eager's by that work alone.

Like ``torch.fx`` writing a ``GraphModule``'s ``forward``, this module writes each step's
call with its arguments spelled out, once, when the program is lowered: the step's read
values are the function's parameters, constants are bound by name, aten overloads are
called through their C++ callable, and the outputs are picked by position. Nothing here
decides *what* a step computes; :mod:`.program` says that, this module only writes it
out.

>>> import torch
>>> source = StepSource(["x", "w"])
>>> call = source.call(torch.ops.aten.mul.Tensor, [source.param("x"), source.param("w")], {})
>>> step = source.build([call], "double")
>>> step(torch.ones(2), torch.full((2,), 3.0))
(tensor([3., 3.]),)
"""
from __future__ import annotations

import keyword
from typing import Any, Callable, Sequence

import torch

__all__ = ["StepSource", "kernel_of"]


def kernel_of(target: Callable) -> Callable:
    """The callable that does ``target``'s work: an aten overload's C++ entry (what its
    ``__call__`` forwards to, one Python frame less; dispatch modes still see the call),
    any other callable itself."""
    if isinstance(target, torch._ops.OpOverload):
        return getattr(target, "_op", target)
    return target


class StepSource:
    """The text of one step function and the objects its names stand for.

    ``reads``: the step's parameters, in call order (each becomes ``v0``, ``v1``, ...).
    Expressions are strings of Python; :meth:`const` binds any object to a fresh name."""

    def __init__(self, reads: Sequence[str]):
        self.params = {name: f"v{i}" for i, name in enumerate(reads)}
        self.namespace: dict[str, Any] = {}
        self._lines: list[str] = []

    def param(self, read: str) -> str:
        return self.params[read]

    def const(self, value: Any, hint: str = "c") -> str:
        """A name bound to ``value`` in the function's globals."""
        name = f"{hint}{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def call(self, target: Callable, args: Sequence[str], kwargs: dict[str, str]) -> str:
        """The expression calling ``target`` (through :func:`kernel_of`) on expressions."""
        if any(not k.isidentifier() or keyword.iskeyword(k) for k in kwargs):
            raise ValueError(f"keyword arguments {sorted(kwargs)} cannot be written as a call")
        parts = list(args) + [f"{k}={v}" for k, v in kwargs.items()]
        return f"{self.const(kernel_of(target), 'op')}({', '.join(parts)})"

    def assign(self, name: str, expression: str) -> str:
        """Bind ``expression`` to a local ``name`` (evaluated once, in order)."""
        self._lines.append(f"    {name} = {expression}")
        return name

    def build(self, results: Sequence[str], label: str) -> Callable:
        """The function returning the tuple of ``results`` (expressions), named after ``label``."""
        body = self._lines + [f"    return ({''.join(r + ', ' for r in results)})"]
        text = f"def step({', '.join(self.params.values())}):\n" + "\n".join(body) + "\n"
        namespace = dict(self.namespace)
        exec(compile(text, f"<monetdsl step {label}>", "exec"), namespace)  # noqa: S102 - our own generated code
        step = namespace["step"]
        step.__qualname__ = step.__name__ = f"step_{''.join(c if c.isalnum() else '_' for c in label)}"
        step.source = text
        return step
