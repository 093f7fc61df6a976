"""Solved schedules kept between calls and between processes.

Solving is the slow part of planning (seconds to a minute); the same model, input shapes,
constraints and cost model give the same graph fingerprint and ask for the same schedule.
Schedules are kept in memory for the process and, unless turned off, as ``.monet`` files in
a cache directory, so the next run of a training script starts in seconds:

* :data:`USER_CACHE` (the default of ``monetdsl.optimize(cache_dir=...)``) is the user's cache
  directory, ``$XDG_CACHE_HOME/monetdsl/plans`` or ``~/.cache/monetdsl/plans``, looked up when
  used (so a test that points ``XDG_CACHE_HOME`` elsewhere never touches the real home);
  a path names another directory; ``None`` keeps schedules in memory only.
* An entry is named by the graph fingerprint, the cost model, the constraints, the method
  and :data:`FORMAT` (entries of another format are never read). It is written atomically
  (a temporary file, then a rename), so two processes writing the same entry at once
  leave one whole file, never a mix; the file carries a checksum.
* An entry is never trusted: one whose checksum does not match (truncated, edited), that
  does not parse, that was made for another graph, or whose replay in the simulator is
  invalid or breaks the constraints is ignored (and replaced when the schedule is solved
  again).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ..grammar import format_schedule
from ..grammar.parser import parse_schedule
from ..io import atomic_write, checksum_intact, with_checksum
from ..ir import Schedule, Spec
from ..search.simulator import Simulation, simulate
from ..validate import resolve_constraints

__all__ = ["USER_CACHE", "FORMAT", "ScheduleKey", "user_cache_dir", "resolve_cache_dir", "recall", "keep", "forget"]

#: version of the entries' naming and contents; entries of another version are not read
FORMAT = 1


class _UserCache:
    """The default cache directory: the user's, resolved when used."""

    def __repr__(self) -> str:
        return "USER_CACHE"


#: ``cache_dir`` default: the user's cache directory (see the module docstring)
USER_CACHE = _UserCache()


class ScheduleKey(NamedTuple):
    """What a solved schedule depends on besides the graph's own text."""

    fingerprint: str
    costs: str  # short hash of the cost model's description
    budget: int | None
    max_overhead: float | None
    method: str
    pins: str  # short hash of implementations pinned by the runtime, or ""

    def file_name(self) -> str:
        tag = (f"{self.fingerprint}-c{self.costs}-b{'none' if self.budget is None else self.budget}"
               f"-o{'none' if self.max_overhead is None else self.max_overhead}-{self.method}")
        tag += f"-p{self.pins}" if self.pins else ""
        return f"{tag}-v{FORMAT}.schedule.monet"


_MEMORY: dict[ScheduleKey, tuple[Schedule, Simulation]] = {}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/monetdsl/plans``, or ``~/.cache/monetdsl/plans``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "monetdsl" / "plans"


def resolve_cache_dir(cache_dir) -> Path | None:
    """The directory ``cache_dir`` names (:data:`USER_CACHE`, a path, or None for none).

    Raises ``TypeError`` for anything else (the API turns it into a usage error)."""
    if cache_dir is USER_CACHE:
        return user_cache_dir()
    if cache_dir is None:
        return None
    if isinstance(cache_dir, (str, os.PathLike)) and not isinstance(cache_dir, bytes):
        return Path(os.fspath(cache_dir)).expanduser()
    raise TypeError(f"cache_dir must be a directory path or None (no disk cache), not {cache_dir!r}")


def recall(spec: Spec, key: ScheduleKey, cache_dir: Path | None) -> tuple[Schedule, Simulation] | None:
    """The schedule kept for ``key`` (in memory, else on disk), replayed for ``spec``; None
    when there is none or the entry cannot be trusted."""
    found = _MEMORY.get(key)
    if found is not None:
        return found
    if cache_dir is None:
        return None
    try:
        text = (cache_dir / key.file_name()).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found = _trusted(spec, key, text)
    if found is not None:
        _MEMORY[key] = found
    return found


def keep(spec: Spec, key: ScheduleKey, found: tuple[Schedule, Simulation], cache_dir: Path | None) -> None:
    """Keep a solved schedule in memory and, with ``cache_dir``, on disk. A directory that
    cannot be written is skipped silently: the cache only saves time."""
    _MEMORY[key] = found
    if cache_dir is None:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir / key.file_name(), with_checksum(format_schedule(found[0], spec.network)))
    except OSError:
        pass


def forget() -> None:
    """Drop the schedules kept in memory (the files stay)."""
    _MEMORY.clear()


def _trusted(spec: Spec, key: ScheduleKey, text: str) -> tuple[Schedule, Simulation] | None:
    if not checksum_intact(text):
        return None
    try:
        schedule = parse_schedule(text, "<schedule cache>")
    except Exception:  # noqa: BLE001 - an entry that does not parse is solved again
        return None
    if schedule.fingerprint != spec.fingerprint:
        return None
    try:
        constraints = resolve_constraints(spec.network, spec.constraints, memory_budget=key.budget,
                                          max_overhead=key.max_overhead, path=spec.path, source=spec.source)
        simulation = simulate(spec.network, schedule, constraints=constraints, fingerprint=spec.fingerprint)
    except Exception:  # noqa: BLE001 - a schedule the simulator cannot replay is solved again
        return None
    return (schedule, simulation) if simulation.valid and simulation.ok else None
