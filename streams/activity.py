"""Visitor activity: what one visitor did, per dimension value and UTC quarter hour — the source of
every rollup (streams/rollups.py), and a pure function of the visitor's events and sessions.

A row (kind, value, bucket, visitor) says the visitor was active there, with:
- `events`, `pageviews`     events (and pageviews) of that value in the bucket;
- `sessions`, `bounces`, `duration_ms`   for the sessions that *started* in the bucket;
- `gap`                     quarter hours since the visitor's previous active bucket for the same
                            value, 0 for its first ever.

Kinds and values: `total` (""), `page` (path; pageviews), `name` (event name; not pageviews),
`source` ("source\\x1fchannel" of a session's first event; rows at session starts), `country`
(of each event, like `page`: a visitor counts in the countries of the period's events), `click` (the product dimensions of an affiliate click), `goal` (the id of a goal the
event matches, streams/goals.py).

Unique visitors over a period [S, E) are then exact and additive: a visitor counts once, in the
first bucket of the period where it was active, which is a bucket b whose gap is 0 or reaches
back before S (gap > (b − S) / 15 min). Rollups keep, per bucket, how many visitors had each gap;
since a visitor id lives two days (streams/buckets.py), only the first VISITOR_LIFETIME of a period
needs the gaps, the rest is a plain sum of first visits.
"""

from __future__ import annotations

from collections.abc import Sequence

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.buckets import BUCKET_S
from streams.goals import Goal, SiteGoals
from streams.sessions import Session

SEPARATOR = "\x1f"


def source_value(source: str, channel: str) -> str:
    return f"{source}{SEPARATOR}{channel}"


def product_value(e: Event) -> str:
    return SEPARATOR.join((e.product_id, e.product_slug, e.category_slug, e.brand_slug, e.partner_slug))


# An activity row's measures, in column order: events, pageviews, sessions, bounces, duration_ms, gap.
Measures = tuple[int, int, int, int, int, int]
# (kind, value, quarter hour as UTC seconds // BUCKET_S)
Key = tuple[str, str, int]


def activity(events: Sequence[Event], sessions: Sequence[Session], goals: Sequence[Goal] = ()) -> dict[Key, Measures]:
    """Every activity row of one visitor, by key. The stream core calls this for every visitor a
    batch touches, so it works on plain tuples, integer quarter hours and inline dict lookups (a
    helper call per row cost a third of its time)."""
    counts: dict[Key, list[int]] = {}
    get = counts.get
    matching = (goals if isinstance(goals, SiteGoals) else SiteGoals(goals)).matching if goals else None
    for e in events:
        quarter = int(e.timestamp.timestamp()) // BUCKET_S
        name = e.name
        total = get(key := ("total", "", quarter))
        if total is None:
            total = counts[key] = [0, 0, 0, 0, 0]
        total[0] += 1
        if name == "pageview":
            total[1] += 1
            keys = [("page", e.pathname, quarter), ("country", e.country, quarter)]
        else:
            keys = [("name", name, quarter), ("country", e.country, quarter)]
        if name == "click" and e.product_id:
            keys.append(("click", product_value(e), quarter))
        if matching is not None:
            keys += [("goal", goal_id, quarter) for goal_id in matching(name, e.pathname)]
        for key in keys:
            found = get(key)
            if found is None:
                counts[key] = [1, 0, 0, 0, 0]
            else:
                found[0] += 1
    for s in sessions:
        quarter = int(s.start.timestamp()) // BUCKET_S
        bounce, duration = int(s.bounce), s.duration_ms
        for key in (("total", "", quarter), ("source", source_value(s.source, s.channel), quarter)):
            measures = get(key)
            if measures is None:
                counts[key] = [0, 0, 1, bounce, duration]
            else:
                measures[2] += 1
                measures[3] += bounce
                measures[4] += duration

    previous: dict[tuple[str, str], int] = {}
    out: dict[Key, Measures] = {}
    for key, (n, pageviews, sessions_, bounces, duration) in sorted(counts.items()):  # keys are unique
        kind, value, quarter = key
        before = previous.get((kind, value))
        previous[(kind, value)] = quarter
        out[key] = (n, pageviews, sessions_, bounces, duration, quarter - before if before is not None else 0)
    return out


_COLUMNS = ["site_id", "kind", "value", "bucket", "visitor_id", "events", "pageviews", "sessions", "bounces",
            "duration_ms", "gap", "version", "is_deleted"]


def write(client: Client, upserts: list[tuple], deletes: list[tuple], version: int) -> None:
    """Insert rows (site, visitor, key, measures); deletes become tombstones. Sent by column: a
    batch writes tens of thousands of rows, and building each as a list cost more than the insert."""
    rows = upserts + deletes
    if not rows:
        return
    keys = [key for _, _, key, _ in rows]
    measures = [m for _, _, _, m in rows]
    columns = [[site for site, _, _, _ in rows], [k[0] for k in keys], [k[1] for k in keys],
               [k[2] * BUCKET_S for k in keys], [visitor for _, visitor, _, _ in rows],  # as UTC seconds
               *([m[i] for m in measures] for i in range(6)),
               [version] * len(rows), [0] * len(upserts) + [1] * len(deletes)]
    client.insert("activity", columns, column_names=_COLUMNS, column_oriented=True)
