"""Bit packing of boolean masks: one bit per element, little-endian within a byte.

Bit ``j`` of byte ``k`` holds element ``8k + j`` of the flattened mask, the layout of
``numpy.packbits(bitorder="little")``. A packed mask of ``n`` elements takes
``ceil(n / 8)`` bytes, which is what a ``u1[...]`` tensor costs in a spec.

>>> import torch
>>> m = torch.tensor([True, False, True, True, False, False, False, False, True])
>>> pack_bits(m).tolist()
[13, 1]
>>> unpack_bits(pack_bits(m), m.shape).equal(m)
True
"""
from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def packed_nbytes(numel: int) -> int:
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a flat ``uint8`` tensor of ``ceil(numel / 8)`` bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _WEIGHTS.to(flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= int(d)
    weights = _WEIGHTS.to(packed.device)
    bits = (packed.reshape(-1, 1) & weights) != 0
    return bits.reshape(-1)[:numel].reshape(shape)
