"""Planning: between the search and the runtime.

What the caller asked for (:class:`~.constraints.Constraints`), and a schedule for a traced
spec under it (:mod:`.schedules`): the one a file names, checked against the graph, or
one solved by :func:`monetdsl.search.solve.solve` and kept in the schedule cache
(:mod:`.schedule_cache`) by graph fingerprint, cost model and constraints. The runtime
(:mod:`monetdsl.runtime.plan`) traces the model, asks this package for the schedule and
lowers it; nothing here runs a model.
"""
from .constraints import Constraints
from .schedules import clear_caches, schedule_for

__all__ = ["Constraints", "schedule_for", "clear_caches"]
