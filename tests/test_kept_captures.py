"""Captured steps kept between processes: a hit rebuilds the same spec and trains like
PyTorch without tracing; an edited forward, another shape or setting, a damaged entry or
one written for another model is never used; two writers leave a whole entry; a second
process plans without capturing or tracing."""
from __future__ import annotations

import importlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import monetdsl
from monetdsl.io import checksum_intact
from monetdsl.lowering import graphs
from monetdsl.planning import kept_backwards, schedule_cache
from monetdsl.tracing import api as tracing_api
from monetdsl.tracing import kept_captures
from monetdsl.tracing.graph_text import RecordedTensor
from monetdsl.tracing.kept_captures import capture_key, keep_capture, recall_capture

ROOT = Path(__file__).resolve().parent.parent


class Net(torch.nn.Module):
    """A small model with a norm, a buffer update, a residual and a view."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head((y + y.square()).flatten(2).mean(2))  # a view: its gradient goes through an owner adapter


@pytest.fixture
def captures(monkeypatch) -> list:
    """One entry per real capture from now on."""
    calls = []
    real = tracing_api.capture
    monkeypatch.setattr(tracing_api, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _trace(model, x, directory):
    return tracing_api.trace_graph(model, [x], loss="output", device="cpu", capture_cache=directory)


def test_a_kept_capture_rebuilds_the_same_spec_without_tracing(tmp_path, captures):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    first = _trace(model, x, tmp_path)
    second = _trace(Net(), x, tmp_path)  # another instance, same facts: a hit
    assert captures == [1]
    assert second.text() == first.text() and second.spec.fingerprint == first.spec.fingerprint
    rebuilt = [n for n in second.built.facts.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert rebuilt and all(isinstance(n.meta["val"], RecordedTensor) for n in rebuilt)
    original = {n.name: n.meta["val"] for n in first.built.facts.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    for node in rebuilt:
        val = node.meta["val"]
        assert (val.shape, val.stride(), val.dtype, val.device) == (original[node.name].shape, original[node.name].stride(),
                                                                  original[node.name].dtype, original[node.name].device)
    with pytest.raises(RuntimeError, match="metadata only"):
        rebuilt[0].meta["val"] + 1


def test_another_shape_or_setting_or_requires_grad_is_another_key(tmp_path, captures):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    key = capture_key(model, [x], "output")
    assert key is not None and capture_key(Net(), [torch.randn(5, 3, 8, 8)], "output") == capture_key(Net(), [torch.randn(5, 3, 8, 8)], "output")
    assert capture_key(model, [torch.randn(4, 3, 8, 8)], "output") != key
    assert capture_key(model, [x.double()], "output") != key
    assert capture_key(Net(width=6), [x], "output") != key
    assert capture_key(model, [x], "auto") != key
    model.bn.momentum = 0.3  # a setting extra_repr shows
    assert capture_key(model, [x], "output") != key
    model.bn.momentum = 0.1
    model.bn.track_running_stats = False
    assert capture_key(model, [x], "output") != key
    model.bn.track_running_stats = True
    model.conv.bias.requires_grad_(False)
    assert capture_key(model, [x], "output") != key
    model.conv.bias.requires_grad_(True)
    assert capture_key(model, [x], "output") == key
    _trace(model, x, tmp_path)
    _trace(model, torch.randn(4, 3, 8, 8), tmp_path)
    assert captures == [1, 1]


def test_what_the_key_cannot_see_is_never_keyed():
    """Hooks, a loss function of the caller's, a class made inside a function, an fx
    GraphModule: traced every time."""
    model, x = Net(), torch.randn(2, 3, 8, 8)
    handle = model.bn.register_forward_hook(lambda module, args, out: out * 2)
    assert capture_key(model, [x], "output") is None
    handle.remove()
    assert capture_key(model, [x], lambda out: out.sum()) is None

    def made_here(scale):
        class Scaled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(3, 3)

            def forward(self, x):
                return self.lin(x) * scale

        return Scaled()

    assert capture_key(made_here(2.0), [torch.randn(2, 3)], "output") is None
    graph_module = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    assert capture_key(graph_module, [torch.randn(2, 3)], "output") is None  # generated code, in no file


_MODULE = '''
import torch


def helper(y):
    return {helper}


class Edited(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return {forward}
'''


def test_an_edited_forward_or_helper_in_its_file_is_traced_again(tmp_path, monkeypatch, captures):
    source = tmp_path / "edited_model.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.randn(3, 4)

    versions = itertools.count(1)

    def load(helper, forward):
        source.write_text(_MODULE.format(helper=helper, forward=forward))
        stamp = next(versions) * 10**9  # each version its own modification time, however fast the writes
        os.utime(source, ns=(stamp, stamp))
        sys.modules.pop("edited_model", None)
        importlib.invalidate_caches()
        return importlib.import_module("edited_model").Edited()

    cache = tmp_path / "traces"
    plain = _trace(load("y", "helper(self.lin(x))"), x, cache)
    assert captures == [1]
    _trace(load("y", "helper(self.lin(x))"), x, cache)
    assert captures == [1]  # the same file: a hit
    edited = _trace(load("y", "torch.relu(helper(self.lin(x)))"), x, cache)
    assert captures == [1, 1] and edited.spec.fingerprint != plain.spec.fingerprint
    helped = _trace(load("torch.tanh(y)", "torch.relu(helper(self.lin(x)))"), x, cache)
    assert captures == [1, 1, 1] and helped.spec.fingerprint != edited.spec.fingerprint


def _entry_path(directory: Path) -> Path:
    (path,) = directory.glob("*.capture.json")
    return path


@pytest.mark.parametrize("damage", ["truncated", "edited", "other key", "other model"])
def test_a_damaged_or_foreign_entry_is_ignored_and_replaced(tmp_path, captures, damage):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    first = _trace(model, x, tmp_path)
    path = _entry_path(tmp_path)
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "edited":
        path.write_text(text.replace('"aten::relu.default"', '"aten::sigmoid.default"', 1))
    else:
        from monetdsl.io import with_checksum

        entry = json.loads(text.rstrip("\n").rpartition("\n")[0])
        if damage == "other key":
            entry["key"] = "0" * 64
        else:  # a whole entry, for a model whose parameters are not this one's
            other = _trace(Net(width=6), x, tmp_path / "other")
            foreign = json.loads(_entry_path(tmp_path / "other").read_text().rstrip("\n").rpartition("\n")[0])
            entry.update(graph=foreign["graph"], digest=foreign["digest"], placeholders=foreign["placeholders"])
            assert other.spec.fingerprint != first.spec.fingerprint
        path.write_text(with_checksum(json.dumps(entry) + "\n"))
    traced_before = len(captures)
    again = _trace(model, x, tmp_path)
    assert len(captures) == traced_before + 1 and again.spec.fingerprint == first.spec.fingerprint
    assert checksum_intact(path.read_text())  # replaced by a whole entry
    _trace(model, x, tmp_path)
    assert len(captures) == traced_before + 1


def test_two_writers_of_one_entry_leave_a_whole_one(tmp_path):
    """Entries are renamed into place whole: a reader during two writers sees either."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    made = []
    for width in (8, 6):
        _trace(Net(width), x, tmp_path / str(width))
        made.append(kept_captures.recall_capture(tmp_path / str(width), capture_key(Net(width), [x], "output"), Net(width)))
    key = capture_key(Net(8), [x], "output")
    stop = threading.Event()

    def write(captured):
        while not stop.is_set():
            keep_capture(tmp_path / "shared", key, captured)

    writers = [threading.Thread(target=write, args=(c,)) for c in made]
    for w in writers:
        w.start()
    try:
        for _ in range(200):
            try:
                text = _entry_path(tmp_path / "shared").read_text()
            except (FileNotFoundError, ValueError):
                continue
            assert checksum_intact(text), "an entry being written was read half-way"
    finally:
        stop.set()
        for w in writers:
            w.join()
    found = recall_capture(tmp_path / "shared", key, Net(8))
    # the last rename wins: the 8-wide model's own entry, or the 6-wide one refused for its parameters
    assert found is None or len(found.joint.graph.nodes) == len(made[0].joint.graph.nodes)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [_entry_path(tmp_path / "shared").name]


