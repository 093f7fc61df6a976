"""Each op's time and real memory on the device the model trains on.

Every implementation of every op is run alone with the step function the runtime will
run (:mod:`monetdsl.lowering.program`: the captured aten call for PyTorch's own forward,
its local backward graph, the custom ops of the other alternatives, a recomputation from
saved statistics, mask or seed) on real tensors of the traced shapes, strides and dtypes:
inputs random, derived tensors (masks, statistics, indices) what the alternative's own
first forward produced, gradients random.

Around every run the device's allocator is watched (:mod:`.probes`: the counting CPU
allocator, or ``max_memory_allocated`` on CUDA). A step's **workspace** is its high-water
mark above the memory at its start (its inputs, already allocated) less the bytes the
memory model allocates for its outputs: library temporaries (oneDNN's weight reorders,
cuDNN's and cuBLAS's workspaces), the runtime's own copies and a kernel's scratch are all
in it, where the FakeTensor estimate (:mod:`monetdsl.costs.estimated_workspace`) sees tensors only.
The time is the median of up to ``repeats`` runs after one warm-up (two runs that agree
within :data:`AGREEMENT` are enough: a third would not move their median far, and on a
large graph every run of every step is planning time; the warm-up and the first run are
enough when they agree so); the workspace the largest of the watched runs' peaks.

Ops are measured once per signature (:mod:`.signature`): repeated layers inside one model,
and every op already in the :class:`~.store.MeasurementStore`, cost nothing.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from ..ir import Network
from .probes import device_probe
from .signature import op_signature
from .store import MeasurementStore

__all__ = ["CostReport", "measure_costs", "apply_entries", "run_measured", "Measured", "AGREEMENT"]

#: two timed runs whose times differ by at most this share of the faster are enough
AGREEMENT = 0.1


@dataclass(frozen=True)
class Measured:
    """One step's median time (us) and the allocator's peak above its start (bytes; None
    when the allocator cannot be watched); ``output``: what the warm-up run returned, when
    asked for (a forward's outputs and derived tensors, without running it once more)."""

    time_us: float
    peak: int | None
    output: object = field(default=None, compare=False, repr=False)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_measured(fn, device: str, repeats: int = 3, setup=None, probe=None, warmup: int = 1,
                 agreement: float | None = None, keep_warmup: bool = False) -> Measured:
    """``fn()`` (or ``fn(setup())``, ``setup`` outside the measured region: fresh copies
    for in-place alternatives) run ``warmup`` times, then ``repeats`` times timed and, with
    ``probe``, watched: the median time and the largest peak. With ``agreement``, the
    timed runs stop after two whose times differ by at most that share of the faster,
    and a first timed run that agrees so with the last warm-up run is enough (the warm-up
    paid nothing extra: both are samples; the peak is the watched run's).
    ``keep_warmup``: the first warm-up run's result is returned as ``output``."""
    kept = []

    def once(watched: bool = True):
        arg = setup() if setup is not None else None
        _sync(device)
        if watched and probe is not None:
            probe.start()
        start = time.perf_counter()
        result = fn(arg) if setup is not None else fn()
        _sync(device)
        elapsed = (time.perf_counter() - start) * 1e6
        if not watched and keep_warmup and not kept:
            kept.append(result)
        del result
        return elapsed, probe.stop() if watched and probe is not None else None

    warm = [once(watched=False)[0] for _ in range(warmup)]
    samples = [once()]
    if agreement is not None and warm and _agree([warm[-1], samples[0][0]], agreement):
        times = [warm[-1], samples[0][0]]
    else:
        while len(samples) < max(min(repeats, 2) if agreement is not None else repeats, 1):
            samples.append(once())
        while len(samples) < repeats and not _agree([t for t, _ in samples], agreement):
            samples.append(once())
        times = [t for t, _ in samples]
    peaks = [p for _, p in samples if p is not None]
    return Measured(round(statistics.median(times), 3), max(peaks) if peaks else None, kept[0] if kept else None)


def _agree(times: list[float], agreement: float | None) -> bool:
    """Whether the timed runs so far are enough (two or more within ``agreement``)."""
    return agreement is not None and len(times) >= 2 and max(times) <= (1 + agreement) * max(min(times), 1e-9)


@dataclass
class CostReport:
    """What :func:`measure_costs` found: the network with measured times and workspaces,
    notes for steps that could not run (they keep their estimates), how many ops were
    measured now and how many found measured, and each op's signature."""

    network: Network
    notes: list[str] = field(default_factory=list)
    measured_ops: int = 0
    reused_ops: int = 0
    signatures: dict[str, str] = field(default_factory=dict)  # op name -> signature
    entries: dict[str, dict] = field(default_factory=dict)  # op name -> its measured entry
    watched: bool = True  # whether the allocator was watched (workspaces measured)
    kept: set = field(default_factory=set)  # signatures whose entry is in the store

    def unmeasured_workspaces(self) -> int:
        """How many (op, implementation) steps have no allocator-measured workspace (the
        allocator was not watched, or the step could not run): only these need the
        FakeTensor estimate (:mod:`.estimated_workspace`), which a measured one replaces."""
        missing = 0
        for op in self.network.forward_ops:
            found = self.entries.get(op.name, {}).get("forward", {})
            missing += sum(1 for impl in op.impls if (found.get(impl.name) or {}).get("workspace") is None)
        for bop in self.network.backward_ops:
            found = self.entries.get(bop.of, {}).get("backward", {}).get(bop.local_name, {})
            missing += sum(1 for impl in bop.impls if (found.get(impl.name) or {}).get("workspace") is None)
        return missing


def _random_like(val: torch.Tensor, device: str, positive: bool) -> torch.Tensor:
    """A real tensor with the traced value's shape, strides and dtype: floats random
    (positive, away from zero, for scales and variances), booleans all true, integers zero
    (a valid class, index or seed)."""
    out = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=device)
    if val.dtype.is_floating_point:
        return out.uniform_(0.5, 1.5) if positive else out.normal_()
    return out.fill_(True) if val.dtype == torch.bool else out.zero_()


