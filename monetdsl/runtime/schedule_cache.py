"""The schedule cache, under the name the runtime's users know it by.

The cache lives in :mod:`monetdsl.planning.schedule_cache`; this module is that one's
public names (``monetdsl.runtime.schedule_cache.USER_CACHE`` is the default ``cache_dir``
of ``monetdsl.optimize`` and ``monetdsl.backend``), the same objects, not copies.
"""
from ..planning.schedule_cache import (FORMAT, USER_CACHE, ScheduleKey, forget, keep, recall, resolve_cache_dir,
                                       user_cache_dir)

__all__ = ["USER_CACHE", "FORMAT", "ScheduleKey", "user_cache_dir", "resolve_cache_dir", "recall", "keep", "forget"]
