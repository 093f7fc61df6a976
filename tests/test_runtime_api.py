"""monetdsl.optimize / monetdsl.backend / monetdsl.measure / monetdsl bench: usage and errors."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import monetdsl
from monetdsl.cli import main
from monetdsl.grammar import format_schedule
from monetdsl.grammar.parser import load_schedule, load_spec
from monetdsl.models import SmallCNN
from monetdsl.planning import schedules as planning_schedules
from monetdsl.costs import measure as costs_measure
from monetdsl.runtime import measured_costs
from monetdsl.runtime.calibrate import store_all_schedule
from monetdsl.search.simulator import chosen_impls, simulate
from .runtime_helpers import twins


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_optimize_shares_parameters_and_trains_like_the_model():
    model, reference = twins(Tiny)
    x = torch.randn(5, 8)
    optimized = monetdsl.optimize(model, x, max_overhead=0.5, profile=False)  # the runtime itself, whatever this machine measures
    assert [p is q for p, q in zip(optimized.parameters(), model.parameters())] == [True] * 4
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the model, not the wrapper
    sgd_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        for module, opt in ((optimized, sgd), (reference, sgd_ref)):
            opt.zero_grad()
            module(x).square().sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert optimized.fc1 is model.fc1  # attributes fall through to the model
    assert optimized.plans[0].simulation.overhead <= 0.5


def test_replaced_parameters_buffers_and_submodules_are_the_ones_used():
    """The runtime reads the model's parameters and buffers where they are at each step:
    a parameter, a buffer or a whole submodule replaced between steps is used (and gets
    the gradient) as in eager PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(5, 8)
    optimized = monetdsl.optimize(model, x, method="store-all")
    optimized(x).sum().backward()
    model.zero_grad(set_to_none=True)
    model[0].weight = torch.nn.Parameter(torch.randn(16, 8))
    model[1].running_mean = torch.full((16,), 0.5)
    model[3] = torch.nn.Linear(16, 3)
    reference = copy.deepcopy(model)
    got, want = optimized(x), reference(x)
    got.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(got, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)  # the fastest alternatives: float32 rounding
    assert torch.equal(model[1].running_mean, reference[1].running_mean)


def test_budget_strings_and_infeasible_budgets():
    model = Tiny()
    x = torch.randn(5, 8)
    optimized = monetdsl.optimize(model, x, budget="1GiB")
    assert optimized.plans[0].simulation.peak_bytes <= 2**30
    with pytest.raises(monetdsl.SolveError, match="minimum feasible budget|smallest budget"):
        monetdsl.optimize(model, x, budget=100)
    with pytest.raises(monetdsl.MonetError):  # one except clause catches every answer to bad input
        monetdsl.optimize(model, x, budget=100)


