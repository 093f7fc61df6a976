"""``monetdsl trace``: captured specs describe exactly what autograd keeps.

Evidence on small models (a CNN with batch norm, max-pool and dropout, a
residual net, a U-Net-like net with a concatenation, a two-block GPT):

* the store-all description (first implementation of every op) keeps the same storage
  bytes as a real eager step, op by op and in total (counted with
  ``saved_tensors_hooks`` and autograd's own saved fields);
* shapes and dtypes of traced tensors equal those of a real run;
* every spec parses back to the same IR, validates, is deterministic and can be solved.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monetdsl import models
from monetdsl.errors import OptionError
from monetdsl.grammar import parse_spec
from monetdsl.ir import TensorKind
from monetdsl.search.solve import solve
from monetdsl.costs import trace_model
from monetdsl.tracing import CaptureError
from monetdsl.tracing.evidence import autograd_saved, spec_saved
from monetdsl.validate import validate_spec

MODELS = {
    "small_cnn": (models.small_cnn, lambda: [torch.randn(4, 3, 32, 32)]),
    "tiny_resnet": (models.tiny_resnet, lambda: [torch.randn(4, 3, 16, 16)]),
    "tiny_unet": (models.tiny_unet, lambda: [torch.randn(2, 3, 16, 16)]),
    "tiny_gpt": (models.tiny_gpt, lambda: [torch.randint(0, 512, (2, 64))]),
    "tiny_mobile": (models.tiny_mobile, lambda: [torch.randn(2, 3, 12, 12)]),
}


def _native_dropout(x, p=0.5, training=True, inplace=False):
    return torch.native_dropout(x, p, training)[0] if training else x


@pytest.fixture(scope="module")
def traced():
    out = {}
    for name, (factory, inputs) in MODELS.items():
        torch.manual_seed(0)
        model = factory()
        example = inputs()
        out[name] = (model, example, trace_model(model, example, device="cpu"))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_store_all_saved_bytes_equal_autograd(traced, name, monkeypatch):
    model, example, result = traced[name]
    # torch's CPU eager dropout is not the fused kernel (it keeps a float mask); the captured
    # graph, GPUs and our runtime use native_dropout, which keeps a bool mask: compare with that
    monkeypatch.setattr(F, "dropout", _native_dropout)
    real = autograd_saved(model, example)
    spec = spec_saved(result.network)
    assert spec.total == real.total > 0
    assert [b for _, b in spec.per_op] == [b for _, b in real.per_op], list(zip(spec.per_op, real.per_op))
    assert not result.built.notes


def test_cpu_eager_dropout_keeps_a_float_mask(traced):
    """The one known difference, stated: on the CPU eager dropout keeps 4 bytes per element."""
    model, example, result = traced["small_cnn"]
    real = autograd_saved(model, example)
    spec = spec_saved(result.network)
    drop = next(t for t in result.network.tensors.values() if t.name == "drop.mask")
    assert real.total - spec.total == 3 * drop.nbytes


@pytest.mark.parametrize("name", list(MODELS))
def test_shapes_and_dtypes_match_a_real_run(traced, name):
    model, example, result = traced[name]
    seen = {}
    hooks = []
    for path, module in model.named_modules():
        if path and not list(module.children()):
            hooks.append(module.register_forward_hook(lambda m, i, o, path=path: seen.setdefault(path, o)))
    try:
        model(*example)
    finally:
        for h in hooks:
            h.remove()
    tensors = result.network.tensors
    checked = exact = 0
    for path, out in seen.items():
        if path in tensors and isinstance(out, torch.Tensor):
            t = tensors[path]
            # a module whose result is a reshape of its op's result (nn.Linear on 3-d input)
            # is recorded with the shape of the storage it shares
            assert t.shape == tuple(out.shape) or (math.prod(t.shape) == out.numel() and t.shape[-1] == out.shape[-1]), path
            exact += t.shape == tuple(out.shape)
            assert t.dtype == {torch.float32: "f32", torch.int64: "i64"}[out.dtype], path
            assert t.nbytes == out.numel() * out.element_size()
            checked += 1
    assert checked >= 5 and exact >= checked // 2
    for pname, p in model.named_parameters():
        assert tensors[pname].kind is TensorKind.PARAM and tensors[pname].shape == tuple(p.shape)


@pytest.mark.parametrize("name", list(MODELS))
def test_spec_round_trips_validates_and_solves(traced, name):
    _, _, result = traced[name]
    spec = parse_spec(result.text(), path=f"{name}.monet")
    assert spec.network == result.network
    validate_spec(spec)
    solved = solve(spec, method="store-all")
    assert solved.success and solved.simulation.valid


def test_trace_is_deterministic():
    a = trace_model(models.tiny_resnet(), [(4, 3, 16, 16)], device="P100").text()
    b = trace_model(models.tiny_resnet(), [(4, 3, 16, 16)], device="P100").text()
    assert a == b


def test_catalogue_alternatives_appear(traced):
    net = traced["small_cnn"][2].network
    op = {o.name: o for o in net.forward_ops}
    assert op["relu1"].impl_names == ("plain", "inplace", "mask", "inplace_mask")
    assert op["pool1"].impl_names == ("indices", "window", "plain")
    assert op["drop"].impl_names == ("bool_mask", "bit_mask", "rng_replay")
    assert net.tensors["relu1.mask"].dtype == "u1" and net.tensors["relu1.mask"].nbytes * 32 == net.tensors["relu1"].nbytes
    bwd = {b.name: b for b in net.backward_ops}
    assert bwd["bn1.backward"].impl_names == ("from_input", "from_output")
    assert bwd["conv2.wgrad"].outputs == ("grad(conv2.weight)",) and bwd["conv2.dgrad"].outputs == ("grad(pool1)",)
    assert "conv1.dgrad" not in bwd  # the input batch needs no gradient
    # batch norm recomputes from its saved statistics, more cheaply than its first run
    bn = op["bn1"].impls[0]
    assert bn.recompute_reads == {"bn1.mean", "bn1.invstd"} and bn.recompute_time_us < bn.time_us
    gpt = {o.name: o for o in traced["tiny_gpt"][2].network.forward_ops}
    assert gpt["h.0.attn.sdpa"].impl_names == ("flash", "math")
    assert gpt["h.0.ln_1"].impls[0].recompute_reads


def test_in_place_relu6_is_described_by_the_catalogue(traced):
    """ReLU6(inplace=True) makes autograd keep a copy of its input; the spec keeps the input."""
    result = traced["tiny_mobile"][2]
    op = {o.name: o for o in result.network.forward_ops}
    assert op["stem.2"].impl_names[:2] == ("plain", "inplace")
    bwd = {b.name: b for b in result.network.backward_ops}
    assert bwd["stem.2.backward"].impls[0].name == "from_input"
    assert bwd["depthwise.0.wgrad"].impls and bwd["depthwise.0.dgrad"].impls


def test_in_place_is_offered_only_where_legal(traced):
    net = traced["tiny_resnet"][2].network
    op = {o.name: o for o in net.forward_ops}
    # the stem's ReLU output feeds block1.conv1 and the skip add: its input (stem.1) is read by
    # nothing later, so the ReLU may overwrite it
    assert "inplace" in op["stem.2"].impl_names
    # block1's first ReLU overwrites its BN output; the block's final ReLU overwrites the sum
    assert "inplace" in op["block1.relu"].impl_names
    # the GPT's residual stream is read again after its LayerNorm: no in-place LayerNorm input
    for o in traced["tiny_gpt"][2].network.forward_ops:
        for impl in o.impls:
            if impl.overwrites:
                assert impl.overwrites in o.inputs


def test_fixed_memory_and_optimizers():
    model = models.small_cnn()
    params = sum(p.numel() * 4 for p in model.parameters())
    for optimizer, state in (("sgd", 0), ("momentum", 1), ("adam", 2)):
        net = trace_model(model, [(2, 3, 32, 32)], optimizer=optimizer).network
        fixed = {f.name: f.nbytes for f in net.fixed}
        assert fixed["gradients"] == params
        assert fixed.get("optimizer", 0) == state * params
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert net.fixed_bytes == params + buffers + 2 * 3 * 32 * 32 * 4 + 3 * params


def test_large_batch_traces_without_allocating():
    """Batch 256 at 224x224 (a 147 MiB input, gigabytes of activations) in a fresh process."""
    code = (
        "import resource, torch\n"
        "from monetdsl import models\n"
        "from monetdsl.costs import trace_model\n"
        "from monetdsl.ir import TensorKind\n"
        "model = models.tiny_resnet()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "net = trace_model(model, [(256, 3, 224, 224)], device='P100').network\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "acts = sum(t.nbytes for t in net.tensors.values() if t.kind is TensorKind.ACTIVATION)\n"
        "print(grown // 1024, acts // 2**20)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    grown_mib, activations_mib = map(int, out.stdout.split())
    assert activations_mib > 2048  # the step would need gigabytes
    assert grown_mib < 140  # less than the input alone (147 MiB)


def test_dtype_option_casts_model_and_inputs():
    f32 = trace_model(models.small_cnn(), [(4, 3, 32, 32)]).network
    bf16 = trace_model(models.small_cnn(), [(4, 3, 32, 32)], dtype="bf16").network
    assert bf16.tensors["x"].dtype == "bf16" and bf16.tensors["conv1.weight"].dtype == "bf16"
    assert bf16.tensors["conv1"].nbytes * 2 == f32.tensors["conv1"].nbytes
    assert {f.name: f.nbytes * 2 for f in bf16.fixed} == {f.name: f.nbytes for f in f32.fixed}


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x + 0.1 * torch.randn_like(x))


def test_random_ops_outside_the_catalogue_are_never_recomputed():
    spec = trace_model(_Noisy(), [(4, 8)]).spec
    pinned = [p.text for p in spec.constraints.never_recompute]
    assert pinned and all("randn" in p for p in pinned)
    reparsed = parse_spec(trace_model(_Noisy(), [(4, 8)]).text())
    assert [p.text for p in reparsed.constraints.never_recompute] == pinned


def test_roofline_presets_order_devices():
    times = {}
    for device in ("cpu", "P100", "V100", "A100", "H100"):
        net = trace_model(models.small_cnn(), [(64, 3, 32, 32)], device=device).network
        times[device] = sum(op.impls[0].time_us for op in net.forward_ops)
    assert times["cpu"] > times["P100"] > times["V100"] > times["A100"] > times["H100"] > 0


def test_profile_measures_every_implementation():
    result = trace_model(models.small_cnn(), [(2, 3, 32, 32)], device="cpu", profile=True, repeats=1)
    assert result.cost_model.startswith("measured on cpu")
    assert "measured on cpu" in result.text().splitlines()[2]
    assert not [n for n in result.built.notes if "not measured" in n]
    roofline = trace_model(models.small_cnn(), [(2, 3, 32, 32)], device="cpu").network
    measured = result.network
    differs = 0
    for a, b in zip(roofline.forward_ops, measured.forward_ops):
        assert a.impl_names == b.impl_names
        differs += sum(x.time_us != y.time_us for x, y in zip(a.impls, b.impls))
    assert differs > 10
    assert all(i.time_us > 0 for op in measured.backward_ops for i in op.impls)



def test_profile_times_the_steps_the_runtime_runs(monkeypatch, tmp_path):
    """--profile times the runtime's step functions, not the catalogue's reference formulas:
    an alternative made 20 ms slower in the runtime is 20 ms slower in the spec."""
    import time

    from monetdsl.costs import MeasurementStore
    from monetdsl.lowering import alternatives

    original = alternatives.BACKWARD[("layer_norm", "from_output")]

    def slow(ctx, saved, grads):
        time.sleep(0.02)
        return original(ctx, saved, grads)

    monkeypatch.setitem(alternatives.BACKWARD, ("layer_norm", "from_output"), slow)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Dropout(0.1), nn.Linear(16, 4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded machine a 2-thread kernel can wait whole scheduler ticks for its partner
    try:
        result = trace_model(model, [(4, 8)], device="cpu", profile=True, repeats=3, store=MeasurementStore(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert not [n for n in result.built.notes if "not measured" in n]
    ln = next(op for op in result.network.backward_ops if op.impl_names == ("from_input", "from_output"))
    times = {i.name: i.time_us for i in ln.impls}
    assert times["from_output"] >= 20_000 > times["from_input"]
    # a recomputation that reads saved tensors (the dropout mask, the seed) is timed on its own
    drop = next(op for op in result.network.forward_ops if "bool_mask" in op.impl_names)
    assert all((i.recompute_time_us is not None) == bool(i.recompute_reads) for i in drop.impls)

class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # control flow on a value: a graph break
            return y * 2
        return y


class _GraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.fc(x)


class _MaskedSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y[y > 0].sum()  # a size known only at run time


@pytest.mark.parametrize(
    "model, words",
    [
        (_DataDependent(), "control flow depends on tensor values"),
        (_GraphBreak(), "graph break"),
        (_MaskedSelect(), "shape depends on tensor values"),
    ],
)
def test_what_cannot_be_one_graph_is_reported_at_the_model_line(model, words):
    with pytest.raises(CaptureError) as info:
        trace_model(model, [(2, 4)])
    message = str(info.value)
    assert words in message and f"{Path(__file__).name}:" in message, message
    assert message.startswith("monetdsl: ") and "Traceback" not in message


def test_model_without_trainable_parameters_is_refused():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(CaptureError):
        trace_model(model, [(2, 4)])


def test_bad_options_are_refused():
    """An option the tracer cannot use is an OptionError, as everywhere; a machine without
    the device asked for is a capture problem."""
    with pytest.raises(OptionError, match="optimizer"):
        trace_model(models.small_cnn(), [(2, 3, 32, 32)], optimizer="lamb")
    with pytest.raises(OptionError, match="device"):
        trace_model(models.small_cnn(), [(2, 3, 32, 32)], device="TPU")
    with pytest.raises(OptionError, match="profile"):
        trace_model(models.small_cnn(), [(2, 3, 32, 32)], device="P100", profile=True)
    with pytest.raises(OptionError, match="dtype"):
        trace_model(models.small_cnn(), [(2, 3, 32, 32)], dtype="f8")
    if not torch.cuda.is_available():
        for profile in (False, True):
            with pytest.raises(CaptureError, match="CUDA"):
                trace_model(models.small_cnn(), [(2, 3, 32, 32)], device="cuda", profile=profile)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, y):
        return torch.tanh(self.a(x)) * self.b(y)


def test_several_inputs_are_named_in_order():
    net = trace_model(_TwoInputs(), [(5, 6), (5, 3)], loss="sum").network
    assert net.tensors["x0"].shape == (5, 6) and net.tensors["x1"].shape == (5, 3)
    assert net.tensors["x0"].kind is TensorKind.INPUT
    op = {o.name: o for o in net.forward_ops}
    assert op["a"].inputs[1] == "x0" and op["b"].inputs[1] == "x1"
    assert op["tanh"].impl_names == ("plain", "inplace")  # the product reads tanh's output, not its input


class _Mixed(nn.Module):
    """Ops outside the catalogue: group norm, ELU, chunk, average pooling, transposed
    convolution, bilinear interpolation, softplus; and an in-place LeakyReLU."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ct = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = F.elu(self.gn(self.c(x)))
        a, b = y.chunk(2, dim=1)
        y = torch.cat([a * torch.sigmoid(b), F.avg_pool2d(b, 3, 1, 1)], 1)
        y = F.interpolate(self.act(self.ct(y)), scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.fc(F.softplus(y.permute(0, 2, 3, 1).reshape(-1, 4)))


def test_generic_ops_keep_what_autograd_keeps_up_to_decomposed_index_vectors():
    from monetdsl.tracing.evidence import constant_tensors

    torch.manual_seed(0)
    model, x = _Mixed(), [torch.randn(2, 3, 8, 8)]
    result = trace_model(model, x, device="cpu")
    net = result.network
    real, spec = autograd_saved(model, x), spec_saved(net)
    # the loss's target is built from nothing too, but eager keeps it as well
    constant = {n for n in constant_tensors(net) if not n.startswith("loss.")}
    assert constant  # bilinear interpolation became index arithmetic
    kept_constant = {n for b in net.backward_ops for n in b.impls[0].reads if n in constant}
    assert spec.total - real.total == sum(net.tensors[n].nbytes for n in kept_constant)
    def kept(op):
        return {n for b in net.backward_ops if b.of == op for n in b.impls[0].reads
                if net.tensors[n].grad_of is None and not net.tensors[n].is_fixed}

    only_constant = {o.name for o in net.forward_ops if kept(o.name) and kept(o.name) <= constant}
    per_op = [b for name, b in spec.per_op if name not in only_constant]
    assert per_op == [b for _, b in real.per_op]
    # the in-place LeakyReLU keeps its output, and the catalogue says so
    bwd = {b.name: b for b in net.backward_ops}
    assert bwd["act.backward"].impls[0].name == "from_output"


class _LlamaBlock(nn.Module):
    """RMSNorm + SwiGLU MLP: torch decomposes nn.RMSNorm; the tracer folds it back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.norm = nn.RMSNorm(32)
        self.w1 = nn.Linear(32, 64, bias=False)
        self.w3 = nn.Linear(32, 64, bias=False)
        self.w2 = nn.Linear(64, 32, bias=False)
        self.head = nn.Linear(32, 100)

    def forward(self, idx):
        x = self.emb(idx)
        h = self.norm(x)
        return self.head(x + self.w2(F.silu(self.w1(h)) * self.w3(h)))


def test_decomposed_rms_norm_is_one_catalogue_op_keeping_what_autograd_keeps():
    torch.manual_seed(0)
    model, x = _LlamaBlock(), [torch.randint(0, 100, (2, 7))]
    result = trace_model(model, x, device="cpu")
    net = result.network
    op = {o.name: o for o in net.forward_ops}
    assert op["norm"].inputs == ("emb", "norm.weight") and op["norm"].outputs == ("norm", "norm.rstd")
    assert op["norm"].impl_names == ("autograd", "default")
    bwd = {b.name: b for b in net.backward_ops}
    assert bwd["norm.backward"].impl_names == ("autograd", "from_input", "from_output")
    real, spec = autograd_saved(model, x), spec_saved(net)
    assert spec.total == real.total
    # autograd runs the norm as four nodes (pow, rsqrt, mul, mul): together they keep what the op keeps
    names = [n for n, _ in real.per_op]
    start = names.index("PowBackward0")
    merged = {}
    for keys in real.storages[start:start + 4]:
        merged.update(keys)
    real_per_op = [b for _, b in real.per_op[:start]] + [sum(merged.values())] + [b for _, b in real.per_op[start + 4:]]
    assert [b for _, b in spec.per_op] == real_per_op
    spec_text = parse_spec(result.text())
    validate_spec(spec_text)
    assert solve(spec_text, method="store-all").success


def test_a_catalogue_entry_that_disagrees_with_autograd_falls_back_to_the_generic_description(monkeypatch):
    from monetdsl.catalogue import CATALOGUE
    from monetdsl.catalogue.base import BackwardAlt, BackwardStep

    relu = CATALOGUE["relu"]
    wrong = (BackwardStep("backward", ("x",), (BackwardAlt("from_mask", ("mask",)),)),)
    monkeypatch.setattr(relu, "backward_steps", lambda binding: wrong)
    torch.manual_seed(0)
    model, x = models.small_cnn(), [torch.randn(2, 3, 32, 32)]
    result = trace_model(model, x, device="cpu")
    assert any("relu1: catalogue entry relu would keep" in n for n in result.built.notes)
    assert "described generically" in result.text()
    op = {o.name: o for o in result.network.forward_ops}
    assert op["relu1"].impl_names == ("default",)
    monkeypatch.setattr(F, "dropout", _native_dropout)
    assert spec_saved(result.network).total == autograd_saved(model, x).total


def test_a_model_that_fails_on_its_inputs_is_reported_as_eager_would(capfd):
    """A shape mismatch inside the model is the model's error, said once: the op's own
    message and the model's line, not dynamo's report and torch's logged traceback."""
    import monetdsl

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with pytest.raises(monetdsl.MonetError, match=r"fails on these inputs: RuntimeError: .*\[16, 31\] X \[32, 64\]") as info:
        monetdsl.optimize(model, torch.randn(16, 31), method="store-all")
    assert len(str(info.value)) < 400
    assert "Traceback" not in capfd.readouterr().err
