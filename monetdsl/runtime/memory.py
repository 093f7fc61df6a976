"""Measured memory: peak bytes of a training step, against the plan.

Three probes; the default (``auto``) is what the device's allocator sees:

* ``live``: live tensor bytes, counted by a ``TorchDispatchMode`` that registers every new
  storage an op returns and forgets it when it is freed (storages the step did not
  create are not counted). It sees exactly what the memory model models: tensors, not
  the kernels' private scratch (oneDNN's weight reorders, for instance).
* ``allocator``: every byte through torch's CPU allocator, counted by a small C++
  wrapper installed with ``c10::SetCPUAllocator`` (:mod:`monetdsl.costs.cpu_allocator`,
  built on first use with gcc). Sees everything the process allocates through torch.
* ``cuda``: ``torch.cuda.max_memory_allocated`` around the step.

The plan is a promise about the device's memory, so ``allocator`` (CPU) and ``cuda`` are
what :func:`measure` reports unless told otherwise; ``live`` measures the memory model's
own quantity (tensor bytes), which the tests use to check the executor to the byte.

:func:`measure` runs a step under a probe and reports its peak above the memory at its
start; for an :class:`~monetdsl.runtime.OptimizedModule` it also reports the planned
peak above fixed memory, which is the same quantity when parameter gradients exist
before the step (``zero_grad(set_to_none=False)``), as the memory model assumes.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..costs.probes import AllocatorProbe, CudaProbe
from ..errors import OptionError
from ..costs.storage_counter import StorageCounter

__all__ = ["LiveTensorProbe", "AllocatorProbe", "CudaProbe", "MeasuredStep", "measure", "probe_for"]


class LiveTensorProbe(StorageCounter):
    """Live bytes of real tensor storages created inside the ``with`` block."""

    name = "live"

    def counts(self, t: torch.Tensor) -> bool:
        return t.device.type != "meta" and not isinstance(t, FakeTensor)  # fake tensors own no memory

    def storage_key(self, t: torch.Tensor) -> int:
        return _key(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def start(self):
        self.__enter__()
        self.reset_peak()
        return self

    def stop(self) -> int:
        self.__exit__(None, None, None)
        return self.peak


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def probe_for(kind: str = "auto", device: str = "cpu"):
    """A probe by name; ``auto``: what the device's allocator sees (``cuda`` on a GPU,
    ``allocator`` on the CPU, or ``live`` with a warning where the CPU counter cannot be
    built: no C++ compiler)."""
    if kind == "auto":
        if device.startswith("cuda"):
            kind = "cuda"
        else:
            from ..costs.cpu_allocator import BuildError

            try:
                return AllocatorProbe()
            except BuildError as exc:
                warnings.warn(f"{exc}; measuring live tensor bytes instead (probe='live')", stacklevel=3)
                kind = "live"
    if kind == "live":
        return LiveTensorProbe()
    if kind == "allocator":
        return AllocatorProbe()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("probe cuda: no CUDA device here")
        return CudaProbe()
    raise ValueError(f"unknown probe {kind!r}; use auto, live, allocator or cuda")


@dataclass
class MeasuredStep:
    """Peak bytes of a training step above the memory at its start, per repetition."""

    probe: str
    peaks: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    planned: int | None = None  # planned peak above fixed memory, when known

    @property
    def peak(self) -> int:
        return max(self.peaks) if self.peaks else 0

    @property
    def ratio(self) -> float | None:
        """measured / planned (1.0 = exactly as planned)."""
        if not self.planned:
            return None
        return self.peak / self.planned

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else 0.0

    def summary(self) -> str:
        from ..units import human_bytes

        text = (f"measured peak {human_bytes(self.peak)} ({self.peak} B, probe {self.probe}) above the step's start"
                " (parameters, their gradients, optimizer state and inputs, which a budget counts too, excluded)")
        if self.planned:
            text += f"; planned {human_bytes(self.planned)} ({self.planned} B); measured/planned {self.ratio:.4f}"
        return text


def measure(step, inputs=None, *, loss: Callable | None = None, repeats: int = 1, probe: str = "auto",
            warmup: int = 1) -> MeasuredStep:
    """Measure the peak memory of training steps.

    ``step`` is either a zero-argument callable running one training step, or a model
    (an :class:`~monetdsl.runtime.OptimizedModule` or any module) called on ``inputs``;
    then a step is ``loss(model(*inputs)).backward()``, or without ``loss``
    ``model(*inputs).backward(ones)``: the output's gradient is a tensor of its size, as
    the plan counts it when the loss is computed outside the model (``out.sum()`` would
    seed a broadcast scalar, a few bytes less than planned). The steps run in training
    mode, and every parameter that needs a gradient and has none gets a zeroed ``.grad``
    first (parameter gradients are fixed memory in the plan), into which the measured
    steps accumulate. For an OptimizedModule the planned peak above fixed memory is
    filled in. Measuring leaves a model as it found it: its mode, ``.grad`` s, buffers
    (batch-norm statistics) and the random state are restored afterwards, so it can be
    called in the middle of training.
    """
    if isinstance(step, torch.nn.Module):
        if inputs is None:
            raise OptionError("measure(model, inputs): give the inputs the model is called on")
        with _restored(step):
            return _measure(step, inputs, loss=loss, repeats=repeats, probe=probe, warmup=warmup)
    return _measure(step, inputs, loss=loss, repeats=repeats, probe=probe, warmup=warmup)


@contextlib.contextmanager
def _restored(model: torch.nn.Module):
    """Run a block that trains ``model`` and put back what training changes: the mode,
    each parameter's ``.grad`` (None or its values), the buffers and the random state."""
    training = model.training
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, grad in grads:
                if grad is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = grad
                else:
                    p.grad.copy_(grad)
            for b, value in buffers:
                b.copy_(value)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(training)


def _measure(step, inputs, *, loss, repeats: int, probe: str, warmup: int) -> MeasuredStep:
    planned = None
    if isinstance(step, torch.nn.Module):
        model = step
        args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        from .module import OptimizedModule

        model.train()
        if isinstance(model, OptimizedModule):
            plan = model.plan_for(*args)
            # a plan that trains as eager PyTorch predicts nothing: autograd's own kernels keep what they keep
            planned = None if plan.runs_eager else plan.planned_activation_peak
        params = [p for p in model.parameters() if p.requires_grad]

        def run():
            out = model(*args)
            if loss is not None:
                loss(out).backward()
            else:
                out.backward(torch.ones_like(out))
            del out

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        device = str(args[0].device) if args and isinstance(args[0], torch.Tensor) else "cpu"
    else:
        run = step
        device = "cpu"
    result = MeasuredStep(probe="", planned=planned)
    for _ in range(warmup):
        run()
    for _ in range(repeats):
        p = probe_for(probe, device)
        result.probe = p.name
        start = time.perf_counter()
        p.start()
        try:
            run()
        finally:
            peak = p.stop()
        result.seconds.append(time.perf_counter() - start)
        result.peaks.append(peak)
    return result
