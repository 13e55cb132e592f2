"""Query latency per endpoint for /metrics (`bk_query_seconds{endpoint}`), labelled by the route's
path template under /api/v1 (`GET /stats/overview`), so ids do not make new series; requests no
route matched are `unmatched`."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from besokskollen import metrics


class Timing:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            endpoint = f"{scope['method']} {route.path}" if route is not None else "unmatched"
            metrics.QUERY_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
