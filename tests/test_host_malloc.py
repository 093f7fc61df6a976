"""retain_freed_memory: after it, a freed block is reused without faulting its pages in again.

Each case runs in a fresh interpreter (the setting lasts for the process's life)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from monetdsl.runtime.host_malloc import _glibc, retain_freed_memory

_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from monetdsl.runtime.host_malloc import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory().applied
    def step():
        t = torch.ones(10 << 20)  # 40 MiB, every page written
        del t
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # the steady state: the heap grows for the first few steps (an aligned request does not
    # fit the hole its predecessor left until holes merge), faulting its new pages in once
    print(max(faults[10:]))
""")

_PAGES = (40 << 20) // 4096


def _steady_faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    # glibc's defaults map a 40 MiB block on its own and unmap it at its free: every
    # step faults all its pages in again; retained, the heap block is reused
    assert _steady_faults_per_step("default") > 0.9 * _PAGES
    assert _steady_faults_per_step("retain") < 0.02 * _PAGES


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="top_pad"):
        retain_freed_memory(top_pad=-1)


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_bench_command_retains_freed_memory_on_request():
    out = subprocess.run([sys.executable, "-m", "monetdsl", "bench", "monetdsl.models:small_cnn", "--input", "4x3x32x32",
                          "--method", "recompute-all", "--repeats", "1", "--retain-freed-memory", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["malloc"].startswith("every block from the heap")
    assert abs(data["measured_over_planned"] - 1) < 0.02
