"""The costing stage (monetdsl.costs): the measurement store, measured workspaces against
a direct allocator measurement, measurements reused by op signature, and measure()'s
default probe."""
from __future__ import annotations

import json

import pytest
import torch

import monetdsl
from monetdsl.costs import MeasurementStore, measure_costs, user_cache_dir
from monetdsl.costs.cpu_allocator import BuildError
from monetdsl.costs.probes import AllocatorProbe
from monetdsl.costs.store import FORMAT, signature_digest
from monetdsl.runtime.plan import trace_for_runtime


@pytest.fixture(scope="module")
def allocator():
    try:
        return AllocatorProbe()
    except BuildError as exc:  # pragma: no cover - no g++ here
        pytest.skip(str(exc))


def test_the_store_round_trips_and_ignores_what_it_cannot_trust(tmp_path):
    store = MeasurementStore(tmp_path)
    entry = {"forward": {"default": {"time_us": 12.5, "recompute_time_us": None, "workspace": 4096}}, "backward": {}}
    assert store.get("op A") is None  # miss
    store.put("op A", entry)
    assert store.get("op A") == entry and MeasurementStore(tmp_path).get("op A") == entry  # hit, from disk
    assert store.get("op B") is None
    path = next((tmp_path / "measurements").glob("*/*.json"))
    assert path.stem == signature_digest("op A")
    for damaged in ("{not json", json.dumps({"format": FORMAT, "signature": "op B", "entry": entry}),  # another op's entry
                    json.dumps({"format": FORMAT, "signature": "op A", "entry": {"forward": {"x": {"time_us": -1}}}}),
                    json.dumps({"format": FORMAT - 1, "signature": "op A", "entry": entry}), ""):
        path.write_text(damaged)
        assert store.get("op A") is None, damaged
    store.put("op A", entry)  # a damaged entry is replaced
    assert store.get("op A") == entry
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind
    with pytest.raises(ValueError):
        store.put("op A", {"time_us": float("nan")})


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MONETDSL_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MONETDSL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "monetdsl"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "monetdsl"


class _Layers(torch.nn.Module):
    """A convolution (oneDNN reorders its weight: real workspace) and two identical linear
    layers (one signature: measured once)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.fc1 = torch.nn.Linear(32 * 8 * 8, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.fc3 = torch.nn.Linear(64, 64)

    def forward(self, x):
        y = self.conv(x).flatten(1)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(y)))))


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    model, x = _Layers(), torch.randn(4, 8, 8, 8)
    return model, x, trace_for_runtime(model, [x], optimizer="sgd")


def test_costs_are_measured_once_per_signature_and_read_back(traced, tmp_path, allocator):
    _, _, trace = traced
    store = MeasurementStore(tmp_path)
    first = measure_costs(trace.built, "cpu", store, repeats=1)
    ops = trace.spec.network.forward_ops
    assert first.signatures["fc2"] == first.signatures["fc3"] and first.signatures["tanh"] == first.signatures["tanh.1"]
    assert first.measured_ops == len(set(first.signatures.values())) < len(ops) and not first.notes
    again = measure_costs(trace.built, "cpu", store, repeats=1)
    assert again.measured_ops == 0 and again.reused_ops == len(ops)
    assert again.network == first.network
    assert len(set(first.signatures.values())) == len(list((tmp_path / "measurements").glob("*/*.json")))


def test_measured_workspaces_are_what_the_allocator_sees(traced, tmp_path, allocator):
    """A convolution's and a matrix product's workspace: the allocator's high-water mark
    above the inputs, less the output, measured directly on the same call."""
    _, _, trace = traced
    report = measure_costs(trace.built, "cpu", MeasurementStore(tmp_path), repeats=2)
    net = report.network
    conv = trace.ops["conv"].node
    x, w, b = (torch.randn(a.meta["val"].shape) for a in conv.args[:3])

    def direct(call) -> int:
        call()  # warm-up, as the costing stage does
        allocator.start()
        out = call()
        return allocator.stop() - out.untyped_storage().nbytes()

    conv_ws = direct(lambda: conv.target(x, w, b, *conv.args[3:]))
    assert net.op("conv").impl("default").workspace == conv_ws
    fc = trace.ops["fc2"].node
    h, wt, bias = torch.randn(4, 64), torch.randn(64, 64).t(), torch.randn(64)
    assert net.op("fc2").impl("default").workspace == direct(lambda: fc.target(bias, h, wt))


def test_measure_defaults_to_the_allocator_and_the_plan_holds(allocator):
    """The default plan is made on measured workspaces, and measure() reports what the
    allocator sees: the two agree."""
    torch.manual_seed(0)
    model, x = _Layers(), torch.randn(4, 8, 8, 8)
    optimized = monetdsl.optimize(model, x, method="store-all")
    result = monetdsl.measure(optimized, x, repeats=2)
    assert result.probe == "allocator"
    assert 0.95 <= result.ratio <= 1.05, result.summary()


class _Skip(torch.nn.Module):
    """A skip concatenation whose two gradient parts die at different times: the decoder
    half's right after the transposed convolution, the skip half at the end."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.mid = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        d = torch.relu(self.down(x))
        return self.out(torch.cat([self.up(torch.relu(self.mid(d))), d], 1))


@pytest.mark.parametrize("method", ["store-all", "recompute-all"])
def test_a_concatenations_gradient_parts_own_their_memory(method, allocator):
    """cat's backward returns slices of the incoming gradient; the memory model frees that
    gradient after the step and gives each part its own storage. The runtime copies the
    parts, so no slice keeps the whole gradient alive: the allocator's peak is the plan's."""
    torch.manual_seed(0)
    model, x = _Skip(), torch.randn(4, 3, 16, 16)
    optimized = monetdsl.optimize(model, x, method=method)
    for probe in ("allocator", "live"):
        result = monetdsl.measure(optimized, x, probe=probe)
        assert result.peak <= result.planned, (probe, result.summary())
    cat_grads = optimized.plans[0].program.backward["cat.backward"]
    values = [torch.randn(4, 16, 16, 16)]
    assert all(g.untyped_storage().nbytes() == g.numel() * 4 for g in cat_grads.fn(*values))


class _Clock:
    """``time.perf_counter`` of :mod:`monetdsl.costs.measure`, advanced by the measured
    function itself: each call of ``run`` takes the next of ``durations`` (seconds)."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def run(self):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1
        return self.calls


@pytest.mark.parametrize("durations, runs, median_us", [
    ([1.0e-3, 1.05e-3], 2, 1025.0),  # the warm-up agrees with the first run: both are samples, nothing more
    ([9.0e-3, 1.0e-3, 1.05e-3], 3, 1025.0),  # a slow first call: not a sample; two runs that agree
    ([9.0e-3, 1.0e-3, 2.0e-3, 1.1e-3], 4, 1100.0),  # the first two disagree: a third, the median of three
])
def test_a_step_is_run_no_more_than_its_time_needs_and_a_slow_warm_up_is_no_sample(monkeypatch, durations, runs, median_us):
    from monetdsl.costs import measure

    clock = _Clock(durations)
    monkeypatch.setattr(measure.time, "perf_counter", clock.perf_counter)
    got = measure.run_measured(clock.run, "cpu", repeats=3, agreement=measure.AGREEMENT, keep_warmup=True)
    assert clock.calls == runs
    assert got.time_us == pytest.approx(median_us)
    assert got.output == 1  # the warm-up's own result
