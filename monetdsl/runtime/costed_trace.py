"""The traced, costed spec a runtime plan is made from.

The runtime traces with ``loss="output"``: the spec ends at the model's output (the
training loop computes its loss), or at the loss itself for a model that returns one.
Its costs follow the inputs' device: the roofline preset, or (the default when a schedule
is to be solved on a real device) every op and implementation measured there and
corrected in place by store-all training steps (:mod:`.measured_costs`, :mod:`.calibrate`),
the measurements kept by op signature so a later run reads them back instead.
"""
from __future__ import annotations

import torch

from ..planning.schedules import fingerprint_of

__all__ = ["trace_for_runtime", "timed_trace", "trace_for_plan"]


def trace_for_runtime(model: torch.nn.Module, inputs, *, optimizer: str, device: str | None = None, profile: bool = False,
                      calibrate: bool = True, store=None, estimate_workspaces: bool = True, capture_cache=None):
    """Trace ``model`` on ``inputs`` ending at its output; the cost model follows the inputs'
    device (its roofline preset, or with ``profile`` every op and alternative timed on it,
    then, with ``calibrate``, corrected by timing store-all training steps in place:
    :mod:`.calibrate`). ``store`` (a :class:`~monetdsl.costs.MeasurementStore`): where
    the workspace estimates (and with ``profile`` the measurements) are kept.
    ``estimate_workspaces=False``: no FakeTensor estimates (the caller measures).
    ``capture_cache``: the directory of captured steps (:mod:`monetdsl.tracing.kept_captures`),
    or None to trace."""
    from ..costs import trace_model
    from ..tracing.capture import CaptureError

    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
    preset = device or ("cuda" if on_cuda else "cpu")
    try:
        traced = trace_model(model, list(inputs), loss="output", device=preset, optimizer=optimizer, profile=profile, store=store,
                             estimate_workspaces=estimate_workspaces, capture_cache=capture_cache)
    except CaptureError:
        if preset != "cuda" or profile:
            raise
        return trace_model(model, list(inputs), loss="output", device="A100", optimizer=optimizer, store=store,
                           capture_cache=capture_cache)
    if profile and calibrate:
        from .calibrate import calibrate as calibrate_in_place

        traced = calibrate_in_place(model, list(inputs), traced, optimizer=optimizer).trace
    return traced


def _store(cache_dir):
    """The measurement store in ``cache_dir``, or the user's (it keeps the workspace
    estimates of every graph, and the measured costs)."""
    from ..costs import MeasurementStore

    return MeasurementStore(cache_dir) if cache_dir is not None else MeasurementStore()


def timed_trace(model: torch.nn.Module, inputs, *, optimizer: str, cache_dir: str | None = None, capture_cache=None):
    """``model`` traced with every op and implementation measured on its inputs' device
    (time and allocator-measured memory, alone and in place: :mod:`.measured_costs`), the
    measurements kept by op signature in ``cache_dir`` (default: the user's cache
    directory), so only ops never measured on this machine are run. The FakeTensor
    workspace estimates are made (and kept there) only when a step's workspace could not
    be measured. ``capture_cache``: see :func:`trace_for_runtime`."""
    from .measured_costs import measured_trace

    store = _store(cache_dir)
    plain = trace_for_runtime(model, inputs, optimizer=optimizer, store=store, estimate_workspaces=False,
                              capture_cache=capture_cache)
    return measured_trace(model, inputs, plain, optimizer=optimizer, store=store)


def trace_for_plan(model, inputs, constraints: Constraints, *, optimizer: str, cache_dir, profile: bool | None,
                   capture_cache=None):
    """The trace a plan is made from. ``profile`` None (the default): measured costs on a
    real device when a schedule is to be solved; with a schedule file, the roofline trace
    (no op runs), or the measured one when the file was solved on measured costs (its
    fingerprint, which names the workspaces, is then the measured trace's: the
    measurements of this machine are in the store, so nothing runs again).
    ``capture_cache``: see :func:`trace_for_runtime`."""
    on_device = not any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs)
    if profile or (profile is None and constraints.schedule is None and on_device):
        return timed_trace(model, inputs, optimizer=optimizer, cache_dir=cache_dir, capture_cache=capture_cache)
    plain = trace_for_runtime(model, inputs, optimizer=optimizer, store=_store(cache_dir), capture_cache=capture_cache)
    if profile is None and constraints.schedule is not None and on_device:
        wanted = fingerprint_of(constraints.schedule)
        if wanted not in (None, plain.spec.fingerprint):
            measured = timed_trace(model, inputs, optimizer=optimizer, cache_dir=cache_dir, capture_cache=capture_cache)
            if measured.spec.fingerprint == wanted:
                return measured
    return plain
