"""``trace_graph(model, example_inputs)``: a PyTorch model and its inputs -> a spec of its graph.

The pieces: :mod:`.capture` (joint graph on FakeTensors), :mod:`.joint` (storage owners,
gradient flow), :mod:`.to_ir` (ops, alternatives, roofline times), :mod:`.fixed_memory`
(gradients, optimizer state) and :mod:`.costs` (roofline presets). Workspaces and
measured costs come after, from the costing stage (:func:`monetdsl.costs.trace_model`
runs both).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..grammar.printer import format_spec
from ..ir import Constraints, Network, Pattern, Spec
from ..options import option_error
from .capture import CaptureError, capture, make_fake_inputs
from .costs import PRESETS, Roofline, preset
from .fixed_memory import OPTIMIZERS, fixed_items
from .joint import analyse
from .kept_captures import capture_key, keep_capture, recall_capture
from .to_ir import BuiltNetwork, build_network

__all__ = ["TraceResult", "trace_graph", "with_costs", "with_segments", "DTYPES", "strip_loss_ops"]

#: --dtype spellings
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}


@dataclass
class TraceResult:
    """A traced spec and what produced it."""

    spec: Spec
    built: BuiltNetwork
    cost_model: str
    capture_seconds: float
    total_seconds: float
    header: list[str] = field(default_factory=list)

    @property
    def network(self) -> Network:
        return self.spec.network

    @property
    def ops(self) -> dict:
        """Op name -> :class:`~monetdsl.tracing.to_ir.OpRecord`: the catalogue kind, the role
        binding (attributes such as kernel sizes) and the captured fx node of every op; what
        a runtime needs to run the chosen implementations."""
        return {record.name: record for record in self.built.records}

    def text(self) -> str:
        """The spec as ``.monet`` text: header comments, then the canonical form."""
        return "".join(f"# {line}\n" if line else "#\n" for line in self.header) + format_spec(self.spec)


def _as_inputs(example_inputs) -> list:
    if isinstance(example_inputs, torch.Tensor):
        return [example_inputs]
    if isinstance(example_inputs, tuple) and example_inputs and all(isinstance(d, int) for d in example_inputs):
        return [(example_inputs, torch.float32)]
    out = []
    for item in example_inputs:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.dtype):
            out.append(item)
        elif isinstance(item, (tuple, list)) and all(isinstance(d, int) for d in item):
            out.append((tuple(item), torch.float32))
        else:
            raise CaptureError(f"an example input must be a tensor, a shape or (shape, dtype); got {item!r}")
    return out


def _network_name(model: nn.Module, name: str | None) -> str:
    if name:
        return name
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(model).__name__).lower()
    return re.sub(r"[^A-Za-z0-9_]", "_", text) or "model"


def trace_graph(
    model: nn.Module,
    example_inputs,
    *,
    loss: Callable | str = "auto",
    name: str | None = None,
    device: str = "P100",
    profile: bool = False,
    optimizer: str = "adam",
    dtype: str | torch.dtype | None = None,
    capture_cache: Path | None = None,
) -> TraceResult:
    """Trace one training step of ``model`` and describe it as a spec with roofline times
    and no workspaces (the costing stage adds them: :func:`monetdsl.costs.trace_model`).

    ``example_inputs``: tensors (real, meta or fake), shapes, or ``(shape, dtype)`` pairs;
    nothing of their size is allocated. ``device``: a roofline preset (``cpu``, ``P100``,
    ``V100``, ``A100``, ``H100``) or, with ``profile=True``, the device the costs will be
    measured on (``cpu`` or ``cuda``; checked here). ``dtype`` casts the model and
    floating inputs first. ``capture_cache``: a directory where the captured step is
    kept and read back by a key of the model's and inputs' cheap facts
    (:mod:`.kept_captures`), so a second process need not trace it; None: trace.
    """
    start = time.perf_counter()
    if optimizer not in OPTIMIZERS:
        raise option_error(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}", "monetdsl trace")
    if dtype is not None:
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise option_error(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}", "monetdsl trace")
            dtype = DTYPES[dtype]
        model = model.to(dtype)
    inputs = _as_inputs(example_inputs)
    if dtype is not None:
        inputs = [
            (i.to(dtype) if isinstance(i, torch.Tensor) and i.is_floating_point() else
             (i[0], dtype) if isinstance(i, tuple) and i[1].is_floating_point else i)
            for i in inputs
        ]
    if profile:
        if device not in ("cpu", "cuda"):
            raise option_error(f"--profile times ops on a real device: use --device cpu or cuda, not {device}", "monetdsl trace")
        if device == "cuda" and not torch.cuda.is_available():
            raise CaptureError("--device cuda: no CUDA device is available here")
        # the roofline only fills in ops that cannot be replayed on the device
        roofline = Roofline(PRESETS["cpu"] if device == "cpu" else _cuda_preset(fallback=PRESETS["A100"]))
    else:
        try:
            roofline = Roofline(_cuda_preset() if device == "cuda" else preset(device))
        except KeyError:
            raise option_error(f"unknown device {device!r}; use one of {', '.join(PRESETS)} or cuda", "monetdsl trace") from None
    key = capture_key(model, inputs, loss) if capture_cache is not None else None
    captured = recall_capture(capture_cache, key, model)
    if captured is None:
        fake, _ = make_fake_inputs(inputs)
        captured = capture(model, fake, loss)
        keep_capture(capture_cache, key, captured)
    facts = analyse(captured)
    net_name = _network_name(model, name)
    built = build_network(facts, net_name, roofline)
    if loss == "output":
        built.network = strip_loss_ops(built.network)
        built.never_recompute = [n for n in built.never_recompute if built.network.has_op(n)]
    built.network.fixed = fixed_items(model, optimizer)
    cost_model = roofline.describe()
    constraints = Constraints(never_recompute=tuple(Pattern(n) for n in built.never_recompute))
    spec = Spec(built.network, constraints, path=f"<trace {net_name}>")
    shapes = ", ".join("x".join(str(d) for d in shape) + f" {str(dt).replace('torch.', '')}" for shape, dt in
                       ((tuple(i.shape), i.dtype) if isinstance(i, torch.Tensor) else i for i in inputs))
    header = [
        f"{net_name}: one training step traced by monetdsl trace (torch {torch.__version__})",
        f"inputs {shapes}; loss {captured.loss}; optimizer {optimizer}",
        f"costs: {cost_model}",
        "the first implementation of every op keeps what PyTorch's autograd keeps",
    ]
    for note in built.notes:
        header.append(f"note: {note}")
    result = TraceResult(spec, built, cost_model, captured.seconds, time.perf_counter() - start, header)
    spec.source = result.text()
    return result


def with_costs(trace: TraceResult, network: Network, cost_model: str, notes: Sequence[str] = ()) -> TraceResult:
    """``trace`` with ``network`` (the same graph, other times) and the cost-model line
    ``cost_model`` in its header, plus ``notes``; ``trace`` is untouched."""
    built = replace(trace.built, network=network, notes=[*trace.built.notes, *notes])
    spec = Spec(network, trace.spec.constraints, path=trace.spec.path)
    header = [f"costs: {cost_model}" if line.startswith("costs: ") else line for line in trace.header]
    header += [f"note: {note}" for note in notes]
    result = TraceResult(spec, built, cost_model, trace.capture_seconds, trace.total_seconds, header)
    spec.source = result.text()
    return result


def with_segments(trace: TraceResult, allowance: float | None = None, *, kernel_fee_us: float | None = None,
                  accept=None, turned_off_by: str = "--no-segments") -> TraceResult:
    """``trace`` with its widest blocks of per-sample ops as batch-sliced segments
    (:func:`monetdsl.slicing.with_widest_segments`: within ``allowance`` of the
    no-recompute time, default 10 %, only blocks wider than every other op, among those
    ``accept`` lets through; ``kernel_fee_us`` per op and extra slice, default the P100
    roofline's), named in a header line that says how ``turned_off_by`` writes their ops
    one by one; ``trace`` itself when no block qualifies. What ``monetdsl trace`` writes
    unless ``--no-segments``, and what ``monetdsl.optimize`` plans on
    (:mod:`monetdsl.runtime.segment_steps`). ``built`` is kept as traced (the ops one by
    one, as its records describe them): the runtime lowers a segment op from its member
    ops' records."""
    from ..slicing import DEFAULT_ALLOWANCE, DEFAULT_KERNEL_FEE_US, segment_name, with_widest_segments

    allowance = DEFAULT_ALLOWANCE if allowance is None else allowance
    fee = DEFAULT_KERNEL_FEE_US if kernel_fee_us is None else kernel_fee_us
    sliced, runs = with_widest_segments(trace.spec, allowance, kernel_fee_us=fee, accept=accept)
    if not runs:
        return trace
    names = ", ".join(segment_name(run) for run in runs)
    header = [*trace.header, f"batch-sliced segments: {names} (the widest blocks within {allowance:.0%} of the"
              f" no-recompute time; {turned_off_by} writes their ops one by one)"]
    spec = Spec(sliced.network, sliced.constraints, path=trace.spec.path)
    result = TraceResult(spec, trace.built, trace.cost_model, trace.capture_seconds, trace.total_seconds, header)
    spec.source = result.text()
    return result


def strip_loss_ops(network: Network) -> Network:
    """The network without the ``loss.*`` ops the tracer added (``--loss output``): its
    output is then what the loss read, the model's own output, whose gradient the caller's
    loss provides when the backward starts."""
    loss_ops = [op for op in network.forward_ops if op.name.startswith("loss.")]
    if not loss_ops:
        return network
    removed = {op.name for op in loss_ops}
    produced = {t for op in loss_ops for t in op.outputs} | {d for op in loss_ops for i in op.impls for d in i.derived}
    model_outputs = [t for op in loss_ops for t in op.inputs if t not in produced]
    forward_ops = tuple(op for op in network.forward_ops if op.name not in removed)
    backward_ops = tuple(op for op in network.backward_ops if op.of not in removed)
    dropped = produced | {f"grad({t})" for t in produced}
    tensors = {n: t for n, t in network.tensors.items() if n not in dropped}
    outputs = tuple(dict.fromkeys(t for t in model_outputs if not network.tensors[t].is_fixed))
    return Network(network.name, tensors, forward_ops, backward_ops, outputs, network.fixed)


def _cuda_preset(fallback=None):
    if not torch.cuda.is_available():
        raise CaptureError("--device cuda: no CUDA device is available here; pick a preset (P100, V100, A100, H100)")
    name = torch.cuda.get_device_name()
    for key in ("H100", "A100", "V100", "P100"):
        if key in name:
            return PRESETS[key]
    if fallback is not None:
        return fallback
    raise CaptureError(f"no roofline preset for {name}; use --profile, or a preset name")
