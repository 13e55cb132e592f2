"""A read-through cache for small registries (sites, API keys) read on every request.

Hits come from memory for a few seconds, then are read again, so a row deleted by another process
(a site, a key) stops being served within that time. A miss asks the database at most once a
second per key, so a row created elsewhere is seen within a second. With `known` (every key
there is, read in one query at most once a second): once more than MISSES_PER_S unknown keys a
second were asked for (a flood of made-up site ids or API keys), a key not on that list is a miss
without a query of its own, so the flood costs one query a second, not one each. When the database cannot be read, a row read before is served on (and asked for
again a few seconds later): ingest keeps taking events for known sites while ClickHouse is
restarted, as Kafka keeps them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MAX_MISSES = 10_000  # bounded: clients may send any key they like
MISSES_PER_S = 20

log = logging.getLogger(__name__)


class ReadThroughCache(Generic[K, V]):
    def __init__(self, load: Callable[[K], V | None], miss_ttl_s: float = 1.0, hit_ttl_s: float = 5.0,
                 known: Callable[[], Iterable[K]] | None = None) -> None:
        self._load = load
        self._miss_ttl_s = miss_ttl_s
        self._hit_ttl_s = hit_ttl_s
        self._hits: dict[K, tuple[V, float]] = {}
        self._misses: dict[K, float] = {}
        self._lock = threading.Lock()
        self._load_known = known
        self._known: tuple[frozenset[K], float] = (frozenset(), -1e9)
        self._known_lock = threading.Lock()  # one reader of the key list at a time
        self._miss_second = 0  # the monotonic second the count below is of
        self._misses_in_second = 0

    def answers_without_io(self, key: K) -> bool:
        return self._fresh_hit(key) is not None or self._fresh_miss(key)

    def get(self, key: K) -> V | None:
        if (value := self._fresh_hit(key)) is not None:
            return value
        if self._fresh_miss(key):
            return None
        if self._flooded() and not self._among_known(key):
            self._note_miss(key)
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
        if value is None:
            self._note_miss(key)
        else:
            with self._lock:
                self._hits[key] = (value, time.monotonic())
        return value

    def _note_miss(self, key: K) -> None:
        now = time.monotonic()
        with self._lock:
            self._hits.pop(key, None)
            if len(self._misses) >= _MAX_MISSES:
                self._misses.clear()
            self._misses[key] = now
            if int(now) != self._miss_second:
                self._miss_second, self._misses_in_second = int(now), 0
            self._misses_in_second += 1

    def _flooded(self) -> bool:
        return (self._load_known is not None and self._misses_in_second > MISSES_PER_S
                and int(time.monotonic()) - self._miss_second <= 1)

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
        now = time.monotonic()
        if now - self._misses.get(key, -1e9) < self._miss_ttl_s:
            return True
        known, read_at = self._known
        return self._flooded() and now - read_at < self._miss_ttl_s and key not in known

    def _among_known(self, key: K) -> bool:
        """Whether the key is among those that exist (read again when a second old). When they
        cannot be read, the key's own query decides."""
        with self._known_lock:
            known, read_at = self._known
            if time.monotonic() - read_at >= self._miss_ttl_s:
                try:
                    self._known = known, read_at = frozenset(self._load_known()), time.monotonic()
                except Exception as exc:
                    log.warning("cannot read the list of keys (%s); asking for each", exc)
                    return True
        return key in known
