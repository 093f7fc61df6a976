"""The runtime on a real GPU: the numba.cuda kernels at full size against the torch
implementations, and the zoo trained with schedules on CUDA.

Skipped without a CUDA device (conftest runs numba for real when torch sees one). On a GPU
machine: ``python -m pytest tests/test_runtime_cuda.py`` (``benchmarks/gpu_checks.sh``
runs it with the kernel and runtime benchmarks).

* every compact-form op on CUDA tensors equals its CPU implementation, bit for bit (the
  batch-norm backward within float rounding), for float32, float16 (numba kernels) and
  bfloat16 (torch's formula on the GPU: numba cannot index bfloat16);
* the zoo (CNN with BN, max-pool and dropout; residual net; UNet-like; GPT) on CUDA, from
  the store-all peak down to the smallest: gradients as eager's on the same GPU, and the
  peak of live tensor bytes as planned (at most 2 % above; below only by gradients that
  alias the incoming one, which the simulator counts apart); ``torch.cuda.max_memory_allocated``
  is printed beside it (it adds cuDNN's and cuBLAS's workspaces, which the plan does not
  model);
* autocast (bfloat16) preserved on recompute on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import monetdsl
from monetdsl.models import SmallCNN, TinyResNet, TinyUNet, tiny_gpt
from monetdsl.lowering.ops import CUDA_OPS
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search import solve
from .runtime_helpers import budget_ladder, Reduced, first_impls, patch_dropout, schedule_with, twins
from .test_runtime_cross_entropy import BigVocab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="needs a CUDA device (and numba running for real)")
mops = torch.ops.monetdsl
SIZES = [1, 13, 4096, 4099, 3_000_000, 3_000_001]  # multiples of 8 pack and unpack as int64 words
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def deterministic():
    """Deterministic cuDNN without TF32: a recomputation then differs from eager only in
    float32 rounding (TF32 convolutions round at 1e-3)."""
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = True, False, False
    yield
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------ kernels
def test_every_compact_op_has_a_cuda_kernel():
    for name in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(getattr(mops, name).default.name(), "CUDA"), name


@pytest.mark.parametrize("n", SIZES)
def test_pack_and_unpack_equal_the_cpu(n):
    torch.manual_seed(n)
    mask = torch.rand(n) > 0.4
    bits = mops.pack_bits(mask.cuda())
    assert bits.is_cuda and torch.equal(bits.cpu(), mops.pack_bits(mask))
    assert torch.equal(mops.unpack_bits(bits, [n]).cpu(), mask)
    flags = (torch.rand(n) > 0.5).to(torch.uint8) * 3  # any nonzero byte is set
    assert torch.equal(mops.pack_bits(flags.cuda()).cpu(), mops.pack_bits(flags))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_relu_family_masks_and_backward_equal_the_cpu(n, dtype):
    torch.manual_seed(n)
    x = (torch.randn(n) * 4).to(dtype)
    g = torch.randn(n).to(dtype)
    for low, high in [(0.0, float("inf")), (0.0, 6.0), (-1.0, 1.0)]:
        bits = mops.region_bits(x.cuda(), low, high)
        assert torch.equal(bits.cpu(), mops.region_bits(x, low, high)), (low, high)
    bits = mops.region_bits(x, 0.0, float("inf"))
    for slope in (0.0, 0.01):
        expected = mops.masked_grad(g, bits, slope)
        assert torch.equal(mops.masked_grad(g.cuda(), bits.cuda(), slope).cpu(), expected), slope
        inplace = g.cuda()
        mops.masked_grad_(inplace, bits.cuda(), slope)
        assert torch.equal(inplace.cpu(), expected), slope
    # eager ReLU backward on the GPU, from the output
    assert torch.equal(mops.masked_grad(g.cuda(), bits.cuda(), 0.0),
                       torch.ops.aten.threshold_backward(g.cuda(), torch.relu(x.cuda()), 0))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_dropout_from_bits_is_eager_dropout_on_the_gpu(n, dtype):
    torch.manual_seed(n)
    x = torch.randn(n, device="cuda").to(dtype)
    out, mask = torch.ops.aten.native_dropout(x, 0.3, True)
    bits = mops.pack_bits(mask)
    assert torch.equal(mops.apply_bits(x, bits, 1 / 0.7), out)  # the recomputed forward, bit for bit
    assert torch.equal(mops.apply_bits(x, bits, 1 / 0.7), torch.ops.aten.native_dropout_backward(x, mask, 1 / 0.7))


@pytest.mark.parametrize("shape", [(16, 64, 28, 28), (32, 512, 7, 7), (8, 96, 10, 15)])  # rows of 784, 49, 150
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_from_output_on_the_gpu(affine, dtype, shape):
    torch.manual_seed(3)
    c = shape[1]
    x = torch.randn(*shape, device="cuda", requires_grad=True)
    w = (torch.rand(c, device="cuda") + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, device="cuda", requires_grad=True) if affine else None
    y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    invstd = torch.rsqrt(x.detach().var((0, 2, 3), unbiased=False) + 1e-5)
    args = (g.to(dtype), y.detach().to(dtype), invstd, w.detach() if affine else None, b.detach() if affine else None)
    dx, dw, db = mops.bn_backward_from_output(*args)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx.float(), x.grad, **tol)
    if affine:  # sums over thousands of elements: half-precision inputs leave ~1 % of the largest
        sums = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=0, atol=0.02 * b.grad.abs().max().item())
        torch.testing.assert_close(dw.float(), w.grad, **sums)
        torch.testing.assert_close(db.float(), b.grad, **sums)


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))])
def test_compact_max_pool_indices_on_the_gpu(kernel, stride, padding):
    x = torch.randn(8, 64, 56, 56, device="cuda")
    y, indices = torch.ops.aten.max_pool2d_with_indices(x, list(kernel), list(stride), list(padding), [1, 1])
    args = (list(kernel), list(stride), list(padding), [1, 1], list(x.shape))
    window = mops.window_from_indices(indices, *args)
    assert window.is_cuda and window.dtype == torch.int8
    assert torch.equal(window.cpu(), mops.window_from_indices(indices.cpu(), *args))
    assert torch.equal(mops.indices_from_window(window, *args), indices)


# --------------------------------------------------------------------------------- zoo
ZOO = {
    "cnn": (SmallCNN, lambda: torch.randn(64, 3, 32, 32)),
    "resnet": (TinyResNet, lambda: torch.randn(64, 3, 32, 32)),
    "unet": (TinyUNet, lambda: torch.randn(32, 3, 32, 32)),
    "gpt": (tiny_gpt, lambda: torch.randint(0, 512, (32, 64))),
    # an output layer with its cross-entropy inside: the folded linear_cross_entropy
    "head-loss": (lambda: BigVocab(2048, bias=False, scale=None), lambda: torch.randint(0, 2048, (4, 64))),
}


def _cuda_twins(factory):
    model, reference = twins(factory)
    return model.cuda(), reference.cuda()


def _step(model, x, seed):
    """One training step from RNG state ``seed`` (the loss: a fixed weighting of the output)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_trains_on_the_gpu_as_eager(name):
    """PyTorch's implementations with nothing kept and solved schedules down to the
    smallest budget: outputs and gradients as eager's on the GPU within float rounding
    (cuDNN and cuBLAS need not pick the same algorithm, nor sum in the same order, twice)."""
    factory, make_input = ZOO[name]
    model, reference = _cuda_twins(factory)
    torch.manual_seed(2)
    x = make_input().cuda()
    trace = trace_for_runtime(model, [x], optimizer="adam")
    network = trace.spec.network
    schedules = [schedule_with(trace.spec, first_impls(network), keep="none")]
    for budget in budget_ladder(trace.spec):
        result = solve(trace.spec, memory_budget=budget, time_limit=2, options={"kicks": 2, "refine": False})
        assert result.success, result.message
        schedules.append(result.schedule)
    for number, schedule in enumerate(schedules):
        optimized = monetdsl.optimize(model, schedule=schedule)
        optimized.plan_for(x, trace=trace)
        patch_dropout(reference, schedule.impls)
        (out1, grads1), (out2, grads2) = _step(optimized, x, 3), _step(reference, x, 3)
        assert grads1.keys() == grads2.keys()
        torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
        scale = max(g.abs().max().item() for g in grads2.values())
        for n in grads2:
            torch.testing.assert_close(grads1[n], grads2[n], rtol=1e-3, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_peak_on_the_gpu_is_the_planned_peak(name, record_property):
    """A step on the GPU, loss inside the model, from the store-all peak to the smallest:
    the peak of live tensor bytes within 2 % of the simulator's peak above fixed memory;
    ``torch.cuda.max_memory_allocated`` (printed) adds the libraries' workspaces."""
    factory, make_input = ZOO[name]
    model, _ = _cuda_twins(factory)
    torch.manual_seed(2)
    x = make_input().cuda()
    with torch.no_grad():
        shape = tuple(model(x).shape)
    reduced = Reduced(model, shape).cuda()
    trace = trace_for_runtime(reduced, [x], optimizer="adam")
    network = trace.spec.network
    for budget in budget_ladder(trace.spec):
        result = solve(trace.spec, memory_budget=budget, time_limit=2, options={"kicks": 2, "refine": False})
        optimized = monetdsl.optimize(reduced, schedule=result.schedule)
        optimized.plan_for(x, trace=trace)
        live = monetdsl.measure(optimized, x, probe="live", warmup=1)
        allocated = monetdsl.measure(optimized, x, probe="cuda", warmup=0, repeats=2)
        simulation = result.simulation
        planned = simulation.peak_bytes - simulation.fixed_bytes
        assert live.planned == planned
        rounding = sum(-t.storage_bytes % 512 for t in network.tensors.values() if not t.is_fixed)
        record_property(f"{name}@{budget}", f"live {live.peak} allocated {allocated.peak} planned {planned}")
        print(f"{name} budget {budget}: planned {planned} B, live tensors {live.ratio:.4f}, max_memory_allocated {allocated.ratio:.4f}")
        # never above the plan; below it at most by the gradients that alias the incoming
        # one (add/sum backward), which the simulator counts as storages of their own
        over_counted = sum(trace.built.workspace.aliased.values())
        assert planned - over_counted <= live.peak <= 1.02 * planned, (name, budget, live.summary(), over_counted)
        # the caching allocator also holds cuDNN's and cuBLAS's workspaces, which the plan does not see
        assert allocated.peak >= live.peak - rounding, (name, budget, allocated.summary())


@pytest.mark.parametrize("factory, make_input", [(SmallCNN, lambda: torch.randn(8, 3, 32, 32)), (tiny_gpt, lambda: torch.randint(0, 512, (2, 64)))])
def test_autocast_bf16_on_the_gpu(factory, make_input):
    """Everything recomputed under bfloat16 autocast on the GPU: eager's outputs exactly,
    its gradients within bfloat16 rounding (the recomputations run under the forward's
    autocast state: a float32 recomputation would change the outputs and gradients)."""
    model, reference = _cuda_twins(factory)
    x = make_input().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        trace = trace_for_runtime(model, [x], optimizer="sgd")
        schedule = schedule_with(trace.spec, first_impls(trace.spec.network), keep="none")
        optimized = monetdsl.optimize(model, schedule=schedule)
        optimized.plan_for(x, trace=trace)
        assert any(t.dtype == "bf16" for t in trace.spec.network.tensors.values())
        (out1, g1), (out2, g2) = _step(optimized, x, 6), _step(reference, x, 6)
    assert out1.dtype == torch.bfloat16 and torch.equal(out1, out2)
    for n in g2:  # bfloat16 gradients: GPU reductions round in their own order
        torch.testing.assert_close(g1[n], g2[n], rtol=2e-2, atol=2e-2 * g2[n].abs().max().item(), msg=n)


def test_profile_times_every_step_on_the_gpu():
    """``--profile`` on CUDA runs every implementation's runtime step (numba kernels
    included) on the device: no step falls back to its roofline time."""
    from monetdsl.costs import trace_model

    result = trace_model(SmallCNN(), [(4, 3, 32, 32)], device="cuda", profile=True, repeats=1)
    assert result.cost_model.startswith("measured on")
    assert not [n for n in result.built.notes if "not measured" in n]
    assert all(i.time_us > 0 for op in (*result.network.forward_ops, *result.network.backward_ops) for i in op.impls)


@pytest.mark.parametrize("options", [{"method": "store-all"}, {"max_overhead": 0.15}])
def test_measured_costs_hold_on_the_gpu(options):
    """The default plan is solved on costs measured on the GPU (cuDNN and cuBLAS
    workspaces from max_memory_allocated): measure()'s default, what the caching
    allocator sees, is within 3 % of the plan."""
    model = SmallCNN().cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    optimized = monetdsl.optimize(model, x, time_limit=10, **options)
    assert optimized.plans[0].trace.cost_model.startswith("measured on")
    result = monetdsl.measure(optimized, x, repeats=2)
    assert result.probe == "cuda" and result.ratio <= 1.03, result.summary()
