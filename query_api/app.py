"""The query API application: routers under /api/v1, error shapes, OpenAPI."""

from __future__ import annotations

from fastapi import FastAPI

from query_api import affiliate, errors, sites, stats
from query_api.deps import Context
from query_api.limits import BodyLimit
from query_api.models import ErrorResponse

PREFIX = "/api/v1"
# JSON bodies of the API are small; the NDJSON import (served by ingest) has a cap of its own.
MAX_BODY_BYTES = 1024 * 1024
IMPORT_PATH = f"{PREFIX}/events/import"

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 429, 500)}


def create_app(context: Context, **fastapi_kwargs) -> FastAPI:
    app = FastAPI(
        title="Besökskollen API",
        version="1",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
        **fastapi_kwargs,
    )
    app.state.context = context
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, exempt=frozenset({IMPORT_PATH}))
    errors.install(app)
    for module in (sites, stats, affiliate):
        app.include_router(module.router, prefix=PREFIX, responses=_ERRORS)
    return app
