"""An object store that keeps the segments a job wrote or read lately in memory.

A consumer's micro-batches of a small target rewrite the same segment again and again, and
each time the publish would read back the bytes it wrote a second earlier; a reconciliation
reads a drifted segment to compare it, then rewrites it. Segments are immutable
objects with unique keys, so a cached copy can never be stale: the cache saves one GET per
touched segment per publish, bounded by a byte budget (least recently used goes first).
Everything else is passed through to the wrapped ``ObjectStore``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from snapshots.keys import SEGMENTS
from snapshots.store import ObjectStore

log = logging.getLogger(__name__)


class SegmentCache:
    """``ObjectStore`` with an LRU cache of segment bytes; thread-safe."""

    def __init__(self, store: ObjectStore, budget_bytes: int) -> None:
        self._store = store
        self.budget_bytes = budget_bytes
        self._cached: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put(self, key: str, data: bytes) -> None:
        self._store.put(key, data)
        self._keep(key, data)

    def get(self, key: str) -> bytes:
        with self._lock:
            data = self._cached.get(key)
            if data is not None:
                self._cached.move_to_end(key)
                self.hits += 1
                return data
        data = self._store.get(key)
        self._keep(key, data)
        return data

    def delete_many(self, keys: Iterable[str]) -> int:
        chosen = list(keys)
        with self._lock:
            for key in chosen:
                self._drop(key)
        return self._store.delete_many(chosen)

    def _keep(self, key: str, data: bytes) -> None:
        if f"/{SEGMENTS}" not in key or len(data) > self.budget_bytes // 8:
            return  # manifests are kept by the applier; big segments would evict the rest
        with self._lock:
            self._drop(key)
            self._cached[key] = data
            self._bytes += len(data)
            while self._bytes > self.budget_bytes and self._cached:
                _, evicted = self._cached.popitem(last=False)
                self._bytes -= len(evicted)

    def _drop(self, key: str) -> None:
        data = self._cached.pop(key, None)
        if data is not None:
            self._bytes -= len(data)
