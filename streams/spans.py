"""Visitor spans: where one visitor was active, per dimension, as the quarter-hour buckets of its
activity. They make unique visitors exact and additive (SPEC §6: never a sum of per-day uniques).

For a dimension value (the whole site, a page, an event name, an entry source, a country) each
visitor has a set A of active buckets; its *first* bucket is min A. Then, for a period [S, E):

    visitors = Σ_{b in [S, E)} firsts[b]  +  #{visitors with min A < S and some bucket of A in [S, E)}

The first term is a sum over the `visitors_15m` rollup (how many visitors were first seen in each
bucket); the second reads only spans of visitors first seen within VISITOR_LIFETIME before S and
active in more than one bucket (`multi`). A span row holds (first bucket, last bucket, offsets of
every active bucket in quarter hours), and is a pure function of the visitor's events and sessions.

Kinds and what makes a bucket active:
- `total`   any event;
- `page`    a pageview of that path;
- `name`    an event of that name (not pageviews);
- `source`  the start of a session with that entry source (value "source\\x1fchannel");
- `country` the start of a session from that country.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.buckets import BUCKET_S, bucket_of
from streams.sessions import Session
from streams.storage import INSERT_SETTINGS

SOURCE_SEPARATOR = "\x1f"
_MAX_OFFSET = 65535  # UInt16; a visitor's life is two days (192 buckets)


@dataclass(frozen=True, slots=True)
class Span:
    site_id: str
    kind: str
    value: str
    visitor_id: int
    first: datetime
    last: datetime
    offsets: tuple[int, ...]  # every active bucket, in quarter hours after `first` (0 included)

    @property
    def multi(self) -> int:
        return int(len(self.offsets) > 1)

    @property
    def key(self) -> tuple:
        """The row's sorting key: a span whose first bucket or multi changes moves to a new key."""
        return self.site_id, self.kind, self.multi, self.first, self.value, self.visitor_id


def source_value(source: str, channel: str) -> str:
    return f"{source}{SOURCE_SEPARATOR}{channel}"


def spans(site_id: str, visitor_id: int, events: Sequence[Event], sessions: Sequence[Session]) -> dict[tuple, Span]:
    """Every span of one visitor, by key."""
    active: dict[tuple[str, str], set[datetime]] = defaultdict(set)
    for e in events:
        bucket = bucket_of(e.timestamp)
        active[("total", "")].add(bucket)
        if e.is_pageview:
            active[("page", e.pathname)].add(bucket)
        else:
            active[("name", e.name)].add(bucket)
    for s in sessions:
        active[("source", source_value(s.source, s.channel))].add(s.bucket)
        active[("country", s.country)].add(s.bucket)
    out = {}
    for (kind, value), buckets in active.items():
        ordered = sorted(buckets)
        first = ordered[0]
        offsets = tuple(min(int((b - first).total_seconds()) // BUCKET_S, _MAX_OFFSET) for b in ordered)
        span = Span(site_id, kind, value, visitor_id, first, ordered[-1], offsets)
        out[span.key] = span
    return out


_COLUMNS = ["site_id", "kind", "multi", "first_bucket", "value", "visitor_id", "last_bucket", "offsets",
            "version", "is_deleted"]


def _row(s: Span, version: int, deleted: int) -> list:
    return [s.site_id, s.kind, s.multi, s.first, s.value, s.visitor_id, s.last, list(s.offsets), version, deleted]


def write(client: Client, upserts: Iterable[Span], deletes: Iterable[Span], version: int) -> None:
    rows = [_row(s, version, 0) for s in upserts] + [_row(s, version, 1) for s in deletes]
    if rows:
        client.insert("visitor_spans", rows, column_names=_COLUMNS, settings=INSERT_SETTINGS)
