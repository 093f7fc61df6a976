"""Captured training steps kept between processes, so a second run does not trace again.

Capturing a step (:func:`~.capture.capture`: TorchDynamo, AOTAutograd, FakeTensors) is
most of a warm plan's time: importing the compiler alone takes one to several seconds.
What it produces, the joint graph and what its inputs are, is kept as data
(:mod:`.graph_text`) under a key made of facts read off the model without tracing it:

* the versions of torch, Python and monetdsl's capture code (these modules' source);
* the loss (a named one: a loss function of the caller's is never keyed);
* every submodule: its path, class, ``training`` flag, ``extra_repr()``, the plain
  settings in its ``__dict__`` (numbers, strings, tuples of them), the tensors held
  outside parameters and buffers, and the functions set on the instance;
* every parameter and buffer (tied ones counted under each name): shape, strides,
  dtype, device, ``requires_grad``, and which are the same tensor;
* the source of the file defining each module class in the tree outside torch (and of
  its base classes), and of each function set on an instance: an edit to ``forward``
  or to a helper in the same file makes a new key;
* each input's shape, strides, dtype, device and ``requires_grad``; the default dtype,
  autocast and grad mode.

A model with forward hooks (its own or global ones), a class whose source file cannot be
read, or any other setting the key cannot see is traced every time (no key). What the
key cannot see: code in another file that ``forward`` reaches (a helper module of the
caller's), and global state ``forward`` reads (a module-level flag): after changing those,
clear the cache (delete its ``traces`` directory) or plan with ``cache_dir=None``.

An entry is a JSON file with a checksum line, written atomically (two processes writing
the same entry leave one whole file). It is never trusted: one whose checksum, format or
key does not match, that does not rebuild, whose rebuilt graph does not write back to the
same data (the digest kept with it), or whose parameters and buffers are not the model's
(name, shape, dtype) is ignored, and the step is traced and the entry written again.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

from ..io import read_checked_json, write_checked_json
from .capture import Captured, Placeholder
from .graph_text import UnkeepableGraph, data_digest, graph_from_data, graph_to_data

__all__ = ["FORMAT", "capture_key", "recall_capture", "keep_capture"]

#: version of the entries' contents; entries of another version are not read
FORMAT = 1

#: ``nn.Module`` bookkeeping in a module's ``__dict__`` (seen elsewhere in the key, or irrelevant)
_MODULE_INTERNALS = frozenset({"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
                               "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
                               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                               "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})


class _NoKey(Exception):
    """The model holds something the key cannot describe: trace every time."""


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, modified: int, size: int) -> str:
    """A file's SHA-256, read once per version (``modified``, ``size``: its ``stat``)."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _source_digest(obj) -> str:
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        path = None
    if not path:
        raise _NoKey(f"no source file for {obj!r}")
    try:
        status = os.stat(path)
        return _file_digest(path, status.st_mtime_ns, status.st_size)
    except OSError:
        raise _NoKey(f"cannot read {path}") from None


def _own_code() -> str:
    """The source of the code that captures and writes entries."""
    from . import capture, graph_text

    return "".join(_source_digest(m) for m in (capture, graph_text, sys.modules[__name__]))


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)  # a set's repr follows hash order


def _tensor_facts(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device), bool(t.requires_grad))


def _class_sources(cls: type, seen: dict) -> None:
    for base in cls.__mro__:
        if base in seen or base is object or base.__module__.split(".")[0] == "torch":
            continue
        if "<locals>" in base.__qualname__:  # made by a function: what it closes over is not in the key
            raise _NoKey(f"{base.__qualname__} is defined inside a function")
        seen[base] = _source_digest(base)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _module_facts(name: str, module: nn.Module, sources: dict) -> tuple:
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        raise _NoKey(f"{name or 'the model'} has hooks")
    if isinstance(module, torch.fx.GraphModule):  # its code is generated, in no source file
        raise _NoKey(f"{name or 'the model'} is an fx GraphModule")
    _class_sources(type(module), sources)
    settings, tensors, functions = [], [], []
    for key, value in sorted(module.__dict__.items()):
        if key in _MODULE_INTERNALS:
            continue
        if isinstance(value, torch.Tensor):
            tensors.append((key, _tensor_facts(value)))
        elif _plain(value):
            settings.append((key, repr(value)))
        elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
            target = value.func if isinstance(value, functools.partial) else value
            target = getattr(target, "__func__", target)
            functions.append((key, getattr(target, "__qualname__", repr(target)), _source_digest(target)))
        elif isinstance(value, types.BuiltinFunctionType):
            functions.append((key, f"{value.__module__}.{value.__qualname__}", ""))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type) and _plain(tuple(getattr(value, f.name) for f in dataclasses.fields(value))):
            settings.append((key, repr(value)))
        elif isinstance(value, nn.Module):
            continue  # a submodule held outside _modules is traced through; its own entry is in the tree walk
        else:
            raise _NoKey(f"{name or 'the model'}.{key} is a {type(value).__name__}")
    try:
        shown = module.extra_repr()
    except Exception:  # noqa: BLE001 - a module that cannot describe itself is not keyed
        raise _NoKey(f"{name or 'the model'}.extra_repr() fails") from None
    return (name, _class_name(type(module)), module.training, shown,
            tuple(settings), tuple(tensors), tuple(functions))


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return any(getattr(nn_module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                           "_global_backward_hooks", "_global_backward_pre_hooks"))


