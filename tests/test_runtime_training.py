"""Training with a schedule behaves as training eagerly: RNG replay, batch-norm
statistics, autocast, optimizer steps, gradient accumulation, eval/no_grad, DDP."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monetdsl
from monetdsl.models import SmallCNN, TinyResNet, tiny_gpt
from monetdsl.runtime.plan import trace_for_runtime
from .runtime_helpers import eager_step, first_impls, patch_dropout, schedule_with, twins

ROOT = Path(__file__).resolve().parent.parent


def _recompute_all(model, x, impls=None, **trace_options):
    trace = trace_for_runtime(model, [x], optimizer="sgd", **trace_options)
    chosen = first_impls(trace.spec.network)
    chosen.update(impls or {})
    schedule = schedule_with(trace.spec, chosen, keep="none")
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized.plan_for(x, trace=trace)
    return optimized, schedule


@pytest.mark.parametrize("dropout", ["bool_mask", "bit_mask", "rng_replay"])
def test_dropout_masks_are_identical_on_recompute(dropout):
    """A recomputed dropout reproduces its first output exactly (the kept mask, bits, or
    the seed replayed), and the gradients are eager's with the same masks."""
    model, reference = twins(SmallCNN)
    x = torch.randn(4, 3, 32, 32)
    optimized, schedule = _recompute_all(model, x, {"drop": dropout, "drop.backward": {"bool_mask": "from_mask", "bit_mask": "from_bits", "rng_replay": "from_seed"}[dropout]})
    assert any("drop" in stage.recompute for stage in schedule.stages)
    seen = []

    def observe(planned, env):
        if planned.step.op == "drop" and planned.kind in ("forward", "recompute"):
            seen.append(env["drop"].clone())

    optimized._observe = observe
    patch_dropout(reference, schedule.impls)
    (out1, g1), (out2, g2) = eager_step(optimized, [x], 9), eager_step(reference, [x], 9)
    assert len(seen) >= 2 and all(torch.equal(seen[0], s) for s in seen[1:])
    assert torch.equal(out1, out2) and all(torch.equal(g1[n], g2[n]) for n in g2)


def test_rng_stream_is_eager_after_the_step():
    """The backward's recomputations do not draw from the global RNG."""
    model, reference = twins(SmallCNN)
    x = torch.randn(4, 3, 32, 32)
    optimized, _ = _recompute_all(model, x)
    eager_step(optimized, [x], 4)
    after_optimized = torch.rand(3)
    eager_step(reference, [x], 4)
    assert torch.equal(after_optimized, torch.rand(3))


def test_batch_norm_statistics_updated_once():
    model, reference = twins(TinyResNet)
    x = torch.randn(4, 3, 16, 16)
    optimized, schedule = _recompute_all(model, x)
    assert sum(1 for stage in schedule.stages for op in stage.recompute if "bn" in op) > 5  # BN is recomputed a lot
    buffers = _buffers_after_two_steps_equal(optimized, model, reference, x)
    assert int(buffers["stem.1.num_batches_tracked"]) == 2


def _buffers_after_two_steps_equal(optimized, model, reference, x) -> dict:
    """Two training steps each way; every buffer of ``model`` equals eager's. Returns eager's."""
    for seed in (1, 2):
        eager_step(optimized, [x], seed)
        eager_step(reference, [x], seed)
    buffers = dict(reference.named_buffers())
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    return buffers


class _Counters(torch.nn.Module):
    """Batch norm's counter (``num_batches_tracked += 1``) and a buffer halved every step."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        self.scale.mul_(0.5)
        return (self.bn(self.conv(x)) * 2).relu().sum()


def test_buffer_updates_counters_in_one_call_and_others_as_traced():
    """Counters are incremented together (one ``_foreach_add_``); any other buffer update is
    the traced computation, copied in; after two steps every buffer equals eager's."""
    model, reference = twins(_Counters)
    x = torch.randn(2, 3, 8, 8)
    optimized, _ = _recompute_all(model, x)
    updates = optimized.plans[0].buffer_updates
    assert updates.increments == {"bn.num_batches_tracked": 1} and [name for name, _ in updates.general] == ["scale"]
    buffers = _buffers_after_two_steps_equal(optimized, model, reference, x)
    assert int(buffers["bn.num_batches_tracked"]) == 2 and float(buffers["scale"][0]) == 0.25


@pytest.mark.parametrize("factory, make_input", [(SmallCNN, lambda: torch.randn(4, 3, 32, 32)), (tiny_gpt, lambda: torch.randint(0, 512, (2, 64)))])
def test_autocast_bf16_is_preserved_on_recompute(factory, make_input):
    model, reference = twins(factory)
    x = make_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimized, schedule = _recompute_all(model, x)
        assert any(t.dtype == "bf16" for t in optimized.plans[0].spec.network.tensors.values())
        (out1, g1), (out2, g2) = eager_step(optimized, [x], 6), eager_step(reference, [x], 6)
    assert out1.dtype == torch.bfloat16
    assert torch.equal(out1, out2) and all(torch.equal(g1[n], g2[n]) for n in g2)


