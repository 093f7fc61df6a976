"""Memory of the shipped specs under the memory model (docs/memory-model.md).

    python benchmarks/shipped_peaks.py

For each spec in specs/: fixed memory; the peak of PyTorch's own behaviour (store-all
with every op's first implementation, i.e. what autograd keeps); the store-all peak
with the fastest implementations (masks, compact indices...); and recompute-all.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monetdsl.grammar import load_spec  # noqa: E402
from monetdsl.models.shipped import SHIPPED  # noqa: E402
from monetdsl.search.solve import solve  # noqa: E402

GIB = 2**30



def autograd_store_all(spec):
    """Simulate the store-all schedule with every op's first implementation (PyTorch's own
    behaviour): the peak an unmodified eager training step has under the memory model."""
    from monetdsl.search.baselines import store_all
    from monetdsl.search.simulator import simulate
    from monetdsl.validate import ResolvedConstraints

    network = spec.network
    allowed = {op.name: (op.impls[0].name,) for op in (*network.forward_ops, *network.backward_ops)}
    constraints = ResolvedConstraints(None, None, frozenset(), frozenset(), allowed)
    schedule = store_all(network, constraints, spec_path=spec.path, fingerprint=spec.fingerprint)
    return simulate(network, schedule, constraints=constraints, fingerprint=spec.fingerprint)

def main():
    print(f"{'spec':<14} {'fixed GiB':>9} {'autograd peak':>13} {'store-all':>10} {'recompute-all':>13} {'load s':>7}")
    for entry in SHIPPED:
        start = time.perf_counter()
        spec = load_spec(ROOT / "specs" / entry.filename)
        load = time.perf_counter() - start
        autograd = autograd_store_all(spec)
        fast = solve(spec, method="store-all").simulation
        floor = solve(spec, method="recompute-all").simulation
        print(f"{entry.name:<14} {spec.network.fixed_bytes / GIB:>9.2f} {autograd.peak_bytes / GIB:>13.2f}"
              f" {fast.peak_bytes / GIB:>10.2f} {floor.peak_bytes / GIB:>13.2f} {load:>7.1f}")


if __name__ == "__main__":
    main()
