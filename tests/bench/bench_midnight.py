"""Visitor ids right after UTC midnight, when visitors new to a process need the database
(ingest/visitors.py): the cost against the same work later in the day, in one run, embedded
engine, in-process (no HTTP, no Kafka).

1. `/api/event` through the ingest app's ASGI handler, 64 requests at a time, each from a new
   visitor, with the clock at 12:05, at 00:05 (only sessions open at midnight are asked about)
   and at 00:00:05 UTC (the day's first minute: every new visitor is).
2. An import's visitor ids (`importer.to_events`) for 10,000 events of new visitors, spread over
   ten past days at 02:00–22:00 and in 00:00–00:30.

    python3 tests/bench/bench_midnight.py [--requests 3000] [--events 10000]

Not run by CI: numbers on 2 shared cores are noisy, compare ratios."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import ingest.app as ingest_app  # noqa: E402
from besokskollen.app import DEFAULT_ACCOUNT, ingest_server_app, open_services  # noqa: E402
from besokskollen.config import Settings  # noqa: E402
from ingest import importer  # noqa: E402
from tests.conftest import BROWSER  # noqa: E402

CONCURRENCY = 64


class _Discard:
    """A hand-off that only serializes: the cost measured is ingest's own."""

    async def start(self) -> None: ...

    async def send(self, event) -> None:
        event.to_bytes()

    async def flush(self, events) -> bool:
        return True

    async def stop(self) -> None: ...


async def _post(app, body: bytes, ip: bytes) -> None:
    scope = {"type": "http", "method": "POST", "path": "/api/event", "query_string": b"", "root_path": "",
             "scheme": "http", "http_version": "1.1", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5555),
             "headers": [(b"user-agent", BROWSER.encode()), (b"content-type", b"application/json"),
                         (b"x-forwarded-for", ip)]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 202, sent


async def _requests_per_s(app, site_id: str, first_octet: int, n: int) -> float:
    body = orjson.dumps({"site_id": site_id, "name": "pageview", "url": "https://bench.example/a"})
    ips = [f"{first_octet}.{i // 62500}.{i // 250 % 250}.{i % 250}".encode() for i in range(n)]

    async def client(k: int) -> None:
        for i in range(k, n, CONCURRENCY):
            await _post(app, body, ips[i])

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(CONCURRENCY)))
    return n / (time.perf_counter() - started)


def _import_seconds(services, site, first_day: datetime, in_first_half_hour: bool, n: int) -> float:
    rng = random.Random(3)
    lines = []
    for i in range(n):
        day = first_day + timedelta(days=i % 10)
        offset = timedelta(minutes=rng.uniform(0, 30)) if in_first_half_hour else timedelta(hours=rng.uniform(2, 22))
        lines.append(orjson.dumps({"name": "pageview", "url": "https://bench.example/a", "user_agent": BROWSER,
                                   "timestamp": (day + offset).isoformat(), "ip": f"10.{i // 62500}.{i // 250 % 250}.{i % 250}"}))
    parsed = importer.parse(b"\n".join(lines), site, datetime.now(timezone.utc), services.visitors.id_key(), 400)
    started = time.perf_counter()
    events = importer.to_events(parsed.lines, site, services.visitors)
    assert len(events) == n
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="bk-bench-midnight-")
    services = open_services(Settings(clickhouse_url=f"chdb://{data}/ch", kafka_bootstrap="127.0.0.1:1"))
    site = services.sites.create(DEFAULT_ACCOUNT, "bench.example")
    app = ingest_server_app(services, _Discard())
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)

    rates = {}
    for label, clock, octet in (("12:05 UTC", timedelta(hours=12, minutes=5), 20),
                                ("00:05 UTC", timedelta(minutes=5), 30),
                                ("00:00:05 UTC", timedelta(seconds=5), 40)):
        start = time.monotonic()
        ingest_app.utcnow = lambda clock=clock, start=start: today + clock + timedelta(seconds=time.monotonic() - start)
        uvloop.run(_post(app, orjson.dumps({"site_id": site.site_id, "name": "pageview", "url": "https://bench.example/"}),
                         b"9.9.9.9"))  # the day's salts
        rates[label] = uvloop.run(_requests_per_s(app, site.site_id, octet, args.requests))
    print(f"/api/event, {args.requests} new visitors, {CONCURRENCY} at a time:")
    for label, rate in rates.items():
        print(f"  {label}: {rate:8,.0f} requests/s ({rate / rates['12:05 UTC']:.2f}× midday)")

    first_day = today - timedelta(days=20)
    later = _import_seconds(services, site, first_day, False, args.events)
    early = _import_seconds(services, site, first_day, True, args.events)
    print(f"import of {args.events:,} events of new visitors over ten days:")
    print(f"  02:00-22:00 UTC: {later:6.2f} s")
    print(f"  00:00-00:30 UTC: {early:6.2f} s ({early / later:.2f}× the rest of the day)")


if __name__ == "__main__":
    main()
