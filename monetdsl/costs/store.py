"""Measurements kept on disk, by what was measured, so nothing is measured twice.

An op's measured costs depend only on what runs: the op's calls and their arguments'
shapes, strides and dtypes, its implementations, the device and the library versions
(:mod:`.signature` writes that down as text). The store keeps one small JSON file per
signature under ``<cache dir>/measurements/``; a model traced again, or another model with
some of the same layers (a ResNet's repeated blocks, a deeper copy of a decoder), finds
those ops measured. Files are written atomically; one that cannot be read, or that holds
another signature or a malformed entry, counts as not measured (and is overwritten).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..io import atomic_write
from .locations import user_cache_dir

__all__ = ["MeasurementStore", "signature_digest", "FORMAT"]

#: bumped when the meaning of a stored entry changes (older entries are then misses)
FORMAT = 3


def signature_digest(signature: str) -> str:
    """The file name of a signature's entry."""
    return hashlib.sha256(signature.encode()).hexdigest()[:32]


def _well_formed(value) -> bool:
    """Entries are nested dicts whose leaves are finite non-negative numbers or None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _well_formed(v) for k, v in value.items())
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class MeasurementStore:
    """Measured entries by signature, in ``directory`` (default: the user's cache directory)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else user_cache_dir()
        self.root = self.directory / "measurements"

    def _path(self, signature: str) -> Path:
        digest = signature_digest(signature)
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, signature: str) -> dict | None:
        """The entry stored for ``signature``, or None (absent, unreadable or not this one's)."""
        try:
            data = json.loads(self._path(signature).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("signature") != signature:
            return None
        entry = data.get("entry")
        return entry if isinstance(entry, dict) and _well_formed(entry) else None

    def put(self, signature: str, entry: dict) -> None:
        """Store ``entry`` for ``signature`` (replacing any). A directory that cannot be
        written is not an error: the measurement is simply not kept."""
        if not _well_formed(entry):
            raise ValueError(f"a measurement entry holds numbers only: {entry!r}")
        path = self._path(signature)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"format": FORMAT, "signature": signature, "entry": entry}, sort_keys=True))
        except OSError:
            pass
