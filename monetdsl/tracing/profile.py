"""``--profile``: costs measured on the real device instead of the roofline.

What is measured, and how, is the costing stage's business (:mod:`monetdsl.costs`): every
op and implementation run alone on real tensors of its traced shapes, with the step
functions the runtime runs, timed and watched by the device's allocator, and kept on disk
by op signature. This module names the result in the spec's cost-model line.
"""
from __future__ import annotations

import torch

from ..ir import Network
from .to_ir import BuiltNetwork

__all__ = ["profile_network", "profiled_cost_model", "device_description", "MEASURE_REPEATS"]

#: timed runs per step (after one warm-up): the median is steady by then on small ops,
#: and planning time matters
MEASURE_REPEATS = 3


def device_description(device: str) -> str:
    """The device times are measured on, as specs and caches name it."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def profiled_cost_model(device: str, repeats: int = MEASURE_REPEATS) -> str:
    """The cost-model line of a spec measured on ``device`` (the same on every run of one
    machine: the runtime keys its caches on it)."""
    return (f"measured on {device_description(device)} (median of {repeats} runs after a warm-up run, per op and"
            " implementation; workspaces from the allocator's peak)")


def profile_network(built: BuiltNetwork, device: str, repeats: int = MEASURE_REPEATS, store=None) -> Network:
    """A copy of the built network with measured times and workspaces (``store``: a
    :class:`~monetdsl.costs.MeasurementStore`, by default the user's cache). Steps that
    cannot be run keep their estimates; ``built.notes`` says so."""
    from ..costs import MeasurementStore, measure_costs

    report = measure_costs(built, device, store if store is not None else MeasurementStore(), repeats)
    built.notes.extend(report.notes)
    return report.network
