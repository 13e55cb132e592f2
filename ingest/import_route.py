"""`POST /api/v1/events/import` (SPEC §5.3): the live events' enrichment and hand-off for a file of
events, served wherever the hand-off is (`up` and `ingest`). An /api/v1 operation: the query
API's keys and error shape, never cached."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from besokskollen.config import Settings
from ingest import importer
from ingest.bodies import BodyTooSlow, read_body
from ingest.event import Event, utcnow
from ingest.handoff import Handoff
from ingest.spool import RETRY_AFTER_S, SpoolFull, SpoolRefused
from ingest.visitors import Visitors
from query_api.errors import STORAGE_RETRY_AFTER_S, APIError, error_response
from query_api.keys import KeyStore
from streams.retention import RawEvents
from streams.sites import SiteRegistry

log = logging.getLogger(__name__)

# The body is NDJSON whatever it is labelled (`application/json`, `text/plain`, none: what HTTP
# clients send by default), but not a form's parts: those wrap the file in boundaries.
_NOT_NDJSON = "multipart/"
# Events handed on at once: the Kafka producer batches them, memory stays bounded.
_SEND_AT_ONCE = 1000
# The largest body (BK_MAX_IMPORT_BYTES, 20 MiB by default) at ~70 KB/s.
_BODY_DEADLINE_S = 300.0


def routes(settings: Settings, sites: SiteRegistry, visitors: Visitors, handoff: Handoff,
           keys: KeyStore, raw_events: RawEvents) -> list[Route]:
    # One import at a time per process: each sees every earlier one stored, so visitor ids do
    # not depend on how concurrent requests interleave.
    lock = asyncio.Lock()

    async def post_import(request: Request) -> Response:
        try:
            return await import_events(request)
        except APIError as refusal:
            return error_response(refusal.status, refusal.code, refusal.message, refusal.headers)
        except SpoolRefused as exc:  # the spool logs why, once a minute; what was taken is sent on
            return error_response(503, "spool_full" if isinstance(exc, SpoolFull) else "unavailable",
                                  "the events could not all be kept: the local spool is full or cannot be written;"
                                  " send them again later (each is stored once)", {"Retry-After": str(RETRY_AFTER_S)})
        except Exception:
            log.exception("could not import events")
            return error_response(503, "unavailable", "the events could not be stored; retry later",
                                  {"Retry-After": str(STORAGE_RETRY_AFTER_S)})

    async def import_events(request: Request) -> Response:
        taken_ms = time.time_ns() // 1_000_000  # every part of the request is taken now (handoff.send_all)
        key = await asyncio.to_thread(keys.authenticate, request.headers.get("authorization", ""))
        site_id = request.query_params.get("site_id")
        if not site_id:
            raise APIError(400, "missing_parameter", "site_id is required")
        site = await asyncio.to_thread(key.readable_site, site_id, sites)
        if request.headers.get("content-type", "").strip().lower().startswith(_NOT_NDJSON):
            raise APIError(415, "unsupported_media_type", "send the events as the body (application/x-ndjson, one"
                                                          " per line), not as a form's file")
        if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
            raise APIError(415, "unsupported_media_type", "send the NDJSON uncompressed (no Content-Encoding)")
        try:
            body = await read_body(request, settings.max_import_bytes, _BODY_DEADLINE_S)
        except ClientDisconnect:
            raise APIError(400, "incomplete_body", "the request body was cut off") from None
        except BodyTooSlow:
            raise APIError(408, "body_timeout", f"the request body did not arrive within {_BODY_DEADLINE_S:.0f} s;"
                                                " send smaller parts", {"Connection": "close"}) from None
        if body is None:
            raise APIError(413, "body_too_large",
                           f"import bodies are limited to {settings.max_import_bytes} bytes; split the file")
        try:
            now = utcnow()
            parsed = await asyncio.to_thread(lambda: importer.parse(
                body, site, now, visitors.id_key(), raw_events.complete_since(now)))
        except importer.BadBody as exc:
            raise APIError(400, exc.code, exc.message) from None

        async with lock:
            events: list[Event] = []
            # Each part is handed on once enriched: the stream core (or Kafka and the workers)
            # stores it while the next one is enriched.
            parts = importer.enriched(parsed.lines, site, visitors)
            while part := await asyncio.to_thread(next, parts, None):
                for i in range(0, len(part), _SEND_AT_ONCE):
                    await handoff.send_all(part[i:i + _SEND_AT_ONCE], site.incarnation, taken_ms)
                # A live event continuing one of these sessions carries its id, stored or not yet.
                visitors.remember((e.site_id, e.visitor_id, e.timestamp) for e in part)
                events += part
            stored = await handoff.flush(events, lambda: not sites.is_current(site))
        reply = {"accepted": len(parsed.lines), "rejected": parsed.rejected, "dropped": parsed.dropped, "stored": stored}
        return Response(orjson.dumps({"data": reply}), media_type="application/json")

    return [Route("/api/v1/events/import", post_import, methods=["POST"])]
