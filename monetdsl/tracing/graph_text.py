"""An fx graph of aten calls as plain JSON data, and back, without tracing anything.

Tracing a model (TorchDynamo, AOTAutograd, FakeTensors) takes seconds, most of it
importing and running the compiler; the graphs it produces are plain lists of aten calls
whose arguments are nodes, numbers, dtypes and devices. Written down as data they can be
kept between processes and rebuilt in milliseconds, with no pickled code or tensors: a
call's target is named (``aten::convolution.default``, ``operator.getitem``) and looked
up again in ``torch.ops`` or :mod:`operator`.

A node's ``val`` (what the tracer's FakeTensor said: shape, strides, dtype, device) comes
back as a :class:`RecordedTensor`, a tensor with that metadata and no storage, which
refuses to compute. The other metadata the planner reads is kept too (``seq_nr``,
``partitioner_tag``, ``nn_module_stack``, ``stack_trace``); the classes of
``nn_module_stack`` are named, and looked up in the model's own modules or the modules
already imported.

A graph holding anything else (a Python function, a tensor constant, a symbolic size)
raises :class:`UnkeepableGraph`: the caller traces instead of keeping it.
"""
from __future__ import annotations

import hashlib
import json
import operator
import sys
from typing import Any

import torch
import torch.fx as fx

__all__ = ["UnkeepableGraph", "RecordedTensor", "graph_to_data", "graph_from_data", "data_digest", "value_to_data",
           "value_from_data"]

#: the node metadata the planner reads (the tracer leaves more, unused)
_META_KEYS = ("val", "seq_nr", "partitioner_tag", "nn_module_stack", "stack_trace")

#: Python callables a graph may call besides torch ops, by name
_PY_TARGETS = {f"operator.{name}": getattr(operator, name) for name in
               ("getitem", "add", "sub", "mul", "truediv", "floordiv", "neg", "pow", "mod")}
_PY_NAMES = {id(fn): name for name, fn in _PY_TARGETS.items()}

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in
                   (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {str(f).removeprefix("torch."): f for f in (torch.strided, torch.sparse_coo)}


class UnkeepableGraph(ValueError):
    """The graph holds something that cannot be written down as data."""


class RecordedTensor(torch.Tensor):
    """A tensor's metadata as the tracer recorded it (shape, strides, dtype, device),
    without storage: what rebuilt graphs carry as ``node.meta["val"]``. Reading its
    metadata works as on the FakeTensor it stands for; computing with it raises."""

    @staticmethod
    def __new__(cls, shape, stride, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), strides=tuple(stride), dtype=dtype,
                                                   device=torch.device(device), requires_grad=False)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"a recorded tensor has metadata only; {func} cannot run on it")

    def __repr__(self) -> str:
        return f"RecordedTensor({tuple(self.shape)}, {self.dtype}, {self.device})"


# ----------------------------------------------------------------------------- writing
def _target_name(node: fx.Node):
    if node.op != "call_function":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return {"op": f"{target._schema.name}.{target._overloadname}"}
    name = _PY_NAMES.get(id(target))
    if name is None:
        raise UnkeepableGraph(f"{node.name} calls {target!r}, which is not a torch op")
    return {"py": name}


