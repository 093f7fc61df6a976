"""An output layer and its cross-entropy folded into one op, run in row chunks.

With a large vocabulary a language model's step peaks around its loss: eager holds the
logits and their log-probabilities in the forward, then the log-probabilities, their
gradient and the logits' gradient in the backward. When the logits feed nothing but the
loss, the tracer folds the product in (``linear_cross_entropy``), whose alternatives hold
one chunk of logits at a time: a backward from the log-probabilities by chunks, or the
gradients made in the forward (then neither logits nor log-probabilities are ever kept).
Gradients equal eager's (bit for bit for PyTorch's own alternatives), and the measured
peak follows the plan for every combination.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import monetdsl
from monetdsl.catalogue import loss as loss_catalogue
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search.simulator import simulate
from monetdsl.tracing.evidence import autograd_saved, spec_saved
from .runtime_helpers import eager_step, first_impls, schedule_with, twins
from .test_runtime_cross_entropy import BigVocab, _loss_op

ROWS, VOCAB, CHUNK = 256, 2048, 64


def _big_vocab(bias: bool = False):
    return BigVocab(VOCAB, bias=bias, scale=None)


@pytest.fixture(scope="module")
def traced():
    model, reference = twins(_big_vocab)
    idx = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(3))
    with mock.patch.object(loss_catalogue, "CHUNK_BYTES", CHUNK * VOCAB * 4):  # four chunks of 64 rows
        trace = trace_for_runtime(model, [idx], optimizer="sgd")
    return model, reference, idx, trace


def _head(network):
    return _loss_op(network, "linear_cross_entropy")


def test_the_output_layer_and_its_loss_are_one_op(traced):
    _, _, _, trace = traced
    network = trace.spec.network
    op, bop = _head(network)
    assert not any(o.name.endswith(("head", "cross_entropy")) and o is not op for o in network.forward_ops)
    assert op.inputs == ("tanh", "head.weight", "target")
    assert len(op.outputs) == 2  # the loss and the count of targets: the log-probabilities are derived
    assert op.impl_names == ("default", "grads_in_forward")
    lsm = network.tensors[op.impl("default").derived[0]]
    assert lsm.shape == (ROWS, VOCAB)
    gx, gw = (network.tensors[n] for n in op.impl("grads_in_forward").derived)
    assert gx.shape == (ROWS, 32) and gw.shape == (32, VOCAB)
    assert bop.impl_names == ("autograd", "chunked", "from_grads", "chunked_into_grad", "from_grads_into_grad")
    assert bop.impl("chunked_into_grad").accumulates == {"grad(head.weight)"}
    assert bop.impl("from_grads").reads == frozenset({gx.name, gw.name, f"grad({op.outputs[0]})"})
    # workspaces (measured on the runtime's steps): the whole logits in eager's forward,
    # the log-probabilities' gradient and the logits' gradient in eager's backward; one
    # chunk of logits (made into their gradient in place) in the others, and vectors of
    # one number per row (which targets count, their log-probabilities)
    chunk, rows = CHUNK * VOCAB * 4, ROWS * 8 * 4
    assert op.impl("default").workspace == lsm.nbytes
    assert chunk <= op.impl("grads_in_forward").workspace <= chunk + rows
    assert bop.impl("autograd").workspace >= 2 * lsm.nbytes - gw.nbytes - gx.nbytes
    assert chunk <= bop.impl("chunked").workspace <= chunk + rows
    assert chunk <= bop.impl("chunked_into_grad").workspace <= chunk + rows
    assert bop.impl("from_grads_into_grad").workspace == 0  # scaled straight into .grad
    assert trace.built.records[-1].binding.attrs["chunk_rows"] == CHUNK


def test_store_all_keeps_what_autograd_keeps(traced):
    model, _, idx, trace = traced
    real, spec = autograd_saved(model, [idx], loss="none"), spec_saved(trace.spec.network)
    assert spec.total == real.total
    # autograd's product node and the loss pair keep, together, what the folded op keeps
    names = [n for n, _ in real.per_op]
    start = names.index("MmBackward0")
    assert names[start + 1] == "CrossEntropy"
    merged = {**real.storages[start], **real.storages[start + 1]}
    real_per_op = [b for _, b in real.per_op[:start]] + [sum(merged.values())] + [b for _, b in real.per_op[start + 2:]]
    assert [b for _, b in spec.per_op] == real_per_op


COMBINATIONS = [("default", "autograd"), ("default", "chunked"), ("grads_in_forward", "from_grads"),
                ("default", "chunked_into_grad"), ("grads_in_forward", "from_grads_into_grad")]


def _run(model, reference, idx, trace, forward: str, backward: str, keep: str):
    """One step with the folded op's alternatives ``forward``/``backward`` (PyTorch's for
    every other op) and one eager step: the optimized module, the schedule, both results."""
    network = trace.spec.network
    op, bop = _head(network)
    schedule = schedule_with(trace.spec, {**first_impls(network), op.name: forward, bop.name: backward}, keep=keep)
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized.plan_for(idx, trace=trace)
    return optimized, schedule, eager_step(optimized, [idx], 0), eager_step(reference, [idx], 0)


def _close(got, want):
    (out1, grads1), (out2, grads2) = got, want
    torch.testing.assert_close(out1, out2, rtol=1e-6, atol=0)
    assert grads1.keys() == grads2.keys()
    for name in grads2:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("forward,backward", COMBINATIONS)
@pytest.mark.parametrize("keep", ["all", "none"])
def test_gradients_and_measured_peak(traced, forward, backward, keep):
    model, reference, idx, trace = traced
    network = trace.spec.network
    optimized, schedule, (out1, grads1), (out2, grads2) = _run(model, reference, idx, trace, forward, backward, keep)
    assert grads1.keys() == grads2.keys()
    if (forward, backward) == ("default", "autograd"):  # PyTorch's own: bit for bit
        assert torch.equal(out1, out2)
        assert all(torch.equal(grads1[n], grads2[n]) for n in grads2)
    else:  # the same sums in other orders (chunks)
        _close((out1, grads1), (out2, grads2))
    sim = simulate(network, schedule)
    measured = monetdsl.measure(optimized, idx, probe="live", warmup=1)
    assert measured.planned == sim.peak_bytes - sim.fixed_bytes
    assert abs(measured.ratio - 1) <= 0.02, measured.summary()


def _tied():
    model = _big_vocab()
    model.head.weight = model.emb.weight  # as GPT-2: the output layer is the embedding
    return model


@pytest.mark.parametrize("forward,backward", COMBINATIONS[1:])
def test_a_tied_output_layer_gets_both_gradients(forward, backward):
    """The weight's gradient from the folded op is added to the embedding's."""
    model, reference = twins(_tied)
    idx = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(4))
    with mock.patch.object(loss_catalogue, "CHUNK_BYTES", CHUNK * VOCAB * 4):
        trace = trace_for_runtime(model, [idx], optimizer="sgd")
    op, _ = _head(trace.spec.network)
    assert "emb.weight" in op.inputs
    _, _, got, want = _run(model, reference, idx, trace, forward, backward, "none")
    assert "emb.weight" in want[1]
    _close(got, want)


def test_an_output_layer_with_a_bias_is_folded_too():
    """``addmm``: the bias's gradient is one more sum over the logits' gradient."""
    model, reference = twins(lambda: _big_vocab(bias=True))
    idx = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(6))
    with mock.patch.object(loss_catalogue, "CHUNK_BYTES", CHUNK * VOCAB * 4):
        trace = trace_for_runtime(model, [idx], optimizer="sgd")
    network = trace.spec.network
    op, bop = _head(network)
    assert op.inputs == ("tanh", "head.weight", "head.bias", "target")
    assert set(bop.outputs) == {"grad(tanh)", "grad(head.weight)", "grad(head.bias)"}
    assert [network.tensors[n].shape for n in op.impl("grads_in_forward").derived] == [(ROWS, 32), (32, VOCAB), (VOCAB,)]
    for forward, backward in COMBINATIONS:
        for keep in ("all", "none"):
            optimized, schedule, got, want = _run(model, reference, idx, trace, forward, backward, keep)
            assert "head.bias" in want[1]
            _close(got, want)
            sim = simulate(network, schedule)
            measured = monetdsl.measure(optimized, idx, probe="live", warmup=1)
            assert measured.planned == sim.peak_bytes - sim.fixed_bytes and abs(measured.ratio - 1) <= 0.02, measured.summary()


@pytest.mark.parametrize("frozen", ["head", "body"])
def test_a_frozen_side_needs_one_product(frozen):
    """With the output layer frozen (fine-tuning) only x's gradient flows, and eager keeps
    only the weight; with the body frozen only the weight's, and eager keeps x. The folded
    op reads and makes just what is needed, and every alternative gives eager's gradients."""
    def make():
        model = _big_vocab()
        for name, p in model.named_parameters():
            p.requires_grad_((frozen == "head") != name.startswith("head"))
        return model

    model, reference = twins(make)
    idx = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(5))
    with mock.patch.object(loss_catalogue, "CHUNK_BYTES", CHUNK * VOCAB * 4):
        trace = trace_for_runtime(model, [idx], optimizer="sgd")
    network = trace.spec.network
    op, bop = _head(network)
    assert bop.outputs == (("grad(tanh)",) if frozen == "head" else ("grad(head.weight)",))
    grads_made = network.tensors[op.impl("grads_in_forward").derived[0]]
    assert grads_made.shape == ((ROWS, 32) if frozen == "head" else (32, VOCAB))
    assert ("tanh" in bop.impl("chunked").reads) == (frozen == "body")
    assert ("chunked_into_grad" in bop.impl_names) == (frozen == "body")  # only a weight's gradient goes into .grad
    for forward, backward in COMBINATIONS:
        if backward not in bop.impl_names:
            continue
        _, _, got, want = _run(model, reference, idx, trace, forward, backward, "none")
        _close(got, want)