@pytest.mark.parametrize("options, message", [
    ({"budget": "6 parsecs"}, "budget"),
    ({"budget": -3}, "positive"),
    ({"max_overhead": -0.1}, "max_overhead"),
    ({"schedule": "/nonexistent/plan.monet"}, "does not exist"),
    ({"schedule": str(Path(__file__).resolve().parent)}, "is a directory"),
    ({"schedule": "x.monet", "budget": "1GiB"}, "not both"),
    ({"method": "magic"}, "unknown method"),
    ({"optimizer": "lion"}, "unknown optimizer"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(monetdsl.MonetError, match=message):
        monetdsl.optimize(Tiny(), **options)


def test_bad_models_and_inputs_are_clear_errors():
    with pytest.raises(monetdsl.MonetError, match="nn.Module"):
        monetdsl.optimize(lambda x: x)
    with pytest.raises(monetdsl.MonetError, match="tensor or a tuple"):
        monetdsl.optimize(Tiny(), [[1, 2]])
    optimized = monetdsl.optimize(Tiny())
    with pytest.raises(monetdsl.MonetError, match="requires grad"):
        optimized(torch.randn(2, 8, requires_grad=True))

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(monetdsl.MonetError, match="the model must return one tensor"):
        monetdsl.optimize(Pair(), torch.randn(2, 4))


def test_a_schedule_for_another_graph_is_refused(tmp_path):
    model = Tiny()
    optimized = monetdsl.optimize(model, torch.randn(5, 8), method="store-all")
    plan = optimized.plans[0]
    path = tmp_path / "tiny.schedule.monet"
    path.write_text(format_schedule(plan.schedule, plan.spec.network))
    same = monetdsl.optimize(model, torch.randn(5, 8), schedule=path)  # the same graph: accepted
    assert same.plans[0].schedule.fingerprint == plan.spec.fingerprint
    with pytest.raises(monetdsl.ScheduleError, match=f"made for another graph.*fingerprint {plan.spec.fingerprint}"):
        monetdsl.optimize(model, torch.randn(6, 8), schedule=path)  # another batch size: another graph


@pytest.fixture
def solve_calls(monkeypatch) -> list:
    """The fingerprints of the specs the runtime solves from now on (caches emptied first)."""
    calls = []
    real = planning_schedules.solve

    def counting(*args, **kwargs):
        calls.append(args[0].fingerprint)
        return real(*args, **kwargs)

    monkeypatch.setattr(planning_schedules, "solve", counting)
    planning_schedules.clear_caches()
    return calls


def test_solved_schedules_are_cached_by_fingerprint(tmp_path, solve_calls):
    calls = solve_calls
    x = torch.randn(3, 8)
    a = monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=str(tmp_path))
    b = monetdsl.optimize(Tiny(), x, budget="1MiB")  # another instance, the same graph
    assert len(calls) == 1 and a.plans[0].schedule is b.plans[0].schedule
    assert list(tmp_path.glob(f"{calls[0]}-*.schedule.monet"))
    planning_schedules.clear_caches()
    monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=str(tmp_path))  # read back from the directory
    assert len(calls) == 1
    monetdsl.optimize(Tiny(), torch.randn(4, 8), budget="1MiB")  # new shapes: a new graph, solved
    assert len(calls) == 2


def test_measured_cost_schedules_are_cached_apart_and_run_on_the_same_graph(tmp_path, solve_calls, monkeypatch):
    """A schedule solved on this machine's measured costs (the default) is reused by the
    next run, which finds every op measured in the directory (alone and in place) instead
    of running it again; as a schedule file it runs the model again (the fingerprint names
    the measured workspaces: the plan is the measured one, from the store); the cache keeps
    the two cost models apart."""
    calls = solve_calls
    measured, in_place = [], []
    real_measure, real_in_place = costs_measure._measure_op, measured_costs.in_place_times
    monkeypatch.setattr(costs_measure, "_measure_op", lambda *a, **k: measured.append(a[1].name) or real_measure(*a, **k))
    monkeypatch.setattr(measured_costs, "in_place_times", lambda *a, **k: in_place.append(1) or real_in_place(*a, **k))
    x = torch.randn(16, 8)
    monetdsl.optimize(Tiny(), x, budget="1MiB", profile=False, cache_dir=str(tmp_path))
    assert not measured
    timed = monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=str(tmp_path)).plans[0]
    assert len(calls) == 2  # two cost models (other workspaces): two solves
    assert sorted(measured) == sorted(op.name for op in timed.spec.network.forward_ops) and len(in_place) == 1
    assert timed.trace.cost_model.startswith("measured on cpu")
    planning_schedules.clear_caches()
    again = monetdsl.optimize(Tiny(), x, budget="1MiB", cache_dir=str(tmp_path)).plans[0]
    assert len(calls) == 2 and len(measured) == 3 and len(in_place) == 1  # costs and schedule read back from the directory
    assert again.trace.cost_model == timed.trace.cost_model and again.simulation.compute_us == timed.simulation.compute_us
    assert (again.schedule.impls, again.schedule.stages) == (timed.schedule.impls, timed.schedule.stages)
    path = tmp_path / "timed.schedule.monet"
    path.write_text(format_schedule(timed.schedule, timed.spec.network))
    reused = monetdsl.optimize(Tiny(), x, schedule=str(path)).plans[0]  # the graph measured here: from the store
    assert (reused.schedule.impls, reused.schedule.forward_keep) == (timed.schedule.impls, timed.schedule.forward_keep)


