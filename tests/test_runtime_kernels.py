"""The numba.cuda kernels against the torch implementations, under the CUDA simulator.

``NUMBA_ENABLE_CUDASIM=1`` (set in conftest) runs each kernel on numba's simulator,
one Python thread per simulated thread, so the inputs are tiny; sizes that are not a
multiple of 8 check the packed tails. A separate test compiles every kernel to PTX for
sm_90 (needs ``numba-cuda[cu13]``), which rejects device code the simulator would accept.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from monetdsl.lowering import kernels, ops

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="kernel tests run on numba's CUDA simulator")
mops = torch.ops.monetdsl


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().copy()


@pytest.mark.parametrize("n", [1, 13, 64, 101])
def test_pack_and_unpack_bits(n):
    torch.manual_seed(n)
    mask = torch.rand(n) > 0.4
    out = np.zeros((n + 7) // 8, dtype=np.uint8)
    kernels.launch_pack_bits(_np(mask.to(torch.uint8)), out, n)
    assert torch.equal(torch.from_numpy(out), mops.pack_bits(mask))
    back = np.zeros(n, dtype=np.uint8)
    kernels.launch_unpack_bits(out, back, n)
    assert torch.equal(torch.from_numpy(back).bool(), mask)


@pytest.mark.parametrize("n", [8, 64, 136])
def test_pack_and_unpack_as_words(n):
    """Masks whose length is a multiple of 8: eight flags per int64 word."""
    torch.manual_seed(n)
    mask = torch.rand(n) > 0.4
    out = np.zeros(n // 8, dtype=np.uint8)
    kernels.launch_pack_words(_np(mask.to(torch.uint8)).view(np.int64), out)
    assert torch.equal(torch.from_numpy(out), mops.pack_bits(mask))
    words = np.zeros(n // 8, dtype=np.int64)
    kernels.launch_unpack_words(out, words)
    assert torch.equal(torch.from_numpy(words.view(np.uint8)).bool(), mask)


@pytest.mark.parametrize("low, high", [(0.0, float("inf")), (0.0, 6.0), (-1.0, 1.0)])
def test_region_bits_is_the_relu_family_mask(low, high):
    x = torch.randn(53) * 4
    x[:3] = torch.tensor([low, 0.0, 6.0])  # boundaries are outside the open region
    out = np.zeros(7, dtype=np.uint8)
    kernels.launch_region_bits(_np(x), out, 53, low, high)
    assert torch.equal(torch.from_numpy(out), mops.region_bits(x, low, high))


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_backward_from_the_mask(slope):
    torch.manual_seed(1)
    x, g = torch.randn(45), torch.randn(45)
    bits = mops.region_bits(x, 0.0, float("inf"))
    out = np.zeros(45, dtype=np.float32)
    kernels.launch_masked_grad(_np(g), _np(bits), out, 45, slope)
    expected = mops.masked_grad(g, bits, slope)
    assert torch.equal(torch.from_numpy(out), expected)
    if slope == 0.0:  # ReLU: eager's threshold_backward from the output, exactly
        assert torch.equal(expected, torch.ops.aten.threshold_backward(g, torch.relu(x), 0))
    inplace = _np(g)
    kernels.launch_masked_grad_inplace(inplace, _np(bits), 45, slope)
    assert torch.equal(torch.from_numpy(inplace), expected)
    g2 = g.clone()
    mops.masked_grad_(g2, bits, slope)
    assert torch.equal(g2, expected)


def test_dropout_from_bits():
    torch.manual_seed(2)
    x = torch.randn(30)
    mask = torch.rand(30) > 0.25
    bits = mops.pack_bits(mask)
    out = np.zeros(30, dtype=np.float32)
    kernels.launch_apply_bits(_np(x), _np(bits), out, 30, 1 / 0.75)
    assert torch.equal(torch.from_numpy(out), mops.apply_bits(x, bits, 1 / 0.75))
    assert torch.equal(mops.apply_bits(x, bits, 1 / 0.75), torch.ops.aten.native_dropout_backward(x, mask, 1 / 0.75))


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_from_output(affine):
    torch.manual_seed(3)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if affine else None
    y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    invstd = torch.rsqrt(x.detach().var((0, 2), unbiased=False) + 1e-5)
    dx, dw, db = mops.bn_backward_from_output(g, y.detach(), invstd, w.detach() if affine else None, b.detach() if affine else None)
    torch.testing.assert_close(dx, x.grad)
    if affine:
        torch.testing.assert_close(dw, w.grad)
        torch.testing.assert_close(db, b.grad)
    out = np.zeros(60)
    sums = np.zeros((2, 4))
    kernels.launch_bn_backward_from_output(_np(g).reshape(-1), _np(y).reshape(-1), _np(w) if affine else None, _np(b) if affine else None,
                                           _np(invstd), sums, out, (3, 4, 5))
    torch.testing.assert_close(torch.from_numpy(out).reshape(3, 4, 5), dx)
    xhat = (y.detach() - (b.detach().reshape(1, 4, 1) if affine else 0)) / (w.detach().reshape(1, 4, 1) if affine else 1)
    torch.testing.assert_close(torch.from_numpy(sums[0]), g.sum((0, 2)))
    torch.testing.assert_close(torch.from_numpy(sums[1]), (g * xhat).sum((0, 2)))


@pytest.mark.parametrize("kernel, stride, padding, dilation", [((2, 2), (2, 2), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 2), (1, 2), (1, 0), (2, 1))])
def test_compact_max_pool_indices(kernel, stride, padding, dilation):
    torch.manual_seed(4)
    x = torch.randn(1, 2, 9, 8)
    y, indices = torch.ops.aten.max_pool2d_with_indices(x, list(kernel), list(stride), list(padding), list(dilation))
    args = (list(kernel), list(stride), list(padding), list(dilation), list(x.shape))
    window = mops.window_from_indices(indices, *args)
    assert window.dtype == torch.int8 and torch.equal(mops.indices_from_window(window, *args), indices)
    attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "shape": tuple(x.shape), "out_shape": tuple(y.shape)}
    n = indices.numel()
    out = np.zeros(n, dtype=np.int8)
    kernels.launch_window_from_indices(_np(indices).reshape(-1), out, n, attrs)
    assert torch.equal(torch.from_numpy(out).reshape(window.shape), window)
    back = np.zeros(n, dtype=np.int64)
    kernels.launch_indices_from_window(out, back, n, attrs)
    assert torch.equal(torch.from_numpy(back).reshape(indices.shape), indices)


def test_every_op_has_a_cuda_kernel_and_a_cpu_implementation():
    for name, launched in ops.CUDA_OPS.items():
        op = getattr(torch.ops.monetdsl, name)
        assert all(k in kernels.KERNELS for k in launched)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA"), name  # register_kernel("cuda")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CompositeExplicitAutograd"), name  # torch, on the CPU


_PTX = r"""
from numba import cuda, types
from monetdsl.lowering import kernels
u8, i8, i64, f32, f64 = types.uint8[:], types.int8[:], types.int64[:], types.float32[:], types.float64[:]
sigs = {
    "region_bits": (f32, u8, types.int64, types.float32, types.float32), "pack_words": (i64, u8), "unpack_words": (u8, i64),
    "unpack_bits": (u8, u8, types.int64), "masked_grad": (f32, u8, f32, types.int64, types.float32),
    "masked_grad_inplace": (f32, u8, types.int64, types.float32), "apply_bits": (f32, u8, f32, types.int64, types.float32),
    "bn_channel_sums": (f32, f32, f32, f32, types.float64[:, :], types.int64, types.int64, types.int64, types.boolean, types.boolean),
    "bn_dx": (f32, f32, f32, f32, f32, types.float64[:, :], f32, types.int64, types.int64, types.int64, types.float64, types.boolean, types.boolean),
    "window_from_indices": (i64, i8) + (types.int64,) * 11, "indices_from_window": (i8, i64) + (types.int64,) * 11,
}
assert set(sigs) == set(kernels.KERNELS), set(kernels.KERNELS) ^ set(sigs)
sigs["region_bits (packing 0/1 bytes)"] = (u8, u8, types.int64, types.float32, types.float32)
for name, sig in sigs.items():
    ptx, _ = cuda.compile_ptx(kernels.KERNELS[name.split(" ")[0]].py_func, sig, cc=(9, 0))
    assert ".target sm_90" in ptx, name
print("compiled", len(kernels.KERNELS))
"""


@pytest.mark.skipif(importlib.util.find_spec("nvidia") is None, reason="PTX compilation needs numba-cuda[cu13] (NVVM and NVRTC wheels)")
def test_kernels_compile_for_sm_90():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run([sys.executable, "-c", _PTX], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"compiled {len(kernels.KERNELS)}" in done.stdout
