"""`POST /api/event` (SPEC §5.1) as lean Starlette routes and a list of named steps
(`EventSteps`): this is the hot path, so no framework validation layer — one pydantic parse of
the body, cached lookups, then the hand-off."""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from time import perf_counter_ns

import orjson
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from besokskollen import metrics
from besokskollen.config import Settings
from besokskollen.logs import collapsed_logger
from ingest import clients, useragents
from ingest.bodies import BodyTooSlow, read_body
from ingest.cors import CORS
from ingest.enrich import enrich
from ingest.event import Event, IncomingEvent, problem, utcnow
from ingest.handoff import Handoff
from ingest.retries import FirstCopies
from ingest.spool import RETRY_AFTER_S, SpoolFull, SpoolRefused
from ingest.useragents import Agent
from ingest.visitors import CarryQuestions, Visitors
from query_api.errors import STORAGE_RETRY_AFTER_S, short_of_resources
from streams import storage
from streams.sites import Site, SiteRegistry

log = logging.getLogger(__name__)
# A 503 for each event while ClickHouse is away (sites not cached): said once per 30 s, with how many more.
_away_log = collapsed_logger(f"{__name__}.unavailable")

_PREFETCH = ("prefetch", "prerender")
# A beacon's body (16 KiB at most) arrives in one packet; one still arriving after this is a
# client holding a socket open, not a slow network.
EVENT_BODY_DEADLINE_S = 10.0


# Timing every request's steps cost ~2 µs of a ~50 µs request (`bench_event_handler.py`); a
# sample says as much of where the time goes.
TIME_EVERY = 16

# Built once: a Response is not changed by sending it, and its headers cost more than the send.
_ACCEPTED = Response(status_code=202, headers=CORS)
_DROPPED = Response(status_code=202, headers={**CORS, "x-dropped": "bot"})