def capture_key(model: nn.Module, inputs, loss) -> str | None:
    """The key of ``loss(model(*inputs))``'s capture (see the module docstring), or None
    when the model cannot be keyed. ``inputs``: tensors (real, meta or fake) or
    ``(shape, dtype)`` pairs."""
    if not isinstance(loss, str) or _global_hooks():
        return None
    try:
        sources: dict = {}
        modules = tuple(_module_facts(name, m, sources) for name, m in model.named_modules(remove_duplicate=False))
        identity: dict = {}
        params = tuple((name, _tensor_facts(p), identity.setdefault(id(p), len(identity)))
                       for name, p in model.named_parameters(remove_duplicate=False))
        buffers = tuple((name, _tensor_facts(b), identity.setdefault(id(b), len(identity)))
                        for name, b in model.named_buffers(remove_duplicate=False))
        data = tuple(_tensor_facts(t) if isinstance(t, torch.Tensor) else (tuple(t[0]), str(t[1])) for t in inputs)
        code = _own_code()
    except _NoKey:
        return None
    autocast = tuple((d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in ("cpu", "cuda"))
    facts = (FORMAT, torch.__version__, sys.version_info[:2], code, loss, str(torch.get_default_dtype()),
             torch.is_grad_enabled(), autocast, modules, params, buffers, data,
             tuple(sorted((_class_name(c), d) for c, d in sources.items())))
    return hashlib.sha256(repr(facts).encode()).hexdigest()


def _path(directory: Path, key: str) -> Path:
    return directory / f"{key[:24]}-v{FORMAT}.capture.json"


def keep_capture(directory: Path | None, key: str | None, captured: Captured) -> None:
    """Write ``captured`` as the entry of ``key`` (nothing when either is None, when the
    graph cannot be written down, or when the directory cannot be written: the cache only
    saves time)."""
    if directory is None or key is None:
        return
    try:
        graph = graph_to_data(captured.joint.graph)
    except UnkeepableGraph:
        return
    entry = {"format": FORMAT, "key": key, "graph": graph, "digest": data_digest(graph),
             "placeholders": {name: [p.name, p.kind, p.requires_grad, p.index] for name, p in captured.placeholders.items()},
             "loss": captured.loss, "leaf_modules": sorted(captured.leaf_modules), "notes": list(captured.notes)}
    try:
        write_checked_json(_path(directory, key), entry)
    except OSError:
        pass


def recall_capture(directory: Path | None, key: str | None, model: nn.Module) -> Captured | None:
    """The capture kept for ``key``, rebuilt, or None when there is none or it cannot be
    trusted (see the module docstring)."""
    if directory is None or key is None:
        return None
    start = time.perf_counter()
    entry = read_checked_json(_path(directory, key))
    if entry is None:
        return None
    try:
        if entry["format"] != FORMAT or entry["key"] != key or data_digest(entry["graph"]) != entry["digest"]:
            return None
        graph = graph_from_data(entry["graph"], {_class_name(type(m)): type(m) for m in model.modules()})
        if data_digest(graph_to_data(graph)) != entry["digest"]:
            return None
        placeholders = {name: Placeholder(n, kind, bool(grad), index) for name, (n, kind, grad, index) in entry["placeholders"].items()}
        captured = Captured(torch.fx.GraphModule(torch.nn.Module(), graph), placeholders, 0.0, entry["loss"],
                            frozenset(entry["leaf_modules"]), list(entry["notes"]))
    except Exception:  # noqa: BLE001 - an entry that does not rebuild is traced again
        return None
    if not _matches_model(captured, model):
        return None
    captured.seconds = time.perf_counter() - start
    return captured


def _matches_model(captured: Captured, model: nn.Module) -> bool:
    """Whether every parameter and buffer the graph reads is the model's, with the shape
    and dtype the graph was captured with."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    phs = {n.name: n for n in captured.joint.graph.nodes if n.op == "placeholder"}
    for fx_name, ph in captured.placeholders.items():
        if ph.kind == "input":
            continue
        node = phs.get(fx_name)
        val = node.meta.get("val") if node is not None else None
        tensor = state.get(ph.name)
        if ph.kind == "param" and tensor is None:
            return False
        if tensor is not None and (val is None or tuple(val.shape) != tuple(tensor.shape) or val.dtype != tensor.dtype):
            return False
    return True
