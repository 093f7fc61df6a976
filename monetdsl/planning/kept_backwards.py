"""The lowering's traced backward graphs, kept between processes beside the captured step.

Lowering a schedule traces PyTorch's backward of every op group it runs with autograd's
formulas (:func:`monetdsl.lowering.graphs.local_backward`), and a step traces the
backward of the view chains from a storage owner to its views on first use (the owner
adapters, :func:`monetdsl.lowering.graphs.owner_adapter`): ``make_fx`` on FakeTensors,
tens of milliseconds each, and TorchDynamo's import on first use. A second process
planning the same model needs the same graphs: they are kept as data
(:mod:`monetdsl.tracing.graph_text`) in one file per captured step, named by the key its
capture is kept under (:func:`monetdsl.tracing.kept_captures.capture_key`), and adopted
before the plan's costs are estimated and its schedule lowered.

A file is written atomically with a checksum line; one that is damaged, of another
format or for another key is ignored, and so is each graph in it that does not rebuild
to the same data (the lowering then traces it again). A graph is kept under the
lowering's own key for it (the group's calls and the layouts of what they read; the
view chain and the gradients' layouts), so it is only ever used where it was traced for.
"""
from __future__ import annotations

import atexit
from pathlib import Path

import torch
import torch.fx as fx

from ..io import read_checked_json, write_checked_json
from ..lowering.graphs import (LocalBackward, adopt_local_backward, adopt_owner_adapter_graph, local_backwards,
                               owner_adapter_graphs)
from ..tracing.graph_text import (UnkeepableGraph, data_digest, graph_from_data, graph_to_data, value_from_data,
                                  value_to_data)

__all__ = ["FORMAT", "adopt_kept_backwards", "keep_backwards"]

#: version of the files' contents; files of another version are not read
FORMAT = 1


def _path(directory: Path, key: str) -> Path:
    return directory / f"{key[:24]}-v{FORMAT}.backwards.json"


def _graph_entry(kind: str, key: tuple, module: fx.GraphModule, **fields) -> dict | None:
    try:
        data = value_to_data(key)
        if value_from_data(data) != key:
            return None
        graph = graph_to_data(module.graph, meta=False)
    except (UnkeepableGraph, KeyError, TypeError, ValueError):
        return None
    return {"kind": kind, "key": data, "graph": graph, "digest": data_digest(graph), **fields}


def _entries() -> list[dict]:
    """Every backward and adapter graph of this process, as data (those that can be)."""
    entries = [_graph_entry("backward", key, local.module, args_read=list(local.args_read),
                            outputs_read=list(local.outputs_read), grads_given=list(local.grads_given),
                            wanted=list(local.wanted)) for key, local in local_backwards().items()]
    entries += [_graph_entry("adapter", key, module) for key, module in owner_adapter_graphs().items()]
    return [e for e in entries if e is not None]


def _adopt(entry: dict) -> tuple | None:
    """Adopt one entry; its (kind, key), or None when it does not rebuild to its data."""
    try:
        key = value_from_data(entry["key"])
        graph = graph_from_data(entry["graph"])
        if data_digest(entry["graph"]) != entry["digest"] or data_digest(graph_to_data(graph, meta=False)) != entry["digest"]:
            return None
        module = fx.GraphModule(torch.nn.Module(), graph)
        if not isinstance(key, tuple):
            return None
        if entry["kind"] == "backward":
            local = LocalBackward(module, tuple(entry["args_read"]), tuple(entry["outputs_read"]),
                                  tuple(entry["grads_given"]), tuple(entry["wanted"]))
            adopt_local_backward(key, local)
        elif entry["kind"] == "adapter":
            adopt_owner_adapter_graph(key, module)
        else:
            return None
    except Exception:  # noqa: BLE001 - a graph that does not rebuild is traced again
        return None
    return entry["kind"], key


def _read(directory: Path, key: str) -> list:
    data = read_checked_json(_path(directory, key))
    if data is None or data.get("format") != FORMAT or data.get("key") != key:
        return []
    entries = data.get("graphs")
    return entries if isinstance(entries, list) else []


def adopt_kept_backwards(directory: Path | None, key: str | None) -> frozenset:
    """Adopt the backward and adapter graphs kept under the capture key ``key`` (nothing
    when either is None); the (kind, lowering key) of those adopted."""
    if directory is None or key is None:
        return frozenset()
    adopted = (_adopt(entry) if isinstance(entry, dict) else None for entry in _read(directory, key))
    return frozenset(a for a in adopted if a is not None)


def _made() -> set:
    return {("backward", k) for k in local_backwards()} | {("adapter", k) for k in owner_adapter_graphs()}


#: files to complete at exit with the owner adapters traced after they were written
_AT_EXIT: dict = {}


def keep_backwards(directory: Path | None, key: str | None, adopted: frozenset) -> None:
    """Keep, under the capture key ``key``, the backward and adapter graphs this process
    has traced or adopted (estimating, measuring and lowering this model's ops trace
    those it needs; a process usually plans one model, and a graph kept for another is
    only unused), when any is new beside those ``adopted`` from the file. A directory
    that cannot be written is skipped: the file only saves time.

    The owner adapters are traced by the training steps, later; they are added to the
    file when the process exits (not after a step: a step may be measured, and writing
    the file would count in its peak)."""
    if directory is None or key is None:
        return
    if _made() - adopted:
        _write(directory, key, _entries())
    if not _AT_EXIT:
        atexit.register(_add_adapters_at_exit)
    _AT_EXIT[_path(directory, key)] = (directory, key, frozenset(_made()) | adopted)


def _write(directory: Path, key: str, entries: list, *, create: bool = True) -> None:
    if not create and not directory.is_dir():
        return  # removed since it was written (a temporary one): it stays removed
    try:
        write_checked_json(_path(directory, key), {"format": FORMAT, "key": key, "graphs": entries})
    except OSError:
        pass


def _add_adapters_at_exit() -> None:
    """Add to each file written in this process the owner adapters traced since."""
    adapters = owner_adapter_graphs()
    for directory, key, known in _AT_EXIT.values():
        new = [_graph_entry("adapter", k, module) for k, module in adapters.items() if ("adapter", k) not in known]
        new = [e for e in new if e is not None]
        if new:
            # a directory removed since (a temporary one) stays removed
            _write(directory, key, [e for e in _read(directory, key) if isinstance(e, dict)] + new, create=False)
