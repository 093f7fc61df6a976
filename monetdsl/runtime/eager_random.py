"""Keep the random stream eager PyTorch would draw: no seed-replayed dropout by default.

Dropout's ``bool_mask`` and ``bit_mask`` alternatives draw their mask from the global
random stream exactly as eager PyTorch does, so a step under a schedule draws the same
masks, and leaves the stream where eager would, for the same seed. ``rng_replay`` draws a
single seed instead and regenerates its mask from a private generator: statistically the
same dropout, but different numbers than eager's, and which of the alternatives a search
picks can depend on how long it ran. :func:`optimize <monetdsl.optimize>` therefore plans
without it; a schedule file that chose it is still run as written.

>>> from monetdsl.grammar import parse_spec
>>> spec = parse_spec('''
... network n
...   tensor x f32[8] input
...   op drop (x) -> y f32[8]
...     impl bool_mask -> y.mask bool[8] time 1us
...     impl rng_replay -> y.seed i64[1] time 1us
...     backward reads (grad(y)) -> grad(x)
...       impl from_mask reads (y.mask) time 1us
...       impl from_seed reads (y.seed) time 1us
...   output y
... ''')
>>> [(pin.pattern.text, pin.allowed) for pin in pins_keeping_eager_dropout(spec.network)]
[('drop', ('bool_mask',))]
"""
from __future__ import annotations

from ..ir import ImplPin, Network, Pattern

__all__ = ["SEED_REPLAY", "pins_keeping_eager_dropout"]

#: the dropout alternative whose masks differ from eager's draws
SEED_REPLAY = "rng_replay"


def pins_keeping_eager_dropout(network: Network) -> tuple[ImplPin, ...]:
    """Implementation pins that leave ``rng_replay`` out of every op that offers it."""
    pins = []
    for op in network.forward_ops:
        names = op.impl_names
        if SEED_REPLAY in names and len(names) > 1:
            pins.append(ImplPin(Pattern(op.name), tuple(n for n in names if n != SEED_REPLAY)))
    return tuple(pins)
