"""Completes FastAPI's generated OpenAPI document for every route, present and future: the bearer
security scheme on each operation that takes an API key, and every response an operation can
give (errors with the ErrorResponse schema, 304 for GETs, the rate-limit and cache headers).
FastAPI's 422 is dropped: validation errors answer 400 (query_api/errors.py)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response

from query_api.deps import CACHE_CONTROL, api_key, cached
from query_api.http_semantics import flat_routes
from query_api.limits import MAX_BODY_BYTES
from query_api.models import ErrorResponse
from query_api.rate_limit import DEFAULT_FAILED_AUTH_LIMIT, DEFAULT_LIMIT

SECURITY_SCHEME = "bearerAuth"
DOCUMENT_PATH = "/api/v1/openapi.json"
DOCS_PATH = "/api/v1/docs"

_ERROR_DESCRIPTIONS = {
    "400": "Invalid or missing parameter or body field (`missing_parameter`, `invalid_parameter`)",
    "401": "Missing or unknown API key (`unauthorized`)",
    "403": "The key may not do this: another account's or site's data, or a user-level key is needed (`forbidden`)",
    "404": "No such site, or no such resource for it",
    "413": f"Request body larger than {MAX_BODY_BYTES // 1024 // 1024} MiB (`body_too_large`)",
    "429": "Rate limit exceeded (`rate_limited`): retry after `Retry-After` seconds",
    "500": "Internal error (`internal_error`); the body never carries details",
    "503": "The data store does not answer (`unavailable`): retry after `Retry-After` seconds",
}
IMPORT_PATH = "/api/v1/events/import"
# Errors only some operations give, by (method, path).
EXTRA_ERRORS: dict[tuple[str, str], dict[str, str]] = {
    ("post", "/api/v1/sites"): {"409": "A site for this domain exists already (`site_exists`)"},
    ("post", IMPORT_PATH): {
        "400": "A body that is not events (`empty_body`, `too_many_lines`), or `missing_parameter` (`site_id`)",
        "413": "Body larger than `BK_MAX_IMPORT_BYTES` (20 MiB by default; `body_too_large`): split the file",
        "415": "A `multipart/form-data` upload, or compressed (`unsupported_media_type`)",
        "503": "The events could not be stored (`unavailable`); sending the body again is safe",
    },
}

# The import is a plain Starlette route served beside the query API (ingest/import_route.py), which
# FastAPI does not describe: its operation, added where the route is served.
_IMPORT_OPERATION: dict[str, Any] = {
    "tags": ["import"],
    "summary": "Import historic events",
    "description": "NDJSON, one event per line, whatever the body's Content-Type (README, Import). Each line "
                   "is accepted whole, rejected with "
                   "its line number and field, or dropped as a bot; the answer comes once the accepted "
                   "events are stored. Importing the same file again stores nothing new.",
    "operationId": "import_events",
    "security": [{SECURITY_SCHEME: []}],
    "parameters": [{"name": "site_id", "in": "query", "required": True, "schema": {"type": "string"}}],
    "requestBody": {"required": True, "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
    "responses": {"200": {"description": "Accepted, rejected and dropped lines", "content": {"application/json": {
        "schema": {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "object", "required": ["accepted", "rejected", "dropped", "stored"], "properties": {
                "accepted": {"type": "integer", "description": "Lines accepted (copies of one event id included)"},
                "rejected": {"type": "array", "items": {"type": "object", "properties": {
                    "line": {"type": "integer"}, "field": {"type": "string"}, "code": {"type": "string"},
                    "message": {"type": "string"}}}},
                "dropped": {"type": "array", "items": {"type": "object", "properties": {
                    "line": {"type": "integer"}, "reason": {"type": "string", "enum": ["bot"]}}}},
                "stored": {"type": "boolean", "description": "false: the workers had not written them all "
                                                             "within 120 s (they will)"}}}}}}}}},
}

_HEADERS = {
    "X-RateLimit-Limit": (f"Requests allowed in the current window ({DEFAULT_LIMIT} per minute per API key by "
                          f"default, `BK_RATE_LIMIT_PER_MINUTE`; {DEFAULT_FAILED_AUTH_LIMIT} per minute per address "
                          "for requests without a valid key)", {"type": "integer"}),
    "X-RateLimit-Remaining": ("Requests left in the current window", {"type": "integer", "minimum": 0}),
    "X-RateLimit-Reset": ("When the current window ends, in epoch seconds", {"type": "integer"}),
    "Retry-After": ("Seconds to wait before trying again: until the rate limit allows requests, or for a data"
                    " store that did not answer", {"type": "integer", "minimum": 1}),
    "ETag": ("Strong entity tag of the body; send it in If-None-Match to get 304", {"type": "string"}),
    "Cache-Control": (f"`{CACHE_CONTROL}`", {"type": "string"}),
    "Vary": ("`Authorization`: answers depend on the key", {"type": "string"}),
}
_RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
_CACHE_HEADERS = ("ETag", "Cache-Control", "Vary")
_BATCH_PATH = "/api/v1/batch"  # its answers are reads: cache headers as the GETs', without an ETag
_BATCH_CACHE_HEADERS = {
    "Cache-Control": {"description": f"`{CACHE_CONTROL}`, or `no-store` when a sub-request answered an error",
                      "required": True, "schema": {"type": "string"}},
    "Vary": {"$ref": "#/components/headers/Vary"}}


def _takes_key(dependant: Dependant) -> bool:
    return any(d.call is api_key or _takes_key(d) for d in dependant.dependencies)


def _refs(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def complete(schema: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    authenticated = {(method.lower(), route.path_format) for route in flat_routes(app.routes)
                     if getattr(route, "dependant", None) is not None and _takes_key(route.dependant)
                     for method in route.methods or ()}
    if any(getattr(route, "path", None) == IMPORT_PATH for route in app.routes):
        schema.setdefault("paths", {})[IMPORT_PATH] = {"post": copy.deepcopy(_IMPORT_OPERATION)}
        authenticated.add(("post", IMPORT_PATH))
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key, `Authorization: Bearer bk_…`: user level (every site of the account) "
                       "or site level (one site)"}
    components.setdefault("headers", {}).update(
        {name: {"description": text, "required": True, "schema": sub} for name, (text, sub) in _HEADERS.items()})
    schemas = components.setdefault("schemas", {})
    if "ErrorResponse" not in schemas:
        for name, sub in ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs").items():
            schemas.setdefault(name, sub)
        schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}

    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            for parameter in operation.get("parameters", []):
                _json_schema_bounds(parameter.get("schema", {}))
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # validation errors answer 400
            errors = dict(_ERROR_DESCRIPTIONS)
            if (method, path) in authenticated:
                operation["security"] = [{SECURITY_SCHEME: []}]
            else:
                del errors["401"], errors["403"]
            errors.update(EXTRA_ERRORS.get((method, path), {}))
            for status, description in errors.items():
                response = responses.setdefault(status, {})
                response["description"] = description
                response["content"] = error_content
            if method == "get":
                responses["304"] = {"description": "Not Modified: If-None-Match matched the ETag (no body)",
                                    "headers": _refs(_CACHE_HEADERS)}
            for status, response in responses.items():
                headers = response.setdefault("headers", {})
                headers.update(_refs(_RATE_LIMIT_HEADERS))
                if status in ("429", "503"):
                    headers.update(_refs(("Retry-After",)))
                if method == "get" and status in ("200", "304"):
                    headers.update(_refs(_CACHE_HEADERS))
                if (method, path) == ("post", _BATCH_PATH) and status == "200":
                    headers.update(_BATCH_CACHE_HEADERS)
            operation["responses"] = dict(sorted(responses.items()))

    # FastAPI's validation-error schemas, unused once 422 is gone.
    for name in ("HTTPValidationError", "ValidationError"):
        if name in schemas and f'"#/components/schemas/{name}"' not in orjson.dumps(schema).decode():
            del schemas[name]
    return schema


# pydantic keeps a Query's bounds under its own names when the type has a validator of its own
# (`Integer`, `DecimalNumber`: query_api/deps.py), and JSON Schema tools ignore `ge`/`le`: a client
# generated from the document would send `limit=500` and get a 400.
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(schema: dict[str, Any]) -> None:
    for ours, standard in _BOUNDS.items():
        if ours in schema:
            schema[standard] = schema.pop(ours)
    for branch in schema.get("anyOf", []):  # an optional parameter: `{"anyOf": [{...bounds}, {"type": "null"}]}`
        _json_schema_bounds(branch)


def install(app: FastAPI) -> None:
    """Make `app.openapi` return the completed document, and serve it at DOCUMENT_PATH and the
    Swagger UI at DOCS_PATH with the cache headers, ETag and 304 of every other GET (FastAPI's
    own routes for them send neither; the app is made without them)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(generate(), app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def document(request: Request) -> Response:
        return cached(request, orjson.dumps(app.openapi()), "application/json")

    async def docs(request: Request) -> Response:
        page = get_swagger_ui_html(openapi_url=DOCUMENT_PATH, title=f"{app.title} - Swagger UI")
        return cached(request, bytes(page.body), "text/html; charset=utf-8")

    app.add_route(DOCUMENT_PATH, document, include_in_schema=False)
    app.add_route(DOCS_PATH, docs, include_in_schema=False)
