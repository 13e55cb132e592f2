"""Raw events: written with the session each belongs to, and read back per visitor so the stream
core can recompute that visitor's sessions and activity from everything it did."""

from __future__ import annotations

import operator
from collections import defaultdict, namedtuple
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import NamedTuple

from clickhouse_connect.driver.binding import DT64Param
from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams import migrations
from streams.buckets import history_windows

_FIELDS = tuple(Event.model_fields)  # the wire contract's fields are the columns, in its order
_COLUMNS = [*_FIELDS, "session_id", "version"]
# A retried event (same client event id, a later arrival time) is found this far from its copy.
# The lookup reads the event ids of the site's events in the window (a bloom-filter index skips
# nothing for 500 ids against 8,192-row granules): 6 hours of a 1M-events-a-day site cost ~5 ms.
RETRY_WINDOW = timedelta(hours=6)
_SELECT = ", ".join("toString(event_id)" if f == "event_id" else f for f in _FIELDS)


class StoredEvent(namedtuple("_Fields", _FIELDS)):
    """An event as read back: the fields of `Event`, without validating them again (cheap)."""

    __slots__ = ()


# Which of a key's rows FINAL (and a merge) keeps: copies of one event not merged yet (a
# redelivery, a corrected re-import, a rewrite by another core) come back in no set order; the
# highest version wins, of equal versions the last inserted. A part's name starts with its
# partition id (toYYYYMM: no "_") and its first block number; within a part, rows of one key keep
# their insertion order. Insertion as one number (block · 2³² + offset): a tuple column cost ~3 µs
# a row to convert.
_KEPT = "version, bitShiftLeft(toUInt64(splitByChar('_', _part)[2]), 32) + _part_offset"

# No FINAL: PREWHERE on visitor_id stays possible; copies of one event are collapsed here. Read
# without `_KEPT` first: it made the read ~40 ms slower at 5M events in the window, and copies
# are rare (they last until a merge).
_HISTORY = """
SELECT {columns} FROM events
WHERE site_id IN {{sites:Array(String)}}
  AND timestamp >= {{start:DateTime64(3, 'UTC')}} AND timestamp < {{end:DateTime64(3, 'UTC')}}
  AND visitor_id IN {{visitors:Array(UInt64)}}
"""
_ID = _FIELDS.index("event_id")
_TIME = _FIELDS.index("timestamp")


_GET_FIELDS = operator.attrgetter(*_FIELDS)  # one C call: this runs for every event of every batch


def as_stored(e: Event | StoredEvent) -> StoredEvent:
    """The event as it reads back once stored (it compares equal to its stored copy)."""
    return e if isinstance(e, StoredEvent) else StoredEvent(*_GET_FIELDS(e))


def first_arrivals(batch: Sequence[Event]) -> dict[tuple[str, str], Event]:
    """One event per site and id, the copy the stream core keeps: the earliest (a retry arrives
    later); of equal times, the last sent."""
    first: dict[tuple[str, str], Event] = {}
    for e in batch:
        kept = first.get((e.site_id, e.event_id))
        if kept is None or e.timestamp <= kept.timestamp:
            first[(e.site_id, e.event_id)] = e
    return first


def write(client: Client, events: list[tuple[Event | StoredEvent, int]], version: int) -> None:
    """Insert (event, session id) rows, by column; a row for an existing event id replaces the
    stored one unless that one has a higher version (was written by a batch that read later)."""
    if events:
        columns = [[getattr(e, f) for e, _ in events] for f in _FIELDS] + [[sid for _, sid in events],
                                                                             [version] * len(events)]
        client.insert("events", columns, column_names=_COLUMNS, column_oriented=True)


def delete(client: Client, rows: list[tuple[str, str, datetime, int]]) -> None:
    """Delete these (site, event id, time, visitor) rows: stored copies that an earlier copy of the
    same event replaces, or that moved to another visitor (streams/core.py). Rare, so a
    lightweight DELETE, masked for every read at once.
    The times as `DT64Param`: a datetime inside a list is written in whole seconds (as
    clickhouse-connect writes it, `streams/storage.py`), which matched no stored row with
    milliseconds (an independent chaos run's 250 retries stayed)."""
    if rows:
        migrations.delete_rows(
            client, "DELETE FROM events WHERE (site_id, event_id, timestamp, visitor_id)"
                    " IN {rows:Array(Tuple(String, UUID, DateTime64(3, 'UTC'), UInt64))}",
            {"rows": [(site, event_id, DT64Param(at), visitor) for site, event_id, at, visitor in rows]})


