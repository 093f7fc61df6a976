"""Unroll ``nn.GRU`` into time steps whose hidden state stays two-dimensional.

torch's own decomposition of ``aten.gru.input`` (``torch._decomp.decompositions.gru_impl``)
carries each layer's hidden state as ``(1, batch, hidden)``. Every time step then reads it
through ``F.linear`` on a 3-D tensor, captured as ``view`` -> ``addmm`` -> ``view``, splits
the gates along dimension 2, and adds ``(1, batch, hidden)`` gates to ``(batch, hidden)``
ones, whose backward reduces over the broadcast dimension. None of that is in eager's
cell (``at::native`` keeps ``(batch, hidden)``): it is two views, two autograd view nodes
and up to three reductions per step that the replayed step pays for and eager does not.

:func:`two_dimensional_gru_steps` swaps in a decomposition with the same arithmetic, in
the same order as eager's cell, on a ``(batch, hidden)`` state: each step is ``addmm``,
``split`` and the gate arithmetic, the input projection's gates are split and unbound
once for the sequence, and the layer's output is the steps stacked. Layers,
directions, ``batch_first`` and dropout are handled by torch's own helper, unchanged.
"""
from __future__ import annotations

import contextlib
import torch
import torch.nn.functional as F
from torch._C import DispatchKey

__all__ = ["gru_layer_2d", "two_dimensional_gru_steps"]

#: the dispatch keys under which torch registers its Python GRU decomposition
_KEYS = (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd)


def gru_layer_2d(inp, hidden, params, has_biases, reverse=False):
    """One GRU layer over ``inp`` (time first): the steps' outputs stacked, and the last
    hidden state, which stays ``(batch, hidden)`` throughout (as in eager's cell)."""
    ih_weight, hh_weight = params[0], params[1]
    ih_bias = params[2] if has_biases else None
    hh_bias = params[3] if has_biases else None
    projected = F.linear(inp, ih_weight, ih_bias)  # every step's input gates in one product
    if reverse:
        projected = projected.flip(0)
    outputs = []
    # the input gates are split once for the whole sequence, not once a step (one view call
    # and one autograd node a step less; eager's cell splits each step in C++)
    for input_reset, input_update, input_new in zip(*(gate.unbind(0) for gate in projected.chunk(3, 2))):
        hidden_reset, hidden_update, hidden_new = F.linear(hidden, hh_weight, hh_bias).chunk(3, 1)
        reset = (hidden_reset + input_reset).sigmoid()
        update = (hidden_update + input_update).sigmoid()
        new = (input_new + hidden_new * reset).tanh()
        hidden = (hidden - new) * update + new
        outputs.append(hidden)
    if reverse:
        outputs.reverse()
    return torch.stack(outputs, 0), hidden


def _gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``aten.gru.input`` through torch's layer helper with :func:`gru_layer_2d`."""
    from torch._decomp.decompositions import _rnn_helper, gather_params

    out, final_hiddens = _rnn_helper(input, hx.unbind(0), gather_params(params, has_biases, False), has_biases,
                                     num_layers, dropout, train, bidirectional, batch_first, gru_layer_2d)
    return out, torch.stack(final_hiddens, 0)


@contextlib.contextmanager
def two_dimensional_gru_steps():
    """While open, tracing decomposes ``aten.gru.input`` with :func:`gru_layer_2d`; torch's
    own decomposition is put back on exit (this touches nothing that eager execution uses:
    the Python kernels run only under the tracer's Python dispatcher)."""
    op = torch.ops.aten.gru.input
    saved = {key: op.py_kernels.get(key) for key in _KEYS}
    try:
        for key in _KEYS:
            op.py_kernels[key] = _gru
        op._dispatch_cache.clear()
        yield
    finally:
        for key, kernel in saved.items():
            if kernel is None:
                op.py_kernels.pop(key, None)
            else:
                op.py_kernels[key] = kernel
        op._dispatch_cache.clear()
