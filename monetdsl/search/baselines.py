"""Classic schedules that need no optimiser: comparison points for every benchmark.

* ``store-all``: keep everything the backward reads; no recomputation. The fastest
  schedule and the memory ceiling; its compute is the overhead baseline.
* ``recompute-all``: keep nothing the constraints do not force; every backward stage
  recomputes what it reads from the inputs. The slowest schedule, close to the memory floor.
* ``chen-sqrt``: Chen et al. (2016). Checkpoint every ~sqrt(k)-th of the k articulation
  tensors of the forward graph; each segment is recomputed once, when the backward pass
  enters it, and its tensors are kept until their last use.

All three use :func:`~monetdsl.search.impl_choice.cheapest_impls` (honouring impl pins)
and :func:`~monetdsl.search.schedule_builder.build_schedule`.
"""
from __future__ import annotations

import math

from ..graph import checkpoint_candidates, index
from ..ir import Network, Schedule
from ..validate import ResolvedConstraints
from .impl_choice import cheapest_impls
from .schedule_builder import backward_reads, build_schedule

__all__ = ["store_all", "recompute_all", "chen_sqrt", "chen_sqrt_checkpoints"]


def _setup(network: Network, constraints: ResolvedConstraints | None):
    allowed = constraints.allowed_impls if constraints is not None else {}
    impls = cheapest_impls(network, allowed)
    keep = set(constraints.keep) if constraints is not None else set()
    never = set(constraints.never_recompute) if constraints is not None else set()
    return impls, keep, never


def store_all(network: Network, constraints: ResolvedConstraints | None = None, *, spec_path: str, fingerprint: str) -> Schedule:
    """Keep every forward tensor any backward stage reads; recompute nothing."""
    impls, keep, never = _setup(network, constraints)
    pins = set(keep)
    idx = index(network)
    for reads in backward_reads(network, impls, idx.backward_order):
        keep |= reads
    return build_schedule(
        network, impls, forward_keep=keep, never_recompute=never, pinned=pins, spec_path=spec_path, fingerprint=fingerprint
    )


def recompute_all(network: Network, constraints: ResolvedConstraints | None = None, *, spec_path: str, fingerprint: str) -> Schedule:
    """Keep only what the constraints force; recompute everything else in every stage."""
    impls, keep, never = _setup(network, constraints)
    pins = set(keep)
    return build_schedule(
        network, impls, forward_keep=keep, never_recompute=never, pinned=pins, spec_path=spec_path, fingerprint=fingerprint
    )


def chen_sqrt_checkpoints(network: Network) -> tuple[str, ...]:
    """Every ~sqrt(k)-th of the k articulation tensors, in forward order."""
    candidates = checkpoint_candidates(network)
    if not candidates:
        return ()
    stride = max(1, round(math.sqrt(len(candidates))))
    return tuple(candidates[stride - 1 :: stride])


def chen_sqrt(network: Network, constraints: ResolvedConstraints | None = None, *, spec_path: str, fingerprint: str) -> Schedule:
    """Chen's sqrt(n) checkpointing over the articulation points of the forward graph."""
    impls, keep, never = _setup(network, constraints)
    pins = set(keep)
    keep |= set(chen_sqrt_checkpoints(network))
    return build_schedule(
        network,
        impls,
        forward_keep=keep,
        promote="needed",
        never_recompute=never,
        pinned=pins,
        spec_path=spec_path,
        fingerprint=fingerprint,
    )
