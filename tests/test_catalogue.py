"""Every catalogue alternative computes the same values and gradients as autograd.

For each op kind and each small example: every forward alternative must reproduce the
plain op's output, and every backward alternative whose reads that forward alternative
provides must give the gradients ``torch.autograd.grad`` gives (float64, tight
tolerances). Recomputation with the kept tensors must reproduce the first output exactly.
"""
import pytest
import torch

from monetdsl.catalogue import CATALOGUE, GammaHasZeros, pack_bits, unpack_bits

CASES = [(name, i) for name, kind in sorted(CATALOGUE.items()) for i in range(len(kind.examples()))]


def _clone(inputs):
    return {k: v.detach().clone() for k, v in inputs.items()}


@pytest.mark.parametrize("name,case", CASES)
def test_alternatives_match_autograd(name, case):
    kind = CATALOGUE[name]
    inputs, attrs = kind.examples()[case]
    binding_inputs = {k: v for k, v in inputs.items()}
    from monetdsl.catalogue import Binding

    binding = Binding(binding_inputs, {"y": None}, attrs)
    float_roles = [r for r, t in inputs.items() if t.is_floating_point() and r not in ("running_mean", "running_var")]
    checked = 0
    for falt in kind.forward_alts(binding):
        # oracle: same RNG state for dropout, fresh leaf tensors
        state = torch.get_rng_state()
        leaves = {k: v.detach().clone().requires_grad_(k in float_roles) for k, v in inputs.items()}
        ref_y = kind.autograd_reference(leaves, attrs)["y"]
        g = torch.randn(ref_y.shape, dtype=ref_y.dtype, generator=torch.Generator().manual_seed(11))
        wanted = [leaves[r] for r in float_roles]
        ref_grads = dict(zip(float_roles, torch.autograd.grad(ref_y, wanted, g, allow_unused=True)))
        torch.set_rng_state(state)
        fin = _clone(inputs)
        x_before = fin.get("x", None)
        x_before = x_before.clone() if x_before is not None else None
        out = kind.forward(falt.name, fin, attrs)
        torch.testing.assert_close(out["y"], ref_y.detach(), rtol=1e-10, atol=1e-10)
        for role in falt.derived:
            assert role in out, f"{falt.name} must produce {role}"
        # what is available to a backward after this forward alternative
        available = dict(out)
        for role, t in inputs.items():
            if not (falt.overwrites == role):
                available[role] = t.detach().clone()
        if falt.overwrites:
            # in place: the input's storage now holds the output
            assert out["y"].data_ptr() == fin[falt.overwrites].data_ptr()
        # a recomputation from the kept tensors reproduces the output exactly
        if falt.recompute_reads and x_before is not None:
            saved = {r: out[r] for r in falt.recompute_reads}
            again = kind.forward(falt.name, _clone({**inputs}), attrs, saved=saved)
            assert torch.equal(again["y"], out["y"])
        for step in kind.backward_steps(binding):
            for balt in step.alts:
                if not all(r in available for r in balt.reads):
                    continue
                saved = {r: available[r] for r in balt.reads}
                for role in ("w", "b"):  # affine parameters are always resident
                    if role in inputs and role not in saved:
                        saved[role] = inputs[role]
                incoming = g.clone() if balt.overwrites else g  # an in-place backward consumes its gradient
                grads = kind.backward(step.name, balt.name, {"y": incoming}, saved, attrs)
                if balt.overwrites:  # written over the incoming gradient's storage
                    assert grads[step.grads[0]].data_ptr() == incoming.data_ptr()
                for role in step.grads:
                    if role not in float_roles:
                        continue
                    assert role in grads, f"{name} {step.name}/{balt.name} must give grad of {role}"
                    torch.testing.assert_close(grads[role], ref_grads[role], rtol=1e-8, atol=1e-10)
                checked += 1
    assert checked >= len(kind.forward_alts(binding))


def test_every_backward_alternative_is_reachable():
    for kind in CATALOGUE.values():
        inputs, attrs = kind.examples()[0]
        from monetdsl.catalogue import Binding

        binding = Binding(dict(inputs), {"y": None}, attrs)
        produced = {"y", "lse", "mean", "invstd", "rstd", "indices", "lsm", "total_weight"} | set(inputs)
        for falt in kind.forward_alts(binding):
            produced |= set(falt.derived)
        for step in kind.backward_steps(binding):
            for balt in step.alts:
                assert set(balt.reads) <= produced, (kind.name, balt.name)