def test_torch_compile_backend_trains_like_eager():
    model, reference = twins(SmallCNN)
    x = torch.randn(4, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=monetdsl.backend(method="recompute-all", profile=False))
    try:
        torch.manual_seed(3)
        out = compiled(x)
        out.square().mean().backward()
    finally:
        torch._dynamo.reset()
    torch.manual_seed(3)  # the plan's dropout draws its mask from the global stream as eager does
    ref = reference(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_optimize_keeps_eager_dropout_draws_whatever_the_budget():
    """Seed-replayed dropout would draw other masks than eager's: plans leave it out, so a
    step under the smallest budget trains on eager's masks and leaves the stream as eager."""
    model, reference = twins(SmallCNN)
    x = torch.randn(4, 3, 32, 32)
    optimized = monetdsl.optimize(model, x, method="recompute-all", profile=False)
    assert optimized.plans[0].schedule.impls["drop"] != "rng_replay"
    torch.manual_seed(5)
    out = optimized(x)
    out.square().mean().backward()
    after = torch.rand(3)
    torch.manual_seed(5)
    ref = reference(x)
    ref.square().mean().backward()
    assert torch.equal(out, ref) and torch.equal(torch.rand(3), after)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def _bn_net():
    """Batch norm two modules deep and one deep (buffers at nested paths); no bias before
    a batch norm (its gradient would be zero up to rounding)."""
    return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 8, bias=False), torch.nn.BatchNorm1d(8),
                               torch.nn.Linear(8, 3))


@pytest.mark.parametrize("how, options", [("argument", {"max_overhead": 0.1}), ("inside a dict argument", {"method": "recompute-all"}),
                                          ("compiled itself", {"method": "store-all"})])
def test_torch_compile_backend_of_a_step_taking_the_model(how, options):
    """A compiled step function that takes the model (``L['model']...``, not ``L['self']``),
    or a compiled ``nn.Sequential`` (which dynamo reaches as ``L['fn']...``): its buffers
    are model state, not data, so batch norm's statistics and ``num_batches_tracked`` are
    updated as eagerly, and gradients are eager's."""
    model, reference = twins(_bn_net)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 2, 1, 2])
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(net, x, y):
        return loss_fn(net(x), y)

    def step_dict(nets, x, y):
        return loss_fn(nets["net"](x), y)

    torch._dynamo.reset()
    fn = {"argument": step, "inside a dict argument": step_dict, "compiled itself": model}[how]
    compiled = torch.compile(fn, backend=monetdsl.backend(**options))
    try:
        for _ in range(2):
            if how == "compiled itself":
                got = loss_fn(compiled(x), y)
            else:
                got = compiled(model if how == "argument" else {"net": model}, x, y)
            got.backward()
            want = step(reference, x, y)
            want.backward()
            assert torch.equal(got, want)
    finally:
        torch._dynamo.reset()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)  # two steps' gradients, summed
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), name


def test_measure_reports_planned_and_measured():
    model = Tiny()
    x = torch.randn(64, 8)
    optimized = monetdsl.optimize(model, x, method="store-all")
    result = monetdsl.measure(optimized, x, probe="live", repeats=2)
    assert result.planned == optimized.plans[0].planned_activation_peak
    assert len(result.peaks) == 2 and result.peak > 0 and "measured/planned" in result.summary()
    assert optimized(x).dim() > 0 and result.peak == result.planned  # the output's gradient is the size planned
    with pytest.raises(ValueError, match="unknown probe"):
        monetdsl.measure(optimized, x, probe="psychic")


def test_measure_leaves_the_model_as_it_found_it():
    """Measuring in the middle of training changes nothing: mode, gradients (None or their
    values), batch-norm statistics and the random stream are as before."""
    model = SmallCNN().eval()
    x = torch.randn(4, 3, 32, 32)
    optimized = monetdsl.optimize(model, x, method="store-all")
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    torch.manual_seed(3)
    expected_draw = torch.rand(4)
    torch.manual_seed(3)
    monetdsl.measure(optimized, x, probe="live", repeats=2)
    assert not model.training
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert torch.equal(torch.rand(4), expected_draw)
    with pytest.raises(monetdsl.MonetError, match="give the inputs"):
        monetdsl.measure(optimized)


def test_allocator_probe_counts_every_byte():
    from monetdsl.costs.cpu_allocator import BuildError

    try:
        result = monetdsl.measure(lambda: torch.empty(1 << 20, dtype=torch.uint8).fill_(1), probe="allocator", warmup=0)
    except BuildError as exc:  # pragma: no cover - no g++ here
        pytest.skip(str(exc))
    assert result.peak == 1 << 20


