"""Rebuilding every derived table (sessions, activity, rollups) from the raw events, by feeding them
through the stream core again: after a migration that adds or reshapes a derived table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, timedelta
from typing import NamedTuple

from clickhouse_connect.driver.client import Client

from streams import events, migrations, sessions
from streams.buckets import VISITOR_LIFETIME, utc_midnight
from streams.core import StreamCore

log = logging.getLogger(__name__)


class Replayed(NamedTuple):
    events: int  # stored events read
    kept: int  # visitors whose derived rows were left as they are (`_lost_events`)


def replay(client: Client, session_timeout_s: int, batch_size: int = 20_000,
           progress: Callable[[int, int], None] | None = None) -> Replayed:
    """Every stored event through the core, a UTC day at a time. `progress` is told (events
    done, how many in all) after each day."""
    core = StreamCore(client, session_timeout_s)
    days = events.stored_days(client)
    about, total, kept = sum(n for _, n in days), 0, set()
    for day, _ in days:
        day_events = events.of_day(client, day)
        for i in range(0, len(day_events), batch_size):
            batch = day_events[i:i + batch_size]
            lost = _lost_events(client, {(e.site_id, e.visitor_id) for e in batch}, day)
            kept |= lost
            core.process([e for e in batch if (e.site_id, e.visitor_id) not in lost], rewrite=True)
        total += len(day_events)
        if progress:
            progress(total, max(about, total))
    if kept:
        log.info("%d visitors kept their sessions and activity: some of their raw events are gone (the raw-event"
                 " TTL)", len(kept))
    return Replayed(total, len(kept))


def _lost_events(client: Client, visitors: set[tuple[str, int]], day: date) -> set[tuple[str, int]]:
    """Of these visitors seen on this UTC day, those with a stored session that counts more events
    than are stored for it. The raw-event TTL drops whole parts: of a session that crossed the
    cut, the later events stay. Derived again from those, the visitor would get a second, later
    session beside the stored one and count as new on the first day kept (twice in both days);
    so its stored rows, which every number so far came from, are left as they are."""
    # Every event of a visitor id falls within two UTC days (streams/buckets.py): a margin of its
    # lifetime on both sides holds every session it has.
    start, end = utc_midnight(day) - VISITOR_LIFETIME, utc_midnight(day) + timedelta(days=1) + VISITOR_LIFETIME
    stored = events.per_session(client, visitors, start, end)
    return {(site, visitor) for (site, visitor, session), n in sessions.event_counts(client, visitors, start, end).items()
            if stored.get((site, visitor, session), 0) < n}


def upgrade(client: Client, session_timeout_s: int, raw_events_ttl_days: int, cluster: str | None = None) -> list[int]:
    """Migrate (on a cluster, given its name), apply the raw-event retention, and replay the
    stored events when a migration asks for it. Every process runs this at start; returns the
    migrations applied now."""
    on = migrations.Cluster(cluster) if cluster else None
    # A migration that asks for a replay is recorded once the replay is done, so a process killed
    # mid-replay (an OOM kill, a deploy) leaves it for the next start to run again.
    applied = migrations.migrate(client, on, unrecorded=migrations.REPLAY_AFTER)
    migrations.apply_retention(client, raw_events_ttl_days, on)
    if replayed := sorted(migrations.REPLAY_AFTER & set(applied)):
        log.info("rebuilding derived tables from the raw events after migration %s", applied)
        log.info("replayed %d events", replay(client, session_timeout_s).events)
        migrations.record(client, replayed)
    return applied
