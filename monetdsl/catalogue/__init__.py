"""The operator-implementation catalogue: one entry per op kind, looked up by aten name.

>>> from monetdsl.catalogue import CATALOGUE, kind_for
>>> kind_for("relu").name, kind_for("convolution").name, kind_for("mul") is None
('relu', 'conv', True)
>>> sorted(CATALOGUE)[:4]
['adaptive_avg_pool2d', 'add', 'batch_norm', 'conv']

Ops with no entry are described generically by the tracer: one implementation that
keeps exactly what autograd keeps.
"""
from __future__ import annotations

from .activations import ClampActivation, InputActivation, OutputActivation
from .attention import ScaledDotProductAttention
from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind
from .dropout import Dropout
from .elementwise import Add
from .linear import Convolution, MatMul
from .loss import CrossEntropy, LinearCrossEntropy
from .norms import BatchNorm, GammaHasZeros, LayerNorm, RMSNorm
from .packing import pack_bits, unpack_bits
from .pooling import AdaptiveAvgPool2d, MaxPool2d

__all__ = [
    "CATALOGUE",
    "kind_for",
    "OpKind",
    "ForwardAlt",
    "BackwardAlt",
    "BackwardStep",
    "Binding",
    "GammaHasZeros",
    "pack_bits",
    "unpack_bits",
]

_KINDS: list[OpKind] = [
    ClampActivation("relu", ("relu", "relu_"), autograd_reads="y"),
    ClampActivation("leaky_relu", ("leaky_relu", "leaky_relu_"), autograd_reads="x"),
    ClampActivation("hardtanh", ("hardtanh", "hardtanh_"), autograd_reads="x"),
    OutputActivation("tanh", ("tanh", "tanh_"), 4.0),
    OutputActivation("sigmoid", ("sigmoid", "sigmoid_"), 4.0),
    OutputActivation("softmax", ("_softmax",), 5.0),
    OutputActivation("log_softmax", ("_log_softmax",), 5.0),
    InputActivation("gelu", ("gelu",), 20.0),
    InputActivation("silu", ("silu",), 5.0),
    BatchNorm(),
    LayerNorm(),
    RMSNorm(),
    MaxPool2d(),
    AdaptiveAvgPool2d(),
    Dropout(),
    Convolution(),
    MatMul(),
    ScaledDotProductAttention(),
    Add(),
    CrossEntropy(),
    LinearCrossEntropy(),
]

#: catalogue name -> entry
CATALOGUE: dict[str, OpKind] = {kind.name: kind for kind in _KINDS}
_BY_ATEN: dict[str, OpKind] = {aten: kind for kind in _KINDS for aten in kind.aten}


def kind_for(aten_name: str) -> OpKind | None:
    """The entry covering an aten overload packet name (``"relu"``, ``"addmm"``), if any."""
    return _BY_ATEN.get(aten_name)
