"""The lowering's verdicts on what autograd saves, kept beside the captured step: a warm
plan reuses them without running ops on meta tensors, they equal a fresh check, and a
file of another code version, damaged, or for another key is ignored."""
from __future__ import annotations

import torch

import monetdsl
from monetdsl.lowering import program as lowering_program
from monetdsl.planning import kept_verdicts, schedule_cache
from monetdsl.tracing.kept_captures import capture_key


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)).square())


def _plan(model, x, directory):
    schedule_cache.forget()
    return monetdsl.optimize(model, x, budget="64MiB", cache_dir=directory, profile=False).plans[0]


def _marks(plan) -> dict:
    return {name: step.records_autograd for name, step in plan.program.forward.items()}


def test_a_warm_plan_reuses_the_verdicts_and_they_equal_a_fresh_check(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    cold = _marks(_plan(model, x, tmp_path))
    assert any(cold.values())  # PyTorch's own linear, tanh and square: recorded under autograd
    (path,) = (tmp_path / "traces").glob("*.autograd.json")
    calls = []
    real = lowering_program.saves_only
    monkeypatch.setattr(lowering_program, "saves_only", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _marks(_plan(model, x, tmp_path)) == cold and calls == []  # read back, nothing checked
    assert _marks(_plan(model, x, None)) == cold and calls  # no cache: checked, same verdicts


def test_a_stale_damaged_or_foreign_file_is_ignored(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 16)
    _plan(model, x, tmp_path)
    directory, key = tmp_path / "traces", capture_key(model, [x], "output")
    kept = kept_verdicts.adopt_autograd_verdicts(directory, key)
    assert kept and all(isinstance(v, bool) for v in kept.values())
    assert kept_verdicts.adopt_autograd_verdicts(directory, capture_key(model, [x[:4]], "output")) == {}
    assert kept_verdicts.adopt_autograd_verdicts(None, key) is None
    (path,) = directory.glob("*.autograd.json")
    text = path.read_text()
    path.write_text(text.replace("true", "false", 1))  # an edited verdict: the checksum no longer matches
    assert kept_verdicts.adopt_autograd_verdicts(directory, key) == {}
    path.write_text(text)
    monkeypatch.setattr(kept_verdicts, "code_stamp", lambda: "torch 0.0; another lowering")
    assert kept_verdicts.adopt_autograd_verdicts(directory, key) == {}
