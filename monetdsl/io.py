"""Writing files without ever losing what a user wrote.

Outputs are written atomically (a temporary file in the same folder, then
``os.replace``), so a crash never leaves half a schedule. A schedule monetdsl writes
carries a checksum comment; an existing file is overwritten only while its checksum still
matches (nobody edited it). Anything else already at the target is first moved to a
numbered backup (``name.bak``, ``name.bak.1``, ...).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "write_preserving", "with_checksum", "checksum_intact"]

_MARK = "# checksum "


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step (readers see the old or the new file, never a mix)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_checksum(text: str) -> str:
    """Append the checksum line that marks a file as unedited monetdsl output."""
    return text + f"{_MARK}{_digest(text)} (monetdsl rewrites this file only while it is unedited)\n"


def checksum_intact(text: str) -> bool:
    """True when ``text`` ends with a checksum line that matches the rest of it."""
    body, _, last = text.rstrip("\n").rpartition("\n")
    if not last.startswith(_MARK):
        return False
    digest = last[len(_MARK) :].split()[0] if last[len(_MARK) :].split() else ""
    return digest == _digest(body + "\n")


def write_preserving(path: str | Path, text: str) -> Path | None:
    """Write ``text`` (with a checksum) to ``path``; back up an edited or foreign file first.

    Returns the backup's path when one was made.
    """
    path = Path(path)
    backup = None
    if path.exists():
        old = path.read_text(encoding="utf-8", errors="replace")
        if not checksum_intact(old):
            backup = _free_backup_name(path)
            os.replace(path, backup)
    atomic_write(path, with_checksum(text))
    return backup


def _free_backup_name(path: Path) -> Path:
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{n}")
        n += 1
    return candidate
