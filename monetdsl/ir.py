"""The in-memory model (IR) of a training graph, its constraints and its schedules.

Everything in monetdsl reads and writes these dataclasses: the parser builds them, the
printer writes them back as canonical text, the simulator replays schedules over them,
the solvers search over them and the runtime executes them.

Units: memory is an ``int`` number of bytes; time is a ``float`` number of microseconds.

The model (see ``docs/memory-model.md`` for the exact execution semantics):

* a :class:`Tensor` has a kind (input, param, buffer, activation, gradient), a byte size
  (from dtype and shape, or given directly) and may be a view of another tensor;
* a :class:`ForwardOp` reads tensors and produces tensors; it has one or more
  :class:`ForwardImpl` alternatives, which may overwrite an input in place, produce extra
  *derived* tensors (a 1-bit ReLU mask, compact max-pool indices, batch statistics) and
  give a cheaper recomputation;
* a :class:`BackwardOp` (usually attached to the forward op it differentiates) produces
  gradients; each of its :class:`BackwardImpl` alternatives states exactly which tensors it
  reads, its time and its workspace;
* tensors of kind input, param and buffer, plus the ``fixed`` items (gradient and optimizer
  memory), are *fixed memory*: resident for the whole step and counted in every peak.

A Checkmate-style plain DAG (one output per node, a cost, a size, forward/backward mark)
is the special case with one implementation per op and top-level backward ops.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable

__all__ = [
    "TensorKind",
    "DTYPE_BITS",
    "FIXED_KINDS",
    "Tensor",
    "ForwardImpl",
    "ForwardOp",
    "BackwardImpl",
    "BackwardOp",
    "FixedItem",
    "Network",
    "Pattern",
    "ImplPin",
    "Constraints",
    "Spec",
    "StagePlan",
    "Schedule",
    "grad_name",
    "shape_bytes",
]


class TensorKind(str, Enum):
    """What a tensor is; decides whether it is fixed memory and who may produce it."""

    INPUT = "input"
    PARAM = "param"
    BUFFER = "buffer"
    ACTIVATION = "activation"
    GRADIENT = "gradient"


FIXED_KINDS = frozenset({TensorKind.INPUT, TensorKind.PARAM, TensorKind.BUFFER})

#: Bits per element of every dtype the language knows. ``u1``/``u2``/``u4`` are packed.
DTYPE_BITS = {
    "f64": 64,
    "f32": 32,
    "tf32": 32,
    "f16": 16,
    "bf16": 16,
    "f8e4m3": 8,
    "f8e5m2": 8,
    "c128": 128,
    "c64": 64,
    "i64": 64,
    "i32": 32,
    "i16": 16,
    "i8": 8,
    "u64": 64,
    "u32": 32,
    "u16": 16,
    "u8": 8,
    "bool": 8,
    "u4": 4,
    "u2": 2,
    "u1": 1,
}


def shape_bytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a dense tensor; packed sub-byte dtypes round up to whole bytes."""
    numel = 1
    for dim in shape:
        numel *= int(dim)
    return (numel * DTYPE_BITS[dtype] + 7) // 8


def grad_name(tensor: str) -> str:
    """The name of the gradient of ``tensor`` as it is written in text: ``grad(x)``."""
    return f"grad({tensor})"


@dataclass(frozen=True)
class Tensor:
    """A named tensor. ``nbytes`` is its logical size; a view owns no storage of its own."""

    name: str
    kind: TensorKind
    nbytes: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    view_of: str | None = None
    grad_of: str | None = None
    line: int = field(default=0, compare=False)

    @property
    def storage_bytes(self) -> int:
        """Bytes this tensor adds to memory when it is created (0 for a view)."""
        return 0 if self.view_of is not None else self.nbytes

    @property
    def is_fixed(self) -> bool:
        return self.kind in FIXED_KINDS


@dataclass(frozen=True)
class ForwardImpl:
    """One way to run a forward op.

    ``overwrites`` names an input whose storage the op's first output reuses (in-place);
    ``derived`` lists extra tensors the implementation produces for the backward (a packed
    mask, compact indices, saved statistics). A recomputation costs ``recompute_time_us``
    (defaults to ``time_us``) and additionally needs ``recompute_reads`` (for example the
    batch statistics saved by the first forward, so batch norm is recomputed exactly).
    """

    name: str
    time_us: float
    workspace: int = 0
    overwrites: str | None = None
    derived: tuple[str, ...] = ()
    recompute_time_us: float | None = None
    recompute_reads: frozenset[str] = frozenset()
    line: int = field(default=0, compare=False)

    @property
    def effective_recompute_time_us(self) -> float:
        return self.time_us if self.recompute_time_us is None else self.recompute_time_us


