"""Implementations other than PyTorch's in store-all: inside the stretch where they can be,
charged what they cost where they cut it (``runtime/planned_nodes.py``,
``runtime/stretch_cuts.py``)."""
from __future__ import annotations

import pytest
import torch

import monetdsl
from monetdsl.models.small import TinyMobile
from monetdsl.planning import Constraints
from monetdsl.runtime.calibrate import EagerPairs, store_all_schedule, with_in_place_times
from monetdsl.runtime.plan import _engine_room, trace_for_runtime
from monetdsl.runtime.stretch_cuts import charge_stretch_cuts, cut_implementations
from monetdsl.runtime.stretches import ENGINE_ROOM
from monetdsl.search.impl_choice import cheapest_impls, no_recompute_compute_us
from monetdsl.search.simulator import simulate
from .runtime_helpers import assert_steps_match_eager, first_impls, schedule_with, twins


@pytest.fixture(scope="module")
def mobile():
    model, reference = twins(TinyMobile)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    return model, reference, x, trace_for_runtime(model, [x], optimizer="adam", profile=True)


def _from_output(network) -> dict:
    """Every backward op whose PyTorch implementation reads the input but has one from the
    output (batch norms, ReLU6): that one."""
    return {b.name: "from_output" for b in network.backward_ops
            if b.impls[0].name == "from_input" and "from_output" in b.impl_names}


def test_backwards_from_the_output_run_as_planned_nodes_in_the_stretch(mobile):
    """A MobileNet-style CNN whose batch norms and ReLU6 take their gradient from their
    output (the node holds its own output, detached): store-all is one autograd graph,
    gradients match eager's, and on this machine's measured costs (kernels' workspaces
    included) the allocator's peak is the plan's."""
    model, reference, x, trace = mobile
    network = trace.spec.network
    impls = first_impls(network)
    chosen = _from_output(network)
    assert len(chosen) >= 6
    impls.update(chosen)
    optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, impls, keep="all"))
    plan = optimized.plan_for(x, trace=trace)
    nodes = {op for s in plan.steps.stretches for op in s.nodes}
    assert {network.op(b).of for b in chosen} <= nodes and plan.steps.whole_autograd
    assert sorted(cut_implementations(network, plan, impls)) == sorted(chosen.items())  # charged like cuts
    assert_steps_match_eager(optimized, reference, [x])
    model.zero_grad(set_to_none=False)
    allocator = monetdsl.measure(optimized, x, probe="allocator", warmup=1)
    assert allocator.peak <= allocator.planned * 1.01, allocator.summary()


def _in_place_favouring(network, cutting: dict) -> dict:
    """In-place times: PyTorch's implementations their profiled time, the ``cutting`` ones
    5 us less, the others 100 us more, so the fastest store-all is PyTorch's but for them."""
    times = {}
    for op in (*network.forward_ops, *network.backward_ops):
        own = op.impls[0].time_us
        for impl in op.impls:
            times[(op.name, impl.name)] = own if impl is op.impls[0] else own - 5.0 if cutting.get(op.name) == impl.name \
                else own + 100.0
    return times


def test_implementations_that_cut_the_stretch_are_charged_what_the_cut_measured(mobile):
    """The ReLU6s' backward in place (it overwrites the incoming gradient: no planned node)
    cuts the stretch. When their store-all measures slower than its planned compute by a
    tenth of PyTorch's step, which measures as planned, the cuts are charged that tenth:
    the costed time of the schedule that cuts is that much higher than before, above
    PyTorch's own store-all, and the fastest store-all is PyTorch's again; eager's steps,
    timed beside the mix, are timed again beside it (the eager reference's pairs)."""
    model, _, x, trace = mobile
    network = trace.spec.network
    cutting = {b.name: "from_output_inplace" for b in network.backward_ops if "from_output_inplace" in b.impl_names}
    assert len(cutting) == 2
    in_place = _in_place_favouring(network, cutting)
    costed = with_in_place_times(trace, in_place).trace.spec.network
    mix, own = cheapest_impls(costed), first_impls(network)
    assert all(mix[name] == impl for name, impl in cutting.items())
    before = {name: no_recompute_compute_us(costed, impls) for name, impls in (("mix", mix), ("own", own))}
    assert before["mix"] < before["own"]
    timed, extra = [], 0.1 * before["own"]

    def timer(reference, other, inputs, device):
        timed.append(other.plans[0].schedule.impls)
        return before["own"], before["mix"] + extra

    stale = [(1.0, 9.0)] * 3
    pairs = EagerPairs(list(stale), dict(mix))
    charged, notes = charge_stretch_cuts(model, [x], trace, in_place, optimizer="adam", timer=timer, eager_pairs=pairs)
    after = with_in_place_times(trace, charged).trace.spec.network
    assert len(timed) == 1 and notes
    assert pairs.impls == own and len(pairs.pairs) >= 2 and pairs.pairs[:3] != stale
    assert no_recompute_compute_us(after, mix) == pytest.approx(before["mix"] + extra)
    assert no_recompute_compute_us(after, own) == pytest.approx(before["own"])
    assert cheapest_impls(after) == own


def test_a_mix_that_measures_as_planned_is_not_charged(mobile):
    """The same cuts, measured as their plan says: nothing is charged."""
    model, _, x, trace = mobile
    network = trace.spec.network
    cutting = {b.name: "from_output_inplace" for b in network.backward_ops if "from_output_inplace" in b.impl_names}
    in_place = _in_place_favouring(network, cutting)
    costed = with_in_place_times(trace, in_place).trace.spec.network
    mix = cheapest_impls(costed)
    planned = no_recompute_compute_us(costed, mix), no_recompute_compute_us(costed, first_impls(network))
    charged, notes = charge_stretch_cuts(model, [x], trace, in_place, optimizer="adam",
                                         timer=lambda *_: (planned[1], planned[0]))
    assert charged == in_place and not notes


def test_schedules_monetdsl_times_get_a_solved_plans_engine_room(mobile):
    """A caller's schedule gets no room above its simulated peak (its budget is not
    known); one monetdsl times (calibration, the eager reference) the room a solved
    plan's stretches get, so what is timed is what the solved plan runs."""
    _, _, _, trace = mobile
    network = trace.spec.network
    schedule = store_all_schedule(network, first_impls(network), trace.spec.fingerprint)
    simulation = simulate(network, schedule)
    assert _engine_room(simulation, Constraints(schedule=schedule)) == 0
    room = _engine_room(simulation, Constraints(schedule=schedule, engine_room=True))
    assert room == int(ENGINE_ROOM * (simulation.peak_bytes - simulation.fixed_bytes)) > 0
