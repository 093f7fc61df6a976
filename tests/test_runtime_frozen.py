"""Fine-tuning with frozen layers: parameters with ``requires_grad=False``.

A frozen batch norm or layer norm whose input needs no gradient (a frozen backbone) has
no backward, so autograd never reads its batch statistics and the joint graph does not
name them; the op must still plan (its recomputation normalises again from its input)
and train like eager PyTorch: the same outputs, the same gradients of the trainable
parameters, ``None`` for the frozen ones, and running statistics updated exactly once
per step however often the op is recomputed.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import monetdsl
from monetdsl.cli import main
from monetdsl.grammar import load_spec
from monetdsl.tracing.capture import CaptureError
from monetdsl.runtime.module import OptimizedModule
from monetdsl.runtime.plan import Constraints, trace_for_runtime
from monetdsl.search import solve


def _frozen(model: nn.Module, *prefixes: str) -> nn.Module:
    """``model`` with every parameter under one of ``prefixes`` frozen."""
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
    return model


class TinyTransformer(nn.Module):
    """Embedding, layer norm, one causal attention block with a feed-forward, a head."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.ln1(self.emb(tokens))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + F.gelu(self.ff(self.ln2(h)))
        return self.head(h)


def _conv_bn_head():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


#: name -> (model factory with its frozen parameters, example input factory)
CASES = {
    # the backbone (convolution and batch norm) frozen, the head fine-tuned
    "conv_bn_frozen": (lambda: _frozen(_conv_bn_head(), "0.", "1."), lambda: torch.randn(2, 3, 8, 8)),
    # only the batch norm frozen: the gradient still flows through it to the convolution
    "bn_frozen": (lambda: _frozen(_conv_bn_head(), "1."), lambda: torch.randn(2, 3, 8, 8)),
    # a frozen linear layer in the middle
    "linear_frozen": (lambda: _frozen(_mlp(), "3."), lambda: torch.randn(4, 6)),
    # a frozen first layer: its input gradient is not needed at all (no backward)
    "first_layer_frozen": (lambda: _frozen(_mlp(), "0."), lambda: torch.randn(4, 6)),
    # a frozen embedding and first layer norm in a small transformer
    "embedding_ln_frozen": (lambda: _frozen(TinyTransformer(), "emb.", "ln1."), lambda: torch.randint(0, 11, (2, 5))),
}


@pytest.fixture(scope="module")
def traced():
    """``traced(case)``: the case's model, example input and trace, made once per case
    (the plans of a case share its trace; a case that cannot trace fails alone)."""
    found = {}

    def get(name: str):
        if name not in found:
            factory, make_input = CASES[name]
            torch.manual_seed(0)
            model, x = factory(), make_input()
            found[name] = (model, x, trace_for_runtime(model, [x], optimizer="adam"))
        return found[name]

    return get


def _min_budget(trace) -> int:
    """The smallest peak any schedule of the traced step reaches."""
    result = solve(trace.spec, "milp", memory_budget=1)
    assert not result.success and result.min_feasible_budget is not None
    return result.min_feasible_budget


#: cases also planned under an overhead cap (the searches for the others take seconds each)
CAPPED = ("conv_bn_frozen", "bn_frozen")


def _settings(case: str, trace) -> dict[str, Constraints]:
    """Store-all, recompute-all (every frozen op recomputed), the smallest budget."""
    settings = {
        "store-all": Constraints(method="store-all"),
        "recompute-all": Constraints(method="recompute-all"),
        "minimum budget": Constraints(budget=_min_budget(trace)),
    }
    if case in CAPPED:
        settings["max_overhead=0.3"] = Constraints(max_overhead=0.3)
    return settings