def test_bit_packing_round_trip_and_size():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000, 1001):
        m = torch.rand(n, generator=g) > 0.5
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(unpack_bits(packed, (n,)), m)


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "rms_norm"])
def test_output_based_backward_refuses_zero_gamma(name):
    kind = CATALOGUE[name]
    inputs, attrs = kind.examples()[0]
    inputs = _clone(inputs)
    inputs["w"][0] = 0.0
    out = kind.forward("default", _clone(inputs), attrs)
    saved = {"y": out["y"], "w": inputs["w"], **{k: out[k] for k in ("invstd", "rstd") if k in out}}
    if "b" in inputs:
        saved["b"] = inputs["b"]
    with pytest.raises(GammaHasZeros):
        kind.backward("backward", "from_output", {"y": torch.ones_like(out["y"])}, saved, attrs)


def test_batch_norm_recompute_does_not_touch_running_stats():
    kind = CATALOGUE["batch_norm"]
    inputs, attrs = kind.examples()[0]
    inputs = _clone(inputs)
    first = kind.forward("default", inputs, attrs)
    rm, rv = inputs["running_mean"].clone(), inputs["running_var"].clone()
    assert not torch.equal(rm, torch.zeros_like(rm))  # the first forward updated them
    again = kind.forward("default", inputs, attrs, saved={"mean": first["mean"], "invstd": first["invstd"]})
    assert torch.equal(again["y"], first["y"])
    assert torch.equal(inputs["running_mean"], rm) and torch.equal(inputs["running_var"], rv)
    # and the update matches torch's own
    ref_rm, ref_rv = torch.zeros_like(rm), torch.ones_like(rv)
    x, w, b = kind.examples()[0][0]["x"], kind.examples()[0][0]["w"], kind.examples()[0][0]["b"]
    torch.nn.functional.batch_norm(x, ref_rm, ref_rv, w, b, True, attrs["momentum"], attrs["eps"])
    torch.testing.assert_close(rm, ref_rm)
    torch.testing.assert_close(rv, ref_rv)


def test_weight_gradients_into_grad_add_or_write_by_chunks():
    """conv's weight gradient by chunks of output channels (here 2 of 6, and 16-channel
    alignment not reached) adds into, or writes, the target; matmul's into a transposed view."""
    from unittest import mock

    from monetdsl.catalogue import linear

    conv = CATALOGUE["conv"]
    inputs, attrs = conv.examples()[0]
    x, w = inputs["x"], inputs["w"]
    g = torch.randn(conv.forward("default", inputs, attrs)["y"].shape, dtype=torch.float64)
    want = conv.backward("wgrad", "default", {"y": g}, {"x": x}, attrs)["w"]
    calls = []
    real = linear._CONV_WEIGHT[2]
    with mock.patch.object(linear, "WGRAD_CHUNK_BYTES", 2 * w[0].numel() * 8), \
            mock.patch.dict(linear._CONV_WEIGHT, {2: lambda *a, **k: calls.append(a[1]) or real(*a, **k)}):
        start = torch.randn_like(w)
        added = start.clone()
        linear.conv_weight_grad_into(added, x, g, attrs, overwrite=False)
        written = torch.full_like(w, float("nan"))
        linear.conv_weight_grad_into(written, x, g, attrs, overwrite=True)
    assert [c[0] for c in calls] == [2, 2, 2] * 2
    torch.testing.assert_close(added, start + want)
    torch.testing.assert_close(written, want)
    a, b_grad = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    weight_grad = torch.randn(3, 4, dtype=torch.float64)  # a linear layer's: the gradient of weight.t()
    expected = weight_grad + (a.t() @ b_grad).t()
    linear.matmul_weight_grad_into(weight_grad.t(), a, b_grad, overwrite=False)
    torch.testing.assert_close(weight_grad, expected)
    linear.matmul_weight_grad_into(weight_grad.t(), a, b_grad, overwrite=True)
    torch.testing.assert_close(weight_grad, (a.t() @ b_grad).t())


