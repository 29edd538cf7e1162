"""A least-recently-used cache bounded by bytes, for synthesized audio."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from prometheus_client import Counter

V = TypeVar("V")

CACHE_HITS = Counter("parley_tts_cache_hits", "Synthesis requests answered from the result cache.")
CACHE_MISSES = Counter("parley_tts_cache_misses", "Synthesis requests the result cache could not answer.")


class ByteLruCache(Generic[V]):
    """LRU cache whose bound is the total size of its values, in bytes.

    Thread-safe. A value larger than the whole cache is not stored. Hits and misses are counted both on
    the instance (``hits``, ``misses``) and in the Prometheus counters ``parley_tts_cache_hits_total`` and
    ``parley_tts_cache_misses_total``.

    Args:
        max_bytes: Bound on the summed sizes of the stored values; 0 disables the cache.
        size_of: Size of a value, in bytes.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = max(0, max_bytes)
        self._size_of = size_of
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        """The value stored under ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                CACHE_MISSES.inc()
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            CACHE_HITS.inc()
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Stores ``value``, evicting the least recently used entries until it fits."""
        size = self._size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_used -= old[1]
            while self._entries and self.bytes_used + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes_used -= evicted
            self._entries[key] = (value, size)
            self.bytes_used += size
