"""Rebuilding every derived table (sessions, activity, rollups) from the raw events, by feeding them
through the stream core again: after a migration that adds or reshapes a derived table."""

from __future__ import annotations

import logging
from collections.abc import Callable

from clickhouse_connect.driver.client import Client

from streams import events, migrations
from streams.core import StreamCore

log = logging.getLogger(__name__)


def replay(client: Client, session_timeout_s: int, batch_size: int = 20_000,
           progress: Callable[[int, int], None] | None = None) -> int:
    """Every stored event through the core, a UTC day at a time; returns how many. `progress` is
    told (events done, how many in all) after each day."""
    core = StreamCore(client, session_timeout_s)
    days = events.stored_days(client)
    about, total = sum(n for _, n in days), 0
    for day, _ in days:
        day_events = events.of_day(client, day)
        for i in range(0, len(day_events), batch_size):
            core.process(day_events[i:i + batch_size], rewrite=True)
        total += len(day_events)
        if progress:
            progress(total, max(about, total))
    return total


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
        log.info("replayed %d events", replay(client, session_timeout_s))
        migrations.record(client, replayed)
    return applied
