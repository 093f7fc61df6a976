"""The schedule cache: hits, misses, stale and corrupt entries, two processes writing at once,
the default directory, and planning announced or done up front."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import monetdsl
from monetdsl.grammar import format_schedule, load_spec
from monetdsl.io import checksum_intact, with_checksum
from monetdsl.planning import schedules as planning_schedules
from monetdsl.planning import schedule_cache
from monetdsl.runtime.module import PlanningWarning
from monetdsl.planning import Constraints, schedule_for
from monetdsl.search.solve import solve
from .test_runtime_api import Tiny

ROOT = Path(__file__).resolve().parent.parent
TINY_CHAIN = ROOT / "specs" / "tiny_chain.monet"


@pytest.fixture
def solves(monkeypatch) -> list:
    """The fingerprints the runtime solves from now on."""
    calls = []
    real = planning_schedules.solve
    monkeypatch.setattr(planning_schedules, "solve", lambda *a, **k: calls.append(a[0].fingerprint) or real(*a, **k))
    return calls


def _spec_and_schedules():
    spec = load_spec(TINY_CHAIN)
    store = solve(spec, "store-all")
    recompute = solve(spec, "recompute-all")
    return spec, store, recompute


def _key(spec, budget=None, method="store-all"):
    """The key :func:`schedule_for` uses for this spec solved on its own (roofline) costs."""
    return schedule_cache.ScheduleKey(spec.fingerprint, planning_schedules.short_hash("roofline"), budget, None, method, "")


# ------------------------------------------------------------------ hit, miss, stale, corrupt
def test_a_second_process_reads_the_schedule_back_and_other_constraints_miss(tmp_path, solves):
    x = torch.randn(3, 8)
    first = monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=tmp_path).plans[0]
    assert len(solves) == 1 and len(list(tmp_path.glob("*.schedule.monet"))) == 1
    schedule_cache.forget()  # as a new process starts
    again = monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=tmp_path).plans[0]
    assert len(solves) == 1  # a hit: no search
    assert (again.schedule.impls, again.schedule.stages) == (first.schedule.impls, first.schedule.stages)
    # other constraints: a miss (budgets, not caps, throughout: a cap on a model this small
    # can leave no room against eager's step, and then the model trains as eager, unsolved)
    monetdsl.optimize(Tiny(), x, method="recompute-all", cache_dir=tmp_path)
    assert len(solves) == 2 and len(list(tmp_path.glob("*.schedule.monet"))) == 2


def test_the_default_directory_is_the_users_cache_and_none_turns_it_off(tmp_path, solves, monkeypatch):
    monkeypatch.setenv("MONETDSL_CACHE", str(tmp_path / "mine"))  # empty: other tests fill the shared one
    x = torch.randn(3, 8)
    monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=None)
    assert not schedule_cache.user_cache_dir().exists()
    schedule_cache.forget()
    monetdsl.optimize(Tiny(), x, budget="1MiB")  
    assert schedule_cache.user_cache_dir() == tmp_path / "mine" / "plans"  # beside the measurements
    assert len(list(schedule_cache.user_cache_dir().glob("*.schedule.monet"))) == 1
    with pytest.raises(monetdsl.MonetError, match="cache_dir must be a directory path or None"):
        monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=3)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "edited", "another graph", "over the budget", "empty"])
def test_a_damaged_or_stale_entry_is_ignored_and_replaced(tmp_path, damage):
    spec, store, recompute = _spec_and_schedules()
    budget = recompute.simulation.peak_bytes  # store-all does not fit it
    key = _key(spec, budget, "recompute-all")
    path = tmp_path / key.file_name()
    good = with_checksum(format_schedule(recompute.schedule, spec.network))
    if damage == "truncated":
        text = good[: len(good) // 2]
    elif damage == "garbage":
        text = "\x00\x01 not a schedule\n"
    elif damage == "edited":  # the checksum no longer matches
        text = good.replace("schedule for", "schedule  for", 1)
    elif damage == "another graph":  # parses and replays, but was made for another fingerprint
        text = good.replace(spec.fingerprint, "0123456789abcdef")
        text = with_checksum(text.rpartition("# checksum")[0])
    elif damage == "over the budget":  # a whole, valid schedule that breaks the key's budget
        text = with_checksum(format_schedule(store.schedule, spec.network))
    else:
        text = ""
    path.write_text(text)
    assert schedule_cache.recall(spec, key, tmp_path) is None
    found = schedule_for(spec, Constraints(budget=budget, method="recompute-all"), tmp_path, costs="roofline")
    assert found[1].ok and found[1].peak_bytes <= budget
    # the solved schedule replaced the entry; a fresh process trusts it
    schedule_cache.forget()
    again = schedule_cache.recall(spec, key, tmp_path)
    assert again is not None and again[0].stages == found[0].stages


def test_an_entry_is_replayed_before_use(tmp_path):
    spec, store, _ = _spec_and_schedules()
    key = _key(spec, store.simulation.peak_bytes)  # the spec's own budget is below store-all's peak
    schedule_cache.keep(spec, key, (store.schedule, store.simulation), tmp_path)
    schedule_cache.forget()
    schedule, simulation = schedule_cache.recall(spec, key, tmp_path)
    assert simulation is not store.simulation  # replayed, not read from the file
    assert (simulation.peak_bytes, simulation.compute_us) == (store.simulation.peak_bytes, store.simulation.compute_us)


# ------------------------------------------------------------------ two writers at once
_WRITER = """
import sys
from pathlib import Path
from monetdsl.grammar import load_spec
from monetdsl.planning import schedule_cache
from monetdsl.search.solve import solve
spec = load_spec(sys.argv[1])
found = solve(spec, sys.argv[2])
key = schedule_cache.ScheduleKey(spec.fingerprint, "roofline", int(sys.argv[5]), None, "shared", "")
for _ in range(int(sys.argv[4])):
    schedule_cache.keep(spec, key, (found.schedule, found.simulation), Path(sys.argv[3]))
