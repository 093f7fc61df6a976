"""Cross-entropy folded into one op: traced, planned and run, memory as planned.

``F.cross_entropy`` is ``_log_softmax`` + ``nll_loss_forward`` to autograd, whose backward
holds three logits-sized tensors at once (the log-probabilities, their gradient and the
logits' gradient). The tracer folds the pair into the catalogue's ``cross_entropy``; its
``from_output`` backward writes the logits' gradient straight from the log-probabilities.
With a large vocabulary the loss's backward is where the step peaks, so the plan drops by
exactly one logits-sized tensor (to the forward's logits + log-probabilities), and the
measured peak follows the plan.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import monetdsl
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search.simulator import simulate
from .runtime_helpers import eager_step, first_impls, schedule_with, twins


class BigVocab(nn.Module):
    """Embedding, one tanh layer and a large output layer, with its cross-entropy inside.
    By default the logits are scaled before the loss, so the tracer folds only the loss
    pair; with ``scale=None`` the logits reach the loss through views only and it folds
    the layer in as well (``tests/test_runtime_linear_cross_entropy.py``)."""

    def __init__(self, vocab: int = 2048, width: int = 32, bias: bool = True, scale: float | None = 2.0):
        super().__init__()
        self.scale = scale
        self.emb = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=bias)
        target = torch.arange(4 * 64) * 7 % vocab
        target[::9] = -100  # ignored positions
        self.register_buffer("target", target.view(4, 64))

    def forward(self, idx):
        logits = self.head(torch.tanh(self.fc(self.emb(idx))))
        if self.scale is not None:
            logits = logits * self.scale
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), self.target.view(-1))


@pytest.fixture(scope="module")
def traced():
    model, reference = twins(BigVocab)
    idx = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(3))
    return model, reference, idx, trace_for_runtime(model, [idx], optimizer="sgd")


def _loss_op(network, kind: str = "cross_entropy"):
    """The one forward op named after ``kind`` and its backward op."""
    ops = [op for op in network.forward_ops if op.name.endswith(kind)]
    assert len(ops) == 1, [op.name for op in network.forward_ops]
    return ops[0], network.op(f"{ops[0].name}.backward")


def test_the_pair_is_one_op_with_both_backward_alternatives(traced):
    _, _, _, trace = traced
    network = trace.spec.network
    op, bop = _loss_op(network)
    assert not any(o.name.endswith(("log_softmax", "nll_loss")) for o in network.forward_ops)
    lsm = network.tensors[op.outputs[0]]
    assert lsm.shape == (256, 2048)
    assert bop.impl_names == ("autograd", "from_output")
    assert bop.impl("autograd").workspace == lsm.nbytes  # autograd's gradient of the log-probabilities
    assert bop.impl("from_output").workspace == 0


@pytest.mark.parametrize("alt", ["autograd", "from_output"])
def test_gradients_and_measured_peak(traced, alt):
    model, reference, idx, trace = traced
    network = trace.spec.network
    op, bop = _loss_op(network)
    impls = {**first_impls(network), bop.name: alt}
    schedule = schedule_with(trace.spec, impls, keep="all")
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized.plan_for(idx, trace=trace)
    out1, grads1 = eager_step(optimized, [idx], 0)
    out2, grads2 = eager_step(reference, [idx], 0)
    assert torch.equal(out1, out2)
    for name in grads2:
        if alt == "autograd":  # PyTorch's own: bit for bit
            assert torch.equal(grads1[name], grads2[name]), name
        else:
            torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-5, atol=1e-7, msg=name)
    sim = simulate(network, schedule)
    measured = monetdsl.measure(optimized, idx, probe="live", warmup=1)
    assert measured.planned == sim.peak_bytes - sim.fixed_bytes
    assert abs(measured.ratio - 1) <= 0.02, measured.summary()


def test_from_output_saves_one_logits_sized_tensor(traced):
    _, _, _, trace = traced
    network = trace.spec.network
    op, bop = _loss_op(network)
    peaks = {}
    for alt in ("autograd", "from_output"):
        for keep in ("all", "none"):
            sim = simulate(network, schedule_with(trace.spec, {**first_impls(network), bop.name: alt}, keep=keep))
            assert sim.valid
            if alt == "autograd":
                assert sim.peak_step.op == bop.name  # the loss's backward is where this step peaks
            peaks[alt, keep] = sim.peak_bytes
    lsm = network.tensors[op.outputs[0]].nbytes
    assert peaks["autograd", "all"] - peaks["from_output", "all"] == lsm
    # recomputing everything, from_output peaks while the loss is recomputed (the scalar
    # loss of 4 bytes is alive there as well)
    assert lsm - 4 <= peaks["autograd", "none"] - peaks["from_output", "none"] <= lsm


@pytest.mark.parametrize("loss", [
    lambda logits, t: F.cross_entropy(logits, t, weight=torch.ones(logits.shape[1])),
    lambda logits, t: F.cross_entropy(logits, t, label_smoothing=0.1),
    lambda logits, t: (lambda lp: F.nll_loss(lp, t) + lp.mean())(F.log_softmax(logits, 1)),
], ids=["class-weights", "label-smoothing", "log-probs-reused"])
def test_other_forms_are_not_folded(loss):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 5)

        def forward(self, x, t):
            return loss(self.fc(x), t)

    trace = trace_for_runtime(Model(), [torch.randn(4, 8), torch.tensor([0, 1, 4, 2])], optimizer="sgd")
    assert not any(r.kind is not None and r.kind.name == "cross_entropy" for r in trace.built.records)
