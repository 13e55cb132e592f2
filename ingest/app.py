"""`POST /api/event` (SPEC §5.1) as lean Starlette routes: this is the hot path, so no framework
validation layer — one pydantic parse of the body, cached lookups, then the hand-off. Beside it,
`POST /api/v1/events/import` (SPEC §5.3): the same enrichment and hand-off for a file of events,
served wherever the hand-off is (`up` and `ingest`)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from datetime import datetime

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from besokskollen import metrics
from besokskollen.config import Settings
from ingest import clients, importer, useragents
from ingest.enrich import enrich
from ingest.event import Event, IncomingEvent, problem, utcnow
from ingest.handoff import Handoff
from ingest.spool import SpoolFull
from ingest.visitors import CarryQuestions, Visitors
from query_api.errors import NO_STORE
from query_api.keys import KeyStore, bearer_token
from streams.events import RETRY_WINDOW
from streams.sites import Site, SiteRegistry

log = logging.getLogger(__name__)

_CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, OPTIONS",
    "access-control-allow-headers": "content-type",
    "access-control-max-age": "86400",
    "access-control-expose-headers": "x-dropped",  # so a page's script can see why an event was dropped
}
_PREFETCH = ("prefetch", "prerender")
_NDJSON = "application/x-ndjson"
# The import is an /api/v1 operation: its errors are not to be cached, as the query API's are not.
_NO_STORE = {"cache-control": NO_STORE}
_BEARER = {"www-authenticate": "Bearer", **_NO_STORE}
# Kafka is down and the spool full: a client should come back when an outage may be over.
_SPOOL_FULL_RETRY_S = "30"
# Events of an import handed on at once: the Kafka producer batches them, memory stays bounded.
_SEND_AT_ONCE = 1000


# Client event ids whose first copy's visitor id is remembered (~200 bytes each).
_CLIENT_IDS_REMEMBERED = 100_000


# Built once: a Response is not changed by sending it, and its headers cost more than the send.
_ACCEPTED = Response(status_code=202, headers=_CORS)
_DROPPED = Response(status_code=202, headers={**_CORS, "x-dropped": "bot"})


def _error(status: int, code: str, message: str, headers: dict[str, str] = _CORS) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit` (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


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
           handoff: Handoff, keys: KeyStore) -> list[Route]:
    trusted = settings.trusted_networks
    # One import at a time per process: each sees every earlier one stored, so visitor ids do
    # not depend on how concurrent requests interleave.
    import_lock = asyncio.Lock()

    # (site, event id) of recent client ids → (visitor id, time) of their first copy taken here. A
    # retry from another address (a phone that changed networks) hashes to another visitor id: in
    # Kafka another partition, where a second worker with both copies in flight at once would
    # store it too. With the first copy's id it follows that copy and is counted once.
    first_copies: OrderedDict[tuple[str, str], tuple[int, datetime]] = OrderedDict()

    def as_first_copy(event: Event) -> Event:
        known = first_copies.get((event.site_id, event.event_id))
        if known is None or known[0] == event.visitor_id or event.timestamp - known[1] > RETRY_WINDOW:
            return event
        return event.model_copy(update={"visitor_id": known[0]})

    def taken(event: Event) -> None:
        key = (event.site_id, event.event_id)
        known = first_copies.get(key)
        if known is None or event.timestamp - known[1] > RETRY_WINDOW:
            first_copies[key] = (event.visitor_id, event.timestamp)
            first_copies.move_to_end(key)
        while len(first_copies) > _CLIENT_IDS_REMEMBERED:
            first_copies.popitem(last=False)

    async def lookup_site(incoming: IncomingEvent) -> Site | None:
        if incoming.site_id:
            find, key, cheap = sites.get, incoming.site_id, sites.answers_without_io(site_id=incoming.site_id)
        else:
            find, key, cheap = sites.by_domain, incoming.domain or "", sites.answers_without_io(domain=incoming.domain)
        return find(key) if cheap else await asyncio.to_thread(find, key)

    async def post_event(request: Request) -> Response:
        try:
            response = await accept(request)
        except Exception:
            # Storage or broker trouble is ours, not the client's: say so with a retryable 503.
            log.exception("could not accept an event")
            response = _error(503, "unavailable", "the event could not be stored; retry later")
        if response.status_code != 202:
            metrics.EVENTS_REJECTED.labels(str(response.status_code)).inc()
        return response

    async def accept(request: Request) -> Response:
        try:
            body = await _read_body(request, settings.max_event_bytes)
        except ClientDisconnect:
            return _error(400, "incomplete_body", "the request body was cut off")
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
        args = (incoming, site, agent, user_agent, ip, clients.country(ip, peer, headers, trusted), visitors, at)
        if visitors.needs_io(site.site_id, ip, user_agent, at):
            await carries.settle(site.site_id, ip, user_agent, at)
        needs_io = visitors.needs_io(site.site_id, ip, user_agent, at)  # salts, or the day's first load
        event = await asyncio.to_thread(enrich, *args) if needs_io else enrich(*args)
        if incoming.event_id:
            event = as_first_copy(event)
        try:
            await handoff.send(event)
        except SpoolFull:
            return _error(503, "spool_full", "Kafka is unavailable and the local spool is full; retry later",
                          {**_CORS, "retry-after": _SPOOL_FULL_RETRY_S})
        if incoming.event_id:
            taken(event)
        metrics.EVENTS_ACCEPTED.inc()
        return _ACCEPTED

    async def preflight(request: Request) -> Response:
        return Response(status_code=204, headers=_CORS)

    async def wrong_method(request: Request) -> Response:
        # Starlette's own 405 would name POST only, and without CORS a page's script cannot read it.
        return _error(405, "method_not_allowed", "send events with POST", {**_CORS, "allow": "POST, OPTIONS"})

    async def post_import(request: Request) -> Response:
        try:
            return await import_events(request)
        except Exception:
            log.exception("could not import events")
            return _error(503, "unavailable", "the events could not be stored; retry later", _NO_STORE)

    async def import_events(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization", ""))
        if token is None:
            return _error(401, "unauthorized", "missing API key: send Authorization: Bearer bk_…", _BEARER)
        key = await asyncio.to_thread(keys.lookup, token)
        if key is None:
            return _error(401, "unauthorized", "invalid API key", _BEARER)
        site_id = request.query_params.get("site_id")
        if not site_id:
            return _error(400, "missing_parameter", "site_id is required", _NO_STORE)
        site = await asyncio.to_thread(sites.get, site_id)
        if refusal := key.refusal(site_id, site):
            return _error(*refusal, _NO_STORE)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != _NDJSON:
            return _error(415, "unsupported_media_type", f"send the events as {_NDJSON}, one per line", _NO_STORE)
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            return _error(415, "unsupported_media_type", "send the NDJSON uncompressed (no Content-Encoding)", _NO_STORE)
        try:
            body = await _read_body(request, settings.max_import_bytes)
        except ClientDisconnect:
            return _error(400, "incomplete_body", "the request body was cut off", _NO_STORE)
        if body is None:
            return _error(413, "body_too_large",
                          f"import bodies are limited to {settings.max_import_bytes} bytes; split the file", _NO_STORE)
        try:
            parsed = await asyncio.to_thread(lambda: importer.parse(
                body, site, utcnow(), visitors.id_key(), settings.raw_events_ttl_days))
        except importer.BadBody as exc:
            return _error(400, exc.code, exc.message, _NO_STORE)

        async with import_lock:
            events = await asyncio.to_thread(importer.to_events, parsed.lines, site, visitors)
            for i in range(0, len(events), _SEND_AT_ONCE):
                await asyncio.gather(*(handoff.send(e) for e in events[i:i + _SEND_AT_ONCE]))
            stored = await handoff.flush(events)
        reply = {"accepted": len(events), "rejected": parsed.rejected, "dropped": parsed.dropped, "stored": stored}
        return Response(orjson.dumps({"data": reply}), media_type="application/json")

    return [Route("/api/event", post_event, methods=["POST"]),
            Route("/api/event", preflight, methods=["OPTIONS"]),
            Route("/api/event", wrong_method, methods=["GET", "HEAD", "PUT", "PATCH", "DELETE"]),
            Route("/api/v1/events/import", post_import, methods=["POST"])]
