"""The vocabulary of the operator catalogue: op kinds, their alternatives and bindings.

The catalogue is the single source of truth about operator implementations. For every op
kind it says which alternatives exist, what each forward alternative produces besides
the op's own outputs (a 1-bit mask, compact indices, an RNG seed), what each backward
alternative reads, and how each one is computed (plain torch functions, the reference
that the tracer's tests check against autograd and that a runtime may register as custom
ops). The tracer turns these role-level descriptions into concrete ``.monet`` tensors.

Roles are short names for an op's tensors: ``x`` (main input), ``w``/``b`` (weight and
bias), ``y`` (main output), ``mean``/``invstd`` (saved statistics), ``mask`` and so on.
A backward alternative's ``reads`` lists roles; gradients of the op's outputs are always
read and are not listed.

Conventions the tracer relies on:

* the **first** forward alternative and the first alternative of every backward step
  together keep exactly what PyTorch's autograd keeps (the tracer checks this against
  the captured graph and falls back to the op's generic description when it does not
  hold);
* a forward alternative with ``overwrites="x"`` writes its output into ``x``'s storage;
  a backward alternative with ``overwrites="y"`` writes its input gradient into the
  storage of ``y``'s incoming gradient (the reference implementations do that too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["ForwardAlt", "BackwardAlt", "BackwardStep", "Binding", "OpKind", "DerivedType", "GradTarget"]


@dataclass(frozen=True)
class ForwardAlt:
    """One way to run the forward of an op kind.

    ``derived`` are roles of extra tensors this alternative produces for the backward;
    ``recompute_reads`` are roles a recomputation needs besides the op's inputs (saved
    statistics, a mask, a seed), which make the recomputed output identical to the
    first one; ``cheaper_recompute`` marks alternatives whose recomputation skips work
    (batch statistics are reused rather than reduced again).
    """

    name: str
    derived: tuple[str, ...] = ()
    overwrites: str | None = None
    recompute_reads: tuple[str, ...] = ()
    cheaper_recompute: bool = False
    doc: str = ""


@dataclass(frozen=True)
class BackwardAlt:
    """One way to run a backward step: the roles it reads (gradients of outputs implied).

    ``accumulates`` are parameter roles whose gradient the alternative adds straight into
    the resident ``.grad``, in pieces, instead of returning it (the tracer offers the
    alternative only when those roles are parameters). ``overwrites`` is an output role
    whose incoming gradient the alternative writes its result over (its storage becomes
    the input gradient's; the tracer keeps the alternative only where the memory model
    allows it: ``validate.backward_overwrite_problem``)."""

    name: str
    reads: tuple[str, ...]
    doc: str = ""
    accumulates: tuple[str, ...] = ()
    overwrites: str | None = None


@dataclass(frozen=True)
class BackwardStep:
    """A backward op of the kind: it computes the gradients of ``grads`` (input roles).

    Convolutions and matrix products have two steps (weight gradient and input
    gradient), so the input activation can be released right after the first.
    """

    name: str
    grads: tuple[str, ...]
    alts: tuple[BackwardAlt, ...]


@dataclass(frozen=True)
class GradTarget:
    """Where an alternative that accumulates a parameter gradient puts it: ``tensor`` (the
    parameter's ``.grad``, or the view of it the op's argument is) and whether to write it
    rather than add into it (a ``.grad`` just allocated for this step, not zeroed).

    ``adopt`` (with ``tensor`` None) says there is no gradient to add into yet (the
    parameter has no ``.grad``) and the step writes all of it: an alternative that can
    compute the gradient whole hands it over instead (``adopt(g)``: it becomes the
    ``.grad``, as autograd's first accumulation takes its gradient). Chunks only avoid a
    gradient-sized temporary beside an existing ``.grad``; with none, the whole kernel
    allocates the same bytes and runs faster. Only alternatives marked as adopting
    (``lowering.alternatives.ADOPTING``) are given such targets."""

    tensor: torch.Tensor | None
    overwrite: bool = False
    adopt: Callable[[torch.Tensor], None] | None = None


@dataclass
class Binding:
    """How one captured call maps onto an op kind's roles.

    ``inputs`` maps a role to the call's argument (an fx node in the tracer, a tensor in
    tests); ``outputs`` maps a role to the index of the call's result (``None`` for a
    single tensor result); ``attrs`` holds the non-tensor arguments the reference
    implementations need (kernel size, eps, the input's shape...).
    """

    inputs: dict[str, Any]
    outputs: dict[str, int | None]
    attrs: dict[str, Any] = field(default_factory=dict)


#: (dtype, shape) of a derived tensor
DerivedType = tuple[torch.dtype | str, tuple[int, ...]]


class OpKind:
    """Base class of catalogue entries. Subclasses fill in the class attributes and the
    methods; every method is a pure function of its arguments."""

    #: catalogue name (``relu``, ``batch_norm``...)
    name: str = ""
    #: aten overload packets this kind covers (``"relu"`` matches ``aten.relu.default``)
    aten: tuple[str, ...] = ()
    #: one line for docs and ``--help``
    summary: str = ""
    #: forward cost: floating-point operations per output element, for elementwise kinds
    flops_per_element: float = 1.0
    #: whether the first forward pass reads the input twice (statistics, then normalise)
    two_pass_forward: bool = False

    def bind(self, target, args: tuple, kwargs: dict, input_shapes: list, output_shapes: list) -> Binding | None:
        """Map a call onto roles, or None when this configuration is not covered
        (the tracer then describes the op generically, as autograd runs it)."""
        raise NotImplementedError

    def forward_alts(self, binding: Binding) -> tuple[ForwardAlt, ...]:
        raise NotImplementedError

    def backward_steps(self, binding: Binding) -> tuple[BackwardStep, ...]:
        raise NotImplementedError

    def workspace_roles(self, alt: str) -> tuple[str, ...]:
        """Roles whose size backward alternative ``alt`` allocates as a temporary, besides
        its outputs (an intermediate gradient autograd forms and drops within the step)."""
        return ()

    def flops(self, phase: str, alt: str, binding: Binding) -> float | None:
        """FLOPs of forward (``phase="forward"``) or backward alternative ``alt`` when they
        differ between alternatives in ways the tracer's generic rules (one forward count;
        a backward of twice the forward) do not capture; ``None`` keeps those rules."""
        return None

    def temporary_traffic(self, alt: str, binding: Binding, itemsize: int) -> int:
        """Bytes backward alternative ``alt`` writes to temporaries and reads back, besides
        reading what it reads and writing its outputs (the roofline charges them; an
        unfolded input, for example, is written once and read twice)."""
        return 0

    def derived_type(self, role: str, binding: Binding, y_dtype: torch.dtype, y_shape: tuple[int, ...]) -> DerivedType:
        """dtype and shape of a derived tensor. ``u1`` means one bit per element."""
        raise KeyError(role)

    # reference implementations ----------------------------------------------------------
    def forward(self, alt: str, inputs: dict[str, torch.Tensor], attrs: dict, saved: dict | None = None) -> dict[str, torch.Tensor]:
        """Run forward alternative ``alt``; returns every output and derived role.

        ``saved`` is given for a recomputation: the tensors named by the alternative's
        ``recompute_reads`` (so the result equals the first forward's, bit for bit)."""
        raise NotImplementedError

    def backward(self, step: str, alt: str, grads: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], attrs: dict) -> dict[str, torch.Tensor]:
        """Run backward alternative ``alt`` of ``step``: gradients of the step's roles.

        ``grads`` maps output roles to their incoming gradients; ``saved`` holds exactly
        the roles the alternative reads."""
        raise NotImplementedError

    def autograd_reference(self, inputs: dict[str, torch.Tensor], attrs: dict) -> dict[str, torch.Tensor]:
        """The op as plain differentiable torch code: the oracle the tests compare with."""
        raise NotImplementedError

    def examples(self) -> list[tuple[dict[str, torch.Tensor], dict]]:
        """Small (inputs, attrs) cases the tests run every alternative on."""
        raise NotImplementedError

    # helpers ------------------------------------------------------------------------------
    def all_alternatives(self, binding: Binding) -> dict[str, list[str]]:
        """{"forward": [...], step name: [...]} for documentation."""
        table = {"forward": [a.name for a in self.forward_alts(binding)]}
        for step in self.backward_steps(binding):
            table[step.name] = [a.name for a in step.alts]
        return table