def test_chunks_remove_the_logits_sized_tensors_from_the_peak(traced):
    _, _, _, trace = traced
    network = trace.spec.network
    op, bop = _head(network)
    logits = network.tensors[op.impl("default").derived[0]].nbytes
    peaks = {}
    for forward, backward in COMBINATIONS:
        schedule = schedule_with(trace.spec, {**first_impls(network), op.name: forward, bop.name: backward}, keep="all")
        peaks[backward] = simulate(network, schedule).peak_bytes
    # eager peaks in the loss's backward with three logits-sized tensors (log-probabilities,
    # their gradient, the logits' gradient); by chunks the backward holds one and a chunk,
    # and the forward's two (logits, log-probabilities) become the peak; gradients made
    # in the forward hold a chunk and the two small gradients
    assert peaks["autograd"] - peaks["chunked"] >= logits
    assert peaks["autograd"] - peaks["from_grads"] >= 2 * logits
    # the weight's gradient added into .grad: no vocabulary x width temporary at the head's
    # backward (the peak, with everything kept, is elsewhere: the saving shows at that step)
    weight = network.tensors["head.weight"].nbytes
    for name in ("chunked", "from_grads"):
        steps = {}
        for impl in (name, f"{name}_into_grad"):
            forward = "default" if name == "chunked" else "grads_in_forward"
            schedule = schedule_with(trace.spec, {**first_impls(network), op.name: forward, bop.name: impl}, keep="all")
            steps[impl] = next(s.peak for s in simulate(network, schedule).steps if s.op == bop.name)
        assert steps[name] - steps[f"{name}_into_grad"] >= weight - bop.impl(f"{name}_into_grad").workspace


