"""Sub-commands of ``monetdsl``, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``run=function(args) -> exit status``. :data:`COMMANDS` is the order ``--help`` lists them.
"""
from . import bench, check, show, solve, trace

COMMANDS = [check, solve, show, trace, bench]

__all__ = ["COMMANDS"]
