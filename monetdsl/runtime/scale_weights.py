"""Normalisations whose backward divides by their weight: keep them away from zeros.

A batch, layer or RMS norm's backward ``from_output`` rebuilds the normalised input as
``(y - bias) / weight`` instead of keeping the input. A weight with a zero entry makes
that impossible (torchvision's ``zero_init_residual=True`` starts every residual
branch's last batch-norm weight at zero; a weight can also reach zero in training), and
the gradients would be NaN or wrong. The runtime therefore

* plans with ``from_output`` forbidden (an implementation pin) for every norm whose
  weight has a zero when the plan is made, and
* before every training step, checks the weights of the norms its plan runs
  ``from_output``; when one has a zero, that step uses a plan made with those norms
  forbidden too (planned once, then cached), and a warning names them.

>>> import torch
>>> zero_weight_ops((("bn1", "bn1.weight"), ("bn2", "bn2.weight")), {"bn1.weight": torch.ones(3), "bn2.weight": torch.tensor([1.0, 0.0])})
frozenset({'bn2'})
"""
from __future__ import annotations

import torch

from ..ir import ImplPin, Network, Pattern

__all__ = ["FROM_OUTPUT", "weights_divided_by", "zero_weight_ops", "pins_avoiding_from_output"]

#: the backward alternative that divides by the norm's weight
FROM_OUTPUT = "from_output"

_NORMS = ("batch_norm", "layer_norm", "rms_norm")


def weights_divided_by(trace, impls: dict[str, str] | None, fixed_sources: dict) -> tuple[tuple[str, str], ...]:
    """``(norm op, parameter name in the model)`` for every norm whose chosen backward is
    ``from_output`` (with ``impls`` None: that has such an alternative) and whose weight is
    a parameter: the weights to check before a step, or before planning."""
    network = trace.spec.network
    backward_of = {bop.of: bop.name for bop in network.backward_ops}
    checks = []
    for record in trace.built.records:
        if record.kind is None or record.kind.name not in _NORMS or "w" not in record.role_names:
            continue
        bop = backward_of.get(record.name)
        source = fixed_sources.get(record.role_names["w"])
        chosen = FROM_OUTPUT if impls is None else impls.get(bop)
        if bop is not None and chosen == FROM_OUTPUT and source is not None and source[0] == "param":
            checks.append((record.name, source[1]))
    return tuple(checks)


def zero_weight_ops(checks, params: dict) -> frozenset[str]:
    """The norm ops among ``checks`` whose weight (looked up in ``params``) has a zero
    entry, with one host synchronisation for all of them on a GPU."""
    present = [(op, params[key]) for op, key in checks if key in params]
    if not present:
        return frozenset()
    flags = [(w.detach() == 0).any() for _, w in present]
    flags = torch.stack(flags).tolist() if len({f.device for f in flags}) == 1 else [bool(f) for f in flags]
    return frozenset(op for (op, _), zero in zip(present, flags) if zero)


def pins_avoiding_from_output(network: Network, ops) -> tuple[ImplPin, ...]:
    """Implementation pins that leave ``from_output`` out of these norms' backward ops."""
    pins = []
    for bop in network.backward_ops:
        if bop.of in ops and FROM_OUTPUT in bop.impl_names:
            pins.append(ImplPin(Pattern(bop.name), tuple(n for n in bop.impl_names if n != FROM_OUTPUT)))
    return tuple(pins)
