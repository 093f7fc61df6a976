"""Fixed memory besides the graph's own tensors: parameter gradients and optimizer state.

Parameters, buffers and the input batch are tensors of the spec (kinds ``param``,
``buffer``, ``input``). What the optimizer step needs on top of them is declared as
``fixed`` items:

* ``gradients``: one gradient per trainable parameter (every optimizer);
* ``optimizer``: ``adam`` / ``adamw`` keep two moments per parameter (their step counters
  are host-side scalars and are not counted), ``momentum`` (SGD with momentum) one
  buffer, ``sgd`` (plain) nothing.
"""
from __future__ import annotations

import torch.nn as nn

from ..ir import FixedItem

__all__ = ["OPTIMIZERS", "fixed_items"]

#: optimizer -> state tensors per parameter
OPTIMIZERS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def fixed_items(model: nn.Module, optimizer: str) -> tuple[FixedItem, ...]:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    items = [FixedItem("gradients", trainable)]
    state = OPTIMIZERS[optimizer] * trainable
    if state:
        items.append(FixedItem("optimizer", state))
    return tuple(i for i in items if i.nbytes > 0)
