"""Since when every raw event is surely stored. The TTL of today says `now - days`; a shorter TTL
the database had before may have deleted more, and raising it again brings nothing back. The
import refuses what the stream core could not place against the visitor's stored events, and
trending reads the edges of its windows from raw events only where they are complete."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from clickhouse_connect.driver.client import Client

from streams.migrations import retention_history
from streams.read_cache import ReadThroughCache

# A TTL changed by another process's start is seen within this long (a rolling deploy).
_READ_EVERY_S = 60.0


def complete_since(history: Sequence[tuple[datetime, int]], now: datetime, days: int) -> datetime:
    """The latest point any TTL in `history` (changed at, days) can have deleted up to, and
    `now - days` (this process's own setting: before its start recorded it, and a margin)."""
    since = now - timedelta(days=days)
    # Each TTL was in force until the next change (the last one: until now).
    for (_, kept_days), (ended_at, _) in zip(history, [*history[1:], (now, 0)]):
        since = max(since, min(ended_at, now) - timedelta(days=kept_days))
    return since


class RawEvents:
    def __init__(self, client: Client, days: int) -> None:
        self.days = days
        self._history = ReadThroughCache(lambda _: retention_history(client), hit_ttl_s=_READ_EVERY_S)

    def complete_since(self, now: datetime) -> datetime:
        return complete_since(self._history.get("history") or [], now, self.days)
