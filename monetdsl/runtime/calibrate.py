"""In-place step times: a profile's per-op times corrected by real training steps.

The profiler (:mod:`.step_times`) times every implementation alone, in a tight loop, with
its tensors hot in cache and its output buffer handed back by the allocator at each run.
Inside a training step the same call costs something else: fresh outputs fault their
pages in, inputs come from memory, frees return pages, and every step pays the
executor's own work. On a 2-core CPU a ReLU backward measured 16 us alone and 60-75 us in
place, while a convolution's whole weight gradient measured 30 % *slower* alone than in
place; a planner on tight-loop times recomputes small ops it believes free and picks
alternatives that win alone but not in a step (the ResNet's "fastest implementations"
store-all measured x1.10 slower than PyTorch's own).

:func:`calibrate` runs a few store-all schedules through the executor, each with other
alternatives (the first of every op, the second, ..., and the profile's fastest), times
every step where it runs, and gives each implementation its median in-place time plus
its share of the step's time outside the steps (the executor's own work per step: on a
tiny model, where a kernel takes microseconds, that work is what a recomputation costs).
The first schedule (PyTorch's own implementations) is also timed without an observer,
its stretches running through autograd's engine (:mod:`.stretches`); what that saves is
taken off the in-place times of the backward steps in them (not below
:data:`STRETCH_FLOOR` of their step-by-step time); what another implementation that
cuts a stretch costs besides is measured on the fastest store-all afterwards
(:mod:`.stretch_cuts`). Each schedule is timed for the
rounds asked and, on a model whose steps are short, for more (:data:`ROUNDS_SECONDS`).
The last one (the fastest implementations alone) can also be timed without an observer
interleaved with eager PyTorch's steps, for the eager reference (:mod:`.eager_reference`).
Implementations that no store-all schedule runs (in-place forwards, which store-all never
picks because their input is kept) are scaled by their op's in-place / alone ratio, and
recomputation times by their implementation's. The model's buffers, gradients and random
state are restored afterwards: calibrating changes no state a training loop reads (gradient hooks
registered on the parameters do see the calibration steps' gradients, as they would see
any backward pass).

>>> # trace = trace_for_runtime(model, inputs, optimizer="sgd", profile=True)
>>> # calibrated = calibrate(model, inputs, trace, optimizer="sgd").trace
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch

from ..graph import index
from ..ir import Network
from ..search.impl_choice import cheapest_impls
from ..search.schedule_builder import build_schedule
from ..search.simulator import chosen_impls, simulate

__all__ = ["Calibration", "StepClock", "EagerPairs", "paired_with_eager", "STRETCH_FLOOR", "ROUNDS_SECONDS", "MAX_ROUNDS", "calibrate", "in_place_times", "with_in_place_times", "calibration_schedules", "pooling_keys",
           "state_restored", "backward_seeds", "store_all_schedule", "CALIBRATION_NOTE", "device_of"]

def device_of(inputs) -> str:
    """``cuda`` when an input is on a GPU, else ``cpu``: where the steps timed here run."""
    return "cuda" if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else "cpu"


@dataclass
class EagerPairs:
    """Eager PyTorch's steps interleaved with the runtime's steps of one store-all schedule
    (:func:`paired_with_eager`): ``(eager, runtime)`` seconds in the eager reference's
    clock, and the schedule's implementations (op -> implementation)."""

    pairs: list = field(default_factory=list)
    impls: dict = field(default_factory=dict)

#: what the cost-model line of a calibrated trace adds
CALIBRATION_NOTE = "corrected in place (store-all training steps through the runtime)"


@dataclass
class Calibration:
    """What :func:`calibrate` did: the trace with in-place times, how many (op,
    implementation) pairs were measured in place and how many scaled, and notes."""

    trace: object
    measured: int = 0
    scaled: int = 0
    notes: list[str] = field(default_factory=list)
    in_place: dict = field(default_factory=dict)  # (op, implementation) -> median in-place time, us


def _all_ops(network: Network) -> list:
    return [*network.forward_ops, *network.backward_ops]


