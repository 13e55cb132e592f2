"""Query latency per endpoint for /metrics (`bk_query_seconds{endpoint}`), labelled by the route's
path template under /api/v1 (`GET /stats/overview`), so ids do not make new series. A request
answered before routing (a 429 of the rate limit) counts under the template it asked for;
requests no route matches are `unmatched`, and paths outside /api/v1 (probes, scrapes) are no
queries."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from besokskollen import metrics


class Timing:
    def __init__(self, app: ASGIApp, prefix: str, templates: Callable[[], Iterable[str]] = tuple) -> None:
        """`templates`: the API's path templates under `prefix` (read at the first request that was
        answered before routing, once every route is there)."""
        self.app = app
        self._prefix = prefix
        self._templates = templates
        self._compiled: list[tuple[re.Pattern, str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self._prefix + "/"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            metrics.QUERY_SECONDS.labels(self._endpoint(scope)).observe(time.perf_counter() - started)

    def _endpoint(self, scope: Scope) -> str:
        if (route := scope.get("route")) is not None:
            return f"{scope['method']} {route.path}"
        if self._compiled is None:
            self._compiled = [(compile_path(template)[0], template) for template in self._templates()]
        path = scope["path"].removeprefix(self._prefix)
        asked = next((template for regex, template in self._compiled if regex.match(path)), None)
        return f"{scope['method']} {asked}" if asked else "unmatched"
