"""Capture the joint forward+backward graph of one training step, on fake tensors.

``loss(model(*inputs))`` is compiled with ``torch.compile(fullgraph=True)`` and an
``aot_autograd`` backend whose partition function records AOTAutograd's *joint* graph
(every forward and backward aten op, before any recomputation decision) and then stops
the compilation. Nothing is executed: the inputs are FakeTensors, the parameters are
faked by dynamo, so a batch of 256 at 224x224 traces in seconds without allocating it.

Why this route: the joint graph tags each node as forward or backward, gives every
backward node the sequence number of the forward op it differentiates, carries the
``nn.Module`` path of forward ops and FakeTensor shapes and dtypes everywhere, and its
backward nodes read forward tensors explicitly, which is exactly what autograd keeps.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import Diagnostic, MonetError
from .gru_steps import two_dimensional_gru_steps

__all__ = ["CaptureError", "Captured", "Placeholder", "capture", "LOSSES", "make_fake_inputs", "TrainStep"]


class CaptureError(MonetError):
    """The model could not be captured (graph break, unsupported code, bad inputs)."""

    def __init__(self, message: str):
        super().__init__(Diagnostic(message, "monetdsl"))


@dataclass(frozen=True)
class Placeholder:
    """One graph input: a parameter, a buffer or a model input, by its name."""

    name: str
    kind: str  # "param", "buffer" or "input"
    requires_grad: bool
    index: int | None = None  # position among the step's inputs (kind "input")


@dataclass
class Captured:
    """The joint graph and what its placeholders are."""

    joint: torch.fx.GraphModule
    placeholders: dict[str, Placeholder]  # fx placeholder name (primals_N) -> what it is
    seconds: float
    loss: str
    leaf_modules: frozenset = frozenset()  # module paths without children
    notes: list[str] = field(default_factory=list)


def _auto_loss(out: torch.Tensor) -> torch.Tensor:
    """A loss for tracing when the user gives none (values are irrelevant, shapes are not)."""
    if out.dim() == 0:
        return out
    if out.is_floating_point() and out.dim() == 2:
        return F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long, device=out.device))
    if out.is_floating_point() and out.dim() == 3:  # (batch, sequence, vocabulary): language models
        flat = out.reshape(-1, out.shape[-1])
        return F.cross_entropy(flat, torch.zeros(flat.shape[0], dtype=torch.long, device=out.device))
    if out.is_floating_point() and out.dim() >= 4:  # (batch, classes, *spatial): segmentation
        target = torch.zeros((out.shape[0],) + tuple(out.shape[2:]), dtype=torch.long, device=out.device)
        return F.cross_entropy(out, target)
    return out.float().pow(2).mean()


def _mse(out):
    return out.float().pow(2).mean()


def _sum(out):
    return out.sum()


def _none(out):
    if out.dim() != 0:
        raise TypeError(f"--loss none needs a model that returns a scalar; it returned shape {tuple(out.shape)}")
    return out


def _output(out):
    """``--loss output``: the training loop computes its own loss from the model's output,
    so the spec ends at that output (the tracer sums it to get a backward, then removes
    the sum); a model that returns its loss gives the same spec as ``--loss none``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return one tensor (it returned a {type(out).__name__}): the training loop"
                        " computes the loss from it")
    return out if out.dim() == 0 else out.sum()


#: named losses for the CLI; ``auto`` picks cross-entropy for class scores
LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "auto": _auto_loss,
    "cross_entropy": _auto_loss,
    "mse": _mse,
    "sum": _sum,
    "none": _none,
    "output": _output,
}


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor; pass a loss function that takes it")


class TrainStep(nn.Module):
    """``loss(model(*inputs))`` as one module, so dynamo sees parameters as the model's."""

    def __init__(self, model: nn.Module, loss: Callable):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, *inputs):
        out = self.model(*inputs)
        if self.loss in LOSSES.values() and self.loss is not _output:
            out = _first_tensor(out)
        return self.loss(out)


class _Stop(Exception):
    """Raised by the partition function once the joint graph is recorded."""


