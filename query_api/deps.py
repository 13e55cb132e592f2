"""Request context for the query API: shared clients, the caller's key, and the site it may read."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

import orjson
from clickhouse_connect.driver.client import Client
from fastapi import Depends, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator

from ingest.event import MAX_SITE_ID
from query_api.coalescing import InFlight
from query_api.errors import APIError
from query_api.keys import ApiKey, KeyStore
from streams.funnels import FunnelRegistry
from streams.goals import GoalRegistry
from streams.retention import RawEvents
from streams.sites import Site, SiteRegistry

CACHE_CONTROL = "public, max-age=1800, stale-while-revalidate=3600, stale-if-error=86400"
# A batch's sub-requests carry its site in their scope's state under this key (query_api/batch.py).
BATCH_SITE = "batch_site"

# A site's reads of the rollups (stats, goals, popular) run on one thread: they read a few
# thousand rows, and a second thread cost more CPU to set up than it saved time: ~10 % of the
# ClickHouse CPU of each (4–29 % by query), as fast or faster (`tests/bench/bench_api_reads.py`).
# Trending (raw events at its windows' edges; 17 → 21 ms alone), funnels (raw events) and an
# account's totals (every site) keep every core.
ROLLUP_READ = {"max_threads": 1}


@dataclass(frozen=True, slots=True)
class Context:
    client: Client
    sites: SiteRegistry
    keys: KeyStore
    goals: GoalRegistry
    funnels: FunnelRegistry
    # Since when raw events are all stored: trending reads the edges of its windows from them
    # (query_api/affiliate.py). None: all are.
    raw_events: RawEvents | None = None


def context(request: Request) -> Context:
    return request.app.state.context


Ctx = Annotated[Context, Depends(context)]


def api_key(request: Request, ctx: Ctx) -> ApiKey:
    return ctx.keys.authenticate(request.headers.get("authorization", ""))


Key = Annotated[ApiKey, Depends(api_key)]


def user_key(key: Key) -> ApiKey:
    if not key.user_level:
        raise APIError(403, "forbidden", "this endpoint needs a user-level API key")
    return key


UserKey = Annotated[ApiKey, Depends(user_key)]


def key_refusal(request: Request) -> APIError | None:
    """What the route's key dependency would answer, for a body FastAPI could not decode: it reads
    the body before any dependency runs, and a bad key must still be a 401 (or 403), not a 400."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    try:
        if dependant is not None and _needs(dependant, api_key):
            key = api_key(request, context(request))
            if _needs(dependant, user_key):
                user_key(key)
    except APIError as refusal:
        return refusal
    return None


def _needs(dependant, call) -> bool:
    return any(d.call is call or _needs(d, call) for d in dependant.dependencies)


def readable_site(ctx: Context, key: ApiKey, site_id: str, asked: str | None = None, fresh: bool = False) -> Site:
    """`fresh` for a change (a goal, a funnel, a delete): the site as ClickHouse has it now. From
    the cache, a site another process deleted, and another account created again, was still this
    key's for up to 5 s: its old owner's key put a goal on the new owner's site."""
    return key.readable_site(site_id, ctx.sites, asked, fresh)


def cached_json(request: Request, payload: dict[str, Any], status: int = 200) -> Response:
    """JSON; a GET gets the ISR-friendly cache headers and a strong ETag, and a matching
    If-None-Match gets 304."""
    return cached(request, orjson.dumps(payload), "application/json", status)


_ANSWERS = InFlight()


def shared_json(request: Request, site: Site, compute: Callable[..., Any], *args: Any, data: bool = False) -> Response:
    """`cached_json` of `compute(*args)` (under "data" with `data`), a computation shared by
    identical questions asked at once (query_api/coalescing.py): the same computation and
    arguments, of the same site (a site deleted and created again with its id is another).
    `compute` reads what else it needs (a site's goals) itself: read before, it could be older
    than the computation."""
    def body() -> bytes:
        answer = compute(*args)
        return orjson.dumps({"data": answer} if data else answer)

    return cached(request, _ANSWERS.run((compute, site.site_id, site.incarnation, data, *args), body),
                  "application/json")


def cached(request: Request, body: bytes, media_type: str, status: int = 200) -> Response:
    """`cached_json` for any body (the OpenAPI document and its docs page are GETs too)."""
    if request.method != "GET":
        return Response(body, status_code=status, media_type=media_type)
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag}
    # Weak comparison (RFC 9110 §13.1.2): proxies that compress turn our tags into W/"…". The list
    # may come in several header lines (RFC 9110 §5.3): read them all, not the first.
    sent = {t.strip().removeprefix("W/") for line in request.headers.getlist("if-none-match") for t in line.split(",")}
    if etag in sent or "*" in sent:
        return Response(status_code=304, headers=headers)
    return Response(body, status_code=status, media_type=media_type, headers=headers)


_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _written_as(pattern: re.Pattern, what: str) -> BeforeValidator:
    """Numbers in a query string as people and URL builders write them. pydantic's lax mode also
    takes `5.0`, `+5`, `1_000` and spaces around them for an integer, which a client should hear
    about rather than have guessed."""
    def check(value: object) -> object:
        if isinstance(value, str) and not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value
    return BeforeValidator(check)


# Query parameters: `Annotated[Integer, Query(ge=1)]`.
Integer = Annotated[int, _written_as(_WHOLE, "a whole number in digits, such as 10")]
class _DocumentedAsNumber:
    """pydantic documents a Decimal as a number or a string of digits; a query parameter is text
    anyway, and the document says number, as it did for a float."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        schema.pop("anyOf", None)
        return {"type": "number", **schema}


# A Decimal, not a float: a threshold compared exactly (`min_growth=100.0000000000000001` is above
# a growth of 100, and a float took it for 100; `-100.00000000000000001` passed `ge=-100`).
DecimalNumber = Annotated[Decimal, _written_as(_DECIMAL, "a number in digits, such as 100 or 12.5"),
                          _DocumentedAsNumber]
# An empty site_id is a 400 like any missing parameter, not a site that does not exist.
SiteId = Annotated[str, Query(description="Site ID", min_length=1, max_length=MAX_SITE_ID)]
