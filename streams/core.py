"""The stream core: one batch of enriched events → raw events, sessions, activity, rollups.

Plain Python with no knowledge of who delivers the batch: the embedded runner calls it with events
from ingest in the same process, the Faust agent with events from a Kafka partition.

Per batch, for every visitor it touches, the core reads that visitor's stored events (a visitor id
lives two UTC days, `streams/buckets.py`), and computes the visitor's sessions and activity
twice: from the stored events (what the derived tables hold now) and from stored + new. The
difference is written, the rollup keys it touched are rebuilt from activity, and only then are
the raw events inserted. The raw insert is the commit point: a crash before it leaves the stored
events as they were, so a redelivered batch computes the same difference again; after it, nothing
is left to write. (One exception, just before the insert: a stored copy of an event that the batch
holds at an earlier time, or under another visitor id, is deleted. Killed between the two,
neither copy is stored, and the redelivered batch stores the batch's as a new event, deriving
what the killed one wrote.) Every number is therefore a function of the deduplicated events,
whatever their order, duplicates or redeliveries.

A core keeps nothing between batches: the "before" half is computed again from the stored events
each time. Remembering it (the last 50,000 visitors, as plain tuples, until 2026-12-03) cost more
than it saved: converting and checking it cost about what computing it does for a visitor's usual
few events, and the collection after each batch scanned it. Without it, `tests/bench/bench_core.py`
ran 1.05–1.46× faster in nine alternating pairs (3 or 20 events a visitor, in one session or in
many), and a process holds ~200 MB less.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from bisect import bisect_left, insort
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta

from clickhouse_connect.driver.client import Client

from besokskollen import metrics
from ingest.event import Event
from streams import activity, rollups, sessions, storage
from streams import events as raw_events
from streams.buckets import history_windows
from streams.goals import GoalRegistry, SiteGoals
from streams.sessions import Session, event_order, sessionize

log = logging.getLogger(__name__)


@dataclass
class _Changes:
    """What one batch changes, collected over its visitors."""
    sessions: list[Session] = field(default_factory=list)
    dead_sessions: list[Session] = field(default_factory=list)
    activity: list[tuple] = field(default_factory=list)  # (site, visitor, key, measures)
    dead_activity: list[tuple] = field(default_factory=list)
    events: list[tuple[Event, int]] = field(default_factory=list)
    rollup_keys: set = field(default_factory=set)  # (site, kind, value, quarter hour) to rebuild
    superseded: set = field(default_factory=set)  # (site, event id, time, visitor) of stored rows to delete


class StreamCore:
    def __init__(self, client: Client, session_timeout_s: int, goals: GoalRegistry | None = None,
                 sole_writer: bool = False) -> None:
        """`sole_writer`: no other core writes events to this database while this one runs (the
        embedded engine: one process per data folder, one core per process), so what a batch read
        cannot change before it writes (`_not_taken_meanwhile` need not ask again)."""
        self._client = client
        self._sole_writer = sole_writer
        self._timeout = timedelta(seconds=session_timeout_s)
        self._goals = goals or GoalRegistry(client)

    def process(self, batch: list[Event], rewrite: bool = False, still_current: Callable[[], bool] | None = None) -> None:
        """Idempotent: processing a batch again, whole or in part, changes no number. `rewrite`
        writes the touched visitors' sessions and activity whole, as if nothing derived were stored
        (for `replay`). `still_current`, asked before the first write, says whether the batch as
        its caller made it is still the one to write; if not, nothing is written (`BatchChanged`)."""
        if not batch:
            return
        with collection_paused():
            self._process(batch, rewrite, still_current)

    def _process(self, batch: list[Event], rewrite: bool, still_current: Callable[[], bool] | None) -> None:
        # Taken before anything is read: a batch held up after its reads (a worker that lost its
        # partitions mid-batch, beyond the rebalance timeout) writes rows older than those of a
        # batch that read after it, and under FINAL the later reader's rows win.
        version = time.time_ns()
        clock = time.perf_counter()
        # Keyed by (site_id, event_id): imported ids are stored as given, and one site's copy of
        # an id must not stand for (or drop) another site's.
        by_id = raw_events.first_arrivals(batch)
        stored_as = {key: owner for key, owner in raw_events.owners(self._client, list(by_id.values())).items()
                     if key in by_id}
        # Of a client's copies of one event (its retry: the id again, a later arrival time), the
        # earliest counts, whichever was processed first: a later copy is dropped, and an earlier
        # one (an original that waited in another ingest's spool while its retry went through)
        # takes the stored copy's place, whose raw row is deleted before the commit point
        # (`_visitor` finds it in the visitor's history; under another visitor it is `leaving`).
        replaced: list[raw_events.Owner] = []
        for key, owner in stored_as.items():
            if owner.timestamp < by_id[key].timestamp:
                del by_id[key]
            elif owner.timestamp > by_id[key].timestamp:
                replaced.append(owner)
        # Every copy of the ids kept, in delivery order: an attempt killed midway saw a prefix of
        # them, in which a later copy (a retry delivered first) may have been the one kept.
        delivered: dict[tuple[str, int], list[Event]] = defaultdict(list)
        for e in batch:
            if (e.site_id, e.event_id) in by_id:
                delivered[(e.site_id, e.visitor_id)].append(e)
        batch = list(by_id.values())
        incoming: dict[tuple[str, int], dict[str, Event]] = defaultdict(dict)
        for e in batch:
            incoming[(e.site_id, e.visitor_id)][e.event_id] = e
        # An event sent again under another visitor id (an import after its day's salt expired,
        # a visitor id decided differently) moves: the visitor it was stored under loses it.
        leaving: dict[tuple[str, int], set[str]] = defaultdict(set)
        for key, owner in stored_as.items():
            if key in by_id and key[1] not in incoming.get(owner[:2], {}):
                leaving[owner[:2]].add(key[1])
        days: dict[tuple[str, int], set[date]] = defaultdict(set)
        for e in batch:
            days[(e.site_id, e.visitor_id)].add(e.timestamp.date())
        for visitor, event_ids in leaving.items():
            days[visitor] |= {stored_as[(visitor[0], event_id)].timestamp.date() for event_id in event_ids}
        for owner in replaced:  # the copy to replace is read with its visitor's history
            days[owner[:2]].add(owner.timestamp.date())
        clock = _stage("ids", clock)
        stored = self._history(days)
        clock = _stage("history", clock)

        # The stored rows of events moving to another visitor are deleted too (with those an
        # earlier copy replaces, `_visitor`): a moved event's new row has the same key, but until
        # the two merge a read of the old visitor's events (`history`, by visitor, without FINAL)
        # found the old row alone and put the event back in that visitor's sessions.
        changes = _Changes(superseded={(site, event_id, stored_as[(site, event_id)].timestamp, visitor)
                                       for (site, visitor), event_ids in leaving.items() for event_id in event_ids})
        visitors = incoming.keys() | leaving.keys()
        goals = self._goals.for_sites({site_id for site_id, _ in visitors})
        for visitor in visitors:
            self._visitor(visitor, stored.get(visitor, {}), incoming.get(visitor, {}), delivered.get(visitor, []),
                          leaving.get(visitor, set()), goals[visitor[0]], changes, rewrite)

        # A worker's batch leaves out a deleted site's events by what the site registry said before
        # the reads. A process frozen since (SIGSTOP, a VM pause) across a delete and re-create of
        # the site would write them for the new one: asked again here, in front of the writes.
        if still_current is not None and not still_current():
            raise BatchChanged
        clock = _stage("derive", clock)
        sessions.write(self._client, changes.sessions, changes.dead_sessions, version)
        clock = _stage("sessions", clock)
        activity.write(self._client, changes.activity, changes.dead_activity, version)
        clock = _stage("activity", clock)
        rollups.rebuild(self._client, changes.rollup_keys)
        clock = _stage("rollups", clock)
        # Killed after this and before the commit point, the redelivered batch finds neither copy
        # stored and derives what this one wrote.
        raw_events.delete(self._client, sorted(changes.superseded))
        raw_events.write(self._client, self._not_taken_meanwhile(changes.events), version)  # the commit point
        _stage("raw_events", clock)
        for table, rows in (("sessions", len(changes.sessions) + len(changes.dead_sessions)),
                            ("activity", len(changes.activity) + len(changes.dead_activity)),
                            ("rollup_keys", len(changes.rollup_keys)), ("events", len(changes.events))):
            metrics.ROWS_WRITTEN.labels(table).inc(rows)

    def _not_taken_meanwhile(self, rows: list[tuple[Event, int]]) -> list[tuple[Event, int]]:
        """The rows to store, less retries whose original another core stored since this batch
        read: a worker stalled past the rebalance timeout writes after its partitions' new owner,
        which read the retry and its original and kept the original. The stalled copies of events
        at their own times lose to the owner's (older version), but a retry at another time is
        another row, a second event. Server-made ids (UUIDv7) are not asked about: stamped on
        arrival, they are never retried. Asking about every event cost ~150 ms a 5,000-event batch
        (chDB in-process, 40,000 events stored)."""
        if self._sole_writer:
            return rows
        maybe = [e for e, _ in rows if e.event_id[14:15] != "7"]
        if not maybe:
            return rows
        stored = raw_events.owners(self._client, maybe)
        taken = {key for e in maybe if (owner := stored.get(key := (e.site_id, e.event_id))) is not None
                 and owner.timestamp != e.timestamp}
        if taken:
            log.warning("%d retries' originals were stored by another worker since this batch read them; the retries"
                        " are dropped", len(taken))
        return [(e, session) for e, session in rows if (e.site_id, e.event_id) not in taken]

    def _history(self, days: dict[tuple[str, int], set[date]]) -> dict:
        """Stored events of these visitors (seen on these UTC days), one query per stretch of days
        the batch covers (`history_windows`)."""
        stored: dict = {}
        for start, end, members in history_windows((v, min(dates), max(dates)) for v, dates in days.items()):
            stored.update(raw_events.history(self._client, set(members), start, end))
        return stored

    def _visitor(self, visitor: tuple[str, int], stored: dict[str, Event], new: dict[str, Event],
                 delivered: list[Event], gone: set[str], goals: SiteGoals, changes: _Changes, rewrite: bool) -> None:
        site_id, visitor_id = visitor
        # An id this visitor already has at an earlier time is a retry (from beyond RETRY_WINDOW
        # too): the stored copy stays. At a later time, the stored copy is the retry: replaced.
        def not_a_late_retry(e: Event) -> bool:
            return (known := stored.get(e.event_id)) is None or e.timestamp <= known.timestamp

        if stored:  # a new visitor (most of a batch's) has nothing to filter
            new = {event_id: e for event_id, e in new.items() if not_a_late_retry(e)}
            delivered = list(filter(not_a_late_retry, delivered))
            changes.superseded |= {(site_id, event_id, known.timestamp, visitor_id) for event_id, e in new.items()
                                   if (known := stored.get(event_id)) is not None and known.timestamp > e.timestamp}
        after = {**stored, **new}
        for event_id in gone:
            after.pop(event_id, None)
        after_events = sorted(after.values(), key=event_order)
        after_sessions = sessionize(after_events, self._timeout)
        fresh = activity.activity(after_events, after_sessions, goals)

        if rewrite:
            before_sessions, old = [], {}
        else:
            before_events = sorted(stored.values(), key=event_order)
            before_sessions = sessionize(before_events, self._timeout)
            old = activity.activity(before_events, before_sessions, goals) if before_events else {}
            if before_sessions == after_sessions and old == fresh:  # only events seen before
                # Nothing derived changes, but a copy sent again with fields no number reads (a
                # click's page, props: a corrected import line) still replaces the stored event.
                session_of = {eid: s.session_id for s in after_sessions for eid in s.event_ids}
                changes.events += [(e, session_of[eid]) for eid, e in new.items()
                                   if eid not in stored or raw_events.as_stored(e) != stored[eid]]
                return

        # A batch redelivered after a kill between its derived rows and its raw events (the commit
        # point) starts at the same offset: the killed attempt wrote what a prefix of these
        # events, in delivery order, derives. In time order no prefix derives a session or row
        # that the whole set drops or restores; out of time order one can (a later-delivered,
        # earlier event moves a session's start or joins two sessions; a retry delivered before
        # its original was kept until the original came). Then every row is written whole, and
        # every session and row some prefix derives gets a tombstone unless kept.
        maybe_written = (self._prefix_rows(stored, delivered, gone, goals, stored_rows_known=not rewrite)
                         if _out_of_time_order(delivered) else None)

        # Sessions: changed or new ones are written, vanished ones get a tombstone.
        before_by_id = {s.session_id: s for s in before_sessions}
        after_by_id = {s.session_id: s for s in after_sessions}
        if maybe_written is None:
            changes.sessions += [s for s in after_sessions if before_by_id.get(s.session_id) != s]
            changes.dead_sessions += [s for s in before_sessions if s.session_id not in after_by_id]
        else:
            changes.sessions += after_sessions
            changes.dead_sessions += [s for session_id, s in {**maybe_written[0], **before_by_id}.items()
                                      if session_id not in after_by_id]

        # Raw events: the new ones, and stored ones whose session changed (a merge).
        was_in = {eid: s.session_id for s in before_sessions for eid in s.event_ids}
        for s in after_sessions:
            for eid in s.event_ids:
                if eid in new:
                    changes.events.append((new[eid], s.session_id))
                elif was_in.get(eid) != s.session_id:
                    changes.events.append((stored[eid], s.session_id))

        # Activity: likewise, by key; the rollup key of every changed row is rebuilt.
        for key, measures in fresh.items():
            if maybe_written is not None or old.get(key) != measures:
                changes.activity.append((site_id, visitor_id, key, measures))
                changes.rollup_keys.add((site_id, *key))
        for key, measures in (old if maybe_written is None else {**maybe_written[1], **old}).items():
            if key not in fresh:
                changes.dead_activity.append((site_id, visitor_id, key, measures))
                changes.rollup_keys.add((site_id, *key))

    def _prefix_rows(self, stored: dict[str, Event], delivered: list[Event], gone: set[str],
                     goals: tuple, stored_rows_known: bool = False) -> tuple[dict[int, Session], dict]:
        """The sessions (by id) and activity rows that the stored events with some proper prefix
        of `delivered` derive, each prefix keeping one copy of an id as `first_arrivals` does.
        Only their keys matter (they become tombstones where the whole set drops them), so the
        prefixes are followed incrementally: a row's key comes from one event, or from the first
        event of a session, and from one prefix to the next only the added copy, or the successor
        of the copy it replaced, can become a session's first event. (Sessionizing every prefix
        whole was quadratic: a 5,000-event batch of one visitor at one time took 36 s.)
        `stored_rows_known`: the caller has the stored events' own activity keys (its `old`), so
        a stored copy's event rows are left out (a visitor with 80,000 stored events spent 0.35 s
        a batch listing them again); the rows of the sessions they start in a prefix are not."""
        present = {event_id: e for event_id, e in stored.items() if event_id not in gone}
        order = sorted(map(event_order, present.values()))
        timeout = self._timeout
        ever: list[Event] = []  # every copy some prefix holds
        firsts: list[Event] = []  # every copy that starts a session in some prefix

        def starts(position: int) -> bool:
            return position == 0 or order[position][0] - order[position - 1][0] >= timeout

        kept: dict[str, Event] = {}
        for step, e in enumerate(delivered[:-1]):
            if (copy := kept.get(e.event_id)) is not None and copy.timestamp < e.timestamp:
                continue  # a retry after the copy already in this prefix: that one stays
            kept[e.event_id] = e
            successor = None
            if (old := present.get(e.event_id)) is not None:
                position = bisect_left(order, event_order(old))
                del order[position]
                successor = order[position] if position < len(order) else None
            present[e.event_id] = e
            insort(order, event_order(e))
            if step == 0:  # the first prefix: every copy it holds, every session start
                ever += [e] if stored_rows_known else present.values()
                firsts += [present[order[i][1]] for i in range(len(order)) if starts(i)]
                continue
            ever.append(e)
            for candidate in (event_order(e), successor):
                if candidate is not None and starts(bisect_left(order, candidate)):
                    firsts.append(present[candidate[1]])

        sessions_seen = {}
        rows_seen: dict = {}
        for e in firsts:
            session = sessionize([e], timeout)[0]
            sessions_seen.setdefault(session.session_id, session)
            rows_seen.update(activity.activity([e], [session], goals))
        for e in ever:
            rows_seen.update(activity.activity([e], (), goals))
        return sessions_seen, rows_seen


def _stage(name: str, started: float) -> float:
    """Add the time since `started` to the stage's (`bk_stream_stage_seconds_total`); returns now."""
    now = time.perf_counter()
    metrics.STAGE_SECONDS.labels(name).inc(now - started)
    return now


