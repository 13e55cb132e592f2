"""`/healthz` (the process is alive) and `/readyz` (it can do its work: the store answers with the
current schema and, for the processes that need one, a Kafka broker answers) — 200
or 503 with what failed. Also answered while a server starts (`answering_while_starting`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from clickhouse_connect.driver.client import Client
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ingest.cors import CORS
from streams import migrations

Check = Callable[[], Awaitable[bool]]
_TIMEOUT_S = 2.0
_STARTING_RETRY_S = "5"


def store_check(client: Client) -> Check:
    """One question at a time: a probe gives up after _TIMEOUT_S, but its thread cannot be
    stopped, and on a hung ClickHouse each probe left one asking in the default thread pool (6
    threads here; the rate limiter's key reads and a batch's site reads queue there too). A probe
    while the last one's question is unanswered waits on that question."""
    latest = max(version for version, _name, _steps in migrations.MIGRATIONS)
    asking: asyncio.Future | None = None

    async def check() -> bool:
        nonlocal asking
        if asking is None or asking.done():
            asking = asyncio.ensure_future(asyncio.to_thread(migrations.recorded_versions, client))
            # Its failure may come after every probe waiting on it gave up: seen here, not logged
            # by asyncio as never retrieved.
            asking.add_done_callback(lambda done: done.cancelled() or done.exception())
        versions = await asyncio.shield(asking)
        return latest in versions

    return check


def broker_check(servers: list[tuple[str, int]]) -> Check:
    """Any bootstrap server (`Settings.kafka_servers`) answers a request, all asked at once (a
    refused connection is seen at once). An accepted connection is not enough: a hung broker's
    kernel still accepts them, and it was called ready for the ~27 s it answered nothing."""

    async def check() -> bool:
        asking = [asyncio.ensure_future(_answers_api_versions(host, port)) for host, port in servers]
        try:
            for answer in asyncio.as_completed(asking):
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    if await answer:
                        return True
            return False
        finally:
            for question in asking:
                question.cancel()

    return check


# Kafka's ApiVersions request (key 18, version 0; header v1, client id "readyz"), the first one
# every client sends: a broker answers it whatever it supports.
_CORRELATION_ID = 0x62_6B_72_64
_REQUEST = struct.pack(">hhih", 18, 0, _CORRELATION_ID, 6) + b"readyz"
_API_VERSIONS = struct.pack(">i", len(_REQUEST)) + _REQUEST


async def _answers_api_versions(host: str, port: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_API_VERSIONS)
        await writer.drain()
        _size, correlation_id = struct.unpack(">ii", await reader.readexactly(8))
        return correlation_id == _CORRELATION_ID
    finally:
        writer.close()


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


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening: answered on while it starts, then handed to it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def answering_while_starting(sock: socket.socket) -> Iterator[None]:
    """Answer on the server's socket while it starts — waits for ClickHouse or Kafka, or replays
    a migration, which can take minutes: `/healthz` 200 (the process is alive, so a liveness or
    startup probe does not restart it mid-replay, nor into a crash-loop back-off that outlasts
    the outage), `/readyz` and everything else 503 with Retry-After. The socket stays open: the
    server takes it over, with any connection still waiting to be accepted."""
    from besokskollen import http_protocol  # here: it loads uvicorn, which one-shot commands need not

    server = _StartingServer(sock, http_protocol.HEAD_TIMEOUT_S)
    thread = threading.Thread(target=server.serve_forever, name="answering-while-starting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()


class _StartingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, head_timeout_s: float) -> None:
        super().__init__(sock.getsockname()[:2], _StartingHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.head_timeout_s = head_timeout_s


class _StartingHandler(BaseHTTPRequestHandler):
    def setup(self) -> None:
        # A connection that sends nothing is dropped, as the server drops one: each holds a
        # thread here, and one accepted now would be held past the start.
        self.timeout = self.server.head_timeout_s
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, {"status": "starting"})
        elif path == "/readyz":
            self._answer(503, {"status": "starting", "checks": {}})
        else:
            self._answer(503, {"error": {"code": "starting", "message": "the server is starting; retry later"}})

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _answer(self, status: int, body: dict) -> None:
        payload = orjson.dumps(body)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("cache-control", "no-store")
        if self.path.split("?", 1)[0] == "/api/event":  # a page's script reads the answer, a preflight passes
            for name, value in CORS.items():
                self.send_header(name, value)
        if status == 503:
            self.send_header("retry-after", _STARTING_RETRY_S)
        self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # probes every few seconds: not worth a line each
        pass
