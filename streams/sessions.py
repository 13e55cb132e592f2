"""Sessions (SPEC §6): the events of one (site, visitor) with gaps shorter than the timeout.

`sessionize` is a pure function of a visitor's deduplicated events, so the sessions do not depend
on the order or the number of times events arrive: a late event that fills the gap between two
sessions joins them, one that arrives twice changes nothing. A session's id is a hash of (site,
visitor, first event time): the same events always give the same ids, and a session that gains an
earlier first event gets a new id while its old row is deleted (a tombstone)."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import NamedTuple

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.buckets import VISITOR_LIFETIME, bucket_of, utc_midnight


class Session(NamedTuple):
    """A tuple (built in C: a frozen dataclass's 20 field assignments cost ~6 µs here, and the stream
    core builds one per session of every visitor it touches, before and after)."""
    site_id: str
    visitor_id: int
    session_id: int
    start: datetime
    end: datetime
    entry_page: str
    exit_page: str
    pageviews: int
    events: int
    # Attributes of the session's first event: where it came from and who it was.
    source: str
    channel: str
    referrer: str
    utm_source: str
    utm_medium: str
    utm_campaign: str
    country: str
    device: str
    browser: str
    os: str
    # Each event's name and, for a pageview, its page ("" for other events), in the session's
    # order: funnels read a session's steps from these (query_api/funnels.py).
    event_names: tuple[str, ...] = ()
    event_pages: tuple[str, ...] = ()
    event_ids: tuple[str, ...] = ()  # last: equality and hashing leave it out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and self[:-1] == other[:-1]

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self[:-1])

    @property
    def bucket(self) -> datetime:
        return bucket_of(self.start)

    @property
    def bounce(self) -> bool:
        """At most one pageview and no other event."""
        return self.events <= 1 and self.pageviews == self.events

    @property
    def duration_ms(self) -> int:
        # In integers: through float seconds, 1,482 of the durations up to 200 s came out 1 ms short
        # (1.001 s · 1000 = 1000.9999…).
        return (self.end - self.start) // _MILLISECOND


_MILLISECOND = timedelta(milliseconds=1)
_DAY = timedelta(days=1)

# A session id is its start (UTC seconds) in the high 32 bits and a hash of (site, visitor, start)
# in the low 32: the same events give the same id, and "sessions that started in a period" is a
# range of ids — a query over events needs no join with `sessions` (migration 12's fill).
SESSION_START_SHIFT = 32


# Asked again for every session of every visitor a batch touches (~6 µs each, mostly isoformat).
# Starts are always UTC (`Event`, stored events), so equal starts give equal ids, cached or not.
@lru_cache(maxsize=100_000)
def session_id_for(site_id: str, visitor_id: int, start: datetime) -> int:
    digest = hashlib.blake2b(f"{site_id}\x00{visitor_id}\x00{start.isoformat()}".encode(), digest_size=4)
    return (int(start.timestamp()) << SESSION_START_SHIFT) | int.from_bytes(digest.digest(), "big")


# An event's place in its visitor's order, (timestamp, event_id): events of equal time are ordered
# by id, so entry and exit pages never depend on arrival. A C getter: it is the sort key of every
# visitor a batch touches.
event_order: Callable[[Event], tuple[datetime, str]] = operator.attrgetter("timestamp", "event_id")


def sessionize(events: Sequence[Event], timeout: timedelta) -> list[Session]:
    """Sessions of one visitor's events, which must be sorted by `event_order`."""
    sessions: list[Session] = []
    run: list[Event] = []
    for e in events:
        if run and e.timestamp - run[-1].timestamp >= timeout:
            sessions.append(_session(run))
            run = []
        run.append(e)
    if run:
        sessions.append(_session(run))
    return sessions


def _session(run: list[Event]) -> Session:
    first, last = run[0], run[-1]
    names = tuple([e.name for e in run])
    event_pages = tuple([e.pathname if name == "pageview" else "" for e, name in zip(run, names)])
    pages = [page for page, name in zip(event_pages, names) if name == "pageview"]
    # Positional, in field order, from lists rather than generators: ~3 µs a session here against
    # ~5 with keywords, and this runs for every session of every visitor a batch touches.
    return Session(
        first.site_id, first.visitor_id, session_id_for(first.site_id, first.visitor_id, first.timestamp),
        first.timestamp, last.timestamp, pages[0] if pages else "", pages[-1] if pages else "", len(pages), len(run),
        first.source, first.channel, first.referrer, first.utm_source, first.utm_medium, first.utm_campaign,
        first.country, first.device, first.browser, first.os, names, event_pages, tuple([e.event_id for e in run]),
    )


_COLUMNS = ["site_id", "visitor_id", "session_id", "start", "end", "entry_page", "exit_page", "pageviews",
            "events", "bounce", "duration_ms", "source", "channel", "referrer", "utm_source", "utm_medium",
            "utm_campaign", "country", "device", "browser", "os", "event_names", "event_pages", "version", "is_deleted"]


