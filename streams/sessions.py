"""Sessions (SPEC §6): the events of one (site, visitor) with gaps shorter than the timeout.

Two halves. Assigning an event to a session needs only each visitor's open session (id, start,
end), kept in memory — one visitor always lands on one Kafka partition, so one worker owns it;
a visitor not in memory (after a restart or rebalance) is looked up in `sessions` first. The
session rows themselves are then rebuilt from the raw events that carry their session id, so a
redelivered event can never be counted twice: the rows are a function of the deduplicated events,
not of how often an event was seen."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.storage import INSERT_SETTINGS


@dataclass(slots=True)
class OpenSession:
    session_id: int
    start: datetime
    end: datetime


def session_id_for(site_id: str, visitor_id: int, start: datetime) -> int:
    """Deterministic, so replaying a session's first event yields the same id."""
    digest = hashlib.blake2b(f"{site_id}\x00{visitor_id}\x00{start.isoformat()}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


class SessionStore:
    def __init__(self, client: Client, timeout_s: int) -> None:
        self._client = client
        self._timeout = timedelta(seconds=timeout_s)
        self._open: dict[tuple[str, int], OpenSession] = {}
        self._latest: datetime | None = None

    def __len__(self) -> int:
        return len(self._open)

    def clear(self) -> None:
        self._open.clear()

    def load_missing(self, events: Iterable[Event]) -> None:
        """Fetch, in one query per site, the stored sessions of visitors not in memory that a
        batch starting at its earliest event could still extend."""
        wanted: dict[str, set[int]] = {}
        since: datetime | None = None
        for e in events:
            if (e.site_id, e.visitor_id) not in self._open:
                wanted.setdefault(e.site_id, set()).add(e.visitor_id)
                since = e.timestamp if since is None else min(since, e.timestamp)
        for site_id, visitors in wanted.items():
            rows = self._client.query(
                "SELECT visitor_id, session_id, start, end FROM sessions FINAL"
                " WHERE site_id = {site:String} AND visitor_id IN {visitors:Array(UInt64)}"
                " AND end > {since:DateTime64(3, 'UTC')} ORDER BY end",
                parameters={"site": site_id, "visitors": sorted(visitors), "since": since - self._timeout},
            ).result_rows
            for visitor_id, session_id, start, end in rows:  # ordered by end: the latest wins
                # The client returns UTC columns as naive datetimes; events are aware.
                self._open[(site_id, visitor_id)] = OpenSession(
                    session_id, start.replace(tzinfo=timezone.utc), end.replace(tzinfo=timezone.utc))

    def assign(self, e: Event) -> OpenSession:
        key = (e.site_id, e.visitor_id)
        session = self._open.get(key)
        if session is None or e.timestamp - session.end >= self._timeout:
            session = OpenSession(session_id_for(e.site_id, e.visitor_id, e.timestamp), e.timestamp, e.timestamp)
            self._open[key] = session
        else:
            session.end = max(session.end, e.timestamp)
        if self._latest is None or e.timestamp > self._latest:
            self._latest = e.timestamp
        return session

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


# Entry/exit pages are the first/last pageview; source, device and the rest come from the
# session's first event. `version` is the rebuild time, so the latest rebuild (which has seen
# every event the earlier ones saw) wins under FINAL.
_REBUILD = """
INSERT INTO sessions (site_id, visitor_id, session_id, start, end, entry_page, exit_page, pageviews, events,
                      source, channel, referrer, utm_source, utm_medium, utm_campaign, country, device, browser,
                      os, version)
SELECT site_id, any(visitor_id), session_id, min(timestamp), max(timestamp),
       argMinIf(pathname, timestamp, name = 'pageview'), argMaxIf(pathname, timestamp, name = 'pageview'),
       countIf(name = 'pageview'), count(),
       argMin(source, timestamp), argMin(channel, timestamp), argMin(referrer, timestamp),
       argMin(utm_source, timestamp), argMin(utm_medium, timestamp), argMin(utm_campaign, timestamp),
       argMin(country, timestamp), argMin(device, timestamp), argMin(browser, timestamp), argMin(os, timestamp),
       toUInt64(toUnixTimestamp64Nano(now64(9)))
FROM events FINAL
WHERE site_id = {site:String} AND session_id IN {sessions:Array(UInt64)}
  AND timestamp >= {first:DateTime64(3, 'UTC')} AND timestamp <= {last:DateTime64(3, 'UTC')}
GROUP BY site_id, session_id
"""


def rebuild(client: Client, touched: Mapping[tuple[str, int], OpenSession]) -> None:
    """Rewrite the rows of the touched sessions, keyed by (site, session id), from raw events."""
    by_site: dict[str, list[OpenSession]] = {}
    for (site_id, _), session in touched.items():
        by_site.setdefault(site_id, []).append(session)
    for site_id, sessions in by_site.items():
        client.command(_REBUILD, parameters={
            "site": site_id, "sessions": sorted({s.session_id for s in sessions}),
            "first": min(s.start for s in sessions), "last": max(s.end for s in sessions),
        }, settings=INSERT_SETTINGS)


def has_open_session(client: Client, site_id: str, visitor_id: int, since: datetime) -> bool:
    rows = client.query(
        "SELECT 1 FROM sessions FINAL WHERE site_id = {site:String} AND visitor_id = {visitor:UInt64}"
        " AND end >= {since:DateTime64(3, 'UTC')} LIMIT 1",
        parameters={"site": site_id, "visitor": visitor_id, "since": since},
    ).result_rows
    return bool(rows)
