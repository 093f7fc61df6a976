"""Keep freed host memory in the process: glibc's malloc told not to hand it back.

A training step on a CPU allocates and frees the same activation- and gradient-sized
blocks every step. glibc's malloc gives large freed blocks back to the kernel (``munmap``
of mmapped chunks; ``sbrk`` shrinking a heap whose free top exceeds the trim threshold),
so the next step faults their pages in again, each zeroed by the kernel first. How much a
process pays depends on its history, because glibc adapts its thresholds to the sizes
freed so far: on the 2-core benchmark machine eager GPT-2-like steps fault in 130 MiB per
step; eager ResNet-18-like steps 9-18 MiB in a process that only trains that model, 47 MiB
in a benchmark process that also profiled and solved it (where eager's step then measured
anywhere from 56 to 77 ms), and an implementation's measured cost depended on which
steps ran before it. A GPU has the same problem and PyTorch solves it there
with its caching allocator; on a CPU the usual remedy is another allocator (jemalloc,
tcmalloc) loaded with ``LD_PRELOAD``. :func:`retain_freed_memory` does the part that
matters from inside Python, with glibc's own ``mallopt``: every block comes from the heap
(no block gets a mapping of its own, which its free would unmap), and a freed heap top is
never trimmed, so the process keeps its high-water mark of host memory (as PyTorch's CUDA
allocator keeps its reserved memory) and steady-state steps fault no pages in.

It changes the whole process (eager code included) for the rest of its life and cannot be
undone by glibc's dynamic thresholds, so it is a call users make, not something the
runtime does behind their back. The environment variables ``MALLOC_MMAP_MAX_=0``,
``MALLOC_TRIM_THRESHOLD_`` (a large value) and ``MALLOC_TOP_PAD_`` do the same from outside.

>>> # at the start of a training script (it lasts for the process):
>>> # import monetdsl; monetdsl.retain_freed_memory()
>>> # MallocSettings(applied=True, message='every block from the heap, freed memory kept ...')
>>> from monetdsl.runtime.host_malloc import retain_freed_memory
>>> retain_freed_memory(top_pad=-1)
Traceback (most recent call last):
ValueError: top_pad must be between 0 and 2147483647 bytes, not -1
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass

__all__ = ["MallocSettings", "retain_freed_memory"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class MallocSettings:
    """What :func:`retain_freed_memory` did: ``applied`` is True when glibc accepted every
    setting; ``message`` says what was set or why nothing was."""

    applied: bool
    message: str
    top_pad: int = 0


def _glibc():
    """The process's C library when it is glibc (``mallopt`` and ``gnu_get_libc_version``
    present), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory(*, top_pad: int = 64 << 20) -> MallocSettings:
    """Make glibc's malloc keep freed memory in the process (see the module docstring).

    Every block then comes from a heap (reused after its free) instead of a mapping of its
    own; the trim threshold is set to its maximum, so a freed heap top is never given
    back; ``top_pad`` extra bytes are obtained with every heap growth (fewer, larger
    growths). Calling it again is harmless.

    Returns a :class:`MallocSettings`; off glibc (macOS, Windows, musl) nothing is changed
    and ``applied`` is False.
    """
    if not 0 <= top_pad <= _INT_MAX:
        raise ValueError(f"top_pad must be between 0 and {_INT_MAX} bytes, not {top_pad}")
    libc = _glibc()
    if libc is None:
        return MallocSettings(False, "not glibc: nothing changed (an allocator such as jemalloc, loaded with LD_PRELOAD, does this job there)")
    accepted = [libc.mallopt(_M_MMAP_MAX, 0), libc.mallopt(_M_TOP_PAD, top_pad), libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)]
    if not all(accepted):
        return MallocSettings(False, "glibc refused a mallopt setting (the ones before it may have taken effect)")
    return MallocSettings(True, "every block from the heap, freed memory kept in the process", top_pad)