def _out_of_time_order(events) -> bool:
    """Whether some event was delivered after a later one (by `event_order`)."""
    latest = None
    for e in events:
        order = event_order(e)
        if latest is not None and order < latest:
            return True
        latest = order if latest is None else max(latest, order)
    return False


_pauses = threading.Lock()
_paused = 0  # batches running with the cyclic garbage collector paused, in any thread
_was_enabled = True


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch runs. A batch allocates hundreds of
    thousands of containers (events, sessions, activity dicts), nearly all freed by reference
    counting when it ends, and almost no cycles; but the allocations alone set off the collector:
    in a `tests/bench/bench_core.py` run of ~10 s (its setup included), ~3,000 young and ~14 full
    collections took 2.9 s (a full one ~130 ms, holding the GIL). Cycles made meanwhile, in this
    or another thread, are collected once the batch is done: the first allocation after it sets
    off a collection."""
    global _paused, _was_enabled
    with _pauses:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _pauses:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


class BatchChanged(Exception):
    """What a batch is to hold changed while it was processed; it is made and processed again."""


async def process_until_written(core: StreamCore, batch: list[Event] | Callable[[], list[Event]],
                                still_current: Callable[[], bool] | None = None) -> int:
    """Run a batch on a worker thread (the ClickHouse client is synchronous), retrying until it
    is written: the events were already answered 202 and are never dropped. `batch` may be a
    function that makes it there, at each attempt (it may read ClickHouse too, and what it reads
    may have changed by a retry); `still_current` goes to `StreamCore.process`. Returns its size."""
    def write() -> int:
        events = batch() if callable(batch) else batch
        core.process(events, still_current=still_current)
        return len(events)

    delay, said = 0.1, None
    while True:
        try:
            return await asyncio.to_thread(write)
        except BatchChanged:
            log.info("a site of the batch was deleted and created again while the batch was processed; processing it"
                     " again")
        except Exception as exc:
            # The traceback once, then a line a retry while it is the same failure: a ClickHouse
            # away under load wrote ~100 lines of urllib3's chain every 5 s.
            failure = (type(exc), storage.reason(exc))
            if failure != said:
                log.exception("the stream core failed on a batch; retrying in %.1fs", delay)
                said = failure
            else:
                log.error("the stream core failed on the batch again (%s: %s); retrying in %.1fs", failure[0].__name__,
                          failure[1], delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