def make_fake_inputs(specs: Sequence, fake_mode=None) -> tuple[list[torch.Tensor], Any]:
    """FakeTensors from shapes ``(dims, dtype)`` or from example tensors (real or meta)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake_mode = fake_mode or FakeTensorMode()
    out = []
    for spec in specs:
        if isinstance(spec, FakeTensor):
            out.append(spec)
        elif isinstance(spec, torch.Tensor):
            out.append(fake_mode.from_tensor(spec, static_shapes=True))
        else:
            shape, dtype = spec
            with fake_mode:
                if dtype.is_floating_point:
                    out.append(torch.empty(tuple(shape), dtype=dtype))
                else:
                    out.append(torch.zeros(tuple(shape), dtype=dtype))
    return out, fake_mode


def capture(model: nn.Module, inputs: Sequence[torch.Tensor], loss: Callable | str = "auto") -> Captured:
    """The joint graph of one training step of ``model`` on ``inputs`` (FakeTensors).

    Raises :class:`CaptureError` for graph breaks and for code torch cannot capture.
    Resets dynamo's caches before and after (each trace must compile afresh; a cached
    graph would skip the backend).
    """
    from torch._dynamo.backends.common import aot_autograd

    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise CaptureError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)} or pass a function")
        loss = LOSSES[loss]
    _check_something_trains(model, inputs)
    step = TrainStep(model, loss)
    names: dict[int, tuple[str, str, bool]] = {}
    for name, p in model.named_parameters():
        names[id(p)] = (name, "param", p.requires_grad)
    for name, b in model.named_buffers():
        names[id(b)] = (name, "buffer", False)
    inputs = list(inputs)
    input_names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]

    input_ids = {id(t): i for i, t in enumerate(inputs)}
    recorded: dict[str, Any] = {}

    def partition(joint, joint_inputs, **kwargs):
        recorded["joint"] = joint
        raise _Stop()

    inner = aot_autograd(fw_compiler=lambda g, e: g, bw_compiler=lambda g, e: g, partition_fn=partition)

    def backend(gm, example_inputs):
        order = []
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            arg = node.meta.get("grapharg")
            example = getattr(arg, "example", None)
            source = getattr(arg, "source", None)
            text = getattr(source, "name", "") if source is not None else ""
            text = text() if callable(text) else str(text)
            if example is not None and id(example) in names:
                order.append(names[id(example)])
            elif example is not None and id(example) in input_ids:
                order.append(input_ids[id(example)])  # a model input, by its position
            elif "inputs" in text.split("]")[0]:
                order.append(None)  # a model input, named in order of appearance
            else:  # a tensor attribute that is neither a parameter nor a buffer: resident
                order.append((_clean_source(text) or node.name, "buffer", False))
        recorded["order"] = order
        return inner(gm, example_inputs)

    was_training = model.training
    model.train()
    torch._dynamo.reset()
    start = time.perf_counter()
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    log_level = fake_tensor_log.level
    fake_tensor_log.setLevel(logging.CRITICAL)  # a failing op is reported below, once, not as torch's traceback too
    try:
        compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
        with _recurrent_layers_as_cells(model):
            compiled(*inputs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a readable diagnostic
        inner_exc = getattr(exc, "inner_exception", None) or exc.__cause__
        if not isinstance(exc, _Stop) and not isinstance(inner_exc, _Stop):
            raise CaptureError(_describe_failure(exc)) from None
    finally:
        fake_tensor_log.setLevel(log_level)
        model.train(was_training)
        torch._dynamo.reset()
    seconds = time.perf_counter() - start
    joint = recorded.get("joint")
    if joint is None:
        raise CaptureError("torch compiled the step without a backward graph: does any parameter require grad?")
    _refuse_value_dependent_shapes(joint)
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    order = recorded.get("order", [])
    if len(order) != len(primals):
        raise CaptureError(f"cannot match the {len(primals)} graph inputs to parameters and inputs ({len(order)} known)")
    placeholders: dict[str, Placeholder] = {}
    next_input = 0
    taken = {i for i in order if isinstance(i, int)}
    for node, info in zip(primals, order):
        position = None
        if isinstance(info, int):
            position = info
        elif info is None:
            while next_input in taken:
                next_input += 1
            position = next_input
            taken.add(position)
        if position is not None:
            name = input_names[position] if position < len(input_names) else f"x{position}"
            info = (name, "input", False)
        placeholders[node.name] = Placeholder(info[0], info[1], info[2], position)
    leaves = frozenset(name for name, m in model.named_modules() if name and not list(m.children()))
    return Captured(joint, placeholders, seconds, loss_name, leaves)


@contextlib.contextmanager
def _recurrent_layers_as_cells(model: nn.Module):
    """Capture ``nn.RNN``/``GRU``/``LSTM`` as their per-step cell arithmetic.

    Dynamo stops at recurrent modules unless told otherwise, and with oneDNN on, an LSTM
    becomes one fused layer op whose workspace the FakeTensors give as empty: the plan would
    miss it and its backward cannot run from a recorded value. Unrolled into cells, every
    step's activations are ordinary tensors the search can keep or recompute (the classic
    way to checkpoint an RNN); a GRU's steps keep a 2-D hidden state, as eager's cell does
    (:mod:`.gru_steps`). Models without recurrent layers are captured unchanged.
    """
    if not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        yield
        return
    import torch._dynamo

    with warnings.catch_warnings():  # the flags also set oneDNN's TF32 switch, which warns on some builds
        warnings.simplefilter("ignore", UserWarning)
        no_onednn = torch.backends.mkldnn.flags(enabled=False)
        no_onednn.__enter__()
    try:
        with torch._dynamo.config.patch(allow_rnn=True), two_dimensional_gru_steps():
            yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            no_onednn.__exit__(None, None, None)


def _refuse_value_dependent_shapes(joint) -> None:
    """A plan holds for fixed shapes only: refuse a step in which some tensor's size depends
    on tensor values (``x[mask]``, ``nonzero``, ``unique``), naming the model's line."""
    for node in joint.graph.nodes:
        val = node.meta.get("val")
        values = val if isinstance(val, (list, tuple)) else [val]
        if any(isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in v.shape) for v in values):
            where = _user_line(node.meta.get("stack_trace") or "")
            raise CaptureError(
                f"a tensor's shape depends on tensor values{where} (boolean-mask indexing, nonzero, unique...);"
                " monetdsl plans steps of fixed shapes: use a mask multiply or torch.where instead"
            )