def history(client: Client, visitors: set[tuple[str, int]], start: datetime, end: datetime
            ) -> dict[tuple[str, int], dict[str, StoredEvent]]:
    """Stored events of these (site, visitor) pairs between start and end, by event id."""
    out: dict[tuple[str, int], dict[str, StoredEvent]] = defaultdict(dict)
    if not visitors:
        return out
    # The ids go as an array, a constant set: as a subquery over one string (`arrayJoin(splitByChar
    # (…))`) they made the read 2.4× slower on 5M events in the window (75 → 31 ms; equal on 50k).
    # Other sites' visitors with the same ids are dropped here.
    parameters = {"sites": sorted({site for site, _ in visitors}), "visitors": [v for _, v in visitors],
                   "start": start, "end": end}
    rows = client.query(_HISTORY.format(columns=_SELECT), parameters=parameters).result_rows
    # Ids alone (an id on two sites only takes the slower path): this runs for every batch.
    if len(set(map(operator.itemgetter(_ID), rows))) == len(rows):
        for row in rows:
            event = _event(row)
            if (event.site_id, event.visitor_id) in visitors:
                out[(event.site_id, event.visitor_id)][event.event_id] = event
        return out
    rows = client.query(_HISTORY.format(columns=f"{_SELECT}, {_KEPT}"), parameters=parameters).result_rows
    kept: dict[tuple[str, str], tuple[tuple[int, int], tuple[str, int]]] = {}  # (site, id) → (_KEPT, visitor)
    for row in rows:
        event, inserted = _event(row[:-2]), row[-2:]
        visitor = (event.site_id, event.visitor_id)
        if visitor not in visitors:
            continue
        if (previous := kept.get((event.site_id, event.event_id))) is not None:
            if previous[0] > inserted:
                continue
            out[previous[1]].pop(event.event_id, None)  # an older copy, maybe under another visitor
        kept[(event.site_id, event.event_id)] = (inserted, visitor)
        out[visitor][event.event_id] = event
    return out


class Owner(NamedTuple):
    site_id: str
    visitor_id: int
    timestamp: datetime


def owners(client: Client, events: Sequence[Event], chunk: int = 2000) -> dict[tuple[str, str], Owner]:
    """Where each of these events is stored, if it is, by (site_id, event_id): under which visitor
    and at what time. By site too: imported ids are stored as given, so two sites may hold one id.
    Looked up within `RETRY_WINDOW` of the events' times, one query per stretch of time the batch
    covers (ids go as query parameters: a few thousand at a time), pruned by the sorting key
    (site, timestamp)."""
    found: dict[tuple[str, str], Owner] = {}
    inserted_at: dict[tuple[str, str], tuple[int, int]] = {}
    for event_id, site_id, visitor_id, at, *inserted in _near(
            client, events, f"toString(event_id), site_id, visitor_id, timestamp, {_KEPT}", chunk):
        if inserted_at.get((site_id, event_id), inserted) <= inserted:  # the copy FINAL keeps
            inserted_at[(site_id, event_id)] = inserted
            found[(site_id, event_id)] = Owner(site_id, visitor_id, at.replace(tzinfo=timezone.utc))
    return found


def _near(client: Client, events: Sequence[Event], columns: str, chunk: int) -> Iterator[tuple]:
    """Rows (`columns`) of the stored events with these events' ids (and sites) within
    RETRY_WINDOW of their times: one query per stretch of time, `chunk` ids at a time."""
    for stretch in _stretches(sorted(events, key=lambda e: e.timestamp)):
        for i in range(0, len(stretch), chunk):
            part = stretch[i:i + chunk]
            yield from client.query(
                f"SELECT {columns} FROM events"
                " WHERE site_id IN {sites:Array(String)}"
                " AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp <= {end:DateTime64(3, 'UTC')}"
                # An array, as in `history`: 2× faster than a subquery over one string at 3M events
                # in the window (32 → 16 ms).
                " AND event_id IN {ids:Array(UUID)}",
                parameters={"sites": sorted({e.site_id for e in part}),
                            "start": part[0].timestamp - RETRY_WINDOW, "end": part[-1].timestamp + RETRY_WINDOW,
                            "ids": [e.event_id for e in part]},
            ).result_rows


def _stretches(events: list[Event]) -> list[list[Event]]:
    """Time-sorted events cut where two neighbours are more than two retry windows apart."""
    out: list[list[Event]] = []
    for e in events:
        if out and e.timestamp - out[-1][-1].timestamp <= 2 * RETRY_WINDOW:
            out[-1].append(e)
        else:
            out.append([e])
    return out


def stored_event_ids(client: Client, events: Sequence[Event]) -> set[str]:
    """Which of these events are written as sent (for their site), or never will be because the
    stream core keeps a stored copy instead: one at an earlier time within RETRY_WINDOW (`owners`),
    or one their own visitor holds at an earlier time, however far (`StreamCore._visitor`). A copy
    at the same time with other fields (a line imported again with corrected fields, an event
    moving to another visitor id), or at a later time, is replaced once processed, so it does not
    count: the distributed import answered "stored" while such events were still in Kafka."""
    sent = first_arrivals(events)
    copies = _copies(client, list(sent.values()))
    found, rest = set(), []
    for key, e in sent.items():
        here = copies.get(key, [])
        if as_stored(e) in here or any(c.timestamp < e.timestamp for c in here):
            found.add(key)
        elif not here:
            rest.append(e)
    if rest:
        found |= _held_by_own_visitor(client, rest)
    return {event_id for _, event_id in found}


