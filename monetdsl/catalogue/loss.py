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

When the logits come straight from a linear layer (a language model's output head,
``logits = x @ w``, with or without a bias) and feed nothing but the loss, the tracer
folds the product in as well (:class:`LinearCrossEntropy`). Then the logits never need to
exist whole: the loss and the gradients can be computed in row chunks, so the step holds
one chunk of logits instead of the logits, their log-probabilities and their gradient
(three ``rows x vocabulary`` tensors, the largest of a small language model's step).
"""
from __future__ import annotations

import torch

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, GradTarget, OpKind

__all__ = [
    "CrossEntropy",
    "LinearCrossEntropy",
    "REDUCTIONS",
    "cross_entropy_grad_from_log_probs",
    "linear_cross_entropy_grads",
    "linear_cross_entropy_backward",
    "chunk_rows",
]

#: aten's reduction codes
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def cross_entropy_grad_from_log_probs(grad: torch.Tensor, lsm: torch.Tensor, target: torch.Tensor, total_weight: torch.Tensor,
                                      reduction: int, ignore_index: int, *, overwrite: bool = False) -> torch.Tensor:
    """The logits' gradient of ``nll_loss(lsm, target)`` with ``lsm = log_softmax(logits, 1)``,
    written into one new tensor (``exp(lsm)``, then the targets' ones subtracted and every
    row scaled in place), or into ``lsm`` itself with ``overwrite``.

    On the CPU ``exp(lsm)`` is taken as ``softmax(lsm)`` (the same values, to an ulp: the
    rows of ``exp(lsm)`` already sum to one): ``torch.exp`` of log-probabilities whose results
    fall near the float underflow, which an untrained model's logits produce by the
    thousand, takes a slow path 6-8x slower than the whole softmax (95 ms against 13 ms for
    1024 x 8192 on this project's CPU); softmax's own vectorized exp does not."""
    valid = target != ignore_index
    rows = torch.arange(lsm.shape[0], device=lsm.device)
    scale = grad if reduction == 0 else (grad / total_weight if reduction == 1 else grad).expand(lsm.shape[0])
    scale = torch.where(valid, scale, torch.zeros((), dtype=scale.dtype, device=scale.device))
    if overwrite:
        out = torch.ops.aten._softmax.out(lsm, 1, False, out=lsm) if lsm.device.type == "cpu" else lsm.exp_()
    else:
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


#: the logits of one row chunk of :class:`LinearCrossEntropy` take about this many bytes
#: (on the benchmark GPT's 1024 x 8192 logits on this project's CPU, gradients in the
#: forward took 150 ms with 4 MiB chunks, 129 ms with 8 MiB, 121 ms with 16 MiB; eager's
#: loss region 154 ms)
CHUNK_BYTES = 8 << 20


def chunk_rows(rows: int, vocab: int, element_size: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk so one chunk of logits takes about ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`, read at the call) and at least one row.

    >>> chunk_rows(1024, 8192, 4)
    256
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(rows, chunk_bytes // max(1, vocab * element_size)))


def _row_chunks(rows: int, step: int):
    return ((start, min(rows, start + step)) for start in range(0, rows, step))


def _accumulator(like: torch.Tensor, shape) -> torch.Tensor:
    """A weight-gradient accumulator: in the input's dtype, or float32 for 16-bit types (a
    sum over many chunks in bf16 would lose what a single product keeps)."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.zeros(shape, dtype=dtype, device=like.device)


def _grads_by_chunks(rows: int, vocab: int, x: torch.Tensor | None, w: torch.Tensor | None, want_b: bool, step: int,
                     logits_grad_of, like: torch.Tensor, w_into=None) -> dict[str, torch.Tensor]:
    """The gradients of ``logits = x @ w (+ b)`` by role, from the logits' gradient, one
    row chunk at a time: ``logits_grad_of(start, stop)`` gives the chunk's gradient.
    ``x``'s gradient needs ``w`` and ``w``'s needs ``x``: pass ``None`` for the operand
    whose partner's gradient is not wanted; the bias's (``want_b``) needs neither. The
    weight's gradient is accumulated in ``w``'s transposed layout (``vocab x width``, the
    layout of an ``nn.Linear`` weight) and returned as a view of ``w``'s shape; sums over
    chunks run in float32 for 16-bit inputs (``like`` gives the dtype). With ``w_into``
    (a target with ``tensor``, in ``w``'s shape, and ``overwrite``: a parameter's
    ``.grad`` seen through the transpose) the weight's gradient is added (written) there
    chunk by chunk instead, and not returned."""
    gx = torch.empty((rows, w.shape[0]), dtype=w.dtype, device=w.device) if w is not None else None
    if x is not None and w_into is not None:
        gw_t, fresh = w_into.tensor.t(), w_into.overwrite
    else:
        gw_t, fresh = (_accumulator(like, (vocab, x.shape[1])) if x is not None else None), False
    gb = _accumulator(like, (vocab,)) if want_b else None
    for start, stop in _row_chunks(rows, step):
        dlogits = logits_grad_of(start, stop)
        if gx is not None:
            torch.mm(dlogits, w.t(), out=gx[start:stop])
        if gw_t is not None and fresh:
            torch.mm(dlogits.t().to(gw_t.dtype), x[start:stop].to(gw_t.dtype), out=gw_t)
            fresh = False
        elif gw_t is not None:
            gw_t.addmm_(dlogits.t().to(gw_t.dtype), x[start:stop].to(gw_t.dtype))
        if gb is not None:
            gb.add_(dlogits.sum(0, dtype=gb.dtype))
        del dlogits  # before the next chunk's is made
    if w_into is not None:
        gw_t = None  # already in place
    out = {"x": gx, "w": gw_t.to(like.dtype).t() if gw_t is not None else None, "b": gb.to(like.dtype) if gb is not None else None}
    return {role: g for role, g in out.items() if g is not None}


def linear_cross_entropy_grads(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int,
                               step: int, wanted: tuple[str, ...] = ("x", "w"), b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``cross_entropy(x @ w (+ b), target)`` and its gradients for an incoming gradient of
    one, in row chunks of ``step`` rows: the loss ``y``, ``total_weight`` (as
    ``nll_loss_forward`` gives it), and ``gx``, ``gw``, ``gb`` (for the roles in
    ``wanted``), already divided by the number of counted targets for the mean. Holds one
    chunk of logits (and its gradient) at a time. ``reduction`` is ``mean`` (1) or ``sum`` (2)."""
    if reduction not in (1, 2):
        raise ValueError("gradients in the forward need a scalar loss (reduction mean or sum)")
    valid = target != ignore_index
    total_weight = valid.sum().to(x.dtype)
    loss_sum = torch.zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    safe_target = torch.where(valid, target, torch.zeros_like(target))

    def logits_grad_of(start, stop):
        nonlocal loss_sum
        lsm = torch.mm(x[start:stop], w) if b is None else torch.addmm(b, x[start:stop], w)
        torch.ops.aten._log_softmax.out(lsm, 1, False, out=lsm)
        picked = lsm.gather(1, safe_target[start:stop].unsqueeze(1)).squeeze(1)
        loss_sum = loss_sum - torch.where(valid[start:stop], picked, torch.zeros_like(picked)).sum(dtype=loss_sum.dtype)
        return cross_entropy_grad_from_log_probs(one, lsm, target[start:stop], total_weight, reduction, ignore_index, overwrite=True)

    grads = _grads_by_chunks(x.shape[0], w.shape[1], x if "w" in wanted else None, w if "x" in wanted else None, "b" in wanted,
                             step, logits_grad_of, x)
    loss = (loss_sum / total_weight if reduction == 1 else loss_sum).to(x.dtype)
    return {"y": loss, "total_weight": total_weight, **{f"g{role}": g for role, g in grads.items()}}


def linear_cross_entropy_backward(grad: torch.Tensor, x: torch.Tensor | None, w: torch.Tensor | None, lsm: torch.Tensor,
                                  target: torch.Tensor, total_weight: torch.Tensor, reduction: int, ignore_index: int,
                                  step: int, want_b: bool = False, w_into=None) -> dict[str, torch.Tensor]:
    """The gradients (by role) of ``x``, ``w`` and, with ``want_b``, the bias from the kept
    log-probabilities, in row chunks: the logits' gradient exists one chunk at a time
    (autograd forms it whole, next to the log-probabilities' gradient). ``x`` (``w``) is
    ``None`` when ``w``'s (``x``'s) gradient is not wanted; ``w_into``: see
    :func:`_grads_by_chunks`."""
    def logits_grad_of(start, stop):
        g = grad[start:stop] if reduction == 0 else grad
        return cross_entropy_grad_from_log_probs(g, lsm[start:stop], target[start:stop], total_weight, reduction, ignore_index)

    return _grads_by_chunks(lsm.shape[0], lsm.shape[1], x, w, want_b, step, logits_grad_of, lsm, w_into)


def scaled_grad_into(target, unit: torch.Tensor, grad: torch.Tensor) -> None:
    """``target.tensor += unit * grad`` (``=`` with ``target.overwrite``) without a
    temporary: a gradient made in the forward for an incoming gradient of one, scaled by
    the real incoming gradient straight into ``.grad``."""
    if target.overwrite:
        torch.mul(unit, grad, out=target.tensor)
    else:
        target.tensor.addcmul_(unit, grad)


class LinearCrossEntropy(OpKind):
    """A linear layer followed by cross-entropy, folded by the tracer when its logits feed
    nothing else (a language model's output layer): ``mm`` (or ``addmm`` with a bias) +
    ``_log_softmax`` + ``nll_loss_forward``.

    Roles: ``x`` (rows x width), ``w`` (width x vocabulary: the transposed weight the
    product reads), ``b`` (the bias, when there is one), ``target``; outputs ``y`` and
    ``total_weight``. Forward alternatives:

    * ``default`` runs the calls as eager does and keeps the log-probabilities ``lsm``
      (derived; the logits are a forward temporary);
    * ``grads_in_forward`` computes the loss and, for an incoming gradient of one, the
      gradients ``gx``, ``gw`` (``gb``) in row chunks during the forward: the backward only
      scales them by the incoming gradient (scalar losses only). It keeps width-sized
      tensors instead of a vocabulary-sized one and moves the gradient products into the
      forward pass (a recomputation repeats them).

    Backward alternatives: ``autograd`` (eager's calls: log-probabilities' gradient and
    logits' gradient whole, then the products), ``chunked`` (the same from ``lsm``, one
    chunk of logits' gradient at a time) and ``from_grads`` (scales what the forward made);
    when the weight is a float32/float64 parameter, ``chunked_into_grad`` and
    ``from_grads_into_grad`` do the same but add the weight's gradient into ``.grad``
    (no vocabulary x width temporary).
    Only the gradients that flow are read and made (``grad_roles``, set by the tracer: a
    frozen output layer or body needs one product).
    """

    name = "linear_cross_entropy"
    aten = ()  # never matched by name: folded by the tracer
    summary = "linear_cross_entropy (mm/addmm + log_softmax + nll_loss): backward in row chunks, or gradients in the forward"
    flops_per_element = 6.0

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        raise NotImplementedError("linear_cross_entropy is bound by the tracer's fold, not from one call")

    @staticmethod
    def flowing(attrs: dict) -> tuple[str, ...]:
        """The roles whose gradient flows, in the order x, w, b: ``grad_roles`` (set by the
        tracer) among x, w and, with ``bias``, b; all of them when it is not given."""
        present = ("x", "w", "b") if attrs.get("bias", False) else ("x", "w")
        return tuple(r for r in present if r in attrs.get("grad_roles", present))

    def wanted(self, binding) -> tuple[str, ...]:
        return self.flowing(binding.attrs)

    def forward_alts(self, binding):
        alts = [ForwardAlt("default", derived=("lsm",), doc="the product, log_softmax, nll_loss as eager; keeps the log-probabilities")]
        derived = tuple(f"g{role}" for role in self.wanted(binding))
        if binding.attrs["reduction"] in (1, 2) and derived:
            alts.append(ForwardAlt("grads_in_forward", derived=derived,
                                   doc="loss and unit gradients in row chunks; keeps width-sized gradients"))
        return tuple(alts)

    def backward_steps(self, binding):
        wanted = self.wanted(binding)
        # x's gradient needs w, w's needs x (as autograd's product keeps them); b's neither
        reads = tuple(r for r, needed_for in (("x", "w"), ("w", "x")) if needed_for in wanted) + ("lsm", "target", "total_weight")
        alts = [
            BackwardAlt("autograd", reads, "nll_loss_backward, _log_softmax_backward_data, then the products (two logits-sized temporaries)"),
            BackwardAlt("chunked", reads, "the logits' gradient one row chunk at a time, each chunk into the products"),
            BackwardAlt("from_grads", tuple(f"g{role}" for role in wanted), "the gradients made in the forward, times the incoming gradient"),
        ]
        if "w" in wanted and "w" in binding.attrs.get("param_roles", ()) and binding.attrs.get("element_size", 0) >= 4:
            alts += [BackwardAlt(f"{alt.name}_into_grad", alt.reads, alt.doc + "; the weight's added into .grad", accumulates=("w",))
                     for alt in alts[1:]]
        return (BackwardStep("backward", wanted or ("x", "w"), tuple(alts)),)

    def workspace_roles(self, alt: str) -> tuple[str, ...]:
        """autograd forms the log-probabilities' gradient and the logits' gradient whole."""
        return ("lsm", "lsm") if alt == "autograd" else ()

    def derived_type(self, role, binding, y_dtype, y_shape):
        rows, width = binding.attrs["shape"]
        vocab = binding.attrs["w_shape"][1]
        shapes = {"lsm": (rows, vocab), "gx": (rows, width), "gw": (width, vocab), "gb": (vocab,)}
        return y_dtype, shapes[role]

    def flops(self, phase: str, alt: str, binding) -> float:
        """FLOPs of a forward (``phase="forward"``) or backward alternative: a product is
        ``2 * rows * width * vocabulary``, the softmax part ``6 * rows * vocabulary``."""
        rows, width = binding.attrs["shape"]
        vocab = binding.attrs["w_shape"][1]
        product, softmax = 2.0 * rows * width * vocab, self.flops_per_element * rows * vocab
        products = sum(role in self.wanted(binding) for role in ("x", "w"))
        if phase == "forward":
            return product + softmax + (products * product + softmax if alt == "grads_in_forward" else 0.0)
        if alt == "from_grads":
            return float(rows * width + width * vocab)
        return products * product + softmax

    # -- reference ---------------------------------------------------------------------------
    def forward(self, alt, inputs, attrs, saved=None):
        x, w, b, target = inputs["x"], inputs["w"], inputs.get("b"), inputs["target"]
        if alt == "grads_in_forward":
            return linear_cross_entropy_grads(x, w, target, attrs["reduction"], attrs["ignore_index"], attrs["chunk_rows"],
                                              self.flowing(attrs), b)
        lsm = torch.log_softmax(x @ w if b is None else torch.addmm(b, x, w), 1)
        loss, total_weight = torch.ops.aten.nll_loss_forward(lsm, target, None, attrs["reduction"], attrs["ignore_index"])
        return {"lsm": lsm, "y": loss, "total_weight": total_weight}

    def backward(self, step, alt, grads, saved, attrs, into=None):
        """``into`` (role -> target) is given to the ``*_into_grad`` alternatives, which add
        the weight's gradient there; without it they make it in a zeroed tensor and return it."""
        g = grads["y"]
        if alt.endswith("_into_grad"):
            base = alt[: -len("_into_grad")]
            if into is None:
                like = saved["x"] if base == "chunked" else saved["gw"]
                made = GradTarget(like.new_zeros(attrs["w_shape"]))
                return {**self.backward(step, alt, grads, saved, attrs, {"w": made}), "w": made.tensor}
            if base == "from_grads":
                scaled_grad_into(into["w"], saved["gw"], g)
                return {role: saved[f"g{role}"] * g for role in ("x", "b") if f"g{role}" in saved}
            wanted = self.flowing(attrs)
            return linear_cross_entropy_backward(g, saved["x"], saved["w"] if "x" in wanted else None, saved["lsm"], saved["target"],
                                                 saved["total_weight"], attrs["reduction"], attrs["ignore_index"], attrs["chunk_rows"],
                                                 "b" in wanted, w_into=into["w"])
        if alt == "from_grads":
            return {role: saved[f"g{role}"] * g for role in ("x", "w", "b") if f"g{role}" in saved}
        wanted = self.flowing(attrs)
        x = saved["x"] if "w" in wanted else None  # w's gradient needs x, x's needs w
        w = saved["w"] if "x" in wanted else None
        lsm, target, tw = saved["lsm"], saved["target"], saved["total_weight"]
        if alt == "chunked":
            return linear_cross_entropy_backward(g, x, w, lsm, target, tw, attrs["reduction"], attrs["ignore_index"],
                                                 attrs["chunk_rows"], "b" in wanted)
        if alt != "autograd":
            raise KeyError(alt)
        aten = torch.ops.aten
        g_lsm = aten.nll_loss_backward(g, lsm, target, None, attrs["reduction"], attrs["ignore_index"], tw)
        dlogits = aten._log_softmax_backward_data(g_lsm, lsm, 1, lsm.dtype)
        out = {"x": dlogits @ w.t() if w is not None else None, "w": x.t() @ dlogits if x is not None else None,
               "b": dlogits.sum(0) if "b" in wanted else None}
        return {role: grad for role, grad in out.items() if grad is not None}

    def autograd_reference(self, inputs, attrs):
        reduction = REDUCTIONS[attrs["reduction"]]
        logits = inputs["x"] @ inputs["w"] + (inputs["b"] if "b" in inputs else 0)
        return {"y": torch.nn.functional.cross_entropy(logits, inputs["target"], reduction=reduction, ignore_index=attrs["ignore_index"])}

    def examples(self):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(7, 4, generator=g, dtype=torch.float64)
        w = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
        b = torch.randn(6, generator=g, dtype=torch.float64)
        target = torch.tensor([0, 5, 2, -100, 2, 1, 4])

        def attrs(reduction, ignore_index=-100, rows=3, bias=False):
            return {"reduction": reduction, "ignore_index": ignore_index, "shape": (7, 4), "w_shape": (4, 6), "chunk_rows": rows,
                    "bias": bias, "element_size": 8, "param_roles": ("w", "b")}

        cases = [({"x": x, "w": w, "target": target}, attrs(r)) for r in (1, 2, 0)]
        cases.append(({"x": x, "w": w, "target": torch.tensor([0, 5, 2, 3, 2, 1, 4])}, attrs(1, ignore_index=3, rows=7)))
        for only in ("x", "w"):  # a frozen output layer, a frozen body
            cases.append(({"x": x, "w": w, "target": target}, {**attrs(1), "grad_roles": (only,)}))
        cases += [({"x": x, "w": w, "b": b, "target": target}, attrs(r, bias=True)) for r in (1, 0)]  # with a bias
        return cases

    @staticmethod
    def binding(x, w, b, target, lsm_index: int, loss_index: int, total_weight_index: int, reduction: int, ignore_index: int,
                shape, w_shape, element_size: int) -> Binding:
        """The roles of a folded output layer (``x``, ``w``, ``b``, ``target`` are the
        tracer's nodes; ``b`` is ``None`` without a bias)."""
        rows = chunk_rows(shape[0], w_shape[1], element_size)
        inputs = {"x": x, "w": w, "target": target} if b is None else {"x": x, "w": w, "b": b, "target": target}
        return Binding(inputs, {"lsm": lsm_index, "y": loss_index, "total_weight": total_weight_index},
                       {"reduction": int(reduction), "ignore_index": int(ignore_index), "shape": tuple(shape),
                        "w_shape": tuple(w_shape), "chunk_rows": rows, "bias": b is not None, "element_size": int(element_size)})
