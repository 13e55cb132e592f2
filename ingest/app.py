"""`POST /api/event` (SPEC §5.1) as lean Starlette routes: this is the hot path, so no framework
validation layer — one pydantic parse of the body, cached lookups, then the hand-off."""

from __future__ import annotations

import asyncio
import logging

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
from ingest.cors import CORS
from ingest.enrich import enrich
from ingest.event import IncomingEvent, problem, utcnow
from ingest.handoff import Handoff
from ingest.retries import FirstCopies
from ingest.spool import RETRY_AFTER_S, SpoolFull, SpoolRefused
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


# Built once: a Response is not changed by sending it, and its headers cost more than the send.
_ACCEPTED = Response(status_code=202, headers=CORS)
_DROPPED = Response(status_code=202, headers={**CORS, "x-dropped": "bot"})


def _error(status: int, code: str, message: str, headers: dict[str, str] = CORS) -> Response:
    """An error as the API's are: JSON, not to be cached (README)."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json",
                    headers={**headers, "cache-control": "no-store"})


class BodyTooSlow(Exception):
    """The body did not arrive within its deadline."""


async def read_body(request: Request, limit: int, deadline_s: float) -> bytes | None:
    """The body, or None when it is larger than `limit` (read no further than that). Read from the
    ASGI messages themselves: a beacon's body is one message, taken as it is. Raises BodyTooSlow
    when it takes longer than `deadline_s`: a client trickling a byte every few seconds held a
    request (and its socket) open for hours."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = b""
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect
                chunk = message.get("body", b"")
                body = body + chunk if body else chunk  # bounded by `limit`
                if len(body) > limit:
                    return None
                if not message.get("more_body", False):
                    return body
    except TimeoutError:
        raise BodyTooSlow from None


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


def routes(settings: Settings, sites: SiteRegistry, visitors: Visitors, carries: CarryQuestions,
           handoff: Handoff) -> list[Route]:
    trusted = settings.trusted_networks
    first_copies = FirstCopies()

    async def lookup_site(incoming: IncomingEvent) -> Site | None:
        if incoming.site_id:
            find, key, cheap = sites.get, incoming.site_id, sites.answers_without_io(site_id=incoming.site_id)
        else:
            find, key, cheap = sites.by_domain, incoming.domain or "", sites.answers_without_io(domain=incoming.domain)
        return find(key) if cheap else await asyncio.to_thread(find, key)

    async def post_event(request: Request) -> Response:
        try:
            response = await accept(request)
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

    async def accept(request: Request) -> Response:
        try:
            body = await read_body(request, settings.max_event_bytes, EVENT_BODY_DEADLINE_S)
        except ClientDisconnect:
            return _error(400, "incomplete_body", "the request body was cut off")
        except BodyTooSlow:
            # Closed after the answer: kept open, the client could go on trickling the rest.
            return _error(408, "body_timeout", f"the request body did not arrive within {EVENT_BODY_DEADLINE_S:.0f} s",
                          {**CORS, "connection": "close"})
        if body is None:
            return _error(413, "body_too_large", f"event bodies are limited to {settings.max_event_bytes} bytes")
        try:
            incoming = IncomingEvent.model_validate_json(body.removeprefix(b"\xef\xbb\xbf"))  # a UTF-8 BOM
        except ValidationError as exc:
            _field, code, message = problem(exc)
            return _error(400, code, f"body {message}" if code == "invalid_json" else message)

        site = await lookup_site(incoming)
        if site is None:
            which = f"site_id {incoming.site_id!r}" if incoming.site_id else f"domain {incoming.domain!r}"
            return _error(404, "unknown_site", f"no site with {which}")
        if incoming.site_id and incoming.domain and not site.named_by(incoming.domain):
            # Two sites named: which one the integrator meant is unknown (the import refuses it too)
            return _error(400, "wrong_site", f"domain: {incoming.domain!r} is not the domain of site {site.site_id!r}")

        headers = _headers(request.scope["headers"])
        user_agent = headers.get("user-agent", "")
        agent = useragents.parse(user_agent)
        prefetch = _is_prefetch(headers)
        if agent.is_bot or prefetch:
            metrics.EVENTS_DROPPED.labels("prefetch" if prefetch else "bot").inc()
            return _DROPPED

        at = utcnow()
        peer = request.client.host if request.client else ""
        ip = clients.client_ip(peer, headers, trusted)
        person = (site.site_id, ip, user_agent, at)
        if (visitor := visitors.known_id(*person)) is None:
            await carries.settle(*person)
            # Still unknown: a salt to load, or the day's first load of the sessions open at midnight.
            if (visitor := visitors.known_id(*person)) is None:
                visitor = await asyncio.to_thread(visitors.visitor_id, *person)
        event = enrich(incoming, site, agent, clients.country(ip, peer, headers, trusted), visitor, at)
        if incoming.event_id:
            event = first_copies.follow(event)
        try:
            await handoff.send(event, site.incarnation)
        except SpoolFull:
            return _error(503, "spool_full", "events wait for storage and the local spool is full; retry later",
                          {**CORS, "retry-after": str(RETRY_AFTER_S)})
        except SpoolRefused:  # the spool cannot be written (it logs why, once a minute)
            return _error(503, "unavailable", "the event could not be stored; retry later",
                          {**CORS, "retry-after": str(RETRY_AFTER_S)})
        if incoming.event_id:
            first_copies.taken(event)
        metrics.EVENTS_ACCEPTED.inc()
        return _ACCEPTED

    async def preflight(request: Request) -> Response:
        return Response(status_code=204, headers=CORS)

    async def wrong_method(request: Request) -> Response:
        # Starlette's own 405 would name POST only, and without CORS a page's script cannot read it.
        return _error(405, "method_not_allowed", "send events with POST", {**CORS, "allow": "POST, OPTIONS"})

    return [Route("/api/event", post_event, methods=["POST"]),
            Route("/api/event", preflight, methods=["OPTIONS"]),
            Route("/api/event", wrong_method, methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"])]