def calibration_schedules(network: Network, fingerprint: str, groups: dict | None = None,
                          least_new: float = 0.0) -> list[tuple[str, object]]:
    """Few valid store-all schedules that together run every implementation a store-all
    schedule can run: PyTorch's (the first) of every op; then, while some implementation
    has not run, one that pins every op to an implementation not run yet (forward and
    backward together; else the forward ops, else the backward ones; the other ops choose
    the cheapest compatible); then the k-th implementation of every forward op, and of
    every backward op, for each k, when it runs one not run yet; and always the cheapest
    of all (the search's baseline). Each keeps every forward tensor its backward reads (an
    in-place forward makes the builder recompute what it overwrote). Every schedule is a
    lowering and a training step of the whole model: pinning forward and backward ops
    together, and only to what has not run, needs fewer than pinning the k-th of one side
    at a time (6 schedules against 8 on a ResNet-50, against 9 on a ResNet-18, the same
    implementations run).

    ``groups`` (forward op name -> a key, e.g. its op signature; backward ops follow their
    forward op): ops of one key are taken as one, as the measurement store pools their
    in-place times. An implementation counts as run once it ran on one op of its key, and
    the ops of a key are pinned to *different* implementations not run yet (the i-th op
    of a key to the i-th of them, round robin; a backward op to one its forward op's
    pinned implementation can feed), so one step times several implementations of a
    repeated layer.

    ``least_new``: a schedule after the first (but the fastest) is added only when it runs
    at least this share of all (key, implementation) pairs for the first time; what no
    schedule runs is scaled by its op's in-place / alone ratio (:func:`with_in_place_times`).
    The last schedules of the loop time few: on a ResNet-18 (68 ops, 36 signatures, 194
    pairs) the fourth and fifth ran 8 and 2 pairs, each a lowering and a training step."""
    idx = index(network)
    ops = _all_ops(network)
    forward = {op.name for op in network.forward_ops}
    keys = pooling_keys(network, groups)
    position: dict[str, int] = {}  # a forward op's place among the ops of its key
    counted: dict = defaultdict(int)
    for op in network.forward_ops:
        position[op.name] = counted[keys[op.name]]
        counted[keys[op.name]] += 1
    found, ran, seen = [], set(), set()
    least = least_new * len({(keys[op.name], i.name) for op in ops for i in op.impls})

    def add(label: str, allowed, always: bool = False) -> bool:
        """Add the store-all schedule of ``allowed`` when it runs an implementation not run
        yet (or ``always``); whether it was added."""
        impls = cheapest_impls(network, allowed)
        key_of = tuple(sorted(impls.items()))
        run = {(keys[name], impl) for name, impl in impls.items()}
        if key_of in seen or not (always or (run - ran and (not found or len(run - ran) >= least))):
            return False
        schedule = store_all_schedule(network, impls, fingerprint, idx)
        if schedule is None:
            return False
        seen.add(key_of)
        ran.update(run)
        found.append((label, schedule))
        return True

    add("implementation 1 of every op", {op.name: (op.impls[0].name,) for op in ops})
    while True:
        todo = _not_run_yet(network, idx, keys, position, ran)
        sides = [("every op", todo), ("every forward op", {n: p for n, p in todo.items() if n in forward}),
                 ("every backward op", {n: p for n, p in todo.items() if n not in forward})]
        if not any(pins and add(f"an implementation not run yet of {label}", pins) for label, pins in sides):
            break
    for k in range(1, max(len(op.impls) for op in ops)):
        for side, group in (("forward", network.forward_ops), ("backward", network.backward_ops)):
            pins = {op.name: (op.impls[k].name,) for op in group if len(op.impls) > k}
            if pins:
                add(f"implementation {k + 1} of every {side} op", pins)
    add("the fastest implementations", None, always=True)
    return found


def pooling_keys(network: Network, groups: dict | None = None) -> dict:
    """Op name -> the key its in-place times are pooled under: ``groups``' key of a forward
    op (default its name), ``(that key, local name)`` of a backward op."""
    groups = groups or {}
    keys = {op.name: groups.get(op.name, op.name) for op in network.forward_ops}
    keys.update({b.name: (groups.get(b.of, b.of), b.local_name) for b in network.backward_ops})
    return keys