def _weighted(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()


def _assert_trains_like_eager(prototype, x, trace, constraints: Constraints, label: str) -> None:
    """Two training steps with the schedule and two eager ones from the same state."""
    model, reference = copy.deepcopy(prototype), copy.deepcopy(prototype)
    module = OptimizedModule(model, constraints)
    plan = module.plan_for(x, trace=trace)
    if constraints.budget is not None:
        assert plan.simulation.peak_bytes <= constraints.budget, label
    for step in range(2):
        got, want = module(x), reference(x)
        assert torch.equal(got, want), f"{label}: output of step {step}"
        _weighted(got).backward()
        _weighted(want).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if not q.requires_grad:
            assert p.grad is None, f"{label}: frozen {name} got a gradient"
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"{label}: gradient of {name}")
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), f"{label}: buffer {name}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_layers_train_like_eager(case, traced):
    prototype, x, trace = traced(case)
    for setting, constraints in _settings(case, trace).items():
        _assert_trains_like_eager(prototype, x, trace, constraints, f"{case}, {setting}")


@pytest.mark.parametrize("case, op", [("conv_bn_frozen", "1"), ("embedding_ln_frozen", "ln1")])
def test_a_normalisation_without_backward_recomputes_from_its_input(case, op, traced):
    """No backward reads its statistics, so the spec names none: a recomputation reads
    only the op's inputs and costs a full forward; recompute-all does recompute it."""
    prototype, x, trace = traced(case)
    network = trace.spec.network
    assert not any(b.of == op for b in network.backward_ops)
    for impl in network.op(op).impls:
        assert impl.recompute_reads == frozenset()
        assert impl.effective_recompute_time_us == impl.time_us
    plan = OptimizedModule(copy.deepcopy(prototype), Constraints(method="recompute-all")).plan_for(x, trace=trace)
    assert any(op in stage.recompute for stage in plan.schedule.stages)


def test_torch_compile_backend_fine_tunes_a_frozen_backbone():
    model = _frozen(_conv_bn_head(), "0.", "1.")
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=monetdsl.backend(max_overhead=0.3))
    try:
        got = compiled(x)
        _weighted(got).backward()
    finally:
        torch._dynamo.reset()
    want = reference(x)
    _weighted(want).backward()
    assert torch.equal(got, want)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), name


def test_a_model_with_everything_frozen_is_refused_clearly():
    """Nothing requires grad: ``optimize`` says so (not torch's fake-tensor assertion);
    the ``torch.compile`` backend runs such a graph unchanged, with a warning."""
    model = _mlp().requires_grad_(False)
    x = torch.randn(4, 6)
    with pytest.raises(CaptureError, match=r"Sequential has nothing to train: all 8 of its parameters are frozen"):
        monetdsl.optimize(model, x, method="store-all")
    torch._dynamo.reset()
    try:
        with pytest.warns(UserWarning, match="no parameter that requires grad"):
            got = torch.compile(model, backend=monetdsl.backend(method="store-all"))(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, model(x))


FROZEN_MODELS = (
    "import torch.nn as nn\n"
    "def backbone_frozen():\n"
    "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))\n"
    "    m[0].requires_grad_(False); m[1].requires_grad_(False)\n"
    "    return m\n"
    "def all_frozen():\n"
    "    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).requires_grad_(False)\n"
)


def test_trace_cli_takes_a_frozen_backbone(tmp_path, capsys, monkeypatch):
    """The spec counts gradients and optimizer state of the trainable head only, and the
    frozen batch norm has no backward; a model with nothing to train is refused in words."""
    (tmp_path / "frozen_models.py").write_text(FROZEN_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["trace", "frozen_models:backbone_frozen", "--input", "2x3x8x8", "-o", str(tmp_path / "f.monet")]) == 0
    spec = load_spec(str(tmp_path / "f.monet"))
    head = (2 * 144 + 2) * 4
    assert {item.name: item.nbytes for item in spec.network.fixed} == {"gradients": head, "optimizer": 2 * head}
    assert {b.of for b in spec.network.backward_ops} == {"4", "loss.cross_entropy"}
    capsys.readouterr()
    assert main(["trace", "frozen_models:all_frozen", "--input", "2x4"]) == 1
    err = capsys.readouterr().err
    assert "nothing to train: all 4 of its parameters are frozen" in err and "Traceback" not in err
