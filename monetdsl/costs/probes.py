"""What the device's allocator sees: peak bytes above the allocation at a start point.

* :class:`AllocatorProbe`: every byte through torch's CPU allocator, counted by a small C++
  wrapper (:mod:`.cpu_allocator`, built with gcc on first use). It sees oneDNN's weight
  reorders and every temporary inside a kernel that allocates through torch.
* :class:`CudaProbe`: ``torch.cuda.max_memory_allocated`` (cuDNN and cuBLAS workspaces
  included, with whatever ``torch.backends.cudnn`` settings are in force).

Both are used by the costing stage (one op at a time) and by
:func:`monetdsl.runtime.measure` (a whole training step).
"""
from __future__ import annotations

import torch

__all__ = ["AllocatorProbe", "CudaProbe", "device_probe"]


class AllocatorProbe:
    """Bytes through torch's CPU allocator (a counting wrapper; see :mod:`.cpu_allocator`)."""

    name = "allocator"

    def __init__(self):
        from .cpu_allocator import counter

        self._counter = counter()
        self._base = 0

    def start(self):
        self._base = self._counter.current()
        self._counter.reset_peak()
        return self

    def stop(self) -> int:
        return self._counter.peak() - self._base


class CudaProbe:
    """``torch.cuda.max_memory_allocated`` above the allocation at the start."""

    name = "cuda"

    def start(self):
        torch.cuda.synchronize()
        self._base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self._base


def device_probe(device: str):
    """The allocator probe of ``device`` (``cpu`` or ``cuda...``). Raises
    :class:`~monetdsl.costs.cpu_allocator.BuildError` when the CPU counter cannot be built."""
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("probe cuda: no CUDA device here")
        return CudaProbe()
    return AllocatorProbe()
