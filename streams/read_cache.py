"""A read-through cache for small registries (sites, API keys) read on every request.

Hits come from memory for a few seconds, then are read again, so a row deleted by another process
(a site, a key) stops being served within that time. A miss asks the database at most once a
second per key, so a row created elsewhere is seen within a second while a flood of unknown keys
costs little. When the database cannot be read, a row read before is served on (and asked for
again a few seconds later): ingest keeps taking events for known sites while ClickHouse is
restarted, as Kafka keeps them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MAX_MISSES = 10_000  # bounded: clients may send any key they like

log = logging.getLogger(__name__)


class ReadThroughCache(Generic[K, V]):
    def __init__(self, load: Callable[[K], V | None], miss_ttl_s: float = 1.0, hit_ttl_s: float = 5.0) -> None:
        self._load = load
        self._miss_ttl_s = miss_ttl_s
        self._hit_ttl_s = hit_ttl_s
        self._hits: dict[K, tuple[V, float]] = {}
        self._misses: dict[K, float] = {}
        self._lock = threading.Lock()

    def answers_without_io(self, key: K) -> bool:
        return self._fresh_hit(key) is not None or self._fresh_miss(key)

    def get(self, key: K) -> V | None:
        if (value := self._fresh_hit(key)) is not None:
            return value
        if self._fresh_miss(key):
            return None
        try:
            value = self._load(key)
        except Exception as exc:
            with self._lock:
                if (stale := self._hits.get(key)) is None:
                    raise
                self._hits[key] = (stale[0], time.monotonic())  # not asked again at once
            log.warning("cannot read %r (%s); serving it as last read", key, exc)
            return stale[0]
        with self._lock:
            if value is None:
                self._hits.pop(key, None)
                if len(self._misses) >= _MAX_MISSES:
                    self._misses.clear()
                self._misses[key] = time.monotonic()
            else:
                self._hits[key] = (value, time.monotonic())
        return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._hits[key] = (value, time.monotonic())
            self._misses.pop(key, None)

    def forget(self, key: K) -> None:
        """The row changed here: the next get reads it again."""
        with self._lock:
            self._hits.pop(key, None)
            self._misses.pop(key, None)

    def _fresh_hit(self, key: K) -> V | None:
        hit = self._hits.get(key)
        return hit[0] if hit is not None and time.monotonic() - hit[1] < self._hit_ttl_s else None

    def _fresh_miss(self, key: K) -> bool:
        return time.monotonic() - self._misses.get(key, -1e9) < self._miss_ttl_s