def test_bench_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MONETDSL_CACHE", str(tmp_path / "mine"))
    out = tmp_path / "tiny.schedule.monet"
    status = main(["bench", "monetdsl.models:small_cnn", "--input", "4x3x32x32", "--method", "recompute-all", "--repeats", "1",
                   "--json", "-o", str(out)])
    data = json.loads(capsys.readouterr().out)
    assert status == 0 and out.exists() and (tmp_path / "tiny.schedule.spec.monet").exists()
    assert abs(data["measured_over_planned"] - 1) < 0.02
    assert data["peak_vs_eager"] == data["measured_activation_peak"] / data["eager_activation_peak"] and data["time_vs_eager"] > 0
    # recomputing saves memory against keeping every tensor with the same kernels; against
    # eager's own kernels it need not: on measured costs the fastest implementation of an
    # op may hold a larger workspace (im2col's unfolded input), and which one is fastest
    # depends on the machine's load while the costs are measured
    spec, schedule = load_spec(tmp_path / "tiny.schedule.spec.monet"), load_schedule(out)
    stored = store_all_schedule(spec.network, chosen_impls(spec.network, schedule), spec.fingerprint)
    assert data["planned_peak_bytes"] < simulate(spec.network, stored).peak_bytes
    assert list((tmp_path / "mine" / "plans").glob("*.schedule.monet"))  # kept where optimize keeps it
    assert main(["bench", "monetdsl.models:small_cnn", "--input", "4x3x32x32", "--probe", "nose"]) == 2  # a usage error
    assert "--probe nose" in capsys.readouterr().err
    assert main(["bench", "monetdsl.models:small_cnn", "--input", "4x3x32x32", "--max-overhead", "10%", "--profile",
                 "--cache-dir", str(tmp_path / "cache"), "--repeats", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["costs"].startswith("measured on cpu") and (data["runs_eager"] or data["planned_overhead"] <= 0.1)
    assert list((tmp_path / "cache" / "measurements").glob("*/*.json"))


def test_profiled_costs_choose_this_machines_implementations():
    optimized = monetdsl.optimize(Tiny(), torch.randn(16, 8), max_overhead=0.1, profile=True)
    plan = optimized.plans[0]
    assert plan.trace.cost_model.startswith("measured on cpu")
    assert plan.runs_eager or plan.simulation.overhead <= 0.1  # eager's own step when the runtime has no room


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x, mask=None, *, scale=1.0):
        h = torch.relu(self.inner(x))
        return self.out(h if mask is None else h * mask) * scale


def test_tensor_keyword_arguments_run_as_their_positions():
    """``model(x, mask=m)`` plans and trains as ``model(x, m)`` (one plan for both), equal
    to eager; a keyword-only or non-tensor argument is refused by name."""
    torch.manual_seed(0)
    model = _Masked()
    reference = copy.deepcopy(model)
    x, mask = torch.randn(4, 8), (torch.rand(4, 8) > 0.5).float()
    optimized = monetdsl.optimize(model, (x, mask), method="recompute-all")
    optimized(x, mask=mask).sum().backward()
    reference(x, mask=mask).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    optimized(x, mask).sum().backward()
    assert len(optimized.plans) == 1
    with pytest.raises(monetdsl.MonetError, match="'scale' by keyword only"):
        optimized(x, mask=mask, scale=2.0)
    with pytest.raises(monetdsl.MonetError, match="unexpected keyword argument 'nope'"):
        optimized(x, nope=mask)


def test_a_schedule_file_solved_on_estimated_costs_is_flagged_at_the_users_line(tmp_path):
    """A CLI schedule is solved on a roofline and FakeTensor workspaces: on a real device
    its peak can differ from its plan, and optimize says so where the user called it."""
    spec, schedule = tmp_path / "tiny.monet", tmp_path / "tiny.schedule.monet"
    assert main(["trace", f"{__name__}:Tiny", "--input", "3x8", "--loss", "output", "-o", str(spec)]) == 0
    assert main(["solve", str(spec), "--method", "store-all", "-q", "-o", str(schedule)]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monetdsl.optimize(Tiny(), torch.randn(3, 8), schedule=str(schedule))
    flagged = [w for w in caught if issubclass(w.category, monetdsl.EstimatedCostsWarning)]
    assert len(flagged) == 1 and flagged[0].filename == __file__ and "roofline" in str(flagged[0].message)
    with warnings.catch_warnings(record=True) as caught:  # planned here, on measured costs: nothing to flag
        warnings.simplefilter("always")
        monetdsl.optimize(Tiny(), torch.randn(3, 8), budget="1MiB", cache_dir=None)
    assert not [w for w in caught if issubclass(w.category, monetdsl.EstimatedCostsWarning)]


def test_a_plan_prints_as_a_summary():
    plan = monetdsl.optimize(Tiny(), torch.randn(3, 8), method="recompute-all", profile=False, cache_dir=None).plans[0]
    text = repr(plan)
    assert text.startswith("<RuntimePlan tiny: planned peak") and "recomputes" in text and len(text) < 300
