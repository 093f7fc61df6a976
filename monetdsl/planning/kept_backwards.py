"""The lowering's traced local backwards, kept between processes beside the captured step.

Lowering a schedule traces PyTorch's backward of every op group it runs with autograd's
formulas (:func:`monetdsl.lowering.graphs.local_backward`: ``make_fx`` on FakeTensors,
tens of milliseconds a group, and TorchDynamo's import on first use). A second process
planning the same model needs the same graphs: they are kept as data
(:mod:`monetdsl.tracing.graph_text`) in one file per captured step, named by the key its
capture is kept under (:func:`monetdsl.tracing.kept_captures.capture_key`), and adopted
before the plan's costs are estimated and its schedule lowered (both lower op groups).

A file is written atomically with a checksum line; one that is damaged, of another
format or for another key is ignored, and so is each graph in it that does not rebuild
to the same data (the lowering then traces that group again). The key a graph is kept
under is the lowering's own description of the group (its calls, the layouts of what
they read), so a graph is only ever used for a group it was traced for.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import torch
import torch.fx as fx

from ..io import atomic_write, checksum_intact, with_checksum
from ..lowering.graphs import LocalBackward, adopt_local_backward, local_backwards
from ..tracing.graph_text import UnkeepableGraph, data_digest, graph_from_data, graph_to_data

__all__ = ["FORMAT", "adopt_kept_backwards", "keep_backwards"]

#: version of the files' contents; files of another version are not read
FORMAT = 1


def _path(directory: Path, key: str) -> Path:
    return directory / f"{key[:24]}-v{FORMAT}.backwards.json"


def _entry(key: tuple, local: LocalBackward) -> dict | None:
    text = repr(key)
    try:
        if ast.literal_eval(text) != key:
            return None
        graph = graph_to_data(local.module.graph, meta=False)
    except (UnkeepableGraph, ValueError, SyntaxError):
        return None
    return {"key": text, "graph": graph, "digest": data_digest(graph), "args_read": list(local.args_read),
            "outputs_read": list(local.outputs_read), "grads_given": list(local.grads_given), "wanted": list(local.wanted)}


def _local(entry: dict) -> tuple[tuple, LocalBackward] | None:
    try:
        key = ast.literal_eval(entry["key"])
        graph = graph_from_data(entry["graph"])
        if data_digest(entry["graph"]) != entry["digest"] or data_digest(graph_to_data(graph, meta=False)) != entry["digest"]:
            return None
        local = LocalBackward(fx.GraphModule(torch.nn.Module(), graph), tuple(entry["args_read"]), tuple(entry["outputs_read"]),
                              tuple(entry["grads_given"]), tuple(entry["wanted"]))
    except Exception:  # noqa: BLE001 - a graph that does not rebuild is traced again
        return None
    return (key, local) if isinstance(key, tuple) else None


def _read(directory: Path, key: str) -> list:
    try:
        text = _path(directory, key).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if not checksum_intact(text):
        return []
    try:
        data = json.loads(text.rstrip("\n").rpartition("\n")[0])
    except ValueError:
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        return []
    entries = data.get("graphs")
    return entries if isinstance(entries, list) else []


def adopt_kept_backwards(directory: Path | None, key: str | None) -> frozenset:
    """Adopt the local backwards kept under the capture key ``key`` (nothing when either
    is None); the lowering's keys of those adopted."""
    if directory is None or key is None:
        return frozenset()
    adopted = []
    for entry in _read(directory, key):
        found = _local(entry) if isinstance(entry, dict) else None
        if found is not None:
            adopt_local_backward(*found)
            adopted.append(found[0])
    return frozenset(adopted)


def keep_backwards(directory: Path | None, key: str | None, adopted: frozenset) -> None:
    """Keep, under the capture key ``key``, the local backwards this process has traced or
    adopted (lowering and measuring this graph's ops trace those it needs; a process
    usually plans one model, and a graph kept for another is only unused), when any is
    new beside those ``adopted`` from the file. A directory that cannot be written is
    skipped: the file only saves time."""
    if directory is None or key is None:
        return
    made = local_backwards()
    if not set(made) - adopted:
        return
    entries = [e for e in (_entry(key, local) for key, local in made.items()) if e is not None]
    text = json.dumps({"format": FORMAT, "key": key, "graphs": entries}, separators=(",", ":")) + "\n"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(_path(directory, key), with_checksum(text))
    except OSError:
        pass
