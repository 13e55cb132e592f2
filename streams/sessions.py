"""Sessions (SPEC §6): the events of one (site, visitor) with gaps shorter than the timeout.

Open sessions live in memory, keyed by visitor — one visitor always lands on one Kafka partition,
so one worker owns it. A visitor not in memory (a restarted or rebalanced worker) is looked up in
the `sessions` table first, so a session continues where the previous owner left it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.storage import INSERT_SETTINGS


@dataclass(slots=True)
class Session:
    site_id: str
    visitor_id: int
    session_id: int
    start: datetime
    end: datetime
    entry_page: str
    exit_page: str
    pageviews: int
    events: int
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

    @classmethod
    def begin(cls, e: Event) -> Session:
        digest = hashlib.blake2b(f"{e.site_id}\x00{e.visitor_id}\x00{e.timestamp.isoformat()}".encode(), digest_size=8)
        page = e.pathname if e.is_pageview else ""
        return cls(
            e.site_id, e.visitor_id, int.from_bytes(digest.digest(), "big"), e.timestamp, e.timestamp,
            page, page, int(e.is_pageview), 1, e.source, e.channel, e.referrer, e.utm_source,
            e.utm_medium, e.utm_campaign, e.country, e.device, e.browser, e.os,
        )

    def add(self, e: Event) -> None:
        self.events += 1
        if e.is_pageview:
            self.pageviews += 1
            if not self.entry_page:
                self.entry_page = e.pathname
            if e.timestamp >= self.end:
                self.exit_page = e.pathname
        self.end = max(self.end, e.timestamp)


_COLUMNS = [f.name for f in fields(Session)]


class SessionStore:
    def __init__(self, client: Client, timeout_s: int) -> None:
        self._client = client
        self._timeout = timedelta(seconds=timeout_s)
        self._open: dict[tuple[str, int], Session] = {}
        self._latest: datetime | None = None

    def __len__(self) -> int:
        return len(self._open)

    def clear(self) -> None:
        self._open.clear()

    def load_missing(self, events: Iterable[Event]) -> None:
        """Fetch, in one query per site, the stored open sessions of visitors not in memory."""
        wanted: dict[str, set[int]] = {}
        since: datetime | None = None
        for e in events:
            if (e.site_id, e.visitor_id) not in self._open:
                wanted.setdefault(e.site_id, set()).add(e.visitor_id)
                since = e.timestamp if since is None else min(since, e.timestamp)
        for site_id, visitors in wanted.items():
            rows = self._client.query(
                f"SELECT {', '.join(_COLUMNS)} FROM sessions FINAL"
                " WHERE site_id = {site:String} AND visitor_id IN {visitors:Array(UInt64)}"
                " AND end > {since:DateTime64(3, 'UTC')} ORDER BY end",
                parameters={"site": site_id, "visitors": sorted(visitors), "since": since - self._timeout},
            ).result_rows
            for row in rows:  # ordered by end: the latest session of a visitor wins
                session = Session(*row)
                self._open[(session.site_id, session.visitor_id)] = session

    def apply(self, e: Event) -> Session:
        key = (e.site_id, e.visitor_id)
        session = self._open.get(key)
        if session is None or e.timestamp - session.end >= self._timeout:
            session = self._open[key] = Session.begin(e)
        else:
            session.add(e)
        if self._latest is None or e.timestamp > self._latest:
            self._latest = e.timestamp
        return session

    def write(self, sessions: Iterable[Session]) -> None:
        # `version` = events applied, so the newest state of a session wins under FINAL.
        rows = [[getattr(s, c) for c in _COLUMNS] + [s.events] for s in sessions]
        if rows:
            self._client.insert("sessions", rows, column_names=[*_COLUMNS, "version"], settings=INSERT_SETTINGS)

    def evict_idle(self) -> int:
        """Forget sessions that no later event can extend (judged by event time, not the clock,
        so replays and historic imports behave like live traffic)."""
        if self._latest is None:
            return 0
        horizon = self._latest - self._timeout
        idle = [k for k, s in self._open.items() if s.end < horizon]
        for key in idle:
            del self._open[key]
        return len(idle)


def has_open_session(client: Client, site_id: str, visitor_id: int, since: datetime) -> bool:
    rows = client.query(
        "SELECT 1 FROM sessions FINAL WHERE site_id = {site:String} AND visitor_id = {visitor:UInt64}"
        " AND end >= {since:DateTime64(3, 'UTC')} LIMIT 1",
        parameters={"site": site_id, "visitor": visitor_id, "since": since},
    ).result_rows
    return bool(rows)