def _not_run_yet(network: Network, idx, keys: dict, position: dict, ran: set) -> dict:
    """Pins (op -> a one-implementation tuple) of the ops whose key has an implementation
    not run yet: the i-th op of a key gets the i-th of them (round robin); a backward op
    gets one of them that reads only derived tensors its forward op's pinned
    implementation makes, where there is one."""
    pins: dict[str, tuple[str]] = {}
    for op in network.forward_ops:
        left = [i.name for i in op.impls if (keys[op.name], i.name) not in ran]
        if left:
            pins[op.name] = (left[position[op.name] % len(left)],)
    for bop in network.backward_ops:
        left = [i for i in bop.impls if (keys[bop.name], i.name) not in ran]
        if not left:
            continue
        made = set(idx.forward_ops[bop.of].impl(pins[bop.of][0]).derived) if bop.of in pins else None
        fed = [i for i in left if made is None or all(idx.derived_by.get(r, (None,))[0] != bop.of or r in made for r in i.reads)]
        choice = fed or left
        pins[bop.name] = (choice[position.get(bop.of, 0) % len(choice)].name,)
    return pins


def store_all_schedule(network: Network, impls: dict, fingerprint: str, idx=None):
    """The valid schedule with these implementations that keeps every forward tensor a
    backward reads and recomputes nothing (an in-place forward makes the builder recompute
    what it overwrote), or None when the builder cannot keep them."""
    idx = idx if idx is not None else index(network)
    keep = {r for bop in network.backward_ops for r in bop.impl(impls[bop.name]).reads if idx.is_forward_tensor(r)}
    try:
        schedule = build_schedule(network, impls, forward_keep=keep, spec_path="", fingerprint=fingerprint)
    except Exception:  # noqa: BLE001 - a combination the builder cannot keep is none
        return None
    return schedule if simulate(network, schedule).ok else None


class StepClock:
    """Executor observer: every step's wall time in us, by (phase, op name) (the steps of a
    CUDA device synchronised around each one). ``benchmarks/step_costs.py`` uses it too."""

    def __init__(self, device: str = "cpu"):
        self.samples: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self._start = 0.0

    def before_step(self, planned, env):
        self.sync()
        self._start = time.perf_counter()

    def __call__(self, planned, env):
        self.sync()
        self.samples[(planned.kind, planned.step.op)].append((time.perf_counter() - self._start) * 1e6)


def backward_seeds(out):
    """The tensors of a model's output that need a gradient, and a seed of ones for each."""
    tensors = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor) and t.requires_grad]
    return tensors, [torch.ones_like(t) for t in tensors]


def calibrate(model: torch.nn.Module, inputs, trace, *, optimizer: str, rounds: int = 2) -> Calibration:
    """``trace`` (a profiled trace of ``model`` on ``inputs``, ``loss="output"``) with every
    implementation's time measured in place where a store-all schedule runs it (see the
    module docstring). ``trace`` and the model's state are untouched."""
    in_place, notes = in_place_times(model, inputs, trace, optimizer=optimizer, rounds=rounds)
    return with_in_place_times(trace, in_place, notes)