class _Alternatives:
    """Lookup of an op's implementations by name (shared by forward and backward ops)."""

    impls: tuple

    def impl(self, name: str):
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(name)

    @property
    def impl_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.impls)


@dataclass(frozen=True)
class ForwardOp(_Alternatives):
    """A forward operator: reads ``inputs``, produces ``outputs`` with one of ``impls``."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    impls: tuple[ForwardImpl, ...]
    line: int = field(default=0, compare=False)



@dataclass(frozen=True)
class BackwardImpl:
    """One way to run a backward op: everything it reads (forward tensors, derived tensors,
    gradients), its time and its workspace.

    ``accumulates`` names outputs (gradients of fixed tensors: parameter gradients) that
    this implementation adds straight into their resident storage (``.grad``), piece by
    piece, instead of returning a new tensor that is then added in: such an output
    allocates nothing; the pieces are the workspace.

    ``overwrites`` names a gradient the implementation reads whose storage its first
    output takes (an input gradient written over the output gradient, slice by slice or
    element by element): that output allocates nothing and the overwritten gradient is
    gone after the step. Legal only where the step is the gradient's last reader and the
    two have the same size (``validate.backward_overwrite_problem``)."""

    name: str
    reads: frozenset[str]
    time_us: float
    workspace: int = 0
    line: int = field(default=0, compare=False)
    accumulates: frozenset[str] = frozenset()
    overwrites: str | None = None


@dataclass(frozen=True)
class BackwardOp(_Alternatives):
    """A backward operator; ``of`` is the forward op it differentiates (None in plain DAGs)."""

    name: str
    outputs: tuple[str, ...]
    impls: tuple[BackwardImpl, ...]
    of: str | None = None
    line: int = field(default=0, compare=False)

    def new_output_bytes(self, impl: BackwardImpl, tensors: dict[str, Tensor]) -> int:
        """Bytes the step allocates for its outputs when it runs ``impl``: every output but
        those the implementation accumulates into resident storage and the one it writes
        over a gradient it reads."""
        return sum(tensors[o].storage_bytes for o in self.outputs
                   if o not in impl.accumulates and o != self.overwriting_output(impl))

    def overwriting_output(self, impl: BackwardImpl) -> str | None:
        """The output that takes the storage of the gradient ``impl`` overwrites (the
        first output not accumulated), or None."""
        if impl.overwrites is None:
            return None
        return next((o for o in self.outputs if o not in impl.accumulates), None)

    @property
    def local_name(self) -> str:
        if self.of is not None and self.name.startswith(self.of + "."):
            return self.name[len(self.of) + 1 :]
        return self.name


@dataclass(frozen=True)
class FixedItem:
    """A named block of fixed memory that is not a declared tensor (e.g. optimizer state)."""

    name: str
    nbytes: int
    line: int = field(default=0, compare=False)


@dataclass
class Network:
    """The training graph: tensors, forward and backward ops, outputs and fixed memory.

    ``forward_ops`` and ``backward_ops`` keep declaration order; the text printer writes
    them back in that order, so a hand-written spec keeps its layout.
    """

    name: str
    tensors: dict[str, Tensor]
    forward_ops: tuple[ForwardOp, ...]
    backward_ops: tuple[BackwardOp, ...]
    outputs: tuple[str, ...] = ()
    fixed: tuple[FixedItem, ...] = ()
    line: int = field(default=0, compare=False)

    def op(self, name: str) -> ForwardOp | BackwardOp:
        """The forward or backward op called ``name`` (ops share one namespace)."""
        index = self._op_index()
        return index[name]

    def _op_index(self) -> dict[str, ForwardOp | BackwardOp]:
        cached = self.__dict__.get("_op_cache")
        key = (id(self.forward_ops), id(self.backward_ops))
        if cached is None or cached[0] != key:
            table: dict[str, ForwardOp | BackwardOp] = {}
            for op in self.forward_ops:
                table.setdefault(op.name, op)
            for op in self.backward_ops:
                table.setdefault(op.name, op)
            cached = (key, table)
            self.__dict__["_op_cache"] = cached
        return cached[1]

    def has_op(self, name: str) -> bool:
        return name in self._op_index()

    def with_impls(self, forward=None, backward=None) -> "Network":
        """A copy whose implementations are ``forward(op, impl)`` / ``backward(op, impl)``
        (unchanged where a function is not given): how measured times and workspaces, or
        none, are put into a network without touching its graph."""
        def mapped(ops, fn):
            return ops if fn is None else tuple(replace(op, impls=tuple(fn(op, i) for i in op.impls)) for op in ops)

        return Network(self.name, self.tensors, mapped(self.forward_ops, forward), mapped(self.backward_ops, backward),
                       self.outputs, self.fixed)

    @property
    def fixed_bytes(self) -> int:
        """Memory resident throughout a training step: inputs, params, buffers, fixed items."""
        resident = sum(t.storage_bytes for t in self.tensors.values() if t.is_fixed)
        return resident + sum(item.nbytes for item in self.fixed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Network):
            return NotImplemented
        return (
            self.name == other.name
            and self.tensors == other.tensors
            and self.forward_ops == other.forward_ops
            and self.backward_ops == other.backward_ops
            and self.outputs == other.outputs
            and self.fixed == other.fixed
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Pattern:
    """A name or shell-style glob (``relu*``, ``layer1.*.conv?``) written in constraints."""

    text: str
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class ImplPin:
    """``impl PATTERN = NAME`` or ``impl PATTERN in (A, B)``: allowed implementations."""

    pattern: Pattern
    allowed: tuple[str, ...]


@dataclass
class Constraints:
    """What the user asks of a schedule: a memory budget, an overhead cap and pins."""

    memory_budget: int | None = None
    max_overhead: float | None = None
    keep: tuple[Pattern, ...] = ()
    never_recompute: tuple[Pattern, ...] = ()
    impls: tuple[ImplPin, ...] = ()
    line: int = field(default=0, compare=False)

    def is_empty(self) -> bool:
        return (
            self.memory_budget is None
            and self.max_overhead is None
            and not self.keep
            and not self.never_recompute
            and not self.impls
        )


@dataclass
class Spec:
    """A parsed ``.monet`` spec: the network, its constraints, and where it came from."""

    network: Network
    constraints: Constraints = field(default_factory=Constraints)
    path: str = "<input>"
    source: str = field(default="", compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """Hash of the canonical network text without its times; schedules name it to refuse
        a spec of another graph. Times are left out because a schedule is valid for its
        graph under any costs (the roofline's, or ones timed on this machine, which differ
        from run to run); the simulator re-derives compute from the spec it checks against.
        Everything that decides validity or memory (tensors, sizes, reads, implementations,
        workspaces) is in."""
        from .grammar.printer import format_network  # local: the printer imports the IR

        return hashlib.sha256(format_network(_untimed(self.network)).encode()).hexdigest()[:16]


def _untimed(network: Network) -> Network:
    """``network`` with every implementation's time set to zero (and no recompute time)."""
    return network.with_impls(lambda op, i: replace(i, time_us=0.0, recompute_time_us=None),
                              lambda op, i: replace(i, time_us=0.0))


@dataclass(frozen=True)
class StagePlan:
    """One backward stage: recompute ``recompute`` (forward ops, in order), run ``backward``,
    carry ``keep`` (tensors recomputed here) to later stages, drop ``free`` after the stage."""

    backward: str
    recompute: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    free: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)


@dataclass
class Schedule:
    """A complete plan for one training step of a spec.

    ``impls`` maps every op with more than one implementation to the chosen one;
    ``forward_keep`` are the tensors the forward pass keeps for the backward; ``stages``
    lists the backward ops in execution order with their recomputations.
    """

    spec_path: str
    fingerprint: str
    impls: dict[str, str]
    forward_keep: tuple[str, ...]
    stages: tuple[StagePlan, ...]
    comments: tuple[str, ...] = field(default=(), compare=False)
    path: str = field(default="<schedule>", compare=False)
    source: str = field(default="", compare=False, repr=False)
    impl_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    forward_line: int = field(default=0, compare=False)
    line: int = field(default=0, compare=False)