def _row(s: Session, version: int, deleted: int) -> list:
    return [s.site_id, s.visitor_id, s.session_id, s.start, s.end, s.entry_page, s.exit_page, s.pageviews,
            s.events, int(s.bounce), s.duration_ms, s.source, s.channel, s.referrer, s.utm_source,
            s.utm_medium, s.utm_campaign, s.country, s.device, s.browser, s.os, s.event_names, s.event_pages, version,
            deleted]


def write(client: Client, upserts: Iterable[Session], deletes: Iterable[Session], version: int) -> None:
    """Rows for new or changed sessions, tombstones for sessions that no longer exist."""
    rows = [_row(s, version, 0) for s in upserts] + [_row(s, version, 1) for s in deletes]
    if rows:
        client.insert("sessions", rows, column_names=_COLUMNS)


def event_counts(client: Client, visitors: set[tuple[str, int]], start: datetime, end: datetime
                 ) -> dict[tuple[str, int, int], int]:
    """How many events each session of these (site, visitor) pairs that started between start
    and end counts."""
    if not visitors:
        return {}
    rows = client.query(
        "SELECT site_id, visitor_id, session_id, events FROM sessions FINAL WHERE site_id IN {sites:Array(String)}"
        " AND start >= {start:DateTime64(3, 'UTC')} AND start < {end:DateTime64(3, 'UTC')}"
        " AND visitor_id IN {visitors:Array(UInt64)}",
        parameters={"sites": sorted({site for site, _ in visitors}), "visitors": sorted({v for _, v in visitors}),
                    "start": start, "end": end}).result_rows
    return {(site, visitor, session): n for site, visitor, session, n in rows if (site, visitor) in visitors}


def latest_ends(client: Client, visitors: Iterable[tuple[str, int]], since: datetime) -> dict[tuple[str, int], datetime]:
    """The latest session end of each of these (site, visitor)s that has one after `since`: the
    visitors with a session that has an event after `since` (strictly: an event exactly a timeout
    before the next one ends its session, as in `sessionize`)."""
    wanted = set(visitors)
    if not wanted:
        return {}
    rows = client.query(
        "SELECT site_id, visitor_id, max(end) FROM sessions FINAL WHERE site_id IN {sites:Array(String)}"
        " AND start >= {oldest:DateTime64(3, 'UTC')} AND end > {since:DateTime64(3, 'UTC')}"
        " AND visitor_id IN {visitors:Array(UInt64)}"  # a constant set (streams/events.py `history`)
        " GROUP BY site_id, visitor_id",
        parameters={"sites": sorted({site for site, _ in wanted}), "since": since, "oldest": since - VISITOR_LIFETIME,
                    "visitors": [visitor for _, visitor in wanted]},
    ).result_rows
    return {(site, visitor): end.replace(tzinfo=timezone.utc) for site, visitor, end in rows if (site, visitor) in wanted}


def open_at(client: Client, midnights: Iterable[datetime], timeout: timedelta,
            sites: Iterable[str] | None = None) -> dict[datetime, set[tuple[str, int]]]:
    """(site, visitor) of every session still open at each of these midnights (of these sites, or
    of all): the ids that may carry over. A session is open at midnight m when it started in
    [m − VISITOR_LIFETIME, m) and ended after m − timeout. One query for all of them (an import
    spanning 90 days asked 90 times, ~7 % of its time): the sessions open at the first midnight
    after their start, a few percent of all, whose midnights are then counted here. (Matching
    every session against every midnight in SQL cost sessions × midnights: 3.5 s a request for
    an import spanning 390 days next to 200,000 sessions of other sites.)"""
    midnights = sorted(set(midnights))
    if not midnights:
        return {}
    wanted = set(midnights)
    where = "" if sites is None else " AND site_id IN {sites:Array(String)}"
    rows = client.query(
        "SELECT site_id, visitor_id, start, end FROM sessions FINAL"
        " WHERE start >= {oldest:DateTime64(3, 'UTC')} AND start < {latest:DateTime64(3, 'UTC')}"
        " AND end > {since:DateTime64(3, 'UTC')}" + where +
        " AND end > toStartOfDay(start) + toIntervalDay(1) - toIntervalSecond({timeout:UInt32})",
        parameters={"oldest": midnights[0] - VISITOR_LIFETIME, "latest": midnights[-1], "since": midnights[0] - timeout,
                    "timeout": int(timeout.total_seconds()), "sites": sorted(set(sites or ()))},
    ).result_rows
    out: dict[datetime, set[tuple[str, int]]] = {m: set() for m in midnights}
    for site, visitor, start, end in rows:
        start, end = start.replace(tzinfo=timezone.utc), end.replace(tzinfo=timezone.utc)
        m = utc_midnight(start.date() + _DAY)
        while m - start <= VISITOR_LIFETIME and end > m - timeout:
            if m in wanted:
                out[m].add((site, visitor))
            m += _DAY
    return out