def in_place_times(model: torch.nn.Module, inputs, trace, *, optimizer: str, rounds: int = 2,
                   eager_pairs: EagerPairs | None = None, groups: dict | None = None,
                   least_new: float = 0.0) -> tuple[dict, list[str]]:
    """The median in-place time (us) of every (op, implementation) a calibration schedule
    runs, first forwards and backward steps, and notes on schedules that could not run.

    ``eager_pairs``: filled with eager PyTorch's steps interleaved with the unobserved
    steps of the last schedule, store-all with the fastest implementations
    (:func:`paired_with_eager`): the eager reference (:mod:`.eager_reference`) then needs
    no lowering of its own. ``groups``: forward op -> the key its in-place times are
    pooled under by the caller (its op signature), and ``least_new``: see
    :func:`calibration_schedules`.

    Only the first schedule's steps follow a warm-up step: it is the process's first
    step through the runtime (the allocator's pools, first calls of the executor's code
    paths); every implementation's kernels already ran when they were timed alone, so a
    later schedule's first step is a step like the next (observed steps run every step on
    its own). The first schedule's unobserved steps, which run its stretches through
    autograd's engine for the first time (their forward runs are traced on their first
    call, :mod:`.scripted_runs`), keep their warm-up. A schedule that runs nothing
    the schedules before it did (the fastest implementations, kept for the eager
    reference) is not observed at all."""
    from .module import OptimizedModule
    from ..planning import Constraints

    network = trace.spec.network
    device = device_of(inputs)
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)  # (op, impl) -> us, first forwards and backward steps
    notes: list[str] = []
    savings: dict = {}  # (op, impl) -> us a backward step saves in a stretch (the first schedule with stretches)
    fastest = cheapest_impls(network)  # the combination the eager reference is timed on (the search's baseline)
    keys = pooling_keys(network, groups)
    timed: set = set()  # (pooling key, implementation) pairs observed in place so far
    with state_restored(model, device):
        for label, schedule in calibration_schedules(network, trace.spec.fingerprint, groups, least_new):
            clock = StepClock(device)
            module = OptimizedModule(model, Constraints(None, None, schedule, "auto", engine_room=True), optimizer=optimizer, observe=clock)
            impls = chosen_impls(network, schedule)
            run = {(keys[op], impl) for op, impl in impls.items()}
            pairs_here = eager_pairs is not None and not eager_pairs.pairs and impls == fastest
            if timed and run <= timed and not pairs_here:
                continue
            try:
                module.plan_for(*inputs, trace=trace)
                walls = [] if timed and run <= timed else \
                    _timed_steps(module, inputs, rounds, clock.sync, clock.samples.clear, warm_up=not timed)
            except Exception as exc:  # noqa: BLE001 - reported; the other schedules still calibrate
                notes.append(f"calibration schedule '{label}' not run ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            if walls:
                timed |= run
                between = _between_steps(sum(walls), clock.samples)
                for (phase, op), times in clock.samples.items():
                    if phase != "recompute":  # recomputations are scaled from their first forward's ratio
                        samples[(op, impls[op])].extend(t + between for t in times)
                if not savings:
                    savings = _stretch_savings(module, network, impls, walls,
                                               _unobserved(module, lambda: _timed_steps(module, inputs, len(walls), clock.sync,
                                                                                        most=len(walls))))
            if pairs_here:
                _unobserved(module, lambda: paired_with_eager(model, module, inputs, device, eager_pairs.pairs,
                                                              module_warm=True))
                eager_pairs.impls = dict(impls)
    medians = {key: statistics.median(times) for key, times in samples.items()}
    for key, saved in savings.items():
        if key in medians:
            medians[key] = max(medians[key] - saved, STRETCH_FLOOR * medians[key])
    return medians, notes


#: a backward step in a stretch costs at least this share of its step-by-step time
STRETCH_FLOOR = 0.1

#: a calibration schedule is timed for at least the rounds asked and, while its steps
#: take less than this many seconds in all, up to :data:`MAX_ROUNDS`: on a small model
#: (a few ms a step) one timed step decided between implementations a few us apart, and
#: the load of a shared machine picked a different store-all at every run; a large
#: model's single step already takes longer than this
ROUNDS_SECONDS = 0.25
MAX_ROUNDS = 15


def _timed_steps(module, inputs, rounds: int, sync, warmed=lambda: None, most: int = MAX_ROUNDS,
                 warm_up: bool = True) -> list[float]:
    """Training steps of ``module`` after one warm-up (``warmed`` called after it; none
    when not ``warm_up``): at least ``rounds``, more while they took under
    :data:`ROUNDS_SECONDS` (at most ``most``); each step's wall time in us."""
    walls: list[float] = []
    began = None
    if not warm_up:
        warmed()
        began = time.perf_counter()
    while len(walls) < max(rounds, 1) or (len(walls) < most and time.perf_counter() - began < ROUNDS_SECONDS):
        start = time.perf_counter()
        torch.autograd.backward(*backward_seeds(module(*inputs)))
        sync()
        if began is None:  # the warm-up
            warmed()
            began = time.perf_counter()
        else:
            walls.append((time.perf_counter() - start) * 1e6)
    return walls


def _unobserved(module, timed):
    """``timed()`` (steps of ``module``, a list of their wall times in us) run without the
    module's observer: as a training step runs."""
    observe, module._observe = module._observe, None
    try:
        return timed()
    finally:
        module._observe = observe


def paired_with_eager(model, module, inputs, device: str, pairs: list, rounds: int | None = None,
                      module_warm: bool = False) -> None:
    """Eager steps of ``model`` interleaved with steps of ``module`` (after one warm-up
    pair, or one eager warm-up step when ``module`` has just run steps: each side's
    fastest step is what counts, :func:`~.eager_reference.reference_of`), appended to
    ``pairs`` as ``(eager, runtime)`` seconds in the eager reference's clock (process CPU
    time on a CPU: on a shared machine wall time says more about the other processes than
    about the two steps; wall time on CUDA) until :func:`~.eager_reference.enough_pairs`
    (with ``rounds`` pairs at most, default its own)."""
    from .eager_reference import REFERENCE_ROUNDS, enough_pairs

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clock = time.perf_counter if device.startswith("cuda") else time.process_time

    def seconds(of) -> float:
        sync()
        start = clock()
        torch.autograd.backward(*backward_seeds(of(*inputs)))
        sync()
        return clock() - start

    seconds(model)  # the warm-up
    if not module_warm:
        seconds(module)
    began = time.perf_counter()
    while not enough_pairs([b / a for a, b in pairs], time.perf_counter() - began, rounds or REFERENCE_ROUNDS):
        pairs.append((seconds(model), seconds(module)))


def _stretch_savings(module, network, impls: dict, observed: list[float], unobserved: list[float]) -> dict:
    """What running the schedule's stretches through autograd's engine
    (:mod:`.stretches`) saves per backward step in them, against running every step on
    its own as the ``observed`` steps did (us each): the difference of the medians of
    the ``unobserved`` steps (the same schedule without an observer) and the observed
    ones, shared by the stretches' backward steps
    ((op, implementation) -> us). The search then sees what PyTorch's own store-all
    costs, and prefers PyTorch's implementations where stretches form: a per-op time
    cannot say that a stretch broken by one other implementation saves less (its pieces
    may fall under :data:`~.stretches.MIN_STRETCH_OPS`), so a schedule that mixes pays
    what the eager reference measures (:mod:`.eager_reference`)."""
    plan = module.plans[0] if module.plans else None
    if plan is None or not plan.steps.stretches or not unobserved:
        return {}
    stretch_ops = {op for s in plan.steps.stretches for op in s.ops}
    bops = [b.name for b in network.backward_ops if b.of in stretch_ops]
    saved = max(0.0, statistics.median(observed) - statistics.median(unobserved)) / len(bops) if bops else 0.0
    return {(b, impls[b]): saved for b in bops} if saved > 0 else {}


@contextlib.contextmanager
def state_restored(model: torch.nn.Module, device: str):
    """Training steps run inside leave no trace a training loop reads: parameters'
    gradients (pre-allocated inside, the memory model's regime), buffers, random state and
    train/eval mode are put back afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device == "cuda" else None
    was_training = model.training
    try:
        model.train()
        for p in params:
            p.grad = torch.zeros_like(p)
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)


def _between_steps(wall_us: float, samples: dict) -> float:
    """The work of a training step outside its steps (the executor freeing tensors and
    moving names, the autograd function around the passes), per step: every step the
    schedule runs, a recomputation included, costs that much besides its kernels."""
    count = sum(len(times) for times in samples.values())
    return max(0.0, wall_us - sum(sum(times) for times in samples.values())) / count if count else 0.0


def with_in_place_times(trace, in_place: dict, notes=()) -> Calibration:
    """``trace`` with the in-place times ``in_place`` ((op, implementation) -> us): those
    measured replace the profile's, the other implementations of an op are scaled by the
    op's median in-place / alone ratio, recomputations by their implementation's."""
    from ..tracing.api import with_costs

    network = trace.spec.network
    report = Calibration(trace, notes=list(notes), in_place=dict(in_place))
    ratios: dict[str, list[float]] = defaultdict(list)
    for op in _all_ops(network):
        for impl in op.impls:
            if (op.name, impl.name) in in_place and impl.time_us > 0:
                ratios[op.name].append(in_place[(op.name, impl.name)] / impl.time_us)
    op_ratio = {name: statistics.median(r) for name, r in ratios.items()}

    def corrected(op, impl):
        measured = in_place.get((op.name, impl.name))
        if measured is not None:
            report.measured += 1
            ratio = measured / impl.time_us if impl.time_us > 0 else 1.0
        elif op.name in op_ratio:
            report.scaled += 1
            ratio, measured = op_ratio[op.name], impl.time_us * op_ratio[op.name]
        else:
            return impl
        changes = {"time_us": measured}
        if getattr(impl, "recompute_time_us", None) is not None:
            changes["recompute_time_us"] = impl.recompute_time_us * ratio
        return replace(impl, **changes)

    calibrated = network.with_impls(corrected, corrected)
    uncovered = sum(1 for op in _all_ops(network) if op.name not in op_ratio)
    if uncovered:
        report.notes.append(f"{uncovered} ops not run by any store-all schedule keep their profiled times")
    report.trace = with_costs(trace, calibrated, f"{trace.cost_model}; {CALIBRATION_NOTE}", report.notes)
    return report
