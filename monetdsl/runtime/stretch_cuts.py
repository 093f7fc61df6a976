"""What an implementation that cuts a stretch costs, measured and charged to it.

Store-all with PyTorch's own implementations runs its backward through autograd's engine
in one call (:mod:`.stretches`); calibration takes what that saves off the in-place times
of those backward steps (:func:`~.calibrate.in_place_times`). Another implementation of an
op (a batch norm's backward from its output, a weight gradient written into ``.grad``, a
ReLU's backward in place) may run step by step instead, and the effect is not the op's
own: the stretch around it breaks into pieces that may be too short for the engine
(:data:`~.stretches.MIN_STRETCH_OPS`), and every op in them pays Python per step again.
A per-op time cannot see that, so the planner's fastest store-all took such
implementations for a few microseconds each and measured x1.24-1.25 of eager's step on
two small CNNs where PyTorch's own measured x1.00-1.05.

:func:`charge_stretch_cuts` times the search's fastest store-all against PyTorch's own
(interleaved steps, medians) and, when the mix is slower than its planned compute says
by more than PyTorch's own is, charges the difference to the implementations that ran
outside every stretch while PyTorch's would not have (the **cuts**), shared equally,
then looks again at the new fastest store-all (at most :data:`CHARGE_ROUNDS` times).
Implementations that run in a stretch as planned nodes count with the cuts: a planned
node runs the plan's steps in Python, and its cost is measured the same way. The
search then chooses PyTorch's implementation where the alternative's memory is not
worth the stretch it cuts, and the fastest store-all is the measured-fastest.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..search.impl_choice import cheapest_impls, first_impls, no_recompute_compute_us
from .calibrate import backward_seeds, device_of, paired_with_eager, state_restored, store_all_schedule, with_in_place_times

__all__ = ["CHARGE_ROUNDS", "CUT_NOISE", "PAIRED_SECONDS", "cut_implementations", "charge_stretch_cuts"]

#: new fastest store-all schedules looked at, at most: each is a lowering and a few
#: training steps of the whole model
CHARGE_ROUNDS = 3

#: a mix that measures within this share of PyTorch's store-all step of what its plan
#: says is not charged: interleaved medians of a few steps move by about as much
CUT_NOISE = 0.02

#: interleaved (PyTorch's, mix) step pairs are timed for at least 3 pairs and, while they
#: took less than this many seconds, up to 15
PAIRED_SECONDS = 0.5


def cut_implementations(network, plan, impls: dict) -> list[tuple[str, str]]:
    """The (op, implementation) pairs of ``impls`` that are not PyTorch's own and whose op
    runs the plan's own steps in Python: outside every stretch of ``plan`` (a
    :class:`~.plan.RuntimePlan` of the store-all schedule with ``impls``), or inside one
    as a planned node (:mod:`.planned_nodes`, which costs Python per step too)."""
    first = first_impls(network)
    inside = {op for stretch in plan.steps.stretches for op in stretch.ops if op not in stretch.nodes}
    bops_of: dict[str, list[str]] = {}
    for bop in network.backward_ops:
        bops_of.setdefault(bop.of, []).append(bop.name)
    cut = []
    for op in network.forward_ops:
        if op.name in inside:
            continue
        for name in (op.name, *bops_of.get(op.name, ())):
            if impls[name] != first[name]:
                cut.append((name, impls[name]))
    return cut


def charge_stretch_cuts(model: torch.nn.Module, inputs, trace, in_place: dict, *, optimizer: str,
                        kin=None, timer=None, eager_pairs=None) -> tuple[dict, list[str]]:
    """``in_place`` ((op, implementation) -> in-place us, what
    :func:`~.calibrate.with_in_place_times` reads) with the cuts of the fastest store-all
    charged (module docstring), and notes. ``kin(pair)``: pairs that share one stored
    time (an op signature's) get the same charge; default, each pair alone.
    ``timer(reference, mix, inputs, device)``: the step times (us) of PyTorch's store-all
    and of the mix, default :func:`_paired_medians`. ``eager_pairs``
    (:class:`~.calibrate.EagerPairs`, eager's steps beside the calibration's fastest
    store-all on the profile's times): timed again beside the fastest store-all on the
    charged in-place times when that is another one, so the eager reference is the step
    the search plans against. The model's state is left as it was."""
    from .module import OptimizedModule
    from ..planning import Constraints

    network = trace.spec.network
    first = first_impls(network)
    kin = kin if kin is not None else (lambda pair: pair)
    timer = timer if timer is not None else _paired_medians
    device = device_of(inputs)
    own = store_all_schedule(network, first, trace.spec.fingerprint)
    if own is None:
        return in_place, []
    charged, notes, looked = dict(in_place), [], set()

    def module_of(schedule):
        constraints = Constraints(None, None, schedule, "auto", engine_room=True)
        module = OptimizedModule(model, constraints, optimizer=optimizer, announce=False)
        return module, module.plan_for(*inputs, trace=trace)

    with state_restored(model, device):
        modules = {}  # implementations -> their store-all module, lowered when first timed
        for _ in range(CHARGE_ROUNDS):
            costed = with_in_place_times(trace, charged).trace.spec.network
            impls = cheapest_impls(costed)
            key = tuple(sorted(impls.items()))
            if impls == first or key in looked:
                break
            looked.add(key)
            schedule = store_all_schedule(network, impls, trace.spec.fingerprint)
            if schedule is None:
                break
            mix, plan = module_of(schedule)
            modules[key] = mix
            cut = cut_implementations(network, plan, impls)
            if not cut:
                break
            own_key = tuple(sorted(first.items()))
            if own_key not in modules:
                modules[own_key] = module_of(own)[0]
            own_us, mix_us = timer(modules[own_key], mix, inputs, device)
            missed = (mix_us - no_recompute_compute_us(costed, impls)) - (own_us - no_recompute_compute_us(costed, first))
            if missed <= CUT_NOISE * own_us:
                break
            share = missed / len(cut)
            kinds = {kin(pair) for pair in cut}
            for op in (*network.forward_ops, *network.backward_ops):
                for impl in op.impls:
                    if kin((op.name, impl.name)) in kinds:
                        charged[(op.name, impl.name)] = costed.op(op.name).impl(impl.name).time_us + share
            notes.append(f"{len(cut)} implementations that cut a stretch charged {share:.0f} us each (their store-all"
                         f" measured {mix_us:.0f} us a step, PyTorch's own {own_us:.0f} us)")
        if eager_pairs is not None and eager_pairs.pairs:
            _pair_fastest_again(model, inputs, trace, charged, eager_pairs, modules, module_of, device)
    return charged, notes


def _pair_fastest_again(model, inputs, trace, charged: dict, eager_pairs, modules: dict, module_of, device: str) -> None:
    """``eager_pairs`` timed again beside the fastest store-all on the ``charged`` times,
    when that is not the one they were timed beside."""
    impls = cheapest_impls(with_in_place_times(trace, charged).trace.spec.network)
    if impls == eager_pairs.impls:
        return
    key = tuple(sorted(impls.items()))
    module = modules.get(key)
    if module is None:
        schedule = store_all_schedule(trace.spec.network, impls, trace.spec.fingerprint)
        if schedule is None:
            return
        module, _ = module_of(schedule)
    eager_pairs.pairs.clear()
    paired_with_eager(model, module, inputs, device, eager_pairs.pairs)
    eager_pairs.impls = dict(impls)


def _paired_medians(first, second, inputs, device: str) -> tuple[float, float]:
    """Median wall time (us) of training steps of two modules, interleaved after one
    warm-up step each: at least 3 pairs, more while they took under
    :data:`PAIRED_SECONDS` (at most 15)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(module) -> float:
        sync()
        start = time.perf_counter()
        torch.autograd.backward(*backward_seeds(module(*inputs)))
        sync()
        return (time.perf_counter() - start) * 1e6

    step(first), step(second)
    a, b, began = [], [], time.perf_counter()
    while len(a) < 3 or (len(a) < 15 and time.perf_counter() - began < PAIRED_SECONDS):
        a.append(step(first))
        b.append(step(second))
    return statistics.median(a), statistics.median(b)
