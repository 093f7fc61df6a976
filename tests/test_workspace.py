"""Workspace measurement (monetdsl.costs.estimated_workspace): the temporaries a step allocates.

The tracer runs every implementation's runtime step on FakeTensors and counts new
storages; these tests check the counter and the measured figures against what the
implementations visibly allocate, and against real tensors.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from monetdsl.costs.estimated_workspace import StorageTracker, step_workspace
from monetdsl.costs import trace_model


class _Attention(torch.nn.Module):
    """One attention head group over a q/k/v projection (as GPT blocks do)."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.heads = heads

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, C).sum()


class _Elementwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return torch.nn.functional.gelu(self.drop(self.lin(x))).tanh().sum()


def test_tracker_counts_new_storages_while_they_live():
    with FakeTensorMode():
        x = torch.empty(100)
        with StorageTracker() as tracker:
            a = x * 2          # 400 B
            a.mul_(3)          # in place: nothing new
            v = a.view(10, 10)  # a view: nothing new
            b = a + 1          # 400 B
            c = b.exp()        # 400 B: 1200 B live
            del a, v
            d = c.cos()        # 400 B, a freed: 1200 B again
        assert (tracker.peak, tracker.live) == (1200, 1200)
        del d
        del b, c
    assert tracker.live == 0


def test_step_workspace_is_the_peak_above_the_outputs():
    def step(x):
        t = x * 2              # a temporary as large as x
        return (t.sin(),)      # one output

    x = torch.randn(64)
    ws, results, held = step_workspace(step, lambda: [x], 64 * 4)
    assert (ws, held) == (256, 256) and torch.equal(results[0], (x * 2).sin())


def test_sdpa_math_backward_workspace():
    """B=2, T=8, C=32, 2 heads: q, k, v are 2x2x8x16 f32 (4 KiB each). The math
    backward (a custom op, one call) returns dq, dk, dv in [B, H, T, D] order; the gradient
    of the projection is their cat in [B, T, 3C] order, so each is first copied transposed:
    workspace = dq + dk + dv + their three copies - nothing else, above the 12 KiB output.
    The flash backward's aten kernel returns its gradients in the layout of q, k and v (views of
    the projection): only the three gradients exist before the cat."""
    spec = trace_model(_Attention(), [(2, 8, 32)], device="cpu", optimizer="sgd").spec
    grads = 2 * 2 * 8 * 16 * 4
    bop = next(b for b in spec.network.backward_ops if b.of.endswith("sdpa"))
    assert bop.impl("math").workspace == 6 * grads
    assert bop.impl("flash").workspace == 3 * grads
    fop = spec.network.op(bop.of)
    assert fop.impl("flash").workspace == 0 and fop.impl("math").workspace == 0


def test_elementwise_workspace_and_a_real_run():
    """Dropout's ``bit_mask`` draws eager's bool mask (one byte per element) and packs it
    into bits: the bool mask is its workspace (64 B for 4 x 16); ``bool_mask`` keeps that
    mask (an output, no workspace) and ``rng_replay`` is one custom op. GELU's and tanh's
    aten kernels allocate only their outputs. The figures measured on FakeTensors equal a
    run of the same steps on real tensors."""
    spec = trace_model(_Elementwise(), [(4, 16)], device="cpu", optimizer="sgd").spec
    net = spec.network
    drop = net.op("drop")
    assert {i.name: i.workspace for i in drop.impls} == {"bool_mask": 0, "bit_mask": 4 * 16, "rng_replay": 0}
    for name in ("gelu", "tanh", "gelu.backward", "tanh.backward", "drop.backward"):
        assert all(i.workspace == 0 for i in net.op(name).impls), name
    from monetdsl.runtime.plan import trace_for_runtime
    from monetdsl.lowering.program import lower

    torch.manual_seed(0)
    model = _Elementwise()
    x = torch.randn(4, 16)
    trace = trace_for_runtime(model, [x], optimizer="sgd")
    net = trace.spec.network
    for impls in ({}, {"drop": "bit_mask", "drop.backward": "from_bits"}):
        program = lower(trace, net, impls)
        values = {}
        with torch.no_grad():
            for op in net.forward_ops:
                step = program.forward[op.name]
                inputs = [values[n] if n in values else _fixed(trace, model, x, n) for n in step.reads]
                planned = sum(net.tensors[n].storage_bytes for n in step.writes)
                ws, results, _ = step_workspace(step.fn, lambda: inputs, planned)
                assert ws == op.impl(impls.get(op.name, op.impls[0].name)).workspace, op.name
                values.update(zip(step.writes, results))
            for bop in reversed(net.backward_ops):
                step = program.backward[bop.name]
                inputs = [values[n] if n in values else (torch.ones_like(values[n[5:-1]]) if n.startswith("grad(") else _fixed(trace, model, x, n))
                          for n in step.reads]
                planned = sum(net.tensors[g].storage_bytes for g in bop.outputs)
                ws, results, _ = step_workspace(step.fn, lambda: inputs, planned)
                assert ws == bop.impl(impls.get(bop.name, bop.impls[0].name)).workspace, bop.name
                values.update(zip(step.writes, results))


def _fixed(trace, model, x, name):
    """A fixed tensor of the traced step by IR name: the input or a parameter."""
    tensor = trace.spec.network.tensors[name]
    if tensor.kind.value == "input":
        return x
    params = dict(model.named_parameters())
    return next(p for key, p in params.items() if tensor.shape == tuple(p.shape) and name.endswith(key.split(".")[-1]))
