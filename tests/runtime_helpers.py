"""Helpers for the runtime tests: schedules with chosen implementations, eager references."""
from __future__ import annotations

import copy

import torch

from monetdsl.graph import index
from monetdsl.ir import Network, Schedule
from monetdsl.search.schedule_builder import build_schedule
from monetdsl.search.simulator import simulate


def first_impls(network: Network) -> dict[str, str]:
    """PyTorch's own implementation of every op (the first alternatives)."""
    return {op.name: op.impls[0].name for op in (*network.forward_ops, *network.backward_ops)}


def schedule_with(spec, impls: dict[str, str], keep: str | set = "all", promote: str = "none") -> Schedule:
    """A valid schedule over ``impls``: keep everything the backward reads, nothing, or a set."""
    network = spec.network
    idx = index(network)
    if keep == "all":
        wanted = set()
        for bop in network.backward_ops:
            wanted |= {r for r in bop.impl(impls.get(bop.name, bop.impls[0].name)).reads if idx.is_forward_tensor(r)}
    elif keep == "none":
        wanted = set()
    else:
        wanted = set(keep)
    never = {n for p in spec.constraints.never_recompute for n in [p.text]}
    schedule = build_schedule(network, impls, forward_keep=wanted, promote=promote, never_recompute=never,
                              spec_path="<test>", fingerprint=spec.fingerprint)
    sim = simulate(network, schedule)
    assert sim.valid, [d.message for d in sim.errors]
    return schedule


