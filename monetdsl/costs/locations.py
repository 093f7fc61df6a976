"""Where monetdsl keeps what it measured on this machine between runs.

One directory per user, found as other tools find theirs: ``$MONETDSL_CACHE`` when set
(tests and users who want it elsewhere), else ``$XDG_CACHE_HOME/monetdsl``, else
``~/.cache/monetdsl``. It holds the compiled allocator counter and the per-op
measurements (:mod:`.store`); deleting it only costs measuring again.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_cache_dir"]


def user_cache_dir() -> Path:
    """The user's monetdsl cache directory (not created here)."""
    override = os.environ.get("MONETDSL_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "monetdsl"
    return Path.home() / ".cache" / "monetdsl"
