"""The API's error shape, `{"error": {"code", "message"}}`, for every status it can answer."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import orjson
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import get_route_path

from besokskollen.logs import collapsed_logger

if TYPE_CHECKING:  # `ingest` answers in this shape too, and loads no FastAPI (~0.7 s of CPU at its start)
    from fastapi import FastAPI

log = logging.getLogger(__name__)
# A 503 for each request while ClickHouse is away: 35 lines a second from one api process in an
# audit (115), which buried the rest. Said once per 30 s, with how many more.
_away_log = collapsed_logger(f"{__name__}.unavailable")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# Errors are not to be cached: a 404 for a site created a minute later, or a 429, would otherwise
# be served for the success answers' 30 minutes by every shared cache.
NO_STORE = "no-store"
# ClickHouse errors that say it is short of something for a moment (descriptors, memory, query
# slots), not that the question is wrong: a 503 to come back to, not a 500 to report. An audit
# (118) that exhausted `up`'s open files got `Cannot open epoll descriptor … errno: 24` (EPOLL_ERROR)
# as a 500 on every stats read.
_SHORT_OF = frozenset({"EPOLL_ERROR", "CANNOT_CREATE_TIMER", "MEMORY_LIMIT_EXCEEDED", "CANNOT_ALLOCATE_MEMORY",
                       "TOO_MANY_SIMULTANEOUS_QUERIES", "CANNOT_SCHEDULE_TASK"})
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z_]+)\)")
_OUT_OF_FILES = re.compile(r"errno: 2[34]\b")  # ENFILE, EMFILE


def short_of_resources(exc: Exception) -> bool:
    text = str(exc)
    return bool(_SHORT_OF.intersection(_ERROR_NAME.findall(text)) or _OUT_OF_FILES.search(text))


# What a 503 for a data store that does not answer asks a client to wait: a ClickHouse restart
# takes seconds.
STORAGE_RETRY_AFTER_S = 5


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json",
                    headers={"Cache-Control": NO_STORE, **(headers or {})})


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# The tags pydantic puts in an error's loc for the member of a union it tried (`constrained-str`).
_UNION_MEMBER = re.compile(r"(constrained-)?(str|int|float|bool|decimal)|function-[a-z]+\[.*\]")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path; HEAD wherever GET is (HEAD is
    answered as GET, query_api/http_semantics.py)."""
    routes = request.app.router.routes
    if type(request.app).__module__.startswith("fastapi"):
        from query_api.http_semantics import flat_routes  # FastAPI's routes: only the query API asks

        routes = flat_routes(routes)
    path = get_route_path(request.scope)
    methods: set[str] = set()
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods, key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m))


def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Routing's own errors (404, 405) as every other error: JSON, no-store."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the first route of the path; list them all.
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, code, str(exc.detail), headers or None)


def _key_refusal(request: Request) -> Response | None:
    """The route's answer to the caller's key, if it refuses it: for a body FastAPI could not read,
    which it finds before any dependency (the key's) runs."""
    from query_api.deps import key_refusal  # deps raises APIError: imported here, not at the top

    refusal = key_refusal(request)
    return None if refusal is None else error_response(refusal.status, refusal.code, refusal.message, refusal.headers)


def install(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            # Its loc is the character where parsing stopped, not a field.
            reason = first.get("ctx", {}).get("error", "syntax error")
            return _key_refusal(request) or error_response(
                400, "invalid_parameter", f"body: not valid JSON at character {first['loc'][-1]} ({reason})")
        # The field's path inside the body (steps.1.match_type), or the query parameter's name.
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        if len(loc) > 1 and _UNION_MEMBER.fullmatch(loc[-1]):
            loc.pop()  # which member of a union pydantic tried first (`days.constrained-str`): no field
        field = ".".join(loc) or "body"
        content_type = request.headers.get("content-type", "")
        if (tuple(first.get("loc", ())) == ("body",) and first["type"] != "missing"
                and "json" not in content_type.lower()):
            # FastAPI reads a body as JSON only when it is labelled so (`curl -d` labels it a form).
            return error_response(400, "invalid_parameter", "body: send JSON with Content-Type: application/json"
                                  f" (this one was {content_type or 'unlabelled'!r})")
        # An empty value (`?site_id=`, `"site_id": ""`) is a missing one, as in the import.
        empty = first["type"] == "string_too_short" and first.get("input") == ""
        if first["type"] == "missing" or empty:
            return error_response(400, "missing_parameter", f"{field} is required")
        return error_response(400, "invalid_parameter", f"{field}: {first['msg'].removeprefix('Value error, ')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's answer to a body its JSON parser raised on other than a syntax error (bytes
            # that are not UTF-8, nesting past the recursion limit): the key first, as for bad JSON.
            return _key_refusal(request) or error_response(
                400, "invalid_parameter", "body: not JSON text in UTF-8, or nested too deep")
        return http_error(request, exc)

    @app.exception_handler(OperationalError)
    async def _storage_away(request: Request, exc: OperationalError) -> Response:
        # ClickHouse does not answer (restarting, a network fault): nothing is wrong with the
        # request, and a client (a Next.js revalidation, a dashboard) should try again shortly,
        # keeping what it has (stale-if-error), rather than report a server error.
        _away_log.warning("ClickHouse does not answer on %s %s: %s", request.method, request.url.path, exc)
        return error_response(503, "unavailable", "the data store does not answer; retry shortly",
                              {"Retry-After": str(STORAGE_RETRY_AFTER_S)})

    @app.exception_handler(DatabaseError)
    async def _storage_error(request: Request, exc: DatabaseError) -> Response:
        if short_of_resources(exc):
            _away_log.warning("ClickHouse is short of resources on %s %s: %s", request.method, request.url.path, exc)
            return error_response(503, "unavailable", "the data store is busy; retry shortly",
                                  {"Retry-After": str(STORAGE_RETRY_AFTER_S)})
        return await _crash(request, exc)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        # Never leak a stack trace or SQL to a client; the log has the details.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