class _OpValues(dict):
    """Tensors by IR name for one op, made on first use: random ones for what the op reads,
    and its outputs and derived tensors once a forward step has produced them."""

    _POSITIVE = frozenset({"w", "running_var", "rstd", "invstd"})

    def __init__(self, node_of: dict, device: str, role_of: dict):
        super().__init__()
        self.node_of, self.device, self.role_of = node_of, device, role_of

    def __missing__(self, name: str) -> torch.Tensor:
        if name.startswith("grad(") and name.endswith(")") and name not in self.node_of:
            value = torch.randn_like(self[name[5:-1]])
        else:
            value = _random_like(self.node_of[name].meta["val"], self.device, self.role_of.get(name) in self._POSITIVE)
        self[name] = value
        return value


def _probe(device: str, notes: list):
    from .cpu_allocator import BuildError

    try:
        return device_probe(device)
    except (BuildError, ValueError) as exc:
        notes.append(f"workspaces not measured on the device ({exc}); the FakeTensor estimates are kept")
        return None


def measure_costs(built, device: str, store: MeasurementStore | None = None, repeats: int = 3) -> CostReport:
    """Every implementation of every op of ``built`` (a
    :class:`~monetdsl.tracing.to_ir.BuiltNetwork` carrying its joint graph) measured on
    ``device`` (``cpu`` or ``cuda``), or read from ``store``; new measurements are added
    to ``store``. Returns a new network; ``built`` is untouched."""
    from ..lowering.program import _OpLowering, value_nodes

    network, node_of = built.network, value_nodes(built)
    report = CostReport(network)
    if node_of is None:
        report.notes.append("not measured: the trace carries no joint graph; estimated costs kept")
        return report
    probe = _probe(device, report.notes)
    report.watched = probe is not None
    backward_of: dict[str, list] = {}
    for bop in network.backward_ops:
        backward_of.setdefault(bop.of, []).append(bop)
    this_run: dict[str, dict] = {}
    with torch.no_grad():
        for record in built.records:
            if not network.has_op(record.name):
                continue
            op = network.op(record.name)
            low = _OpLowering(record, built.facts, built.value_names, network)
            bops = backward_of.get(op.name, [])
            signature = op_signature(low, op, bops, node_of, device)
            report.signatures[op.name] = signature
            entry = this_run.get(signature)
            if entry is None and store is not None:
                entry = store.get(signature)
            if entry is not None:
                report.reused_ops += 1
                if store is not None:
                    report.kept.add(signature)
            else:
                entry, notes = _measure_op(low, op, bops, node_of, device, repeats, probe)
                report.notes.extend(notes)
                report.measured_ops += 1
                if store is not None and not notes and probe is not None:
                    store.put(signature, entry)
                    report.kept.add(signature)
            this_run[signature] = entry
            report.entries[op.name] = entry
    report.network = apply_entries(network, report.entries)
    return report