def stored_at(client: Client, site_id: str, event_id: str, at: datetime) -> bool:
    """Whether the event is stored with this id at this time, to the millisecond it was stored at
    (`up --demo`: whether its events are the demo's own)."""
    return bool(client.query(
        "SELECT count() FROM events WHERE site_id = {site:String} AND event_id = {id:UUID}"
        " AND timestamp BETWEEN subtractMilliseconds({at:DateTime64(6, 'UTC')}, 1)"
        " AND addMilliseconds({at:DateTime64(6, 'UTC')}, 1)",
        parameters={"site": site_id, "at": DT64Param(at), "id": event_id}).result_rows[0][0])


def _copies(client: Client, events: list[Event], chunk: int = 2000) -> dict[tuple[str, str], list[StoredEvent]]:
    """The stored rows (every copy, merged or not) of these events' ids within RETRY_WINDOW of
    their times, by (site_id, event_id)."""
    found: dict[tuple[str, str], list[StoredEvent]] = defaultdict(list)
    for row in _near(client, events, _SELECT, chunk):
        stored = _event(row)
        found[(stored.site_id, stored.event_id)].append(stored)
    return found


def _held_by_own_visitor(client: Client, events: list[Event]) -> set[tuple[str, str]]:
    """(site_id, event_id) of these events whose id their visitor has stored at an earlier time
    within its history window (what the stream core reads), one query per stretch of days, as the
    core reads them."""
    wanted = {(e.site_id, e.visitor_id, e.event_id): e.timestamp for e in events}
    found: set[tuple[str, str]] = set()
    for start, end, members in history_windows((e, e.timestamp.date(), e.timestamp.date()) for e in events):
        rows = client.query(
            "SELECT site_id, visitor_id, toString(event_id), timestamp FROM events"
            " WHERE site_id IN {sites:Array(String)}"
            " AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}"
            " AND visitor_id IN {visitors:Array(UInt64)} AND event_id IN {ids:Array(UUID)}",  # as in `history`
            parameters={"sites": sorted({e.site_id for e in members}), "start": start, "end": end,
                        "visitors": sorted({e.visitor_id for e in members}), "ids": [e.event_id for e in members]},
        ).result_rows
        found |= {(site_id, event_id) for site_id, visitor_id, event_id, at in rows
                  if (sent := wanted.get((site_id, visitor_id, event_id))) is not None
                  and at.replace(tzinfo=timezone.utc) < sent}
    return found


def per_session(client: Client, visitors: set[tuple[str, int]], start: datetime, end: datetime
                ) -> dict[tuple[str, int, int], int]:
    """How many events are stored for each session of these (site, visitor) pairs, of the events
    between start and end."""
    if not visitors:
        return {}
    rows = client.query(
        "SELECT site_id, visitor_id, session_id, count() FROM events FINAL"
        " WHERE site_id IN {sites:Array(String)} AND timestamp >= {start:DateTime64(3, 'UTC')}"
        " AND timestamp < {end:DateTime64(3, 'UTC')} AND visitor_id IN {visitors:Array(UInt64)}"
        " GROUP BY site_id, visitor_id, session_id",
        parameters={"sites": sorted({site for site, _ in visitors}), "visitors": sorted({v for _, v in visitors}),
                    "start": start, "end": end}).result_rows
    return {(site, visitor, session): n for site, visitor, session, n in rows if (site, visitor) in visitors}


def stored_days(client: Client) -> list[tuple[date, int]]:
    """Each UTC day with stored events, and how many. Deduplicated: copies not merged yet (every
    row twice after migration 10's two copies) made a rebuild's progress end at half its total."""
    return [(row[0], row[1]) for row in client.query(
        "SELECT toDate(timestamp) AS day, count() FROM events FINAL GROUP BY day ORDER BY day").result_rows]


def of_day(client: Client, day: date) -> list[StoredEvent]:
    """Every stored event of one UTC day, deduplicated."""
    result = client.query(
        f"SELECT {_SELECT} FROM events FINAL WHERE toDate(timestamp) = {{day:Date}}"
        " ORDER BY timestamp, event_id", parameters={"day": day})
    return [_event(row) for row in result.result_rows]


def _event(row: tuple) -> StoredEvent:
    # Built as a plain tuple (`_make` then `_replace` took twice as long): every stored event of
    # every visitor a batch touches is read back through here.
    fields = list(row)
    fields[_TIME] = fields[_TIME].replace(tzinfo=timezone.utc)
    return tuple.__new__(StoredEvent, fields)
