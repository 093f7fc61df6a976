"""Overhead caps against eager PyTorch's step, as users mean them.

The search plans a schedule's overhead against the cheapest schedule that recomputes
nothing, on the measured costs: the runtime's own store-all step. A user's cap is a
promise about eager PyTorch's step, and the runtime is not eager PyTorch: on a small
model its step does Python work per op that eager's C++ autograd does not (a 22-op CNN
on 8 CIFAR images: about x1.1 at store-all), on a larger one it can be faster (its
backward frees early and adds gradients in place). If the runtime's fastest step takes
``r`` x eager's, a schedule planned at overhead ``c`` runs at about ``(1 + c) r`` x
eager's; so the search gets the cap ``(1 + cap) / r - 1``, never more than the cap asked
for (``r`` is measured, with noise; a cap is not loosened on it). When that is below
:data:`EAGER_MARGIN` (2 %, what ``r``'s measurement resolves) no schedule that
recomputes fits, or one would fit by less than the noise of the measurement: the model
then trains as eager PyTorch (its own forward and autograd, which is the step the cap is
measured against), and a :class:`~monetdsl.errors.CapWarning` says so. The decision is
then a property of the model and cap, not of the machine's load at planning time: it
flips only where ``r`` itself is within noise of ``(1 + cap) / 1.02``.

``r`` is measured once per graph and machine and kept in the
:class:`~monetdsl.costs.MeasurementStore`. Where the costs are calibrated in place
(:mod:`.calibrate`), the calibration's last schedule, store-all with the fastest
implementations alone, is stepped without an observer interleaved with eager steps
(:func:`keep_calibration_pairs`): that is ``r``, with no lowering of its own; under pins
that rule some of those implementations out, it is scaled by the planned compute of the
fastest store-all the pins allow over the timed one's, on the calibrated costs. The
runtime's step is what is timed, not a sum of per-op times: a per-op time cannot say
that a stretch through autograd's engine (:mod:`.stretches`) broken by another
implementation saves less. A graph whose in-place times were all read back from the
store (its layers calibrated in another model) times its own pairs: eager steps
interleaved with the runtime's store-all steps of the fastest implementations. Either way
``r`` is the ratio of each side's fastest step (:func:`reference_of`), not a median: on a
shared machine the load only slows steps down, and a median moved with it. On a CPU the
steps are timed in the process's CPU time: wall time says more about the other processes
than about the two steps; with several intra-op threads it counts their work for both
steps alike. It applies where the costs were measured on the device (the default on a
real device); a plan on roofline estimates has no eager step to compare with. The pairs
stop (:func:`enough_pairs`) once the ratio is known within :data:`REFERENCE_TOLERANCE` (a
95 % confidence interval of the pairs' mean ratio, at least 3 pairs), after 11 pairs, or
once 3 s went into them (at least 2 pairs: a ResNet-18's pair takes seconds on a CPU, and
a third would add as much to planning); but short steps are paired for at least
:data:`REFERENCE_MIN_SECONDS` (up to :data:`REFERENCE_MOST` pairs): the fastest of dozens
of steps of a few ms is the undisturbed one, the fastest of three was not always.

>>> reference = EagerReference(eager_us=2000.0, runtime_us=2200.0)
>>> round(reference.search_cap(0.15), 4), reference.search_cap(0.05)
(0.0455, None)
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch

from ..costs import MeasurementStore
from ..costs.signature import machine_signature
from ..errors import CapWarning, warn_at_user
from ..search.impl_choice import cheapest_impls, first_impls
from ..validate import resolve_constraints
from ..search.simulator import simulate
from .calibrate import CALIBRATION_NOTE, device_of, paired_with_eager, state_restored, store_all_schedule

__all__ = ["EagerReference", "REFERENCE_ROUNDS", "REFERENCE_SECONDS", "REFERENCE_TOLERANCE", "REFERENCE_MIN_SECONDS",
           "REFERENCE_MOST", "EAGER_MARGIN", "enough_pairs", "measure_reference",
           "time_against_eager", "eager_reference", "reference_of", "keep_calibration_pairs", "cap_against_eager"]

#: interleaved (eager, runtime) step pairs timed, after one warm-up pair, at most ...
REFERENCE_ROUNDS = 11
#: ... and no more once this many seconds went into them (at least 2 pairs): planning time
#: matters, a 3 ms step pair costs 70 ms for all 11, a 1 s one would cost 24 s ...
REFERENCE_SECONDS = 3.0
#: ... or once the ratio is known within this share of it (the half-width of a 95 %
#: confidence interval of the mean ratio, from 3 pairs on): a cap moves by about as much
REFERENCE_TOLERANCE = 0.02
#: short steps are paired for at least this many seconds (up to :data:`REFERENCE_MOST`
#: pairs), whatever the rules above say: each side's fastest step is the reference, and
#: on a shared machine the fastest of 3 steps of a few ms moved a small CNN's ratio
#: across its cap between two runs; the fastest of dozens is the undisturbed step
REFERENCE_MIN_SECONDS = 0.5
REFERENCE_MOST = 41
#: the model trains as eager PyTorch when the runtime's store-all leaves less room than
#: this for recomputation: the ratio is measured to about :data:`REFERENCE_TOLERANCE`, so
#: a smaller room is a decision the load of the machine makes, and a schedule that may
#: recompute 1 % of a step saves little
EAGER_MARGIN = REFERENCE_TOLERANCE
#: Student's t at 97.5 % by degrees of freedom (n - 1 pairs), for the interval above
_T975 = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class EagerReference:
    """Median step times (us) of eager PyTorch and of the runtime's store-all schedule with
    the fastest implementations (the search's overhead baseline), and their ratio."""

    eager_us: float
    runtime_us: float
    ratio: float | None = None  # median of the pairs' ratios; runtime_us / eager_us when not given

    @property
    def runtime_over_eager(self) -> float:
        return self.ratio if self.ratio is not None else self.runtime_us / self.eager_us

    def search_cap(self, cap: float) -> float | None:
        """The overhead cap against the runtime's store-all step that keeps a schedule
        within ``cap`` of eager's step (at most ``cap``), or None when even store-all
        does not fit, or leaves less room than :data:`EAGER_MARGIN` (module docstring)."""
        allowed = (1.0 + cap) / self.runtime_over_eager - 1.0
        return None if allowed < EAGER_MARGIN else min(cap, allowed)


def enough_pairs(ratios: list[float], seconds: float, rounds: int = REFERENCE_ROUNDS) -> bool:
    """Whether the timed pairs so far (their runtime / eager ratios, ``seconds`` spent on
    them) are enough: :data:`REFERENCE_MOST` of them; else none before 2 pairs and
    :data:`REFERENCE_MIN_SECONDS`; then ``rounds`` of them, or any once
    :data:`REFERENCE_SECONDS` went by, or 3 or more whose mean ratio is known within
    :data:`REFERENCE_TOLERANCE` (95 %).

    >>> enough_pairs([1.10, 1.11, 1.10], 0.6), enough_pairs([1.10, 1.11, 1.10], 0.1), enough_pairs([1.0, 1.3], 3.5)
    (True, False, True)
    """
    n = len(ratios)
    if n >= REFERENCE_MOST:
        return True
    if n < 2 or seconds < REFERENCE_MIN_SECONDS:
        return False
    if n >= rounds or seconds >= REFERENCE_SECONDS:
        return True
    if n < 3:
        return False
    half_width = _T975.get(n - 1, 2.2) * statistics.stdev(ratios) / n ** 0.5
    return half_width <= REFERENCE_TOLERANCE * statistics.median(ratios)


def measure_reference(model: torch.nn.Module, inputs, trace, spec=None, *, optimizer: str,
                      rounds: int = REFERENCE_ROUNDS) -> EagerReference:
    """Eager steps of ``model`` interleaved with the runtime's steps of the store-all
    schedule with the fastest implementations on ``trace``'s costs that ``spec``'s pins
    allow (default: the trace's spec; see the module docstring); the model's state is
    left as it was."""
    spec = spec if spec is not None else trace.spec
    network = spec.network
    allowed = resolve_constraints(network, spec.constraints, path=spec.path, source=spec.source).allowed_impls
    schedule = store_all_schedule(network, cheapest_impls(network, allowed), trace.spec.fingerprint)
    if schedule is None:
        raise ValueError("no store-all schedule of the fastest implementations is valid")
    return time_against_eager(model, inputs, trace, schedule, optimizer=optimizer, rounds=rounds)


def time_against_eager(model: torch.nn.Module, inputs, trace, schedule, *, optimizer: str,
                       rounds: int = REFERENCE_ROUNDS) -> EagerReference:
    """Eager steps of ``model`` interleaved with the runtime's steps of ``schedule``
    (:func:`reference_of` their pairs); the model's state is left as it was."""
    from .module import OptimizedModule
    from ..planning import Constraints

    device = device_of(inputs)
    pairs: list = []
    with state_restored(model, device):
        runtime = OptimizedModule(model, Constraints(None, None, schedule, "auto", engine_room=True), optimizer=optimizer, announce=False)
        runtime.plan_for(*inputs, trace=trace)
        paired_with_eager(model, runtime, inputs, device, pairs, rounds)
    return reference_of(pairs)


def reference_of(pairs: list[tuple[float, float]]) -> EagerReference:
    """The reference of interleaved ``(eager, runtime)`` step pairs (seconds): each side's
    fastest step, and their ratio. Another process can only add to a step's time (it
    takes the cores and the caches, and on a CPU an intra-op thread spinning for a
    descheduled one counts CPU time), so each side's fastest step is its least disturbed.
    Under heavy load neither this nor a median of the pairs' ratios is steady (a small
    CNN at load average 7-10 on 2 cores: 1.0-3.9 and 1.0-3.3 over eleven repetitions).

    >>> reference_of([(1.0, 1.2), (2.0, 1.1), (1.1, 3.0)]).runtime_over_eager
    1.1
    """
    eager, ours = min(a for a, _ in pairs), min(b for _, b in pairs)
    return EagerReference(eager * 1e6, ours * 1e6, ours / eager)


def _key(trace, spec, device: str) -> str:
    clock = "wall time" if device == "cuda" else "process CPU time"
    pins = f"; pins {spec.constraints.impls!r}" if spec.constraints.impls else ""
    return f"eager reference in {clock}; graph {trace.spec.fingerprint}{pins}; {machine_signature(device)}"


def _pairs_key(trace, device: str) -> str:
    clock = "wall time" if device == "cuda" else "process CPU time"
    return f"eager against the calibration's fastest store-all in {clock}; graph {trace.spec.fingerprint}; {machine_signature(device)}"


def keep_calibration_pairs(store: MeasurementStore, trace, device: str, eager) -> None:
    """Keep the step pairs the calibration timed on its store-all schedule of the fastest
    implementations (``eager``: an :class:`~.calibrate.EagerPairs`) for
    :func:`eager_reference`: :func:`reference_of` them, and that schedule's planned
    compute on ``trace``'s calibrated costs (what a later run reads back, too). Not kept
    when the calibrated costs make other implementations the fastest: the calibration
    picks its fastest on the costs measured alone, and where what a stretch saves makes
    PyTorch's own the fastest after all, the timed schedule's other implementations cut
    the stretch its baseline runs in (an unrolled GRU: x2.4 of eager's step timed, x1.1
    for the store-all the search plans against), which no scaling by planned compute shows."""
    network = trace.spec.network
    timed = store_all_schedule(network, eager.impls, trace.spec.fingerprint) if eager.impls else None
    if timed is None or len(eager.pairs) < 2 or not all(a > 0 for a, _ in eager.pairs):
        return
    if cheapest_impls(network) != eager.impls:
        return  # the calibrated costs (a stretch's savings) chose other implementations: the pairs time another baseline
    found = reference_of(eager.pairs)
    store.put(_pairs_key(trace, device), {"eager_us": found.eager_us, "runtime_us": found.runtime_us,
                                          "ratio": found.runtime_over_eager,
                                          "planned_us": simulate(network, timed).compute_us})


def _from_calibration_pairs(trace, spec, device: str, store: MeasurementStore) -> EagerReference | None:
    """The reference from the calibration's pairs: their ratio, times the planned compute
    of the store-all with the fastest implementations ``spec``'s pins allow over the timed
    schedule's, both on the calibrated costs; None without pairs."""
    found = store.get(_pairs_key(trace, device))
    if found is None or not {"eager_us", "runtime_us", "ratio", "planned_us"} <= set(found) \
            or found["eager_us"] <= 0 or found["planned_us"] <= 0:
        return None
    network = spec.network
    allowed = resolve_constraints(network, spec.constraints, path=spec.path, source=spec.source).allowed_impls
    fastest = store_all_schedule(network, cheapest_impls(network, allowed), trace.spec.fingerprint)
    if fastest is None:
        return None
    scale = simulate(network, fastest).compute_us / found["planned_us"]
    return EagerReference(found["eager_us"], found["runtime_us"] * scale, found["ratio"] * scale)


def eager_reference(model: torch.nn.Module, inputs, trace, spec=None, *, optimizer: str,
                    store: MeasurementStore | None = None) -> EagerReference:
    """The stored reference of this graph (with ``spec``'s pins) on this machine, else one
    from the calibration's pairs (:func:`keep_calibration_pairs`), else one measured now;
    kept."""
    store = store if store is not None else MeasurementStore()
    spec = spec if spec is not None else trace.spec
    device = device_of(inputs)
    key = _key(trace, spec, device)
    found = store.get(key)
    if found is not None and {"eager_us", "runtime_us", "ratio"} <= set(found) and found["eager_us"] > 0:
        return EagerReference(found["eager_us"], found["runtime_us"], found["ratio"])
    reference = _from_calibration_pairs(trace, spec, device, store)
    if reference is None:
        reference = measure_reference(model, inputs, trace, spec, optimizer=optimizer)
    store.put(key, {"eager_us": reference.eager_us, "runtime_us": reference.runtime_us, "ratio": reference.runtime_over_eager})
    return reference


def cap_against_eager(model: torch.nn.Module, inputs, trace, spec, constraints, *, optimizer: str, cache_dir=None):
    """``constraints`` (:class:`~monetdsl.runtime.plan.Constraints`) with the overhead cap
    the search needs on ``spec`` (the trace's, with the plan's pins) for the caller's cap
    to hold against eager's step (module docstring). Unchanged without a cap, with a
    schedule given, or on costs not measured on the device."""
    if constraints.max_overhead is None or constraints.schedule is not None or CALIBRATION_NOTE not in trace.cost_model:
        return constraints
    store = MeasurementStore(cache_dir) if cache_dir is not None else MeasurementStore()
    try:
        reference = eager_reference(model, inputs, trace, spec, optimizer=optimizer, store=store)
    except Exception as exc:  # noqa: BLE001 - the plan goes on against the runtime's own baseline, and says so
        warn_at_user(f"monetdsl: eager's step could not be timed next to the runtime's ({type(exc).__name__}: "
                     f"{str(exc)[:80]}); the overhead cap is planned against the runtime's store-all step", CapWarning)
        return constraints
    cap = reference.search_cap(constraints.max_overhead)
    if cap is None:
        eager = _eager_schedule(spec, trace)
        runs = "the model runs as eager PyTorch (no memory saved)" if eager is not None else "the plan keeps every tensor"
        warn_at_user(f"monetdsl: the runtime's fastest step measured x{reference.runtime_over_eager:.2f} of eager PyTorch's"
                     f" on this model and machine, so no schedule that recomputes fits max_overhead="
                     f"{constraints.max_overhead:.1%} of eager's step; {runs}", CapWarning)
        if eager is None:
            return replace(constraints, max_overhead=None, method="store-all")
        return replace(constraints, max_overhead=None, schedule=eager, eager=True)
    return replace(constraints, max_overhead=round(cap, 6))


def _eager_schedule(spec, trace):
    """What autograd itself does, as a schedule: every op's first implementation (PyTorch's),
    everything its backward reads kept; None when the plan's pins rule a first
    implementation out (eager would not be what was planned)."""
    network = spec.network
    allowed = resolve_constraints(network, spec.constraints, path=spec.path, source=spec.source).allowed_impls
    first = first_impls(network)
    if any(name in allowed and impl not in allowed[name] for name, impl in first.items()):
        return None
    return store_all_schedule(network, first, trace.spec.fingerprint)
