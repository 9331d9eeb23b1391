"""A bounded, thread-safe least-recently-used map: every cache the app keeps is one, so a
long-running public Space cannot grow without limit."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A small thread-safe least-recently-used map with a hard size bound."""

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None):
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: K, value: V) -> None:
        evicted = []
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                evicted.append(self._data.popitem(last=False))
        for k, v in evicted:
            if self._on_evict:
                self._on_evict(k, v)

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._data.pop(key, None)

    def get_or_load(self, key: K, load: Callable[[], V], load_lock: threading.RLock) -> V:
        """Cached value, or ``load()`` once under ``load_lock`` (concurrent callers wait for it
        rather than loading the same model twice)."""
        found = self.get(key)
        if found is not None:
            return found
        with load_lock:
            found = self.get(key)
            if found is None:
                found = load()
                self.put(key, found)
        return found

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._data)

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._data.items())

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
