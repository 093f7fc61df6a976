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
    first = monetdsl.optimize(_repeated(), x, max_overhead=0.1, cache_dir=tmp_path).plans[0]
    schedule_cache.forget()  # as a new process starts
    entries = sorted(p.name for p in tmp_path.glob("*.schedule.monet"))
    second = monetdsl.optimize(_repeated(), x, max_overhead=0.1, cache_dir=tmp_path).plans[0]
    assert _times(second) == _times(first)
    assert (second.schedule.impls, second.schedule.stages) == (first.schedule.impls, first.schedule.stages)
    assert sorted(p.name for p in tmp_path.glob("*.schedule.monet")) == entries and len(entries) == 1
    assert second.simulation.compute_us == first.simulation.compute_us