def _error(status: int, code: str, message: str, headers: dict[str, str] = CORS) -> Response:
    """An error as the API's are: JSON, not to be cached (README)."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json",
                    headers={**headers, "cache-control": "no-store"})


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """One dict (Starlette's Headers scans the list on every lookup, and a request makes ~10);
    repeated headers are joined as HTTP allows, so every X-Forwarded-For line counts."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _is_prefetch(headers: dict[str, str]) -> bool:
    purpose = (headers.get("sec-purpose") or headers.get("purpose") or headers.get("x-moz") or "").lower()
    return any(p in purpose for p in _PREFETCH)


class Drop(str, Enum):
    """Why an event was answered 202 and not kept (`bk_events_dropped_total{reason}`)."""
    BOT = "bot"  # a crawler, monitor or headless browser by its user agent
    PREFETCH = "prefetch"  # a prefetch or prerender request, not a page shown


@dataclass(slots=True)
class Beacon:
    """One `/api/event` request, as far as its steps got: each fills in its fields."""
    request: Request
    body: bytes = b""
    incoming: IncomingEvent | None = None
    site: Site | None = None
    headers: dict[str, str] | None = None
    agent: Agent | None = None
    peer: str = ""
    ip: str = ""
    at: datetime | None = None
    visitor_id: int = 0
    event: Event | None = None


Outcome = Response | Drop | None  # a step's: an answer that ends the request, a drop, or go on


class EventSteps:
    """`POST /api/event` as named steps, in `ORDER`. Each reads what the steps before it put on
    the `Beacon` and adds its own, or ends the request: refused (a 4xx naming the field), dropped
    (202 with `X-Dropped` and a `Drop` reason) or held back (503, retry later). The steps of one
    request in `TIME_EVERY` are timed (`bk_event_step_seconds_total{step}`, awaited waits
    included), so a scrape says where production traffic spends its time."""

    ORDER = ("read_body", "parse", "find_site", "drop_bots", "identify", "enrich", "hand_off")

    def __init__(self, settings: Settings, sites: SiteRegistry, visitors: Visitors, carries: CarryQuestions,
                 handoff: Handoff) -> None:
        self._settings, self._sites, self._visitors, self._carries, self._handoff = (
            settings, sites, visitors, carries, handoff)
        self._trusted = settings.trusted_networks
        self._first_copies = FirstCopies()
        self._requests = 0
        self._steps = [(getattr(self, name), inspect.iscoroutinefunction(getattr(self, name)),
                        metrics.EVENT_STEPS.of(name)) for name in self.ORDER]

    async def run(self, request: Request) -> Response:
        beacon = Beacon(request)
        self._requests += 1
        timed = self._requests % TIME_EVERY == 0
        for step, awaited, spent in self._steps:
            if timed:
                started = perf_counter_ns()
            outcome = await step(beacon) if awaited else step(beacon)
            if timed:
                spent[0] += perf_counter_ns() - started
                spent[1] += 1
            if outcome is not None:
                if isinstance(outcome, Drop):
                    metrics.EVENTS_DROPPED.labels(outcome.value).inc()
                    return _DROPPED
                return outcome
        metrics.EVENTS_ACCEPTED.inc()
        return _ACCEPTED

    async def read_body(self, b: Beacon) -> Outcome:
        try:
            body = await read_body(b.request, self._settings.max_event_bytes, EVENT_BODY_DEADLINE_S)
        except ClientDisconnect:
            return _error(400, "incomplete_body", "the request body was cut off")
        except BodyTooSlow:
            # Closed after the answer: kept open, the client could go on trickling the rest.
            return _error(408, "body_timeout", f"the request body did not arrive within {EVENT_BODY_DEADLINE_S:.0f} s",
                          {**CORS, "connection": "close"})
        if body is None:
            return _error(413, "body_too_large", f"event bodies are limited to {self._settings.max_event_bytes} bytes")
        b.body = body
        return None

    def parse(self, b: Beacon) -> Outcome:
        try:
            b.incoming = IncomingEvent.model_validate_json(b.body.removeprefix(b"\xef\xbb\xbf"))  # a UTF-8 BOM
        except ValidationError as exc:
            _field, code, message = problem(exc)
            return _error(400, code, f"body {message}" if code == "invalid_json" else message)
        return None

    async def find_site(self, b: Beacon) -> Outcome:
        incoming, sites = b.incoming, self._sites
        if incoming.site_id:
            find, key, cheap = sites.get, incoming.site_id, sites.answers_without_io(site_id=incoming.site_id)
        else:
            find, key, cheap = sites.by_domain, incoming.domain or "", sites.answers_without_io(domain=incoming.domain)
        site = find(key) if cheap else await asyncio.to_thread(find, key)
        if site is None:
            which = f"site_id {incoming.site_id!r}" if incoming.site_id else f"domain {incoming.domain!r}"
            return _error(404, "unknown_site", f"no site with {which}")
        if incoming.site_id and incoming.domain and not site.named_by(incoming.domain):
            # Two sites named: which one the integrator meant is unknown (the import refuses it too)
            return _error(400, "wrong_site", f"domain: {incoming.domain!r} is not the domain of site {site.site_id!r}")
        b.site = site
        return None

    def drop_bots(self, b: Beacon) -> Outcome:
        b.headers = headers = _headers(b.request.scope["headers"])
        b.agent = useragents.parse(headers.get("user-agent", ""))
        if _is_prefetch(headers):
            return Drop.PREFETCH
        return Drop.BOT if b.agent.is_bot else None

    async def identify(self, b: Beacon) -> Outcome:
        """The client's address and the visitor id (SPEC §5.2), at the time of arrival."""
        b.at = utcnow()
        b.peer = b.request.client.host if b.request.client else ""
        b.ip = clients.client_ip(b.peer, b.headers, self._trusted)
        person = (b.site.site_id, b.ip, b.headers.get("user-agent", ""), b.at)
        visitors = self._visitors
        if (visitor := visitors.known_id(*person)) is None:
            await self._carries.settle(*person)
            # Still unknown: a salt to load, or the day's first load of the sessions open at midnight.
            if (visitor := visitors.known_id(*person)) is None:
                visitor = await asyncio.to_thread(visitors.visitor_id, *person)
        b.visitor_id = visitor
        return None

    def enrich(self, b: Beacon) -> Outcome:
        country = clients.country(b.ip, b.peer, b.headers, self._trusted)
        b.event = enrich(b.incoming, b.site, b.agent, country, b.visitor_id, b.at)
        if b.incoming.event_id:  # a client's retry takes the visitor id of its first copy (ingest/retries.py)
            b.event = self._first_copies.follow(b.event)
        return None

    async def hand_off(self, b: Beacon) -> Outcome:
        try:
            await self._handoff.send(b.event, b.site.incarnation)
        except SpoolFull:
            return _error(503, "spool_full", "events wait for storage and the local spool is full; retry later",
                          {**CORS, "retry-after": str(RETRY_AFTER_S)})
        except SpoolRefused:  # the spool cannot be written (it logs why, once a minute)
            return _error(503, "unavailable", "the event could not be stored; retry later",
                          {**CORS, "retry-after": str(RETRY_AFTER_S)})
        if b.incoming.event_id:
            self._first_copies.taken(b.event)
        return None


def routes(settings: Settings, sites: SiteRegistry, visitors: Visitors, carries: CarryQuestions,
           handoff: Handoff) -> list[Route]:
    steps = EventSteps(settings, sites, visitors, carries, handoff)

    async def post_event(request: Request) -> Response:
        try:
            response = await steps.run(request)
        except Exception as exc:
            # Storage or broker trouble is ours, not the client's: say so with a retryable 503.
            headers = {**CORS, "retry-after": str(STORAGE_RETRY_AFTER_S)}
            if isinstance(exc, OperationalError):  # a lookup ClickHouse did not answer (a site not cached, a salt)
                _away_log.warning("could not accept an event: ClickHouse does not answer (%s)", storage.reason(exc))
            elif isinstance(exc, DatabaseError) and short_of_resources(exc):  # no traceback an event
                _away_log.warning("could not accept an event: ClickHouse is short of resources (%s)", exc)
            else:
                log.exception("could not accept an event")
                headers = CORS
            response = _error(503, "unavailable", "the event could not be stored; retry later", headers)
        if response.status_code != 202:
            metrics.EVENTS_REJECTED.labels(str(response.status_code)).inc()
        return response

    async def preflight(request: Request) -> Response:
        return Response(status_code=204, headers=CORS)

    async def wrong_method(request: Request) -> Response:
        # Starlette's own 405 would name POST only, and without CORS a page's script cannot read it.
        return _error(405, "method_not_allowed", "send events with POST", {**CORS, "allow": "POST, OPTIONS"})

    return [Route("/api/event", post_event, methods=["POST"]),
            Route("/api/event", preflight, methods=["OPTIONS"]),
            Route("/api/event", wrong_method, methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"])]