@pytest.mark.parametrize("factory, make_input", [(SmallCNN, lambda: torch.randn(4, 3, 32, 32)), (tiny_gpt, lambda: torch.randint(0, 512, (2, 64)))])
def test_every_alternative_runs_under_autocast(factory, make_input):
    """Every catalogue alternative under bfloat16 autocast (16-bit activations meeting
    float32 weights and statistics: batch and layer norm from their outputs, 1-bit masks,
    compact indices): outputs and gradients in eager's dtypes and within bfloat16 rounding
    of eager's."""
    from .runtime_helpers import impl_combinations

    model, reference = twins(factory)
    x = make_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trace = trace_for_runtime(model, [x], optimizer="sgd")
        combos = impl_combinations(trace.spec.network)
        assert any("from_output" in combo.values() for combo in combos)
        for impls in combos:
            optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, impls, keep="none"))
            optimized.plan_for(x, trace=trace)
            patch_dropout(reference, impls)
            (out1, g1), (out2, g2) = eager_step(optimized, [x], 6), eager_step(reference, [x], 6)
            assert out1.dtype == out2.dtype and (out1.float() - out2.float()).abs().max() <= 2e-2 * out2.float().abs().max()
            for n in g2:
                assert g1[n].dtype == g2[n].dtype, n
                assert (g1[n] - g2[n]).abs().max() <= 5e-2 * g2[n].abs().max() + 1e-6, (n, impls)


def test_autocast_state_selects_its_own_plan():
    model = SmallCNN()
    x = torch.randn(2, 3, 32, 32)
    optimized = monetdsl.optimize(model, method="recompute-all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert optimized(x).dtype == torch.bfloat16
    assert optimized(x).dtype == torch.float32
    plans = optimized.plans
    assert len(plans) == 2 and plans[0].spec.fingerprint != plans[1].spec.fingerprint
    # a schedule made under autocast is refused for the float32 graph
    mixed = monetdsl.optimize(model, schedule=plans[0].schedule)
    with pytest.raises(monetdsl.ScheduleError, match="made for another graph"):
        mixed(x)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_steps_track_eager(optimizer):
    model, reference = twins(TinyResNet)
    x = torch.randn(4, 3, 16, 16)
    optimized, _ = _recompute_all(model, x)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=1e-2))
    opt1, opt2 = make(model.parameters()), make(reference.parameters())  # built on the model itself
    weights = torch.randn(4, 10)
    for step in range(3):
        for module, opt in ((optimized, opt1), (reference, opt2)):
            opt.zero_grad()
            torch.manual_seed(step)
            (module(x) * weights).sum().backward()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), (step, name)


def test_gradient_accumulation():
    model, reference = twins(SmallCNN)
    xs = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    optimized, _ = _recompute_all(model, xs[0])
    for module in (optimized, reference):
        torch.manual_seed(0)
        for x in xs:  # no zero_grad between micro-batches: .grad accumulates
            module(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("switched", ["optimized", "model"])
def test_eval_and_no_grad_run_eagerly(switched):
    """``eval()`` on the optimized module or on the model (a training loop built before
    ``optimize`` switches the model) runs the model eagerly; the mode is the model's."""
    model, reference = twins(SmallCNN)
    x = torch.randn(4, 3, 32, 32)
    optimized, _ = _recompute_all(model, x)
    which = optimized if switched == "optimized" else model
    which.eval()
    reference.eval()
    assert not model.training and not model.bn1.training and not optimized.training
    assert torch.equal(optimized(x), reference(x))
    assert int(model.bn1.num_batches_tracked) == 0  # no training step ran
    which.train()
    reference.train()
    assert optimized.training and model.bn1.training
    with torch.no_grad():
        torch.manual_seed(0)
        a = optimized(x)
        torch.manual_seed(0)
        b = reference(x)
    assert torch.equal(a, b) and not a.requires_grad
    assert torch.equal(model.bn1.running_mean, reference.bn1.running_mean)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_same_gradients(tmp_path):
    """DistributedDataParallel over an optimized module: two processes on localhost with
    the gloo backend; each rank's gradients equal the ranks' eager gradients averaged."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = [tmp_path / f"rank{r}.txt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(r), "2", port, str(results[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for r, (proc, result) in enumerate(zip(procs, results)):
        assert proc.returncode == 0, outputs[r][-2000:]
        assert result.read_text() == "ok", result.read_text()


def test_gradient_hooks_fire_once_with_the_whole_gradient():
    """Hooks on parameters (gradient clipping, optimizer-in-backward) see what eager shows them."""
    model, reference = twins(tiny_gpt)  # the token embedding is tied to the output layer: two writers
    x = torch.randint(0, 512, (2, 16))
    optimized, _ = _recompute_all(model, x)
    seen, seen_ref = [], []
    model.wte.weight.register_hook(lambda g: seen.append(g.clone()))
    reference.wte.weight.register_hook(lambda g: seen_ref.append(g.clone()))
    (out1, g1), (out2, g2) = eager_step(optimized, [x], 3), eager_step(reference, [x], 3)
    assert optimized._last_state_hooks
    assert len(seen) == len(seen_ref) == 1
    torch.testing.assert_close(seen[0], seen_ref[0])
    torch.testing.assert_close(g1["wte.weight"], g2["wte.weight"])
