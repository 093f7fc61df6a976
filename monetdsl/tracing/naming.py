"""Readable, unique names for traced ops and tensors.

Ops are named after the ``nn.Module`` that ran them (``layer1.0.conv1``), with the op
kind appended when a module runs several ops (``layer1.0.relu``, ``layer1.0.relu.1``,
``h.0.attn.sdpa``); ops of the model's own ``forward`` use the kind alone, ops of the
loss are under ``loss.``.

>>> module_path("L['self'].model.layer1.0.conv1"), module_path("L['s']._modules['model']._modules['fc']")
('layer1.0.conv1', 'fc')
>>> module_path("L['self'].model")
''
"""
from __future__ import annotations

import re

__all__ = ["module_path", "NameAllocator", "op_names"]

_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.([A-Za-z0-9_]+)")


def module_path(raw: str) -> str:
    """The dotted module path inside the model from dynamo's ``nn_module_stack`` entry."""
    text = raw
    head = re.match(r"^[A-Z]\['[^']*'\]", text)
    if head:
        text = text[head.end():]
    parts = [a or b or c for a, b, c in _PART.findall(text)]
    parts = [p for p in parts if p not in ("_modules",)]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts)


class NameAllocator:
    """Hands out names, appending ``_2``, ``_3``... when one is taken."""

    def __init__(self, taken=()):
        self.taken: set[str] = set(taken)

    def take(self, name: str) -> str:
        candidate = name
        n = 2
        while candidate in self.taken:
            candidate = f"{name}_{n}"
            n += 1
        self.taken.add(candidate)
        return candidate


def op_names(entries: list[tuple[str | None, str]], leaves=None) -> list[str]:
    """Names for ops given ``(module path or None for the loss, kind)`` in forward order.

    ``leaves`` are the paths of modules without children: a leaf module run several times
    (one ``nn.ReLU`` used thrice) names its ops ``path``, ``path.1``...; ops that a
    composite module's own ``forward`` runs are ``path.kind``, ``path.kind.1``...
    """
    by_path: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(entries):
        by_path.setdefault("\0loss" if path is None else path, []).append(i)
    names = [""] * len(entries)
    for path, members in by_path.items():
        kinds = [entries[i][1] for i in members]
        prefix = "loss" if path == "\0loss" else path
        if path != "\0loss" and path and len(members) == 1 and (leaves is None or path in leaves):
            names[members[0]] = path
            continue
        same = len(set(kinds)) == 1 and path not in ("", "\0loss") and (leaves is None or path in leaves)
        seen: dict[str, int] = {}
        for i, kind in zip(members, kinds):
            base = prefix if same else (f"{prefix}.{kind}" if prefix else kind)
            count = seen.get(base, 0)
            seen[base] = count + 1
            names[i] = base if count == 0 else f"{base}.{count}"
    allocator = NameAllocator()
    return [allocator.take(n) for n in names]
