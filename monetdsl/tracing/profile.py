"""``--profile``: time every op and implementation on the real device.

Each op is run in isolation on random tensors of its traced shapes, every alternative
separately, with the step functions the runtime runs (:mod:`monetdsl.runtime.step_times`).
Each timing is the median of ``repeats`` runs after two warm-up runs, with the device
synchronised around every run. An implementation that cannot be run keeps its roofline
time and the spec says so in a note.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..ir import Network
from .to_ir import BuiltNetwork

__all__ = ["profile_network", "profiled_cost_model", "device_description", "time_call"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int = 5, setup=None) -> float:
    """Median microseconds of ``fn()`` (or ``fn(setup())``) after two warm-up calls.

    ``setup`` runs outside the timed region: fresh copies for in-place alternatives."""
    def once():
        arg = setup() if setup is not None else None
        _sync(device)
        start = time.perf_counter()
        fn(arg) if setup is not None else fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e6

    for _ in range(2):
        once()
    samples = [once() for _ in range(max(repeats, 1))]
    return round(statistics.median(samples), 3)


def device_description(device: str) -> str:
    """The device times are measured on, as specs and caches name it."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def profiled_cost_model(device: str, repeats: int = 5) -> str:
    """The cost-model line of a spec timed on ``device`` (the same on every run of one
    machine: the runtime keys its caches on it)."""
    return f"measured on {device_description(device)} (median of {repeats} runs after 2 warm-up runs, per op and implementation)"


def profile_network(built: BuiltNetwork, device: str, repeats: int = 5) -> Network:
    """A copy of the built network with measured times. Implementations that cannot be
    timed keep their roofline time; ``built.notes`` says so."""
    from ..runtime.step_times import time_steps

    report = time_steps(built, device, repeats)
    built.notes.extend(report.notes)
    return report.network