"""


def test_two_processes_writing_the_same_entry_leave_a_whole_one(tmp_path):
    spec, store, recompute = _spec_and_schedules()
    budget = store.simulation.peak_bytes  # both fit it (the spec's own budget is below store-all's peak)
    key = schedule_cache.ScheduleKey(spec.fingerprint, "roofline", budget, None, "shared", "")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(TINY_CHAIN), method, str(tmp_path), "150", str(budget)],
                                env=env,
                                stderr=subprocess.PIPE, text=True) for method in ("store-all", "recompute-all")]
    while any(w.poll() is None for w in writers):  # read while both write: never half a file
        try:
            text = (tmp_path / key.file_name()).read_text()
        except FileNotFoundError:
            continue
        assert checksum_intact(text), "an entry being written was read half-way"
    for w in writers:
        assert w.wait() == 0, w.stderr.read()
    schedule_cache.forget()
    final = schedule_cache.recall(spec, key, tmp_path)
    assert final is not None and final[0].stages in (store.schedule.stages, recompute.schedule.stages)
    assert [p.name for p in tmp_path.iterdir()] == [key.file_name()]  # no temporary file left behind


# ------------------------------------------------------------------ planning announced, or up front
def test_a_new_shape_in_a_training_call_is_announced_once():
    fast = monetdsl.optimize(Tiny(), torch.randn(3, 8), budget="1MiB", cache_dir=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast(torch.randn(3, 8)).sum().backward()  # planned up front: silent
        assert not caught
        for _ in range(2):
            fast(torch.randn(7, 8)).sum().backward()
    planning = [w for w in caught if issubclass(w.category, PlanningWarning)]
    assert len(planning) == 1 and "(7, 8) float32" in str(planning[0].message)
    assert planning[0].filename == __file__  # points at the training call


def test_several_shapes_can_be_planned_up_front(solves):
    shapes = [(3, 8), (5, 8)]
    fast = monetdsl.optimize(Tiny(), [(torch.randn(*s),) for s in shapes], budget="1MiB", cache_dir=None)
    assert len(fast.plans) == 2 and len(solves) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanningWarning)
        for s in shapes:
            fast(torch.randn(*s)).sum().backward()
    with pytest.raises(monetdsl.MonetError, match="a list of those to plan several input shapes"):
        monetdsl.optimize(Tiny(), [(torch.randn(3, 8),), "x"], budget="1MiB")
