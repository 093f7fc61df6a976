"""A GRU's unrolled steps keep a (batch, hidden) state, as eager's cell does.

The layer function must compute ``nn.GRU``'s values; captured, a step must add no view
or reduction that grows with the sequence (torch's own decomposition adds two views per
step around the hidden product and sums each broadcast gate gradient); planned and run,
the model must train like eager with several layers, both directions and a given initial
state; and torch's decomposition must be back in place once the capture is over.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import monetdsl
from monetdsl.tracing.capture import make_fake_inputs, capture
from monetdsl.tracing.gru_steps import gru_layer_2d, two_dimensional_gru_steps

from .runtime_helpers import eager_step, twins


class GRUWithState(nn.Module):
    def __init__(self, layers=2, bidirectional=True, reads_last_state=True):
        super().__init__()
        self.reads_last_state = reads_last_state
        self.gru = nn.GRU(5, 7, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(7 * (2 if bidirectional else 1), 3)
        self.h0 = nn.Parameter(torch.randn(layers * (2 if bidirectional else 1), 1, 7))

    def forward(self, x):
        out, last = self.gru(x, self.h0.expand(-1, x.shape[0], -1).contiguous())
        scores = self.head(out[:, -1])
        return scores + last.sum() if self.reads_last_state else scores


@pytest.mark.parametrize("reverse", [False, True])
def test_the_layer_function_computes_eager_gru_values(reverse):
    torch.manual_seed(0)
    gru = nn.GRU(4, 6)
    x, h0 = torch.randn(5, 3, 4), torch.randn(3, 6)
    params = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    out, last = gru_layer_2d(x, h0, params, True, reverse=reverse)
    # a reversed layer walks the steps from the last and returns them in input order
    expected_out, expected_last = gru(x.flip(0) if reverse else x, h0.unsqueeze(0))
    torch.testing.assert_close(out, expected_out.flip(0) if reverse else expected_out)
    torch.testing.assert_close(last, expected_last[0])
    assert last.shape == (3, 6)


def _op_counts(steps: int) -> tuple[dict, dict]:
    """Aten calls of a captured GRU step by name: (forward, backward)."""
    model = nn.GRU(4, 6, batch_first=True)
    inputs, _ = make_fake_inputs([((2, steps, 4), torch.float32)])
    captured = capture(model, inputs, loss=lambda out: out[0].sum())
    forward: dict = {}
    backward: dict = {}
    for node in captured.joint.graph.nodes:
        if str(node.target).startswith("aten."):
            counts = backward if node.meta.get("partitioner_tag") == "is_backward" else forward
            name = str(node.target).split(".")[1]
            counts[name] = counts.get(name, 0) + 1
    return forward, backward


def test_a_captured_step_adds_no_view_or_reduction():
    (short, short_back), (long, long_back) = _op_counts(3), _op_counts(6)
    for op in ("view", "_unsafe_view", "unsqueeze"):
        assert short.get(op, 0) == long.get(op, 0), (op, short.get(op), long.get(op))
    assert long["addmm"] - short["addmm"] == 3  # one hidden product per step
    # in the backward, one reduction per step: the hidden bias's gradient (no broadcast gate)
    assert long_back["sum"] - short_back["sum"] == 3


def test_torch_decomposition_is_restored_after_capture():
    op = torch.ops.aten.gru.input
    before = dict(op.py_kernels)
    with two_dimensional_gru_steps():
        assert op.py_kernels != before
    assert op.py_kernels == before


@pytest.mark.parametrize("method, reads_last_state", [("store-all", False), ("chen-sqrt", True)])
def test_a_deep_bidirectional_gru_with_a_state_trains_like_eager(method, reads_last_state):
    model, reference = twins(lambda: GRUWithState(reads_last_state=reads_last_state))
    x = torch.randn(2, 4, 5)
    optimized = monetdsl.optimize(model, (x,), method=method, cache_dir=None, profile=False)
    live = monetdsl.measure(optimized, (x,), probe="live")
    if reads_last_state:  # the stacked last states are counted high (164 of 10180 bytes): never low
        assert live.peak <= live.planned, (live.peak, live.planned)
    else:
        assert live.peak == live.planned, (live.peak, live.planned)
    (out, grads), (expected, expected_grads) = eager_step(optimized, [x], 1), eager_step(reference, [x], 1)
    torch.testing.assert_close(out, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
