"""The query API application: routers under /api/v1, error shapes, OpenAPI."""

from __future__ import annotations

from fastapi import FastAPI

from ingest.clients import Trusted
from query_api import affiliate, batch, errors, funnels, goals, sites, stats
from query_api import openapi
from query_api.deps import Context
from query_api.http_semantics import HeadAndVary
from query_api.limits import MAX_BODY_BYTES, BodyLimit
from query_api.models import ErrorResponse
from query_api.rate_limit import RateLimit, RateLimiter, SharedRateLimiter
from query_api.timing import Timing

PREFIX = "/api/v1"
# JSON bodies of the API are small; the NDJSON import (served by ingest) has a cap of its own.

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 429, 500)}


def create_app(context: Context, *, trusted_proxies: Trusted = (),
               rate_limiter: RateLimiter | SharedRateLimiter | None = None, **fastapi_kwargs) -> FastAPI:
    """`trusted_proxies`: peers whose X-Forwarded-For names the client (Settings.trusted_networks);
    `rate_limiter`: the counters (default 100 requests a minute per key), also `app.state.rate_limiter`."""
    app = FastAPI(
        title="Besökskollen API",
        version="1",
        # Served by query_api/openapi.py, with the cache headers of every GET.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # `/sites/` is not `/sites`: a redirect took `/sites/%2F` to the site list.
        redirect_slashes=False,
        **fastapi_kwargs,
    )
    app.state.context = context
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, exempt=frozenset({openapi.IMPORT_PATH}))
    # Added last = runs first: HEAD/Vary around the rate limit around the body cap.
    app.state.rate_limiter = rate_limiter or RateLimiter()
    app.add_middleware(RateLimit, limiter=app.state.rate_limiter, keys=context.keys, trusted=trusted_proxies,
                       exempt=frozenset({openapi.DOCUMENT_PATH, openapi.DOCS_PATH}))
    app.add_middleware(HeadAndVary)
    app.add_middleware(Timing, prefix=PREFIX,
                       templates=lambda: [path.removeprefix(PREFIX) for path in app.openapi()["paths"]])
    errors.install(app)
    for module in (sites, stats, affiliate, goals, funnels, batch):
        app.include_router(module.router, prefix=PREFIX, responses=_ERRORS)
    openapi.install(app)  # security, every response and header, for every route (query_api/openapi.py)
    return app
