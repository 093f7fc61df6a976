"""Sub-commands of ``monetdsl``, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``run=function(args) -> exit status``. :data:`COMMANDS` is the order ``--help`` lists them.
"""
from . import bench, check, import_graph, show, slice, solve, sweep, trace

COMMANDS = [check, solve, sweep, show, trace, bench, import_graph, slice]

__all__ = ["COMMANDS"]
