"""A counting wrapper around torch's CPU allocator: current and peak bytes, exactly.

torch has no ``torch.cpu.max_memory_allocated``. This builds (once, with gcc, into a
cache directory keyed by the torch version and the source) a small shared library that
wraps ``c10::GetCPUAllocator()`` and installs itself with ``c10::SetCPUAllocator`` at the
highest priority. Every allocation after installation is counted (a side table maps a
pointer to its size and the wrapped allocator's deleter); tensors allocated before keep
their own deleters and are never counted. The pointer is its own context, as oneDNN's
``raw_allocate`` requires.

Installed for the rest of the process on first use; counting costs a mutex per
allocation, cheap enough to leave on while timing.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from .locations import user_cache_dir

__all__ = ["counter", "AllocatorCounter", "BuildError"]

_SOURCE = r"""
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace {
struct Entry { size_t size; c10::DeleterFnPtr deleter; };
std::mutex table_mutex;
std::unordered_map<void*, Entry>* table = new std::unordered_map<void*, Entry>();
std::atomic<int64_t> current_bytes{0};
std::atomic<int64_t> peak_bytes{0};
c10::Allocator* wrapped = nullptr;

void counting_delete(void* ptr) {
  Entry entry{0, nullptr};
  {
    std::lock_guard<std::mutex> guard(table_mutex);
    auto it = table->find(ptr);
    if (it == table->end()) return;
    entry = it->second;
    table->erase(it);
  }
  current_bytes -= static_cast<int64_t>(entry.size);
  entry.deleter(ptr);
}

struct CountingAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = wrapped->allocate(n);
    void* data = inner.get();
    if (data == nullptr || inner.get_context() != data) return inner;
    c10::DeleterFnPtr deleter = inner.get_deleter();
    c10::Device device = inner.device();
    inner.release_context();
    {
      std::lock_guard<std::mutex> guard(table_mutex);
      (*table)[data] = Entry{n, deleter};
    }
    int64_t now = (current_bytes += static_cast<int64_t>(n));
    int64_t seen = peak_bytes.load();
    while (now > seen && !peak_bytes.compare_exchange_weak(seen, now)) {}
    return c10::DataPtr(data, data, &counting_delete, device);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counting_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};
CountingAllocator* instance = new CountingAllocator();
}  // namespace

extern "C" {
int monetdsl_install() {
  if (wrapped != nullptr) return 0;
  wrapped = c10::GetCPUAllocator();
  c10::SetCPUAllocator(instance, /*priority=*/255);
  return 1;
}
int64_t monetdsl_current() { return current_bytes.load(); }
int64_t monetdsl_peak() { return peak_bytes.load(); }
void monetdsl_reset_peak() { peak_bytes.store(current_bytes.load()); }
}
"""


class BuildError(RuntimeError):
    """The allocator counter could not be compiled (no g++, or torch's headers missing)."""


def _build() -> Path:
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    digest = hashlib.sha256((_SOURCE + torch.__version__ + str(abi) + sys.version).encode()).hexdigest()[:16]
    target = user_cache_dir() / f"cpu_allocator_counter_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = target.with_suffix(".cpp")
    source.write_text(_SOURCE)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}", "-lc10",
           f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot build the CPU allocator counter: {exc}") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.strip().splitlines()[-1:] or ["g++ failed"]
        raise BuildError(f"cannot build the CPU allocator counter: {errors[0].strip()}")
    os.replace(tmp, target)
    return target


class AllocatorCounter:
    """Current and peak bytes allocated through torch's CPU allocator since installation."""

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        for name in ("monetdsl_current", "monetdsl_peak"):
            getattr(library, name).restype = ctypes.c_int64
        library.monetdsl_install()

    def current(self) -> int:
        return int(self._lib.monetdsl_current())

    def peak(self) -> int:
        return int(self._lib.monetdsl_peak())

    def reset_peak(self) -> None:
        self._lib.monetdsl_reset_peak()


_COUNTER: AllocatorCounter | None = None


def counter() -> AllocatorCounter:
    """The process's counter (built and installed on first call)."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = AllocatorCounter(ctypes.CDLL(str(_build()), mode=ctypes.RTLD_GLOBAL))
    return _COUNTER
