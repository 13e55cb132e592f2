"""Bulk import (SPEC §5.3): an NDJSON body → events put through the same enrichment as live ones.

`parse` is pure: every line is accepted whole, rejected with the field at fault, or dropped as a
bot, and keeps its 1-based line number (blank lines are skipped but counted). `to_events` then
enriches the accepted lines in timestamp order, so a person's visitor id is decided event after
event exactly as it would have been live.

A line without an `event_id` gets one from its content (`content_event_id`): importing the same
file twice stores every event once. The id is keyed with the installation's secret: the content
holds the IP, and an unkeyed hash of it could be reversed by trying every IPv4 address."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import orjson
from pydantic import ValidationError

from ingest import clients, useragents
from ingest.enrich import enrich
from ingest.event import Event, ImportedEvent, problem
from ingest.visitors import Visitors
from streams.buckets import VISITOR_LIFETIME
from streams.sites import Site

MAX_LINES = 100_000
_BOM = b"\xef\xbb\xbf"


class BadBody(ValueError):
    """The body as a whole cannot be imported (empty, too many lines)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    event: ImportedEvent
    event_id: str


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"line", "field", "code", "message"}
    dropped: list[dict] = field(default_factory=list)  # {"line", "reason"}


def content_event_id(site_id: str, e: ImportedEvent, key: bytes) -> str:
    """UUIDv5, in the namespace made of the installation's 16-byte `key` (`Salts.id_key`), of the
    line's canonical content: a JSON array of site id, name, url, referrer, props, product (all
    five fields, slug defaulted), timestamp (UTC, milliseconds), ip and user agent, keys sorted."""
    timestamp = e.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    content = [site_id, e.name, e.url, e.referrer or "", e.props, e.product.model_dump() if e.product else None,
               timestamp, e.ip, e.user_agent]
    return str(uuid.uuid5(uuid.UUID(bytes=key), orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()))


def parse(body: bytes, site: Site, now: datetime, id_key: bytes, complete_since: datetime | None = None) -> Parsed:
    """Validate every line of `body` as an event of `site`, judged against the clock `now`;
    `id_key` keys the content ids of lines without an `event_id`. With
    `complete_since` (`streams.retention`), events whose visitor's stored events may be gone in
    part (within a visitor's lifetime of it) are refused: the stream core reads them."""
    oldest = complete_since + VISITOR_LIFETIME if complete_since else None
    # A UTF-8 BOM starts Windows exports, and so every part of files joined with `cat`: skipped
    # at the start of any line (it is never JSON), so a line's verdict does not depend on where it is.
    raw_lines = [line.removeprefix(_BOM) for line in body.split(b"\n")]
    while raw_lines and not raw_lines[-1].strip():  # blank lines at the end hold no events to count
        raw_lines.pop()
    if len(raw_lines) > MAX_LINES:
        raise BadBody("too_many_lines", f"at most {MAX_LINES} lines per request; split the file")
    if not raw_lines:
        raise BadBody("empty_body", "the body holds no events")
    parsed = Parsed()
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            event = _validate(raw, site, now, oldest)
        except _Rejected as rejection:
            field_, code, message = rejection.args
            parsed.rejected.append({"line": number, "field": field_, "code": code, "message": message})
            continue
        if useragents.parse(event.user_agent).is_bot:
            parsed.dropped.append({"line": number, "reason": "bot"})  # as live ingest drops them
            continue
        event_id = str(event.event_id) if event.event_id else content_event_id(site.site_id, event, id_key)
        parsed.lines.append(Line(number, event, event_id))
    return parsed


class _Rejected(Exception):
    """(field, code, message) of a line that cannot be imported."""


def _validate(raw: bytes, site: Site, now: datetime, oldest: datetime | None) -> ImportedEvent:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Rejected("", "invalid_json", "line is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Rejected("", "invalid_json", "line must be a JSON object")
    if data.get("site_id") is None and data.get("domain") is None:
        data["site_id"] = site.site_id  # the request names the site; a line need not repeat it
    try:
        event = ImportedEvent.model_validate(data, context={"now": now, **({"oldest": oldest} if oldest else {})})
    except ValidationError as exc:
        raise _Rejected(*problem(exc)) from None
    if event.site_id is not None and event.site_id != site.site_id:
        raise _Rejected("site_id", "wrong_site", f"site_id: {event.site_id!r} is not the site imported to")
    if event.domain is not None and not site.named_by(event.domain):
        raise _Rejected("domain", "wrong_site", f"domain: {event.domain!r} is not the site imported to")
    return event


def to_events(lines: list[Line], site: Site, visitors: Visitors) -> list[Event]:
    """Enrich accepted lines, oldest first (ties in file order): the client IP is the line's own,
    there is no proxy to trust. Visitor ids come from an instance of `visitors` made for these
    lines alone (`Visitors.for_batch`): their times are not the live clock's."""
    return [event for part in enriched(lines, site, visitors) for event in part]


def enriched(lines: list[Line], site: Site, visitors: Visitors, size: int = 5000) -> Iterator[list[Event]]:
    """`to_events`, `size` events at a time: a part can be stored while the next is enriched.
    Of lines sharing an event id, only the copy the stream core keeps of one batch goes on (the
    earliest; of equal times, the last): parts are batches of their own, and a copy in a later
    part, hours away and under another visitor id, would be stored as a second event."""
    kept: dict[str, Line] = {}
    for line in lines:
        if (first := kept.get(line.event_id)) is None or line.event.timestamp <= first.event.timestamp:
            kept[line.event_id] = line
    lines = list(kept.values())
    visitors = visitors.for_batch((site.site_id, line.event.ip, line.event.user_agent, line.event.timestamp)
                                  for line in lines)
    ordered = sorted(lines, key=lambda line: (line.event.timestamp, line.number))
    for start in range(0, len(ordered), size):
        part = []
        for line in ordered[start:start + size]:
            e = line.event
            country = clients.country(e.ip, e.ip, {}, ())  # the address's own: no edge headers here
            visitor = visitors.visitor_id(site.site_id, e.ip, e.user_agent, e.timestamp)
            part.append(enrich(e, site, useragents.parse(e.user_agent), country, visitor, e.timestamp,
                               event_id=line.event_id))
        yield part
