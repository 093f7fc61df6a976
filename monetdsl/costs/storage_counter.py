"""Counting new storages while they live: the one mechanism behind the live-tensor probe
(:class:`monetdsl.runtime.memory.LiveTensorProbe`, real tensors) and the FakeTensor
workspace estimate (:mod:`.estimated_workspace`, fake ones)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["StorageCounter"]


class StorageCounter(TorchDispatchMode):
    """Counts the bytes of storages created inside the ``with`` block while they live (a
    storage an op returns that one of its inputs already had is not new: in-place ops and
    views allocate nothing). Subclasses say which tensors count and how a storage is keyed."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}

    def counts(self, t: torch.Tensor) -> bool:
        return True

    def storage_key(self, t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _forget(self, key: int) -> None:
        nbytes = self._tracked.pop(key, None)
        if nbytes is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {self.storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or not self.counts(t):
                continue
            key = self.storage_key(t)
            if key in (0, -1) or key in self._tracked or key in inputs:
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            self._tracked[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._forget, key)
        return out
