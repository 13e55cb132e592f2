"""Raw events: written with the session each belongs to, and read back per visitor so the stream
core can recompute that visitor's sessions and spans from everything it did."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import date, datetime, timezone

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.storage import INSERT_SETTINGS

_FIELDS = [
    "event_id", "site_id", "timestamp", "name", "visitor_id", "hostname", "pathname", "referrer", "source",
    "channel", "utm_source", "utm_medium", "utm_campaign", "country", "device", "browser", "os", "props",
    "product_id", "product_slug", "category_slug", "brand_slug", "partner_slug",
]
_COLUMNS = [*_FIELDS, "session_id"]

# No FINAL: PREWHERE on visitor_id stays possible, and copies of one event (same id, same content;
# only session_id may differ, and it is recomputed anyway) are collapsed here.
_HISTORY = f"""
SELECT {', '.join(_FIELDS)} FROM events
WHERE site_id IN {{sites:Array(String)}}
  AND timestamp >= {{start:DateTime64(3, 'UTC')}} AND timestamp < {{end:DateTime64(3, 'UTC')}}
  AND (site_id, visitor_id) IN {{visitors:Array(Tuple(String, UInt64))}}
"""


def write(client: Client, events: Iterable[tuple[Event, int]]) -> None:
    """Insert (event, session id) rows; a row for an existing event id replaces the stored one."""
    rows = [[*(getattr(e, f) for f in _FIELDS), session_id] for e, session_id in events]
    if rows:
        client.insert("events", rows, column_names=_COLUMNS, settings=INSERT_SETTINGS)


def history(client: Client, visitors: set[tuple[str, int]], start: datetime, end: datetime
            ) -> dict[tuple[str, int], dict[str, Event]]:
    """Stored events of these (site, visitor) pairs between start and end, by event id."""
    out: dict[tuple[str, int], dict[str, Event]] = defaultdict(dict)
    if not visitors:
        return out
    result = client.query(_HISTORY, parameters={
        "sites": sorted({site for site, _ in visitors}), "visitors": sorted(visitors), "start": start, "end": end})
    for row in result.result_rows:
        event = _event(row)
        out[(event.site_id, event.visitor_id)][event.event_id] = event
    return out


def stored_days(client: Client) -> list[date]:
    return [row[0] for row in client.query(
        "SELECT DISTINCT toDate(timestamp) AS day FROM events ORDER BY day").result_rows]


def of_day(client: Client, day: date) -> list[Event]:
    """Every stored event of one UTC day, deduplicated."""
    result = client.query(
        f"SELECT {', '.join(_FIELDS)} FROM events FINAL WHERE toDate(timestamp) = {{day:Date}}"
        " ORDER BY timestamp, event_id", parameters={"day": day})
    return [_event(row) for row in result.result_rows]


def _event(row: tuple) -> Event:
    fields = dict(zip(_FIELDS, row))
    fields["event_id"] = str(fields["event_id"])
    fields["timestamp"] = fields["timestamp"].replace(tzinfo=timezone.utc)
    return Event.model_construct(**fields)


def sites_with_events(client: Client, site_ids: list[str]) -> set[str]:
    if not site_ids:
        return set()
    rows = client.query(
        "SELECT DISTINCT site_id FROM events WHERE site_id IN {ids:Array(String)}", parameters={"ids": site_ids}
    ).result_rows
    return {row[0] for row in rows}
