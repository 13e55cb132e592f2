"""A read-through cache for small registries (sites, API keys) read on every request.

Hits come from memory for a few seconds, then are read again, so a row deleted by another process
(a site, a key) stops being served within that time. A miss asks the database at most once a
second per key, so a row created elsewhere is seen within a second. With `known` (every key
there is, read in one query at most once a second): once more than MISSES_PER_S unknown keys a
second were asked for (a flood of made-up site ids or API keys), a key not on that list is a miss
without a query of its own, so the flood costs one query a second, not one each. When the database cannot be read, a row read before is served on (and asked for
again a few seconds later): ingest keeps taking events for known sites while ClickHouse is
restarted, as Kafka keeps them. While one caller reads a key again, the others get its value as
last read rather than read it too: on a hung ClickHouse each read waits out its timeout, and every
thread of ingest's pool did, answering nothing for 4 s in every 9 (an audit, 2026-12-05).
With `read_ahead`, a value asked for past half its time is read again by a thread of the
cache's own, so no request waits for that read (the one that did waited ~4 s on a hung
ClickHouse); while that read runs every value is served as last read, and a read that fails
serves every value on for another while. A value not asked for in its second half is read when
next asked, before it is served, as without.

With `load_many` (a query for many keys at once), a key read again takes along every other value
past half its time that was asked for in the last TAKEN_ALONG_IF_USED_S, and `get_many` reads
what a batch needs in one query. With thousands of sites, each seen less often than every few
seconds, a query per site and event (ingest's site, the stream core's goals) held ingest at ~280
events/s where it takes ~2,800 this way (a many-tenant audit, 2026-12-05)."""

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
_MAX_TAKEN_ALONG = 10_000  # values a read takes along (`load_many`): one statement's worth
TAKEN_ALONG_IF_USED_S = 60.0

log = logging.getLogger(__name__)