def _arg(value) -> Any:
    if isinstance(value, fx.Node):
        return {"n": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"f": repr(value)}  # inf and nan are not JSON
    if isinstance(value, tuple):
        return {"t": [_arg(v) for v in value]}
    if isinstance(value, list):
        return {"l": [_arg(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"d": [[k, _arg(v)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    raise UnkeepableGraph(f"an argument of type {type(value).__name__} cannot be kept")


def _val(value) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if not all(isinstance(d, int) for d in (*value.shape, *value.stride())):
            raise UnkeepableGraph("a tensor of symbolic size cannot be kept")
        return {"shape": list(value.shape), "stride": list(value.stride()), "dtype": str(value.dtype).removeprefix("torch."),
                "device": str(value.device)}
    if isinstance(value, (tuple, list)):
        return {"t" if isinstance(value, tuple) else "l": [_val(v) for v in value]}
    if isinstance(value, (bool, int, float)):
        return {"f": repr(value)} if isinstance(value, float) else value
    raise UnkeepableGraph(f"a recorded value of type {type(value).__name__} cannot be kept")


def _module_stack(stack: dict) -> list:
    out = []
    for key, (path, cls) in stack.items():
        if not isinstance(cls, type):
            raise UnkeepableGraph(f"nn_module_stack names {cls!r}, not a class")
        out.append([str(key), str(path), f"{cls.__module__}:{cls.__qualname__}"])
    return out


def _meta(node: fx.Node) -> dict:
    meta = {}
    for key in _META_KEYS:
        if key not in node.meta:
            continue
        value = node.meta[key]
        if key == "val":
            meta[key] = _val(value)
        elif key == "nn_module_stack":
            meta[key] = _module_stack(value or {})
        elif value is None or isinstance(value, (int, str)):
            meta[key] = value
        else:
            raise UnkeepableGraph(f"{node.name}: metadata {key} of type {type(value).__name__} cannot be kept")
    return meta


def graph_to_data(graph: fx.Graph, *, meta: bool = True) -> list:
    """``graph``'s nodes as JSON-able data (with the planner's metadata when ``meta``)."""
    nodes = []
    for node in graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            raise UnkeepableGraph(f"{node.name} is a {node.op} node")
        entry = {"name": node.name, "op": node.op, "target": _target_name(node),
                 "args": _arg(tuple(node.args)), "kwargs": _arg(dict(node.kwargs))}
        if meta:
            entry["meta"] = _meta(node)
        nodes.append(entry)
    return nodes


def value_to_data(value) -> Any:
    """A value made of numbers, strings, tuples, lists, dtypes and devices (a cache key)
    as JSON-able data; :class:`UnkeepableGraph` for anything else."""
    if isinstance(value, fx.Node):
        raise UnkeepableGraph("a graph node is not a plain value")
    return _arg(value)


def value_from_data(data) -> Any:
    """The value :func:`value_to_data` wrote."""
    return _unarg(data, {})


def data_digest(data) -> str:
    """SHA-256 of ``data`` written as canonical JSON: how an entry names its graph."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------- reading
def _resolve_target(target):
    if isinstance(target, str):
        return target
    if "op" in target:
        qualified, overload = target["op"].rsplit(".", 1)
        namespace, name = qualified.split("::", 1)
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return _PY_TARGETS[target["py"]]


def _unarg(value, nodes: dict):
    if not isinstance(value, dict):
        return value
    (kind, inner), = value.items()
    if kind == "n":
        return nodes[inner]
    if kind == "f":
        return float(inner)
    if kind == "t":
        return tuple(_unarg(v, nodes) for v in inner)
    if kind == "l":
        return [_unarg(v, nodes) for v in inner]
    if kind == "d":
        return {k: _unarg(v, nodes) for k, v in inner}
    if kind == "dtype":
        return _DTYPES[inner]
    if kind == "device":
        return torch.device(inner)
    if kind == "memory_format":
        return _MEMORY_FORMATS[inner]
    if kind == "layout":
        return _LAYOUTS[inner]
    raise KeyError(kind)


def _unval(value):
    if value is None or isinstance(value, (bool, int)):
        return value
    if "shape" in value:
        return RecordedTensor(value["shape"], value["stride"], _DTYPES[value["dtype"]], value["device"])
    (kind, inner), = value.items()
    if kind == "f":
        return float(inner)
    items = [_unval(v) for v in inner]
    return tuple(items) if kind == "t" else items


def _class(reference: str, classes: dict) -> type:
    if reference in classes:
        return classes[reference]
    module, qualname = reference.split(":", 1)
    found = sys.modules[module]  # the model's classes are imported: the model exists
    for part in qualname.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise TypeError(f"{reference} is not a class")
    return found


def _unmeta(meta: dict, classes: dict) -> dict:
    out = {}
    for key, value in meta.items():
        if key == "val":
            out[key] = _unval(value)
        elif key == "nn_module_stack":
            out[key] = {k: (path, _class(cls, classes)) for k, path, cls in value}
        else:
            out[key] = value
    return out


def graph_from_data(data: list, classes: dict | None = None) -> fx.Graph:
    """The graph :func:`graph_to_data` wrote; ``classes`` (``"module:qualname"`` -> class)
    names the classes of ``nn_module_stack`` first, the modules imported the others.
    Raises (``KeyError``, ``AttributeError``, ``TypeError``, ``ValueError``) on data it
    did not write, or that names ops or classes this process does not have: the caller
    treats that as no entry."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in data:
        args = _unarg(entry["args"], nodes)
        kwargs = _unarg(entry["kwargs"], nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError("a node's arguments are not a tuple and a dict")
        node = graph.create_node(entry["op"], _resolve_target(entry["target"]), args, kwargs, name=entry["name"])
        if node.name != entry["name"]:
            raise ValueError(f"node {entry['name']} came back as {node.name}")
        node.meta.update(_unmeta(entry.get("meta", {}), classes or {}))
        nodes[node.name] = node
    return graph
