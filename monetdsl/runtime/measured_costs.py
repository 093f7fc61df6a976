"""The costs a plan is solved on when the model trains on a real device (the default).

Two measurements, both kept in the :class:`~monetdsl.costs.MeasurementStore` by op
signature:

1. every op and implementation alone (:func:`monetdsl.costs.measure_costs`): its time and
   its allocator-measured workspace;
2. the times in place, inside store-all training steps run by the executor
   (:mod:`.calibrate`), which differ from the alone times by what a real step adds
   (pages faulted in, cold caches, the executor's own work), and what an implementation
   that cuts a stretch of autograd's engine costs besides (:mod:`.stretch_cuts`).

The second needs the whole model, so it runs only when some op of the graph has no
in-place times stored yet; its medians are then stored with each op's entry (ops of one
signature share the median of their samples). Planning the same model again, or a model
made of layers already measured, runs no step at all.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

import torch

from ..costs import MeasurementStore, measured_report, profiled_cost_model
from ..tracing.api import with_costs
from .calibrate import CALIBRATION_NOTE, EagerPairs, device_of, in_place_times, with_in_place_times
from .eager_reference import keep_calibration_pairs
from .stretch_cuts import charge_stretch_cuts

__all__ = ["measured_trace", "measured_cost_model", "device_of", "IN_PLACE_ROUNDS", "LEAST_NEW_SHARE"]

#: timed store-all steps per calibration schedule (after a warm-up step): planning time
#: matters, and ops of one signature pool their samples in the store
IN_PLACE_ROUNDS = 1
#: a calibration schedule is stepped only when it times at least this share of the
#: graph's (signature, implementation) pairs for the first time
#: (:func:`~.calibrate.calibration_schedules`): each is a lowering and a training step
LEAST_NEW_SHARE = 0.05


def measured_cost_model(device: str) -> str:
    """The cost-model line of a trace whose costs come from :func:`measured_trace`."""
    return f"{profiled_cost_model(device)}; {CALIBRATION_NOTE}"


def _stored_in_place(network, entries: dict) -> dict | None:
    """(op, implementation) -> in-place us from the entries, or None when an op has none stored."""
    found = {}
    for op in network.forward_ops:
        in_place = entries.get(op.name, {}).get("in_place")
        if in_place is None:
            return None
        for impl, us in in_place.get("forward", {}).items():
            found[(op.name, impl)] = us
    for bop in network.backward_ops:
        in_place = entries.get(bop.of, {}).get("in_place")
        if in_place is None:
            return None
        for impl, us in in_place.get("backward", {}).get(bop.local_name, {}).items():
            found[(bop.name, impl)] = us
    return found


def _pooled_in_place(network, report, in_place: dict) -> tuple[dict, dict]:
    """The in-place times by signature: each signature's median over its ops' samples, as
    ``(pooled, medians)``: ``pooled`` is (op, implementation) -> that median (what a later
    run reads back from the store, so this run plans on the same times), ``medians`` is
    signature -> its ``in_place`` entry."""
    samples: dict[str, dict] = defaultdict(lambda: {"forward": defaultdict(list), "backward": defaultdict(lambda: defaultdict(list))})
    for op in network.forward_ops:
        for impl in op.impls:
            if (op.name, impl.name) in in_place:
                samples[report.signatures[op.name]]["forward"][impl.name].append(in_place[(op.name, impl.name)])
    for bop in network.backward_ops:
        for impl in bop.impls:
            if (bop.name, impl.name) in in_place:
                samples[report.signatures[bop.of]]["backward"][bop.local_name][impl.name].append(in_place[(bop.name, impl.name)])
    medians = {
        signature: {
            "forward": {impl: statistics.median(v) for impl, v in got["forward"].items()},
            "backward": {local: {impl: statistics.median(v) for impl, v in by_impl.items()} for local, by_impl in got["backward"].items()},
        }
        for signature, got in samples.items()
    }
    pooled = {}
    for op in network.forward_ops:
        for impl, us in medians.get(report.signatures.get(op.name), {}).get("forward", {}).items():
            pooled[(op.name, impl)] = us
    for bop in network.backward_ops:
        for impl, us in medians.get(report.signatures.get(bop.of), {}).get("backward", {}).get(bop.local_name, {}).items():
            pooled[(bop.name, impl)] = us
    return pooled, medians


def _kin(network, report):
    """(op, implementation) -> what shares its stored in-place time: the op's signature,
    its backward op's local name, the implementation."""
    local = {op.name: (op.name, "forward") for op in network.forward_ops}
    local.update({bop.name: (bop.of, bop.local_name) for bop in network.backward_ops})

    def kin(pair):
        forward_op, role = local[pair[0]]
        return report.signatures.get(forward_op, forward_op), role, pair[1]

    return kin


def _store_in_place(network, report, medians: dict, store: MeasurementStore) -> None:
    """Each kept signature's entry with its median in-place times."""
    done = set()
    for op in network.forward_ops:
        signature = report.signatures.get(op.name)
        if signature not in report.kept or signature in done:
            continue
        done.add(signature)
        entry = dict(report.entries[op.name])
        entry["in_place"] = medians.get(signature, {"forward": {}, "backward": {}})
        store.put(signature, entry)


def measured_trace(model: torch.nn.Module, inputs, trace, *, optimizer: str, store: MeasurementStore | None = None):
    """``trace`` (of ``model`` on ``inputs``, ``loss="output"``) with the costs measured on
    the inputs' device: alone, then in place (see the module docstring). ``store``: where
    measurements are kept (default: the user's cache directory). The model's state is
    untouched."""
    store = store if store is not None else MeasurementStore()
    device = device_of(inputs)
    trace, report = measured_report(trace, device, store)
    measured = with_costs(trace, report.network, profiled_cost_model(device), report.notes)
    in_place = _stored_in_place(report.network, report.entries)
    notes: list[str] = []
    if in_place is None:
        pairs = EagerPairs()  # eager's steps beside the fastest store-all's, for the eager reference
        samples, notes = in_place_times(model, list(inputs), measured, optimizer=optimizer, rounds=IN_PLACE_ROUNDS,
                                        eager_pairs=pairs, groups=report.signatures, least_new=LEAST_NEW_SHARE)
        # planned on the pooled medians, as the next run reads them back: a schedule this run
        # solves replays on that run's costs exactly, so its cache entry is reused
        in_place, medians = _pooled_in_place(report.network, report, samples)
        charged, cut_notes = charge_stretch_cuts(model, list(inputs), measured, in_place, optimizer=optimizer,
                                                 kin=_kin(report.network, report), eager_pairs=pairs)
        if cut_notes:
            notes = [*notes, *cut_notes]
            in_place, medians = _pooled_in_place(report.network, report, charged)
        _store_in_place(report.network, report, medians, store)
        calibrated = with_in_place_times(measured, in_place, notes).trace
        keep_calibration_pairs(store, calibrated, device, pairs)
        return calibrated
    return with_in_place_times(measured, in_place, notes).trace