class ReadThroughCache(Generic[K, V]):
    def __init__(self, load: Callable[[K], V | None], miss_ttl_s: float = 1.0, hit_ttl_s: float = 5.0,
                 known: Callable[[], Iterable[K]] | None = None,
                 load_many: Callable[[list[K]], dict[K, V]] | None = None, read_ahead: bool = False) -> None:
        """`load_many`: the values of the keys that have one (the others are misses)."""
        self._read_ahead = read_ahead
        self._reading_ahead = False  # one read ahead at a time (with `load_many` it takes along the others due)
        self._load = load
        self._load_many = load_many
        self._taking_along = threading.Lock()  # one read that takes others along at a time
        self._used: dict[K, float] = {}  # when each value was last asked for (with `load_many`)
        self._changes = 0  # `put`s and `forget`s: a read for many keys begun before one keeps nothing
        self._miss_ttl_s = miss_ttl_s
        self._hit_ttl_s = hit_ttl_s
        self._hits: dict[K, tuple[V, float]] = {}
        self._reading: set[K] = set()  # keys with a value whose read again is under way
        self._misses: dict[K, float] = {}
        self._lock = threading.Lock()
        self._load_known = known
        self._known: tuple[frozenset[K], float] = (frozenset(), -1e9)
        self._known_lock = threading.Lock()  # one reader of the key list at a time
        self._miss_second = 0  # the monotonic second the count below is of
        self._misses_in_second = 0

    def answers_without_io(self, key: K) -> bool:
        return self._fresh_hit(key) is not None or self._fresh_miss(key) or self._read_by_another(key) is not None

    def get(self, key: K) -> V | None:
        if (value := self._fresh_hit(key)) is not None:
            if self._load_many is not None:
                self._used[key] = time.monotonic()
            if self._read_ahead:
                self._start_reading_ahead(key)
            return value
        if self._fresh_miss(key):
            return None
        changes = self._changes
        if self._flooded() and not self._among_known(key):
            self._note_miss(key, changes)  # not over a `put` made while the list was read
            return None
        with self._lock:
            if (stale := self._read_by_another(key)) is not None:
                return stale
            if (again := key in self._hits):
                self._reading.add(key)
        try:
            return self._read_again_or_anew(key)
        finally:
            if again:
                with self._lock:
                    self._reading.discard(key)

    def _start_reading_ahead(self, key: K) -> None:
        """Read the key again on a thread of its own if it is past half its time. While that read
        runs (on a hung ClickHouse, its timeout), callers get every value as last read, also past
        its time (`_read_by_another`): the read is asking the database for them all, the ones it
        takes along, and it says soon whether the database answers (if not, all are served on)."""
        hit = self._hits.get(key)
        if hit is None or self._reading_ahead or time.monotonic() - hit[1] <= self._hit_ttl_s / 2:
            return
        with self._lock:
            if self._reading_ahead or key in self._reading:
                return
            self._reading_ahead = True
        # Not a daemon: the interpreter waits for the read (bounded by the client's timeouts) rather
        # than end under it while the embedded ClickHouse is closed.
        try:
            threading.Thread(target=self._read_ahead_of_time, args=(key,), name="read-ahead").start()
        except RuntimeError as exc:  # no thread to be had: the value is read when due, as without
            self._reading_ahead = False
            log.warning("cannot read %r ahead (%s)", key, exc)

    def _read_ahead_of_time(self, key: K) -> None:
        try:
            self._read_again_or_anew(key)
        except Exception as exc:  # noqa: BLE001 - the row was forgotten meanwhile: its next get reads it
            log.debug("reading %r ahead failed: %s", key, exc)
        finally:
            self._reading_ahead = False

    def _read_by_another(self, key: K) -> V | None:
        """The key's value as last read, while another caller reads it again, or while the cache
        reads ahead."""
        hit = self._hits.get(key)
        return hit[0] if hit is not None and (self._reading_ahead or key in self._reading) else None

    def _read_again_or_anew(self, key: K) -> V | None:
        changes = self._changes
        try:
            value = self._read(key)
        except Exception as exc:
            # The database cannot be read: every value read before is served on, and asked for
            # again a few seconds later, not by each next caller (an audit: with only this key
            # served on, the other sites' reads, due one after another, each held a request).
            with self._lock:
                now = time.monotonic()
                self._hits = {k: (v, now) for k, (v, _) in self._hits.items()}
                if (stale := self._hits.get(key)) is None:
                    raise
            log.warning("cannot read %r (%s); serving it as last read, and every other value too", key, exc)
            return stale[0]
        if value is None:
            self._note_miss(key, changes)
        else:
            self._store([key], {key: value}, changes)
            if self._load_many is not None:
                self._used[key] = time.monotonic()
        return value

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The values of these keys that have one; what is not fresh is read in one query (with
        `load_many`; else one each). Not for keys from clients: no flood check."""
        out: dict[K, V] = {}
        due = []
        for key in keys:
            if (value := self._fresh_hit(key)) is not None:
                out[key] = value
            elif not self._fresh_miss(key):
                due.append(key)
        if not due:
            return out
        if self._load_many is None:
            return out | {key: value for key in due if (value := self.get(key)) is not None}
        changes = self._changes
        found = self._load_many(due)
        self._store(due, found, changes)
        return out | {key: found[key] for key in due if key in found}

    def _read(self, key: K) -> V | None:
        """The key's value from the database, with every other entry past half its time when one
        query can read many (and no other thread is doing so: those read theirs alone)."""
        if self._load_many is None or not self._taking_along.acquire(blocking=False):
            return self._load(key)
        try:
            now = time.monotonic()
            used = self._used.copy()  # one C call: `get` adds to it without the lock
            for k in [k for k, at in used.items() if now - at > TAKEN_ALONG_IF_USED_S]:
                del self._used[k]
            with self._lock:
                along = [k for k, at in used.items() if k != key and now - at <= TAKEN_ALONG_IF_USED_S
                         and (hit := self._hits.get(k)) is not None and now - hit[1] > self._hit_ttl_s / 2]
            keys = [key, *along[:_MAX_TAKEN_ALONG]]
            changes = self._changes
            found = self._load_many(keys)
            self._store(keys[1:], found, changes)
            return found.get(key)
        finally:
            self._taking_along.release()

    def _store(self, keys: list[K], found: dict[K, V], changes: int) -> None:
        """Keep what a read for these keys found; a key without a value is a miss (not counted
        towards a flood: nobody asked for it). Nothing if a row changed here since the read began:
        the read may predate it (a site deleted here would be served on)."""
        now = time.monotonic()
        with self._lock:
            if changes != self._changes:
                return
            for key in keys:
                if key in found:
                    self._hits[key] = (found[key], now)
                    self._misses.pop(key, None)
                else:
                    self._keep_miss(key, now)

    def _keep_miss(self, key: K, now: float) -> None:
        """(Under the lock.)"""
        self._hits.pop(key, None)
        if len(self._misses) >= _MAX_MISSES:
            self._misses.clear()
        self._misses[key] = now

    def _note_miss(self, key: K, changes: int | None = None) -> None:
        """`changes` as a read for the key began: a miss read before a change made here (a site
        created here meanwhile) is not kept."""
        now = time.monotonic()
        with self._lock:
            if changes is None or changes == self._changes:
                self._keep_miss(key, now)
            if int(now) != self._miss_second:
                self._miss_second, self._misses_in_second = int(now), 0
            self._misses_in_second += 1

    def _flooded(self) -> bool:
        return (self._load_known is not None and self._misses_in_second > MISSES_PER_S
                and int(time.monotonic()) - self._miss_second <= 1)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._changes += 1
            self._hits[key] = (value, time.monotonic())
            self._misses.pop(key, None)

    def forget(self, key: K) -> None:
        """The row changed here: the next get reads it again."""
        with self._lock:
            self._changes += 1
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