@pytest.mark.parametrize("form", ["loss-outside", "logits-reused", "scaled"])
def test_other_forms_are_not_folded(form):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 50)

        def forward(self, x, t):
            logits = self.head(x)
            if form == "loss-outside":
                return logits
            loss = F.cross_entropy(logits * 2 if form == "scaled" else logits, t)
            return loss + logits.mean() if form == "logits-reused" else loss

    inputs = [torch.randn(4, 8), torch.tensor([0, 1, 4, 2])]
    trace = trace_for_runtime(Model(), inputs, optimizer="sgd")
    assert not any(r.kind is not None and r.kind.name == "linear_cross_entropy" for r in trace.built.records)


def test_the_lowest_peak_needs_the_chunks(traced):
    """The lowest peak the exact search reaches is lower with the folded op's own
    alternatives than with eager's alone (pinned by an ``impl`` constraint), and its
    schedule uses them."""
    from monetdsl.grammar import parse_spec
    from monetdsl.search import solve

    _, _, _, trace = traced
    op, bop = _head(trace.spec.network)
    pinned = parse_spec(trace.spec.source.rstrip("\n") + f"\n\nconstraints\n    impl {op.name} = default\n    impl {bop.name} = autograd\n")
    lowest = {}
    for name, spec in (("all", trace.spec), ("eager", pinned)):
        result = solve(spec, "milp", max_overhead=1.0, objective="memory", time_limit=60)
        assert result.success, result.message
        lowest[name] = result.simulation.peak_bytes
        if name == "all":
            assert result.schedule.impls[bop.name] in ("chunked", "from_grads")
    logits = ROWS * VOCAB * 4
    assert lowest["eager"] - lowest["all"] >= logits


def test_the_traced_spec_round_trips_through_its_text(tmp_path):
    """``monetdsl trace`` of a model with its loss inside: the folded op and its derived
    tensors survive the text, and a solved schedule checks against the parsed spec."""
    from monetdsl.cli import main
    from monetdsl.grammar import parse_spec
    from monetdsl.grammar.printer import format_schedule
    from monetdsl.search import solve
    from monetdsl.costs import trace_model
    from monetdsl.validate import validate_spec

    torch.manual_seed(0)
    result = trace_model(_big_vocab(), [torch.randint(0, VOCAB, (4, 64))], loss="none", device="cpu")
    text = result.text()
    assert "linear_cross_entropy" in text and "grads_in_forward" in text and "from_grads" in text
    spec = parse_spec(text)
    validate_spec(spec)
    assert spec.fingerprint == result.spec.fingerprint
    solved = solve(spec, "hybrid", max_overhead=0.5, objective="memory", time_limit=30)
    assert solved.success and solved.simulation.ok
    (tmp_path / "head.monet").write_text(text)
    (tmp_path / "plan.monet").write_text(format_schedule(solved.schedule, spec.network))
    assert main(["check", str(tmp_path / "head.monet"), "--schedule", str(tmp_path / "plan.monet")]) == 0
