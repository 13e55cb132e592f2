"""Visitor activity: what one visitor did, per dimension value and UTC quarter hour — the source of
every rollup (streams/rollups.py), and a pure function of the visitor's events and sessions.

A row (kind, value, bucket, visitor) says the visitor was active there, with:
- `events`, `pageviews`     events (and pageviews) of that value in the bucket;
- `sessions`, `bounces`, `duration_ms`   for the sessions that *started* in the bucket;
- `gap`                     quarter hours since the visitor's previous active bucket for the same
                            value, 0 for its first ever.

Kinds and values: `total` (""), `page` (path; pageviews), `name` (event name; not pageviews),
`source` ("source\\x1fchannel" of a session's first event; rows at session starts), `country`
(likewise), `click` (the product dimensions of an affiliate click), `goal` (the id of a goal the
event matches, streams/goals.py).

Unique visitors over a period [S, E) are then exact and additive: a visitor counts once, in the
first bucket of the period where it was active, which is a bucket b whose gap is 0 or reaches
back before S (gap > (b − S) / 15 min). Rollups keep, per bucket, how many visitors had each gap;
since a visitor id lives two days (streams/buckets.py), only the first VISITOR_LIFETIME of a period
needs the gaps, the rest is a plain sum of first visits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.buckets import BUCKET_S, bucket_of
from streams.goals import Goal
from streams.sessions import Session

SEPARATOR = "\x1f"


def source_value(source: str, channel: str) -> str:
    return f"{source}{SEPARATOR}{channel}"


def product_value(e: Event) -> str:
    return SEPARATOR.join((e.product_id, e.product_slug, e.category_slug, e.brand_slug, e.partner_slug))


@dataclass(frozen=True, slots=True)
class Activity:
    site_id: str
    kind: str
    value: str
    bucket: datetime
    visitor_id: int
    events: int = 0
    pageviews: int = 0
    sessions: int = 0
    bounces: int = 0
    duration_ms: int = 0
    gap: int = 0

    @property
    def key(self) -> tuple:
        return self.site_id, self.kind, self.value, self.bucket, self.visitor_id


def activity(site_id: str, visitor_id: int, events: Sequence[Event], sessions: Sequence[Session],
             goals: Sequence[Goal] = ()) -> dict[tuple, Activity]:
    """Every activity row of one visitor, by key."""
    counts: dict[tuple[str, str, datetime], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for e in events:
        bucket = bucket_of(e.timestamp)
        total = counts[("total", "", bucket)]
        total[0] += 1
        if e.is_pageview:
            total[1] += 1
            counts[("page", e.pathname, bucket)][0] += 1
        else:
            counts[("name", e.name, bucket)][0] += 1
        if e.name == "click" and e.product_id:
            counts[("click", product_value(e), bucket)][0] += 1
        for goal in goals:
            if goal.matches(e.name, e.pathname):
                counts[("goal", goal.goal_id, bucket)][0] += 1
    for s in sessions:
        for kind, value in (("total", ""), ("source", source_value(s.source, s.channel)), ("country", s.country)):
            row = counts[(kind, value, s.bucket)]
            row[2] += 1
            row[3] += int(s.bounce)
            row[4] += s.duration_ms

    previous: dict[tuple[str, str], datetime] = {}
    out = {}
    for (kind, value, bucket), (n, pageviews, sessions_, bounces, duration) in sorted(counts.items()):
        before = previous.get((kind, value))
        gap = int((bucket - before).total_seconds()) // BUCKET_S if before else 0
        previous[(kind, value)] = bucket
        row = Activity(site_id, kind, value, bucket, visitor_id, n, pageviews, sessions_, bounces, duration, gap)
        out[row.key] = row
    return out


_COLUMNS = ["site_id", "kind", "value", "bucket", "visitor_id", "events", "pageviews", "sessions", "bounces",
            "duration_ms", "gap", "version", "is_deleted"]


def _row(a: Activity, version: int, deleted: int) -> list:
    return [a.site_id, a.kind, a.value, a.bucket, a.visitor_id, a.events, a.pageviews, a.sessions, a.bounces,
            a.duration_ms, a.gap, version, deleted]


def write(client: Client, upserts: Iterable[Activity], deletes: Iterable[Activity], version: int) -> None:
    rows = [_row(a, version, 0) for a in upserts] + [_row(a, version, 1) for a in deletes]
    if rows:
        client.insert("activity", rows, column_names=_COLUMNS)
