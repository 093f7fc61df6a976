"""A second process plans on the costs the first one stored, and reuses its schedule."""
from __future__ import annotations

import torch

import monetdsl
from monetdsl.runtime import schedule_cache


def _repeated() -> torch.nn.Module:
    """Layers of one signature: their in-place times are pooled in the measurement store."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _times(plan) -> dict:
    network = plan.spec.network
    return {(op.name, impl.name): impl.time_us for op in (*network.forward_ops, *network.backward_ops) for impl in op.impls}


def test_the_next_run_plans_on_the_measured_costs_read_back(tmp_path):
    """The first run measures every op in place and solves on the pooled medians it stores,
    so the next run (costs read back from the store) has the same costs to the bit, finds
    the schedule in the cache and does not solve again."""
    x = torch.randn(32, 16)
    schedule_cache.forget()
    first = monetdsl.optimize(_repeated(), x, budget="4MiB", cache_dir=tmp_path).plans[0]
    schedule_cache.forget()  # as a new process starts
    entries = sorted(p.name for p in tmp_path.glob("*.schedule.monet"))
    second = monetdsl.optimize(_repeated(), x, budget="4MiB", cache_dir=tmp_path).plans[0]
    assert _times(second) == _times(first)
    assert (second.schedule.impls, second.schedule.stages) == (first.schedule.impls, first.schedule.stages)
    assert sorted(p.name for p in tmp_path.glob("*.schedule.monet")) == entries and len(entries) == 1
    assert second.simulation.compute_us == first.simulation.compute_us


def _workspaces(trace) -> dict:
    network = trace.spec.network
    return {(op.name, impl.name): impl.workspace for op in (*network.forward_ops, *network.backward_ops) for impl in op.impls}


def test_workspace_estimates_are_read_back_for_the_same_graph_only(tmp_path, monkeypatch):
    """The FakeTensor estimates of a graph traced before come from the store (the same
    numbers, no step run); another shape is another graph, estimated; an entry that does
    not cover every implementation is estimated again."""
    from monetdsl.costs import MeasurementStore, kept_workspaces, trace_model
    from monetdsl.tracing.api import trace_graph

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4))
    store = MeasurementStore(tmp_path)
    first = trace_model(model, [torch.randn(8, 16)], loss="output", store=store)
    assert any(_workspaces(first).values())  # something to keep: dropout's bit mask draws a bool mask first
    signature = kept_workspaces.workspace_signature(trace_graph(model, [torch.randn(8, 16)], loss="output").built)
    assert store.get(signature) is not None
    estimated = []
    real = kept_workspaces.measure_workspaces
    monkeypatch.setattr(kept_workspaces, "measure_workspaces", lambda built: estimated.append(1) or real(built))
    again = trace_model(model, [torch.randn(8, 16)], loss="output", store=store)
    assert not estimated and _workspaces(again) == _workspaces(first) and again.spec.fingerprint == first.spec.fingerprint
    other = trace_model(model, [torch.randn(4, 16)], loss="output", store=store)
    assert estimated == [1] and _workspaces(other) != _workspaces(first)
    entry = store.get(signature)
    op = next(iter(entry["workspace"]))
    entry["workspace"][op].popitem()
    store.put(signature, entry)
    mended = trace_model(model, [torch.randn(8, 16)], loss="output", store=store)
    assert estimated == [1, 1] and _workspaces(mended) == _workspaces(first)