def apply_entries(network: Network, entries: dict[str, dict]) -> Network:
    """``network`` with the times and workspaces of ``entries`` (op name -> entry; what an
    entry lacks keeps the network's value)."""
    def forward(op, impl):
        found = entries.get(op.name, {}).get("forward", {}).get(impl.name)
        if not found:
            return impl
        changes = {"time_us": found["time_us"]}
        if found.get("recompute_time_us") is not None:
            changes["recompute_time_us"] = found["recompute_time_us"]
        if found.get("workspace") is not None:
            changes["workspace"] = int(found["workspace"])
        return replace(impl, **changes)

    def backward(bop, impl):
        found = entries.get(bop.of, {}).get("backward", {}).get(bop.local_name, {}).get(impl.name)
        if not found:
            return impl
        changes = {"time_us": found["time_us"]}
        if found.get("workspace") is not None:
            changes["workspace"] = int(found["workspace"])
        return replace(impl, **changes)

    return network.with_impls(forward, backward)


def _measure_op(low, op, bops, node_of, device, repeats, probe) -> tuple[dict, list[str]]:
    """The entry of one op: every forward implementation (first forward, recomputation
    when it reads saved tensors) and every backward step's implementations."""
    from ..lowering.program import _backward_step

    notes: list[str] = []
    tensors = low.network.tensors
    values = _OpValues(node_of, device, {n: r for r, n in low.role_names.items()})
    entry: dict = {"forward": {}, "backward": {}}
    for impl in op.impls:
        try:
            entry["forward"][impl.name] = _measure_forward(low, op, impl, values, device, repeats, probe)
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            notes.append(f"{op.name} impl {impl.name}: not measured ({type(exc).__name__}: {str(exc)[:80]}); estimate kept")
    for bop in bops:
        steps = entry["backward"].setdefault(bop.local_name, {})
        for impl in bop.impls:
            try:
                step = _backward_step(low, bop, impl, first=impl.name == bop.impls[0].name)
                reads = [values[n] for n in step.reads]
                fn = step.with_scratch_targets(device)
                if impl.overwrites is None:
                    got = run_measured(lambda fn=fn, reads=reads: fn(*reads), device, repeats, probe=probe, agreement=AGREEMENT)
                else:  # it writes over that gradient: a fresh copy before every run, as for a forward in place
                    got = run_measured(lambda args, fn=fn: fn(*args), device, repeats, probe=probe, agreement=AGREEMENT,
                                       setup=_fresh_copy_of(impl.overwrites, step.reads, reads))
                steps[impl.name] = {"time_us": got.time_us, "workspace": _workspace(got.peak, bop.new_output_bytes(impl, tensors))}
            except Exception as exc:  # noqa: BLE001 - reported, never hidden
                notes.append(f"{bop.name} impl {impl.name}: not measured ({type(exc).__name__}: {str(exc)[:80]}); estimate kept")
    values.clear()
    return entry, notes


def _fresh_copy_of(target: str, names, values: list):
    """A ``setup`` for :func:`run_measured`: ``values`` with a new copy of ``target``'s."""
    return lambda: [v.clone() if n == target else v for n, v in zip(names, values)]


def _workspace(peak: int | None, planned: int) -> int | None:
    return None if peak is None else max(0, peak - planned)


def _measure_forward(low, op, impl, values: _OpValues, device: str, repeats: int, probe) -> dict:
    """The first forward's time and workspace and, when the recomputation reads saved
    tensors, the recomputation's (on what this alternative's first forward derived). An
    in-place alternative gets a fresh copy of the input it overwrites before every run."""
    from ..lowering.program import _forward_step

    tensors = low.network.tensors
    planned = sum(tensors[out].storage_bytes for k, out in enumerate((*op.outputs, *impl.derived))
                  if not (k == 0 and impl.overwrites is not None))

    def arguments(step, own: dict) -> list:
        found = [own[n] if n in own else values[n] for n in step.reads]
        return [v.clone() if n == impl.overwrites else v for n, v in zip(step.reads, found)]

    def measured(step, own: dict, keep: bool = False) -> Measured:
        return run_measured(lambda args: step.fn(*args), device, repeats, setup=lambda: arguments(step, own), probe=probe,
                            agreement=AGREEMENT, keep_warmup=keep)

    first = _forward_step(low, op, impl, recompute=False)
    got = measured(first, {}, keep=True)  # its warm-up's outputs are what a backward alternative reads
    workspace = _workspace(got.peak, planned)
    own = dict(zip(first.writes, got.output))
    for name, value in own.items():
        values.setdefault(name, value)  # what a backward alternative reads: the first alternative deriving it
    again = None
    if impl.recompute_reads:
        redo = measured(_forward_step(low, op, impl, recompute=True), own)
        again = redo.time_us
        if workspace is not None and redo.peak is not None:
            workspace = max(workspace, _workspace(redo.peak, planned))
    return {"time_us": got.time_us, "recompute_time_us": again, "workspace": workspace}
