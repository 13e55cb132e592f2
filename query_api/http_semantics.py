"""HTTP details for every route under /api/v1, present and future, without touching the routes:

- `HEAD` is answered as `GET` without the body: the same status and headers (Content-Length,
  ETag, Cache-Control, rate-limit headers), so a HEAD needs no route of its own.
- A GET (or HEAD) response names `Authorization` in `Vary`: what a URL answers depends on the
  key sent, so a shared cache must not hand one key's answer to another."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import fastapi.routing
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/api/v1/"
VARY = "Authorization"


def flat_routes(routes: Sequence[BaseRoute]) -> Iterator[Any]:
    """Every route with its effective `path_format`, `path_regex`, `methods` (and `dependant` for
    FastAPI routes), whether FastAPI copies included routers' routes into the app (before 0.16x)
    or keeps the routers (`iter_route_contexts`)."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from iter_contexts(routes) if iter_contexts is not None else routes


def merge_vary(headers: list[tuple[bytes, bytes]], name: str = VARY) -> list[tuple[bytes, bytes]]:
    """The headers with `name` in a single Vary header (kept once; `*` left alone)."""
    values: list[str] = []
    rest = []
    for key, value in headers:
        if key.lower() == b"vary":
            values += [v.strip() for v in value.decode("latin-1").split(",") if v.strip()]
        else:
            rest.append((key, value))
    if "*" not in values and name.lower() not in {v.lower() for v in values}:
        values.append(name)
    return [*rest, (b"vary", ", ".join(values).encode("latin-1"))]


class HeadAndVary:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX) or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_varied(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": merge_vary(list(message.get("headers", [])))}
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_varied)
