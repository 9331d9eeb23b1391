"""A bounded, thread-safe store of tensors, for results that are expensive to recompute.

Frozen image features depend only on the image and the backbone, prompted ones on the image, the
backbone and the prompts; a server that keeps them answers a repeated question without running
the image tower. This object is passed to whoever computes (it is never hidden in a model), is
bounded in bytes rather than entries (a 1000-class weight matrix and a 512-number feature differ
by three orders of magnitude), and evicts the least recently used entries first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

Value = torch.Tensor | Sequence["Value"]


class TensorCache:
    """Least-recently-used map from hashable keys to tensors (or nested lists / tuples of them),
    holding at most ``max_bytes`` of tensor data."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, Value] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def _size(cls, value: Value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return sum(cls._size(v) for v in value)

    @classmethod
    def _detach(cls, value: Value) -> Value:
        if isinstance(value, torch.Tensor):
            return value.detach()
        return type(value)(cls._detach(v) for v in value)

    def get(self, key: Hashable) -> Value | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: Value) -> None:
        """Store ``value`` (detached); one larger than the whole budget is not kept."""
        value = self._detach(value)
        size = self._size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._data[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= self._size(evicted)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


__all__ = ["TensorCache"]