def _user_line(stack_trace: str) -> str:
    """`` (at model.py:12: y[y > 0])``: the innermost frame of a recorded stack trace that is
    neither torch's nor monetdsl's, or ``""``."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack_trace)
    own = [f for f in frames if "/torch/" not in f[0] and "/monetdsl/" not in f[0]]
    if not own:
        return ""
    file, line, _function, code = own[-1]
    return f" (at {file}:{line}: {code.strip()})"


def _check_something_trains(model: nn.Module, inputs: Sequence) -> None:
    """Refuse a step with nothing to differentiate before torch is asked to compile it:
    without a parameter or input that requires grad there is no backward graph, and
    torch's own failure then (on the real parameters beside fake inputs) names neither
    the model nor the cause."""
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        return
    what = f"all {len(params)} of its parameters are frozen (requires_grad=False)" if params else "it has no parameters"
    raise CaptureError(f"{type(model).__name__} has nothing to train: {what}, so a training step has no backward;"
                       " unfreeze at least one parameter")


def _model_error(text: str) -> str | None:
    """When dynamo's message says an op of the model itself failed on the example inputs
    (a shape or dtype mismatch, which eager would raise too), that error and the last line
    of the user's code on the way to it; ``None`` for any other failure."""
    import re

    found = re.search(r"Dynamo failed to run FX node with fake tensors:.*?: got (\w+)\((['\"])(.*?)\2\)", text, re.S)
    if found is None:
        return None
    where = ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text.split("from user code:", 1)[-1])
    own = [f for f in frames if not any(part in f[0] for part in ("site-packages", "/torch/", "/monetdsl/tracing/"))]
    if own:
        file, line, function = own[-1]
        where = f" (in {function}, {file}:{line})"
    return f"the model fails on these inputs: {found.group(1)}: {found.group(3)}{where}"


def _clean_source(text: str) -> str:
    """``L['self']._modules['model']._modules['pos']`` -> ``pos`` (a readable tensor name)."""
    import re

    parts = re.findall(r"\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)", text)
    names = [a or b for a, b in parts]
    names = [n for n in names if n not in ("self", "s", "_modules", "_parameters", "_buffers", "model", "L", "G")]
    return ".".join(names)


def _describe_failure(exc: Exception) -> str:
    text = str(exc).strip()
    failed = _model_error(text)
    if failed is not None:
        return failed
    ours = re.search(r"raised exception TypeError\((['\"])((?:the model must|--loss) .*?)\1\)", text)
    if ours:  # a loss of LOSSES refused the model's output, inside the compiled step
        return ours.group(2)
    where = _user_line(text)
    if "data-dependent" in text:
        return (f"the model's control flow depends on tensor values{where} (.item(), bool(tensor), a Python"
                " `if` on a tensor); monetdsl plans one fixed graph: use torch.where, or move the branch"
                " out of the model")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    hint = next((ln.removeprefix("Hint:").strip().rstrip(".") for ln in lines if ln.startswith("Hint:")), "")
    try:
        from torch._dynamo import exc as dexc

        if isinstance(exc, dexc.Unsupported):
            return (f"graph break: torch cannot capture the model as one graph{where}: {first}"
                    + (f"; {hint}" if hint else "") + "; monetdsl needs the whole step in one graph")
    except ImportError:  # pragma: no cover - dynamo internals moved
        pass
    return f"the model cannot be captured{where} ({type(exc).__name__}: {' '.join(lines[:3])})"