@pytest.mark.parametrize("case", [0, 2])  # a 2-d convolution; a 1-d one with stride 2 and dilation 2
def test_convolution_weight_gradient_by_im2col(case):
    """One matrix product of the output gradient and the unfolded input: the same weight
    gradient as PyTorch's kernel, added into or written to the target, also when the target
    is not contiguous (a channels-last ``.grad``), and made whole as a new tensor."""
    from unittest import mock

    from monetdsl.catalogue import linear

    conv = CATALOGUE["conv"]
    inputs, attrs = conv.examples()[case]
    x = inputs["x"]
    g = torch.randn(conv.forward("default", inputs, attrs)["y"].shape, dtype=torch.float64)
    want = conv.backward("wgrad", "default", {"y": g}, {"x": x}, attrs)["w"]
    torch.testing.assert_close(linear.conv_weight_grad_im2col(x, g, attrs), want)
    start = torch.randn_like(want)
    added = start.clone()
    linear.conv_weight_grad_im2col_into(added, x, g, attrs, overwrite=False)
    torch.testing.assert_close(added, start + want)
    written = torch.full_like(want, float("nan"))
    linear.conv_weight_grad_im2col_into(written, x, g, attrs, overwrite=True)
    torch.testing.assert_close(written, want)
    strided = torch.randn(tuple(reversed(want.shape)), dtype=torch.float64).permute(*reversed(range(want.dim())))
    assert not strided.is_contiguous()
    before = strided.clone()
    linear.conv_weight_grad_im2col_into(strided, x, g, attrs, overwrite=False)
    torch.testing.assert_close(strided, before + want)
    if want.dim() == 4:  # a channels-last weight's gradient: the product goes straight into it, no whole temporary
        last = torch.randn_like(want).contiguous(memory_format=torch.channels_last)
        before = last.clone()
        with mock.patch.object(linear, "conv_weight_grad_im2col", side_effect=AssertionError("made whole")):
            linear.conv_weight_grad_im2col_into(last, x, g, attrs, overwrite=False)
            torch.testing.assert_close(last, before + want)
            linear.conv_weight_grad_im2col_into(last, x, g, attrs, overwrite=True)
        torch.testing.assert_close(last, want)


@pytest.mark.parametrize("shape, stride", [((2, 6, 9, 8), (2, 3)), ((2, 6, 9), (3,))])
def test_pointwise_im2col_holds_only_its_columns(shape, stride):
    """A strided 1x1 convolution's weight gradient by im2col: PyTorch's, and on real
    tensors the step holds exactly the bytes measured on FakeTensors (the workspace the
    plan counts); CPU ``unfold`` would hold an input-sized storage for smaller columns."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from monetdsl.catalogue import linear
    from monetdsl.costs.estimated_workspace import StorageTracker

    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn((4, shape[1]) + (1,) * (len(shape) - 2), dtype=torch.float64)
    conv = torch.nn.functional.conv2d if len(shape) == 4 else torch.nn.functional.conv1d
    g = torch.randn(conv(x, w, stride=stride).shape, dtype=torch.float64)
    attrs = {"w_shape": list(w.shape), "stride": list(stride), "padding": [0] * len(stride), "dilation": [1] * len(stride)}
    want = torch.ops.aten.convolution_backward(g, x, w, None, list(stride), attrs["padding"], attrs["dilation"],
                                               False, [0] * len(stride), 1, [False, True, False])[1]
    peaks = []
    for fake in (False, True):
        with FakeTensorMode() if fake else torch.no_grad():
            xs, gs, out = (torch.empty(t.shape, dtype=t.dtype) for t in (x, g, w)) if fake else (x, g, torch.zeros_like(w))
            with StorageTracker() as tracker:
                linear.conv_weight_grad_im2col_into(out, xs, gs, attrs, overwrite=True)
            peaks.append(tracker.peak)
            if not fake:
                torch.testing.assert_close(out, want)
    assert peaks[0] == peaks[1] == 8 * (g.numel() + x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)].numel())


@pytest.mark.parametrize("case", [0, 2])
def test_im2col_traffic_counts_the_unfolded_input_and_the_copies(case):
    """The roofline's extra bytes for ``im2col_into_grad``: the unfolded input written, copied
    and read by the product (4 passes), the output gradient copied and read (3), sized as
    the real unfold of the example (strides, padding and dilation included)."""
    from monetdsl.catalogue import Binding
    from monetdsl.catalogue.linear import _im2col_operands

    conv = CATALOGUE["conv"]
    inputs, attrs = conv.examples()[case]
    binding = Binding(inputs, {"y": None}, attrs)
    g = torch.randn(conv.forward("default", inputs, attrs)["y"].shape, dtype=torch.float64)
    g2, c2 = _im2col_operands(inputs["x"], g, attrs)
    assert conv.temporary_traffic("im2col_into_grad", binding, 8) == 8 * (4 * c2.numel() + 3 * g2.numel())
    assert conv.temporary_traffic("into_grad", binding, 8) == 0
