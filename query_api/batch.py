"""`POST /batch`: several GET requests for one site in one round trip (the reference's "Batch
Requests"). Sub-requests run concurrently through this same application — the same validation,
errors and answers as when sent alone — marked internal, so the batch costs one rate-limit unit."""

from __future__ import annotations

import asyncio
import decimal
import math
import re
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, field_validator

from ingest.event import MAX_SITE_ID
from query_api.deps import BATCH_SITE, CACHE_CONTROL, Ctx, Key, readable_site
from query_api.http_semantics import VARY
from query_api.models import BatchResponse

router = APIRouter(tags=["batch"])

MAX_REQUESTS = 20
# Endpoints that take the batch's site_id; funnel stats name their site through the funnel.
_SITE_ENDPOINTS = frozenset({"stats/overview", "stats/pages", "stats/referrers", "stats/countries",
                             "popular/products", "popular/categories", "popular/partners", "trending/products",
                             "goals", "funnels"})
# Any id: one that no funnel has is `funnel_not_found`, as alone.
_FUNNEL_STATS = re.compile(r"funnels/[^/]+/stats")

# Constrained, so pydantic refuses what no query string can carry: a JSON body can hold lone
# surrogates ("\ud800"), which a plain `str` lets through to the sub-request's URL encoding (a 500).
ParamName = Annotated[str, Field(max_length=100)]
MAX_PARAM_CHARS = 2000
Scalar = Annotated[str, Field(max_length=MAX_PARAM_CHARS)] | int | float | bool


class SubRequest(BaseModel):
    endpoint: Annotated[str, Field(min_length=1, max_length=100, examples=["popular/products"])]
    # null is a parameter not given, as `"referrer": null` is none in an event
    params: dict[ParamName, Scalar | None] = Field(default_factory=dict, max_length=20)

    @field_validator("params")
    @classmethod
    def _finite(cls, params: dict[str, Scalar | None]) -> dict[str, Scalar | None]:
        # NaN and Infinity are not JSON, though Python's parser takes them (and 1e400 as infinity).
        for name, value in params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name!r}: NaN, Infinity and numbers beyond ±1.8e308 are not taken")
            if isinstance(value, int) and len(_query_value(value)) > MAX_PARAM_CHARS:
                raise ValueError(f"{name!r}: at most {MAX_PARAM_CHARS} characters, as text")
        return params


class BatchRequest(BaseModel):
    site_id: Annotated[str, Field(min_length=1, max_length=MAX_SITE_ID)]
    requests: Annotated[list[SubRequest], Field(min_length=1, max_length=MAX_REQUESTS)]


def _error(endpoint: str, code: str, message: str) -> dict:
    return {"endpoint": endpoint, "error": {"code": code, "message": message}}


def _query_value(value: Scalar) -> str:
    """A JSON scalar as a query string writes it: `true`, `10` (JSON's 10.0 is the same number),
    `0.0000001` rather than Python's `1e-07`, which the endpoints' number parameters refuse."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else format(decimal.Decimal(repr(value)), "f")
    return str(value)


async def _run(request: Request, site_id: str, sub: SubRequest) -> dict:
    # As written: `/stats/pages` and `stats/pages/` are no endpoints alone (404), nor here.
    endpoint = sub.endpoint
    params = {k: _query_value(v) for k, v in sub.params.items() if v is not None}
    if endpoint in _SITE_ENDPOINTS:
        params["site_id"] = site_id
    elif _FUNNEL_STATS.fullmatch(endpoint) is None:
        return _error(sub.endpoint, "unknown_endpoint",
                      f"batch serves {', '.join(sorted(_SITE_ENDPOINTS))} and funnels/{{id}}/stats")
    path = f"/api/v1/{endpoint}"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": urlencode(params).encode(),
             # Starlette reads headers as Latin-1: encoded back the same way, the key is sent byte for byte.
             "headers": [(b"authorization", request.headers.get("authorization", "").encode("latin-1"))],
             "client": request.scope.get("client"), "server": request.scope.get("server"),
             # The funnel-stats route takes a funnel of the batch's site only (`BATCH_SITE`): looked
             # up there, with that route's errors (ClickHouse away: this result's 503, not the batch's).
             "state": {"batch_internal": True, BATCH_SITE: site_id}}
    status, chunks = 500, []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await request.app(scope, receive, send)
    except Exception:
        # Starlette answers an unhandled error (errors.py: a 500, logged) and then raises it again:
        # that answer is this sub-request's result, not the whole batch's.
        if not (status == 500 and chunks):  # failed before that answer
            return _error(sub.endpoint, "internal_error", "internal server error")
    body: dict[str, Any] = orjson.loads(b"".join(chunks) or b"{}")
    if status == 200:
        return {"endpoint": sub.endpoint, **body}
    return {"endpoint": sub.endpoint, "error": body.get("error", {"code": "error", "message": f"status {status}"})}


@router.post("/batch", response_model=BatchResponse)
async def batch(request: Request, ctx: Ctx, key: Key, body: BatchRequest) -> Response:
    """Up to 20 (MAX_REQUESTS) GET requests for one site (`site_id` is added to each), run
    concurrently; each result carries its `endpoint` and either `data`/`meta` or its own `error`.
    Counts as one request against the rate limit."""
    site = await asyncio.to_thread(readable_site, ctx, key, body.site_id)
    results = await asyncio.gather(*(_run(request, site.site_id, sub) for sub in body.requests))
    # The reference's cache headers on every endpoint: a batch's answers are the GETs', as fresh.
    # One with a sub-request's error is not to be kept (a funnel not found may be made a minute later).
    fresh = CACHE_CONTROL if all("error" not in r for r in results) else "no-store"
    return Response(orjson.dumps({"results": results}), media_type="application/json",
                    headers={"Cache-Control": fresh, "Vary": VARY})
