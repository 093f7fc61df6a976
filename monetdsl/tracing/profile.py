"""``--profile``: time every op and implementation on the real device.

Each op is run in isolation on random tensors of its traced shapes: catalogue ops
through their reference implementations (:mod:`monetdsl.catalogue`), every alternative
separately; other ops by replaying their captured aten calls (forward, and the backward
nodes of their group). Each timing is the median of ``repeats`` runs after two warm-up
runs, with the device synchronised around every run. An op that cannot be replayed keeps
its roofline time and the spec says so in a note.
"""
from __future__ import annotations

import operator
import statistics
import time
from dataclasses import replace

import torch
import torch.fx as fx

from ..ir import BackwardOp, ForwardOp, Network
from .joint import is_alias
from .to_ir import BuiltNetwork

__all__ = ["profile_network", "time_call"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int = 5, setup=None) -> float:
    """Median microseconds of ``fn()`` (or ``fn(setup())``) after two warm-up calls.

    ``setup`` runs outside the timed region: fresh copies for in-place alternatives."""
    def once():
        arg = setup() if setup is not None else None
        _sync(device)
        start = time.perf_counter()
        fn(arg) if setup is not None else fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e6

    for _ in range(2):
        once()
    samples = [once() for _ in range(max(repeats, 1))]
    return round(statistics.median(samples), 3)


def _real(val, device: str, role: str | None = None):
    if not isinstance(val, torch.Tensor):
        return val
    shape, dtype = tuple(val.shape), val.dtype
    if dtype.is_floating_point:
        if role in ("w", "running_var"):
            return torch.rand(shape, dtype=dtype, device=device) + 0.5  # no zero scale, positive variance
        return torch.randn(shape, dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _materialise(node: fx.Node, device: str, cache: dict):
    def conv(a):
        if isinstance(a, fx.Node):
            if a not in cache:
                cache[a] = _real(a.meta.get("val"), device)
            return cache[a]
        if isinstance(a, (list, tuple)):
            return type(a)(conv(b) for b in a)
        return a

    return conv(node.args), {k: conv(v) for k, v in node.kwargs.items()}


def _replay(nodes, device: str, repeats: int) -> float:
    calls = []
    cache: dict = {}
    for node in nodes:
        if node.target is operator.getitem or is_alias(node):
            continue
        args, kwargs = _materialise(node, device, cache)
        calls.append((node.target, args, kwargs))
    if not calls:
        return 0.0

    def run():
        for target, args, kwargs in calls:
            target(*args, **kwargs)

    return time_call(run, device, repeats)


def profile_network(built: BuiltNetwork, device: str, repeats: int = 5) -> tuple[Network, str]:
    """A copy of the built network with measured times; and the device's description."""
    network = built.network
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    fops = {op.name: op for op in network.forward_ops}
    bops_by_op: dict[str, list[BackwardOp]] = {}
    for bop in network.backward_ops:
        bops_by_op.setdefault(bop.of, []).append(bop)
    new_fwd: dict[str, ForwardOp] = {}
    new_bwd: dict[str, BackwardOp] = {}
    for record in built.records:
        if record.name not in fops:
            continue  # a loss op removed by --loss output
        fop = fops[record.name]
        bops = bops_by_op.get(record.name, [])
        try:
            if record.kind is None:
                t = _replay([record.node], device, repeats)
                new_fwd[fop.name] = replace(fop, impls=tuple(replace(i, time_us=t) for i in fop.impls))
                for bop in bops:
                    tb = _replay(record.backward_nodes, device, repeats)
                    new_bwd[bop.name] = replace(bop, impls=tuple(replace(i, time_us=tb) for i in bop.impls))
            else:
                new_fwd[fop.name], timed = _profile_catalogue_forward(record, fop, device, repeats)
                for bop in bops:
                    new_bwd[bop.name] = _profile_catalogue_backward(record, bop, timed, device, repeats)
        except Exception as exc:  # noqa: BLE001 - keep the roofline time, say so
            built.notes.append(f"{record.name}: not profiled ({type(exc).__name__}: {str(exc)[:80]}); roofline time kept")
    forward_ops = tuple(new_fwd.get(op.name, op) for op in network.forward_ops)
    backward_ops = tuple(new_bwd.get(op.name, op) for op in network.backward_ops)
    profiled = Network(network.name, network.tensors, forward_ops, backward_ops, network.outputs, network.fixed)
    return profiled, name


def _role_inputs(record, device):
    inputs = {}
    for role, arg in record.binding.inputs.items():
        if isinstance(arg, fx.Node):
            inputs[role] = _real(arg.meta.get("val"), device, role)
    return inputs


def _profile_catalogue_forward(record, fop, device, repeats):
    kind, attrs = record.kind, record.binding.attrs
    base = _role_inputs(record, device)
    impls = []
    outputs_by_alt = {}
    for impl in fop.impls:
        fresh = lambda: {k: v.clone() for k, v in base.items()}  # noqa: E731 - in-place alternatives write their input
        t = time_call(lambda ins: kind.forward(impl.name, ins, attrs), device, repeats, setup=fresh)
        out = kind.forward(impl.name, fresh(), attrs)
        outputs_by_alt[impl.name] = out
        recompute = None
        if impl.recompute_time_us is not None:
            alt = next(a for a in kind.forward_alts(record.binding) if a.name == impl.name)
            saved = {r: out[r] for r in alt.recompute_reads}
            recompute = time_call(lambda ins: kind.forward(impl.name, ins, attrs, saved=saved), device, repeats, setup=fresh)
        impls.append(replace(impl, time_us=t, recompute_time_us=recompute))
    # tensors a backward may read: inputs and every alternative's outputs
    available = dict(base)
    for out in outputs_by_alt.values():
        for role, value in out.items():
            available.setdefault(role, value)
    return replace(fop, impls=tuple(impls)), available


def _profile_catalogue_backward(record, bop, available, device, repeats):
    kind, attrs = record.kind, record.binding.attrs
    step = bop.local_name
    step_spec = next(s for s in kind.backward_steps(record.binding) if s.name == step)
    y = available["y"]
    grads = {"y": torch.randn(y.shape, dtype=y.dtype, device=y.device)}
    impls = []
    for impl in bop.impls:
        alt = next(a for a in step_spec.alts if a.name == impl.name)
        saved = {r: available[r] for r in alt.reads if r in available}
        for role in ("w", "b"):
            if role in available and role not in saved:
                saved[role] = available[role]
        t = time_call(lambda: kind.backward(step, impl.name, grads, saved, attrs), device, repeats)
        impls.append(replace(impl, time_us=t))
    return replace(bop, impls=tuple(impls))