def test_a_warm_plan_trains_like_pytorch_without_tracing_or_make_fx(tmp_path, captures, monkeypatch):
    """The second plan rebuilds the capture and adopts the kept local backwards and owner
    adapters: nothing is traced, and a training step writes the gradients plain PyTorch
    computes."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    reference = Net()
    reference.load_state_dict(model.state_dict())
    cold = monetdsl.optimize(model, x, budget="64MiB", cache_dir=tmp_path, profile=False)
    cold(x).sum().backward()  # its first step traces the owner adapters, kept when the process exits:
    kept_backwards._add_adapters_at_exit()
    model.zero_grad()
    (path,) = (tmp_path / "traces").glob("*.backwards.json")
    assert captures == [1] and {"backward", "adapter"} <= {e["kind"] for e in json.loads(path.read_text().splitlines()[0])["graphs"]}
    schedule_cache.forget()
    monkeypatch.setattr(graphs, "_CACHE", {})  # as a new process starts
    monkeypatch.setattr(graphs, "_ADAPTERS", {})

    def no_make_fx(*args, **kwargs):
        raise AssertionError("a kept local backward was traced again")

    monkeypatch.setattr("torch.fx.experimental.proxy_tensor.make_fx", no_make_fx)
    warm = monetdsl.optimize(model, x, budget="64MiB", cache_dir=tmp_path, profile=False)
    assert captures == [1]
    warm(x).square().mean().backward()
    reference(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_damaged_backwards_file_is_ignored(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    monetdsl.optimize(model, x, budget="64MiB", cache_dir=tmp_path, profile=False)
    (path,) = (tmp_path / "traces").glob("*.backwards.json")
    key = capture_key(model, [x], "output")
    monkeypatch.setattr(graphs, "_CACHE", {})
    assert kept_backwards.adopt_kept_backwards(tmp_path / "traces", key)
    assert not kept_backwards.adopt_kept_backwards(tmp_path / "traces", capture_key(model, [x[:1]], "output"))
    text = path.read_text()
    for damaged in (text[: len(text) // 2], text.replace('"aten::', '"aten::x', 1)):
        path.write_text(damaged)
        monkeypatch.setattr(graphs, "_CACHE", {})
        assert not kept_backwards.adopt_kept_backwards(tmp_path / "traces", key) and not graphs._CACHE


_WARM_CHILD = """
import importlib.abc, sys, traceback
importers = []


