"""`POST /api/event` (SPEC §5.1) as lean Starlette routes: this is the hot path, so no framework
validation layer — one pydantic parse of the body, cached lookups, then the hand-off."""

from __future__ import annotations

import asyncio
import logging

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from besokskollen.config import Settings
from ingest import useragents
from ingest.enrich import enrich
from ingest.event import IncomingEvent, utcnow
from ingest.handoff import Handoff
from ingest.visitors import Visitors
from streams.sites import Site, SiteRegistry

log = logging.getLogger(__name__)

_CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, OPTIONS",
    "access-control-allow-headers": "content-type",
    "access-control-max-age": "86400",
}
_PREFETCH = ("prefetch", "prerender")


def _accepted(**extra: str) -> Response:
    return Response(status_code=202, headers={**_CORS, **extra})


def _error(status: int, code: str, message: str) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=_CORS)


def _validation_error(exc: ValidationError) -> Response:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return _error(400, "missing_field", f"{field} is required")
    if first["type"] == "model_type":
        return _error(400, "invalid_json", "body must be a JSON object")
    message = first["msg"].removeprefix("Value error, ")
    return _error(400, "invalid_field", f"{field}: {message}" if field else message)


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


def _is_prefetch(request: Request) -> bool:
    purpose = (request.headers.get("sec-purpose") or request.headers.get("purpose")
               or request.headers.get("x-moz") or "").lower()
    return any(p in purpose for p in _PREFETCH)


def routes(settings: Settings, sites: SiteRegistry, visitors: Visitors, handoff: Handoff) -> list[Route]:
    trusted = settings.trusted_networks

    async def lookup_site(incoming: IncomingEvent) -> Site | None:
        if incoming.site_id:
            find, key, cheap = sites.get, incoming.site_id, sites.answers_without_io(site_id=incoming.site_id)
        else:
            find, key, cheap = sites.by_domain, incoming.domain or "", sites.answers_without_io(domain=incoming.domain)
        return find(key) if cheap else await asyncio.to_thread(find, key)

    async def post_event(request: Request) -> Response:
        try:
            return await accept(request)
        except Exception:
            # Storage or broker trouble is ours, not the client's: say so with a retryable 503.
            log.exception("could not accept an event")
            return _error(503, "unavailable", "the event could not be stored; retry later")

    async def accept(request: Request) -> Response:
        try:
            body = await _read_body(request, settings.max_event_bytes)
        except ClientDisconnect:
            return _error(400, "incomplete_body", "the request body was cut off")
        if body is None:
            return _error(413, "body_too_large", f"event bodies are limited to {settings.max_event_bytes} bytes")
        try:
            incoming = IncomingEvent.model_validate_json(body)
        except ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors()):
                return _error(400, "invalid_json", "body is not valid JSON")
            return _validation_error(exc)

        site = await lookup_site(incoming)
        if site is None:
            which = f"site_id {incoming.site_id!r}" if incoming.site_id else f"domain {incoming.domain!r}"
            return _error(404, "unknown_site", f"no site with {which}")

        user_agent = request.headers.get("user-agent", "")
        agent = useragents.parse(user_agent)
        if agent.is_bot or _is_prefetch(request):
            return _accepted(**{"x-dropped": "bot"})

        at = utcnow()
        args = (incoming, site, agent, user_agent, request.client.host if request.client else "",
                request.headers, trusted, visitors, at)
        event = await asyncio.to_thread(enrich, *args) if visitors.needs_io(at) else enrich(*args)
        await handoff.send(event)
        return _accepted()

    async def preflight(request: Request) -> Response:
        return Response(status_code=204, headers=_CORS)

    return [Route("/api/event", post_event, methods=["POST"]),
            Route("/api/event", preflight, methods=["OPTIONS"])]
