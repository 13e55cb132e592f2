"""`/healthz` (the process is alive) and `/readyz` (it can do its work: the store answers with the
current schema and, for the processes that need one, a Kafka broker accepts connections) — 200
or 503 with what failed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from clickhouse_connect.driver.client import Client
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from streams import migrations

Check = Callable[[], Awaitable[bool]]
_TIMEOUT_S = 2.0


def store_check(client: Client) -> Check:
    latest = max(version for version, _name, _steps in migrations.MIGRATIONS)

    async def check() -> bool:
        versions = await asyncio.to_thread(migrations.recorded_versions, client)
        return latest in versions

    return check


def broker_check(servers: list[tuple[str, int]]) -> Check:
    """Any bootstrap server (`Settings.kafka_servers`) accepts a TCP connection (a refused one is
    seen at once)."""

    async def check() -> bool:
        for host, port in servers:
            try:
                _reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                continue
            writer.close()
            return True
        return False

    return check


async def readiness(checks: dict[str, Check]) -> tuple[int, dict]:
    async def run(check: Check) -> bool:
        try:
            return await asyncio.wait_for(check(), _TIMEOUT_S)
        except Exception:
            return False

    results = dict(zip(checks, await asyncio.gather(*(run(c) for c in checks.values()))))
    ready = all(results.values())
    return (200 if ready else 503), {"status": "ready" if ready else "unavailable", "checks": results}


def routes(checks: dict[str, Check]) -> list[Route]:
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        status, body = await readiness(checks)
        return JSONResponse(body, status_code=status)

    return [Route("/healthz", healthz, methods=["GET", "HEAD"]), Route("/readyz", readyz, methods=["GET", "HEAD"])]