class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch._dynamo" and not importers:
            importers.extend(f.filename for f in traceback.extract_stack() if "/monetdsl/" in f.filename)
        return None


sys.meta_path.insert(0, Watch())
import torch, monetdsl
sys.path.insert(0, sys.argv[2])
from test_kept_captures import Net
torch.manual_seed(0)
model, x = Net(), torch.randn(2, 3, 8, 8)
fast = monetdsl.optimize(model, x, budget="64MiB", cache_dir=sys.argv[1], profile=False)
print("imported by: " + " ".join(importers) if "torch._dynamo" in sys.modules else "no dynamo")
fast(x).sum().backward()
"""


def test_a_second_process_plans_without_tracing(tmp_path):
    """The second process neither captures the step (TorchDynamo) nor traces a kept
    backward (``make_fx`` on FakeTensors, which imports TorchDynamo). Torch may still
    import TorchDynamo for other reasons: some of its Python meta kernels and custom ops
    do on their first call. The first process adds the owner adapters its step traced
    when it exits."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [subprocess.run([sys.executable, "-c", _WARM_CHILD, str(tmp_path), str(ROOT / "tests")], env=env,
                           capture_output=True, text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    cold, warm = (r.stdout.strip().splitlines()[-1] for r in runs)
    assert "/monetdsl/tracing/capture.py" in cold
    kept = ("/monetdsl/tracing/", "/monetdsl/lowering/graphs.py", "/monetdsl/lowering/autograd_saves.py")
    assert warm == "no dynamo" or not any(part in warm for part in kept), warm
    (path,) = (tmp_path / "traces").glob("*.backwards.json")  # with the adapters the first step traced, at its exit
    assert "adapter" in {e["kind"] for e in json.loads(path.read_text().splitlines()[0])["graphs"]}