def budget_ladder(spec) -> list[int]:
    """The store-all peak, the smallest peak the baseline methods reach, and halfway."""
    from monetdsl.search import solve

    peaks = sorted({solve(spec, m).simulation.peak_bytes for m in ("store-all", "chen-sqrt", "recompute-all")})
    return [peaks[-1], (peaks[0] + peaks[-1]) // 2, peaks[0]]


def eager_step(model, inputs, seed: int, loss=None):
    """Output and parameter gradients of one eager training step from RNG state ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*inputs)
    (loss or _reduce)(out).backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_steps_match_eager(optimized, reference, inputs, seeds=(1, 2)) -> None:
    """Outputs and parameter gradients of ``optimized``'s training steps equal eager
    ``reference``'s, one step per seed."""
    for seed in seeds:
        out1, grads1 = eager_step(optimized, inputs, seed)
        out2, grads2 = eager_step(reference, inputs, seed)
        torch.testing.assert_close(out1, out2)
        for name in grads2:
            torch.testing.assert_close(grads1[name], grads2[name], msg=name)


def _reduce(out):
    return out if out.dim() == 0 else (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()


def twins(factory, seed: int = 0):
    torch.manual_seed(seed)
    model = factory()
    return model, copy.deepcopy(model)


def impl_combinations(network: Network, limit: int = 12) -> list[dict[str, str]]:
    """Implementation choices that together use every alternative of every op: each
    choice gives every op the alternative it has used least so far (a backward op among
    those whose derived reads the chosen forward alternative produces), until all ran."""
    idx = index(network)
    used: dict[str, dict[str, int]] = {op.name: {i: 0 for i in op.impl_names} for op in (*network.forward_ops, *network.backward_ops)}
    combos = []
    for _ in range(limit):
        if all(min(counts.values()) > 0 for counts in used.values()):
            break
        impls = {}
        for op in network.forward_ops:
            def remaining_backward(impl):
                produced = set(impl.derived)
                return sum(1 for b in idx.backward_of.get(op.name, ()) for alt in idx.backward_ops[b].impls
                           if used[b][alt.name] == 0 and all(r not in idx.derived_by or r in produced for r in alt.reads))
            impl = min(op.impls, key=lambda i: (used[op.name][i.name] > 0, -remaining_backward(i), used[op.name][i.name]))
            impls[op.name] = impl.name
            used[op.name][impl.name] += 1
            produced = set(impl.derived)
            for bname in idx.backward_of.get(op.name, ()):
                bop = idx.backward_ops[bname]
                usable = [b for b in bop.impls if all(r not in idx.derived_by or r in produced for r in b.reads)]
                pick = min(usable, key=lambda b: used[bname][b.name])
                impls[bname] = pick.name
                used[bname][pick.name] += 1
        combos.append(impls)
    return combos


def widest_impls(network: Network) -> dict[str, str]:
    """Every op's alternative with the largest workspace: the forward's, then each backward
    op's among those whose derived reads that forward alternative produces."""
    idx = index(network)
    impls = {}
    for op in network.forward_ops:
        forward = max(op.impls, key=lambda impl: impl.workspace)
        impls[op.name] = forward.name
        for bname in idx.backward_of.get(op.name, ()):
            usable = [b for b in idx.backward_ops[bname].impls if all(r not in idx.derived_by or r in forward.derived for r in b.reads)]
            impls[bname] = max(usable, key=lambda impl: impl.workspace).name
    return impls


def patch_dropout(model, impls: dict[str, str]):
    """Make the eager twin's dropout modules draw their masks as the chosen alternatives
    do: ``rng_replay`` from a seed drawn from the global RNG, the others as eager does."""
    from monetdsl.catalogue.dropout import draw_seed, mask_from_seed

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and impls.get(name) == "rng_replay":
            def forward(x, p=module.p):
                mask = mask_from_seed(draw_seed(), x.shape, p, x.device)
                return x * mask * (1.0 / (1.0 - p))
            module.forward = forward
        elif isinstance(module, torch.nn.Dropout) and "forward" in module.__dict__:
            del module.forward


class Reduced(torch.nn.Module):
    """``model`` with a fixed linear loss inside, so the whole step is planned (a loss
    computed outside the model is memory the plan cannot see)."""

    def __init__(self, model: torch.nn.Module, shape):
        super().__init__()
        self.model = model
        numel = 1
        for d in shape:
            numel *= d
        self.register_buffer("weights", torch.linspace(-1, 1, numel).reshape(shape))

    def forward(self, *inputs):
        return (self.model(*inputs) * self.weights).sum()


class StepPeaks:
    """An executor observer that measures every step's own peak of live tensor bytes: a
    :class:`~monetdsl.runtime.memory.LiveTensorProbe` active through the whole training
    step, read right before each step (``live_before``) and after it (``peaks``, the peak
    since the step began)."""

    def __init__(self, network: Network):
        from monetdsl.runtime.memory import LiveTensorProbe

        self.network = network
        self.probe = LiveTensorProbe()
        self.live_before: list[int] = []
        self.peaks: list[int] = []
        self.steps: list = []

    def before_step(self, planned, env) -> None:
        self.probe.reset_peak()
        self.live_before.append(self.probe.live)

    def __call__(self, planned, env) -> None:
        self.peaks.append(self.probe.peak)
        self.steps.append(planned)

    @property
    def increments(self) -> list[int]:
        """Each step's peak above the live bytes at its start."""
        return [p - b for p, b in zip(self.peaks, self.live_before)]


def measured_step_peaks(optimized, x, network: Network) -> StepPeaks:
    """Run one training step of ``optimized`` (whose output is a scalar loss) on ``x``, with
    parameter gradients allocated beforehand (fixed memory in the plan), observing every
    step's peak of live tensor bytes (above the memory at the start of the training step)."""
    observer = StepPeaks(network)
    optimized._observe = observer
    for p in optimized.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    observer.probe.start()
    try:
        optimized(x).backward()
    finally:
        observer.probe.stop()
        optimized._observe = None
    return observer


def assert_steps_allocate_as_planned(module, x, trace, impls: dict[str, str], label: str = "") -> None:
    """Train ``module`` (traced as ``trace``, a scalar output) one step with ``impls``,
    keeping everything and then nothing: each step's own peak of live tensor bytes is the
    simulator's, less what it passes through (known from the trace); a recomputation's is
    at most that (an implementation's workspace is the larger of its first forward's and
    its recomputation's)."""
    import monetdsl
    from monetdsl.search.simulator import simulate

    network = trace.spec.network
    aliased = trace.built.workspace.aliased
    for keep in ("all", "none"):
        schedule = schedule_with(trace.spec, impls, keep=keep)
        simulation = simulate(network, schedule)
        optimized = monetdsl.optimize(module, schedule=schedule)
        optimized.plan_for(x, trace=trace)
        observed = measured_step_peaks(optimized, x, network)
        for step, measured in zip(simulation.steps, observed.increments):
            planned = step.peak - simulation.fixed_bytes - step.live_before - aliased.get((step.op, step.impl, step.kind), 0)
            if step.kind == "recompute":
                assert measured <= planned, (label, keep, step.describe(), measured, planned)
            else:
                assert measured == planned, (label, keep, step.describe(), measured, planned)
