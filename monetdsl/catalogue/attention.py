"""Scaled dot-product attention: flash-style (keeps the log-sum-exp) or math (keeps P).

* ``flash`` (what autograd keeps on this path): the forward keeps its output and the
  per-row log-sum-exp; the backward recomputes the probabilities from q, k and the
  log-sum-exp. Nothing quadratic in the sequence length is kept.
* ``math``: the forward also keeps the probability matrix (B x H x L x S); the backward
  skips recomputing it: faster, at a memory cost quadratic in the sequence length.

Covered: no dropout inside attention, no explicit mask (``is_causal`` is fine).
"""
from __future__ import annotations

import math

import torch

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind

__all__ = ["ScaledDotProductAttention"]


class ScaledDotProductAttention(OpKind):
    name = "sdpa"
    aten = ("_scaled_dot_product_flash_attention_for_cpu",)
    summary = "sdpa: flash (keeps out + log-sum-exp, recomputes P) or math (keeps P)"

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        q, k, v = args[:3]
        dropout_p = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
        is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
        if dropout_p or kwargs.get("attn_mask") is not None:
            return None
        scale = kwargs.get("scale")
        attrs = {"is_causal": bool(is_causal), "scale": scale, "q_shape": tuple(input_shapes[0]), "k_shape": tuple(input_shapes[1]),
                 "lse_shape": tuple(output_shapes[1])}
        return Binding({"q": q, "k": k, "v": v}, {"y": 0, "lse": 1}, attrs)

    def forward_alts(self, binding):
        return (
            ForwardAlt("flash", doc="keeps the output and the log-sum-exp"),
            ForwardAlt("math", derived=("probs",), doc="also keeps the probability matrix"),
        )

    def backward_steps(self, binding):
        return (BackwardStep("backward", ("q", "k", "v"), (
            BackwardAlt("flash", ("q", "k", "v", "y", "lse"), "recomputes the probabilities"),
            BackwardAlt("math", ("q", "k", "v", "probs"), "reads the kept probabilities"),
        )),)

    def derived_type(self, role, binding, y_dtype, y_shape):
        if role == "probs":
            q, k = binding.attrs["q_shape"], binding.attrs["k_shape"]
            return y_dtype, tuple(q[:-1]) + (k[-2],)
        raise KeyError(role)

    # reference -------------------------------------------------------------------------------
    def _scores(self, q, k, attrs):
        scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        s = (q @ k.transpose(-1, -2)) * scale
        if attrs["is_causal"]:
            L, S = s.shape[-2], s.shape[-1]
            keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return s, scale

    def forward(self, alt, inputs, attrs, saved=None):
        s, _ = self._scores(inputs["q"], inputs["k"], attrs)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        out = {"y": p @ inputs["v"], "lse": lse}
        if alt == "math":
            out["probs"] = p
        return out

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        q, k, v = saved["q"], saved["k"], saved["v"]
        if alt == "flash":
            s, scale = self._scores(q, k, attrs)
            p = torch.exp(s - saved["lse"].reshape(s.shape[:-1]).unsqueeze(-1))
            d = (g * saved["y"]).sum(-1, keepdim=True)
        elif alt == "math":
            p = saved["probs"]
            scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
            d = None
        else:
            raise KeyError(alt)
        dv = p.transpose(-1, -2) @ g
        dp = g @ v.transpose(-1, -2)
        if d is None:
            d = (dp * p).sum(-1, keepdim=True)
        ds = p * (dp - d)
        return {"q": (ds @ k) * scale, "k": (ds.transpose(-1, -2) @ q) * scale, "v": dv}

    def autograd_reference(self, inputs, attrs):
        y = torch.nn.functional.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=attrs["is_causal"], scale=attrs["scale"])
        return {"y": y}

    def examples(self):
        g = torch.Generator().manual_seed(10)
        q = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
        k = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
        base = {"q_shape": tuple(q.shape), "k_shape": tuple(k.shape), "lse_shape": (2, 3, 5)}
        return [({"q": q, "k": k, "v": v}, {**base, "is_causal": True, "scale": None}),
                ({"q": q, "k": k, "v": v}, {**base, "is_causal": False, "scale": 0.3})]
