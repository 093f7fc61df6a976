"""Runs of a stretch's forward calls traced by TorchScript (monetdsl.runtime.scripted_runs):
eager's gradients bit for bit, the plan's memory, and runs that end where the plan
releases a tensor from before them."""
from __future__ import annotations

import copy

import pytest
import torch

import monetdsl
from monetdsl.ir import TensorKind
from monetdsl.runtime.scripted_runs import ScriptedRun, scripted_runs
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.runtime.straight_line import generate

from .runtime_helpers import first_impls, schedule_with
from .runtime_models import GRUHead


def _runs(plan) -> list:
    """The plan's traced runs, as the functions its generated forward calls."""
    return [v for v in plan.steps.code.forward.__globals__.values() if isinstance(v, ScriptedRun)]


def _planned(keep):
    torch.manual_seed(0)
    model = GRUHead()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 10, 6)
    trace = trace_for_runtime(model, [x], optimizer="adam")
    network = trace.spec.network
    if keep == "early cells":  # the first cells recomputed, the later ones stored: stretches beside recomputation
        keep = {n for bop in network.backward_ops for n in bop.impls[0].reads if n in network.tensors
                and network.tensors[n].kind is TensorKind.ACTIVATION} - {n for op in network.forward_ops[:24] for n in op.outputs}
    optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, first_impls(network), keep=keep, promote="needed"))
    return model, reference, x, optimized, optimized.plan_for(x, trace=trace)


@pytest.mark.parametrize("keep", ["all", "early cells"])
def test_a_traced_run_trains_as_python_calls_do_and_peaks_the_same(keep):
    """PyTorch's own implementations, every activation kept or the first cells recomputed:
    the traced forward gives the gradients of one Python call per op bit for bit over two
    steps (``.grad`` None, then added into; the first eager's own), and the same live and
    allocator peaks."""
    model, reference, x, optimized, plan = _planned(keep)
    twin, _, _, python, python_plan = _planned(keep)
    fixed = {n for n, t in plan.spec.network.tensors.items() if t.is_fixed}
    python_plan.steps.code = generate(python_plan.steps, fixed, stretched=True, scripted=False)
    assert _runs(plan) and not _runs(python_plan)
    for step in range(2):
        optimized(x).sum().backward()
        python(x).sum().backward()
        reference(x).sum().backward()
        for (name, p), q, e in zip(model.named_parameters(), twin.parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad), name
            if step == 0:
                assert torch.equal(p.grad, e.grad), name
            torch.testing.assert_close(p.grad, e.grad, msg=name)
    assert all(run.traced not in (None, False) for run in _runs(plan))
    for probe in ("live", "allocator"):
        measured = monetdsl.measure(optimized, (x,), probe=probe).peak
        assert measured == monetdsl.measure(python, (x,), probe=probe).peak, probe
        assert measured <= plan.planned_activation_peak, probe


def test_a_run_ends_where_the_plan_releases_a_tensor_from_before_it():
    *_, plan = _planned("all")
    stretch_of = {op: s for s in plan.steps.stretches for op in s.ops}
    runs = scripted_runs(plan.steps.forward, stretch_of)
    assert runs
    for start, end in runs.items():
        made = set()
        for k in range(start, end):
            planned = plan.steps.forward[k]
            made.update(planned.step.writes)
            assert stretch_of[planned.step.op] is stretch_of[plan.steps.forward[start].step.op]
            if k < end - 1:
                assert set(planned.release_after) <= made


def test_a_function_the_tracer_refuses_runs_as_it_is():
    calls = []

    def not_traceable(a):
        calls.append(1)
        return a + 1, "a note"  # a string: not a traced function's output

    run = ScriptedRun(not_traceable)
    first = run(torch.ones(2))
    assert run.traced is False and torch.equal(first[0], torch.full((2,), 2.0)) and first[1] == "a note"
