"""Sub-commands of ``monetdsl``, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``run=function(args) -> exit status``. :data:`COMMANDS` is the order ``--help`` lists them.
"""
from . import check, show, solve, sweep

COMMANDS = [check, solve, sweep, show]

__all__ = ["COMMANDS"]
