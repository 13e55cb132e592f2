"""The stream core: one batch of enriched events → raw events, sessions, visitor spans, rollups.

Plain Python with no knowledge of who delivers the batch: the embedded runner calls it with events
from ingest in the same process, the Faust agent with events from a Kafka partition.

Per batch, for every visitor it touches, the core reads that visitor's stored events (a visitor id
lives two UTC days, `streams/buckets.py`), and computes the visitor's sessions and spans twice: from
the stored events (what the derived tables hold now) and from stored + new. The difference is
written, then the rollup buckets it touched are rebuilt, and only then are the raw events inserted.
The raw insert is the commit point: a crash before it leaves the stored events as they were, so a
redelivered batch computes the same difference again; a crash after it leaves nothing derived from
sessions or spans unwritten, and the event rollups are rebuilt from the batch's own buckets. Every
number is therefore a function of the deduplicated events, whatever their order, duplicates or
redeliveries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams import events as raw_events
from streams import rollups, sessions, spans
from streams.buckets import bucket_of, history_window, hour_of
from streams.sessions import Session, event_order, sessionize
from streams.spans import Span

log = logging.getLogger(__name__)


@dataclass
class _Changes:
    """What one batch changes, collected over its visitors."""
    sessions: list[Session] = field(default_factory=list)
    dead_sessions: list[Session] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    dead_spans: list[Span] = field(default_factory=list)
    events: list[tuple[Event, int]] = field(default_factory=list)
    session_buckets: set = field(default_factory=set)
    firsts: set = field(default_factory=set)


class StreamCore:
    def __init__(self, client: Client, session_timeout_s: int) -> None:
        self._client = client
        self._timeout = timedelta(seconds=session_timeout_s)
        self.last_batch_ms = 0.0

    def process(self, batch: list[Event], rewrite: bool = False) -> None:
        """Idempotent: processing a batch again, whole or in part, changes no number. `rewrite`
        writes the touched visitors' sessions and spans whole, as if nothing derived were stored
        (for `replay`)."""
        if not batch:
            return
        started = time.perf_counter()
        incoming: dict[tuple[str, int], dict[str, Event]] = defaultdict(dict)
        for e in batch:
            incoming[(e.site_id, e.visitor_id)].setdefault(e.event_id, e)
        times = [e.timestamp for e in batch]
        stored = raw_events.history(self._client, set(incoming), *history_window(min(times), max(times)))

        changes = _Changes()
        for visitor, new in incoming.items():
            self._visitor(visitor, stored.get(visitor, {}), new, changes, rewrite)

        version = time.time_ns()
        sessions.write(self._client, changes.sessions, changes.dead_sessions, version)
        spans.write(self._client, changes.spans, changes.dead_spans, version)
        rollups.rebuild_sessions(self._client, changes.session_buckets, version)
        rollups.rebuild_visitors(self._client, changes.firsts, version)
        raw_events.write(self._client, changes.events)  # the commit point
        version = time.time_ns()
        rollups.rebuild_event_counts(self._client, {(e.site_id, bucket_of(e.timestamp)) for e in batch}, version)
        rollups.rebuild_clicks(self._client, {(e.site_id, hour_of(e.timestamp)) for e in batch if e.name == "click"},
                               version)
        self.last_batch_ms = (time.perf_counter() - started) * 1000

    def _visitor(self, visitor: tuple[str, int], stored: dict[str, Event], new: dict[str, Event],
                 changes: _Changes, rewrite: bool) -> None:
        site_id, visitor_id = visitor
        before_events = [] if rewrite else sorted(stored.values(), key=event_order)
        after_events = sorted({**stored, **new}.values(), key=event_order)
        before = sessionize(before_events, self._timeout)
        after = sessionize(after_events, self._timeout)

        # Sessions: changed or new ones are written, vanished ones get a tombstone.
        before_by_id = {s.session_id: s for s in before}
        after_by_id = {s.session_id: s for s in after}
        for s in after:
            if before_by_id.get(s.session_id) != s:
                changes.sessions.append(s)
                changes.session_buckets.add((site_id, s.bucket))
        for s in before:
            if s.session_id not in after_by_id:
                changes.dead_sessions.append(s)
                changes.session_buckets.add((site_id, s.bucket))

        # Raw events: the new ones, and stored ones whose session changed (a merge).
        was_in = {eid: s.session_id for s in before for eid in s.event_ids}
        for s in after:
            for eid in s.event_ids:
                if eid in new:
                    changes.events.append((new[eid], s.session_id))
                elif was_in.get(eid) != s.session_id:
                    changes.events.append((stored[eid], s.session_id))

        # Spans: likewise, by key (a span whose first bucket moves is a new key).
        old = spans.spans(site_id, visitor_id, before_events, before)
        fresh = spans.spans(site_id, visitor_id, after_events, after)
        for key, span in fresh.items():
            if old.get(key) != span:
                changes.spans.append(span)
                changes.firsts.add((site_id, span.kind, span.first))
        for key, span in old.items():
            if key not in fresh:
                changes.dead_spans.append(span)
                changes.firsts.add((site_id, span.kind, span.first))


async def process_until_written(core: StreamCore, batch: list[Event]) -> None:
    """Run a batch on a worker thread (the ClickHouse client is synchronous), retrying until it
    is written: the events were already answered 202 and are never dropped."""
    delay = 0.1
    while True:
        try:
            await asyncio.to_thread(core.process, batch)
            return
        except Exception:
            log.exception("stream core failed on a batch of %d events; retrying in %.1fs", len(batch), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

