"""Dropout: the mask kept as bools (autograd), as 1 bit per element, or not at all.

Every alternative draws its mask from a private generator seeded from the global RNG,
so the three produce the same mask from the same RNG state. ``rng_replay`` keeps only
that seed (an int64) and regenerates the mask in the backward. A recomputation always
reuses what the first forward kept (the mask, the bits or the seed), so a recomputed
dropout is identical to the first one: it never draws a fresh mask.
"""
from __future__ import annotations

import torch

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind
from .packing import pack_bits, unpack_bits

__all__ = ["Dropout", "draw_seed", "mask_from_seed"]


def draw_seed(device=None) -> torch.Tensor:
    """A fresh seed from the global RNG, as a one-element int64 tensor."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def mask_from_seed(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """The keep-mask (True = kept) that ``seed`` determines, drawn straight into a bool
    tensor (no float temporary the size of the activation)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()))
    return torch.empty(tuple(shape), dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=gen)


class Dropout(OpKind):
    name = "dropout"
    aten = ("native_dropout",)
    summary = "dropout: keep a bool mask, a 1-bit mask, or only an RNG seed (replayed)"
    flops_per_element = 2.0

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        p = float(args[1])
        train = args[2] if len(args) > 2 else kwargs.get("train", True)
        if train is False or not 0.0 < p < 1.0:
            return None
        return Binding({"x": args[0]}, {"y": 0, "mask": 1}, {"p": p, "shape": tuple(output_shapes[0])})

    def forward_alts(self, binding):
        return (
            ForwardAlt("bool_mask", derived=("mask",), recompute_reads=("mask",), doc="one bool per element (autograd)"),
            ForwardAlt("bit_mask", derived=("bits",), recompute_reads=("bits",), doc="one bit per element"),
            ForwardAlt("rng_replay", derived=("seed",), recompute_reads=("seed",), doc="only the seed; the mask is regenerated"),
        )

    def backward_steps(self, binding):
        return (BackwardStep("backward", ("x",), (
            BackwardAlt("from_mask", ("mask",)),
            BackwardAlt("from_bits", ("bits",)),
            BackwardAlt("from_seed", ("seed",), "regenerates the mask from the seed"),
        )),)

    def derived_type(self, role, binding, y_dtype, y_shape):
        if role == "mask":
            return torch.bool, tuple(y_shape)
        if role == "bits":
            return "u1", tuple(y_shape)
        if role == "seed":
            return torch.int64, (1,)
        raise KeyError(role)

    def _mask(self, alt, saved, attrs, device):
        if "mask" in saved:
            return saved["mask"]
        if "bits" in saved:
            return unpack_bits(saved["bits"], attrs["shape"]).to(device)
        return mask_from_seed(saved["seed"], attrs["shape"], attrs["p"], device)

    def forward(self, alt, inputs, attrs, saved=None):
        x = inputs["x"]
        if saved:
            mask = self._mask(alt, saved, attrs, x.device)
            seed = saved.get("seed")
        else:
            seed = draw_seed()
            mask = mask_from_seed(seed, x.shape, attrs["p"], x.device)
        y = x * mask * (1.0 / (1.0 - attrs["p"]))
        if alt == "bool_mask":
            return {"y": y, "mask": mask}
        if alt == "bit_mask":
            return {"y": y, "bits": pack_bits(mask)}
        return {"y": y, "seed": seed}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        mask = self._mask(alt, saved, attrs, g.device)
        return {"x": g * mask * (1.0 / (1.0 - attrs["p"]))}

    def autograd_reference(self, inputs, attrs):
        # the oracle draws its mask exactly as the alternatives do (same RNG state)
        x = inputs["x"]
        mask = mask_from_seed(draw_seed(), x.shape, attrs["p"], x.device)
        return {"y": x * mask * (1.0 / (1.0 - attrs["p"]))}

    def examples(self):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(4, 37, generator=g, dtype=torch.float64)
        return [({"x": x}, {"p": 0.3, "shape": tuple(x.shape)})]
