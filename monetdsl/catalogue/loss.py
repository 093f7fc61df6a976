"""Cross-entropy: log-softmax followed by the negative log-likelihood, as one op.

``F.cross_entropy`` reaches autograd as two aten calls, ``_log_softmax`` and
``nll_loss_forward``; the tracer folds the pair into this kind (when the log-softmax feeds
nothing but the loss in the forward pass, over dimension 1 of a 2-d input, with no class
weights). Outputs: the log-probabilities ``lsm`` (kept for the backward), the loss ``y`` and
``total_weight`` (the number of targets that are not ``ignore_index``, for the mean).

Autograd's backward runs in two steps: ``nll_loss_backward`` writes the gradient of the
log-probabilities (a tensor the size of the logits, zero but at the targets), then
``_log_softmax_backward_data`` turns it into the logits' gradient, so three logits-sized
tensors are alive at once (``lsm``, its gradient and the logits' gradient): the first
alternative, ``autograd``, counts the middle one as workspace. ``from_output`` writes the
logits' gradient directly, ``scale * (exp(lsm) - onehot(target))`` per row (``scale`` =
the incoming gradient, divided by ``total_weight`` for the mean; zero for an ignored
target), which is the same quantity without the middle tensor.
"""
from __future__ import annotations

import torch

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind

__all__ = ["CrossEntropy", "REDUCTIONS", "cross_entropy_grad_from_log_probs"]

#: aten's reduction codes
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def cross_entropy_grad_from_log_probs(grad: torch.Tensor, lsm: torch.Tensor, target: torch.Tensor, total_weight: torch.Tensor,
                                      reduction: int, ignore_index: int) -> torch.Tensor:
    """The logits' gradient of ``nll_loss(lsm, target)`` with ``lsm = log_softmax(logits, 1)``,
    written into one new tensor (``exp(lsm)``, then the targets' ones subtracted and every
    row scaled in place).

    On the CPU ``exp(lsm)`` is taken as ``softmax(lsm)`` (the same values, to an ulp: the
    rows of ``exp(lsm)`` already sum to one): ``torch.exp`` of log-probabilities whose results
    fall near the float underflow, which an untrained model's logits produce by the
    thousand, takes a slow path 6-8x slower than the whole softmax (95 ms against 13 ms for
    1024 x 8192 on this project's CPU); softmax's own vectorized exp does not."""
    valid = target != ignore_index
    rows = torch.arange(lsm.shape[0], device=lsm.device)
    scale = grad if reduction == 0 else (grad / total_weight if reduction == 1 else grad).expand(lsm.shape[0])
    scale = torch.where(valid, scale, torch.zeros((), dtype=scale.dtype, device=scale.device))
    out = torch.softmax(lsm, 1) if lsm.device.type == "cpu" else torch.exp(lsm)
    out.index_put_((rows, torch.where(valid, target, torch.zeros_like(target))), -valid.to(out.dtype), accumulate=True)
    return out.mul_(scale.unsqueeze(1))


class CrossEntropy(OpKind):
    """Log-softmax + NLL loss (folded by the tracer): backward as autograd (two steps, a
    logits-sized temporary) or straight from the log-probabilities."""

    name = "cross_entropy"
    aten = ()  # never matched by name: the tracer folds ``_log_softmax`` + ``nll_loss_forward``
    summary = "cross_entropy (log_softmax + nll_loss): backward from the log-probabilities without autograd's intermediate gradient"
    flops_per_element = 6.0

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        raise NotImplementedError("cross_entropy is bound by the tracer's fold, not from one call")

    def forward_alts(self, binding):
        return (ForwardAlt("default", doc="log_softmax then nll_loss, as eager; keeps the log-probabilities"),)

    def backward_steps(self, binding):
        reads = ("lsm", "target", "total_weight")
        return (BackwardStep("backward", ("x",), (
            BackwardAlt("autograd", reads, "nll_loss_backward then _log_softmax_backward_data (a logits-sized temporary)"),
            BackwardAlt("from_output", reads, "scale * (exp(lsm) - onehot(target)), one tensor"),
        )),)

    def workspace_roles(self, alt: str) -> tuple[str, ...]:
        """Roles whose size a backward alternative allocates as a temporary."""
        return ("lsm",) if alt == "autograd" else ()

    # -- reference ---------------------------------------------------------------------------
    def forward(self, alt, inputs, attrs, saved=None):
        lsm = torch.log_softmax(inputs["x"], 1)
        loss, total_weight = torch.ops.aten.nll_loss_forward(lsm, inputs["target"], None, attrs["reduction"], attrs["ignore_index"])
        return {"lsm": lsm, "y": loss, "total_weight": total_weight}

    def backward(self, step, alt, grads, saved, attrs):
        g, lsm, target, tw = grads["y"], saved["lsm"], saved["target"], saved["total_weight"]
        if alt == "autograd":
            aten = torch.ops.aten
            g_lsm = aten.nll_loss_backward(g, lsm, target, None, attrs["reduction"], attrs["ignore_index"], tw)
            return {"x": aten._log_softmax_backward_data(g_lsm, lsm, 1, lsm.dtype)}
        if alt == "from_output":
            return {"x": cross_entropy_grad_from_log_probs(g, lsm, target, tw, attrs["reduction"], attrs["ignore_index"])}
        raise KeyError(alt)

    def autograd_reference(self, inputs, attrs):
        reduction = REDUCTIONS[attrs["reduction"]]
        return {"y": torch.nn.functional.cross_entropy(inputs["x"], inputs["target"], reduction=reduction, ignore_index=attrs["ignore_index"])}

    def examples(self):
        g = torch.Generator().manual_seed(6)
        x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
        target = torch.tensor([0, 4, 2, -100, 2, 1])
        cases = [({"x": x, "target": target}, {"reduction": r, "ignore_index": -100, "shape": tuple(x.shape)}) for r in (1, 2, 0)]
        cases.append(({"x": x, "target": torch.tensor([0, 4, 2, 3, 2, 1])}, {"reduction": 1, "ignore_index": 3, "shape": tuple(x.shape)}))
        return cases

    @staticmethod
    def binding(x, target, lsm_index: int, loss_index: int, total_weight_index: int, reduction: int, ignore_index: int, shape) -> Binding:
        """The roles of a folded pair (``x`` and ``target`` are the tracer's nodes)."""
        return Binding({"x": x, "target": target}, {"lsm": lsm_index, "y": loss_index, "total_weight": total_weight_index},
                       {"reduction": int(reduction), "ignore_index": int(ignore_index), "shape": tuple(shape)})
