"""Stream throughput and freshness, distributed topology (Kafka 4.x, Faust workers, the ClickHouse
front over chDB):

1. the ceiling: how fast a bare aiokafka consumer reads the events topic on this machine, and how
   fast Faust hands the same records to an agent that does nothing with them;
2. one `besokskollen worker`: events/s through the whole stream core, as a share of the ceiling;
3. freshness: ingest's capacity is measured, then events are sent at half of it for a while with
   two workers, one of them killed (-9) halfway; for every accepted pageview, the time from its
   202 to the moment the API's pageview count includes it (counts are compared in order).

    python3 tests/bench/bench_streams.py [--events 40000] [--seconds 40]

Not run by CI: numbers on 2 shared cores are noisy, compare ratios."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import ADMIN_KEY, Broker, free_port, process, stable_group_size, wait_until  # noqa: E402

BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
CLI = [sys.executable, "-m", "besokskollen"]


def events(site: str, n: int) -> list:
    from ingest.event import Event

    rng, now = random.Random(5), datetime.now(timezone.utc)
    return [Event(event_id=str(uuid.uuid4()), site_id=site, timestamp=now - timedelta(seconds=n - i),
                  name="pageview", visitor_id=rng.randrange(n // 3), pathname=f"/p/{rng.randrange(200)}",
                  country="SE", channel="direct") for i in range(n)]


async def produce(bootstrap: str, topic: str, batch: list) -> None:
    from aiokafka import AIOKafkaProducer

    from streams.topic import ensure_topic

    await ensure_topic(bootstrap, topic, 12, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        for e in batch:
            await producer.send(topic, e.to_bytes(), key=e.kafka_key)
        await producer.flush()
    finally:
        await producer.stop()


async def raw_consume_rate(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"raw-{uuid.uuid4().hex[:6]}")
    await consumer.start()
    try:
        seen, started = 0, time.perf_counter()
        while seen < n:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=5000)).values():
                seen += len(records)
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


# A Faust agent that only counts what it is given: how fast Faust itself hands a topic's records
# to an agent here (the same batching as streams/worker.py), before any work is done on them.
_FAUST_NOOP = """
import os, time, faust
app = faust.App(os.environ["NOOP_GROUP"], broker="kafka://" + os.environ["NOOP_BOOTSTRAP"], web_enabled=False,
                consumer_auto_offset_reset="earliest")
topic = app.topic(os.environ["NOOP_TOPIC"], key_serializer="raw", value_serializer="raw")
seen = {"n": 0, "since": None}

@app.agent(topic)
async def count(stream):
    async for values in stream.take(5000, within=0.2):
        if seen["since"] is None:  # from the first batch on: joining the group is not counted
            seen["since"] = time.perf_counter()
            continue
        seen["n"] += len(values)
        if seen["n"] >= int(os.environ["NOOP_UNTIL"]):
            with open(os.environ["NOOP_OUT"], "w") as out:
                out.write(str(seen["n"] / (time.perf_counter() - seen["since"])))
            os._exit(0)
"""


def faust_noop_rate(tmp: Path, bootstrap: str, topic: str, n: int) -> float:
    (tmp / "faust_noop.py").write_text(_FAUST_NOOP)
    out = tmp / "faust_noop.rate"
    env = {**os.environ, "NOOP_GROUP": f"noop-{uuid.uuid4().hex[:6]}", "NOOP_BOOTSTRAP": bootstrap,
           "NOOP_TOPIC": topic, "NOOP_UNTIL": str(n * 3 // 4), "NOOP_OUT": str(out)}
    subprocess.run([sys.executable, "-m", "faust", "-A", "faust_noop", "worker", "-l", "warn", "--without-web"],
                   cwd=tmp, env=env, capture_output=True, timeout=600)
    return float(out.read_text())


def stored(clickhouse: str, site: str) -> int:
    from streams import storage

    return storage.connect(clickhouse).query("SELECT count() FROM events WHERE site_id = {s:String}",
                                             parameters={"s": site}).result_rows[0][0]


def worker_rate(tmp: Path, env: dict, clickhouse: str, site: str, n: int) -> float:
    with process([*CLI, "worker", "--port", str(free_port())], tmp / "worker-rate.log", env):
        wait_until(lambda: stored(clickhouse, site) > 0, 180, "the worker's first batch", interval=0.2)
        first, t0 = stored(clickhouse, site), time.perf_counter()
        wait_until(lambda: stored(clickhouse, site) >= n, 900, "every event stored", interval=0.5)
        return (n - first) / (time.perf_counter() - t0)


# The load comes from aiohttp's client: httpx's AsyncClient managed ~110 requests/s here against
# an ingest that answers wrk at ~2,500/s, which made "half the capacity" a trickle.
async def capacity(ingest: str, site: str, seconds: float) -> float:
    """Accepted events/s of /api/event under 64 concurrent clients."""
    done, stop = 0, time.monotonic() + seconds

    async def client(c: aiohttp.ClientSession, k: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with c.post(f"{ingest}/api/event", json={"site_id": site, "name": "pageview", "url": "https://s.example/cap"},
                              headers={"user-agent": BROWSER, "x-forwarded-for": f"10.9.{k}.{done % 250}"}) as r:
                await r.read()
                done += r.status == 202

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as c:
        await asyncio.gather(*(client(c, k) for k in range(64)))
    return done / seconds


async def steady(ingest: str, api: str, site: str, rate: float, seconds: float, kill_at: float, victim) -> dict:
    """Pageviews at `rate`/s for `seconds`; poll the API's pageview count; kill `victim` at `kill_at` s."""
    accepted: list[float] = []
    counts: list[tuple[float, int]] = []
    start = time.monotonic()
    killed_at = None
    sending: set[asyncio.Task] = set()

    async def sender(c: aiohttp.ClientSession) -> None:
        n = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            n += 1
            sending.add(asyncio.create_task(one(c, n)))
        await asyncio.gather(*sending)

    async def one(c: aiohttp.ClientSession, n: int) -> None:
        async with c.post(f"{ingest}/api/event", json={"site_id": site, "name": "pageview",
                                                       "url": f"https://s.example/f/{n % 50}"},
                          headers={"user-agent": BROWSER, "x-forwarded-for": f"10.8.{n // 250 % 250}.{n % 250}"}) as r:
            await r.read()
            if r.status == 202:
                accepted.append(time.monotonic())

    async def poller(c: httpx.AsyncClient) -> None:
        nonlocal killed_at
        while time.monotonic() - start < seconds + 60:
            if killed_at is None and time.monotonic() - start >= kill_at:
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
            r = await c.get("/api/v1/stats/pages", params={"site_id": site, "period": "7d", "limit": 1000},
                            headers={"authorization": f"Bearer {ADMIN_KEY}"})
            total = sum(p["pageviews"] for p in r.json()["data"] if p["page"].startswith("/f/"))
            counts.append((time.monotonic(), total))
            if time.monotonic() - start > seconds and total >= len(accepted):
                break
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as ci, \
            httpx.AsyncClient(base_url=api, timeout=30) as ca:
        await asyncio.gather(sender(ci), poller(ca))
    accepted.sort()
    lags, k = [], 0
    for i, at in enumerate(accepted, start=1):  # the i-th accepted event is visible once the count reaches i
        while k < len(counts) and counts[k][1] < i:
            k += 1
        if k < len(counts):
            lags.append((at, counts[k][0] - at))
    ordered = sorted(lag for _, lag in lags)
    after_kill = [lag for at, lag in lags if killed_at and at >= killed_at - 5]
    return {"accepted": len(accepted), "p50": statistics.median(ordered), "p99": ordered[int(len(ordered) * 0.99)],
            "worst_after_kill": max(after_kill, default=float("nan")),
            "before_kill_p99": sorted(lag for at, lag in lags if not killed_at or at < killed_at - 5)[
                int(0.99 * len([1 for at, _ in lags if not killed_at or at < killed_at - 5]))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bk-streams-"))
    broker = Broker(tmp / "kafka")
    broker.data.mkdir()
    broker.start()
    ready = tmp / "ready"
    try:
        with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp / "ch"), "--port", "0",
                      "--ready-file", str(ready)], tmp / "chfront.log"):
            port = wait_until(lambda: ready.exists() and ready.read_text().strip(), 30, "the ClickHouse front")
            clickhouse = f"http://127.0.0.1:{port}/?compress=false"
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            env = {"BK_KAFKA_BOOTSTRAP": broker.bootstrap, "BK_CLICKHOUSE_URL": clickhouse, "BK_ADMIN_KEY": ADMIN_KEY,
                   "BK_KAFKA_TOPIC": topic, "BK_RATE_LIMIT_PER_MINUTE": "100000000"}
            subprocess.run([*CLI, "migrate"], env={**os.environ, **env}, cwd=ROOT, check=True, capture_output=True)
            batch = events("rate-example", args.events)
            asyncio.run(produce(broker.bootstrap, topic, batch))
            ceiling = asyncio.run(raw_consume_rate(broker.bootstrap, topic, args.events))
            print(f"raw aiokafka consume: {ceiling:,.0f} events/s", flush=True)
            noop = faust_noop_rate(tmp, broker.bootstrap, topic, args.events)
            print(f"a Faust agent doing nothing: {noop:,.0f} events/s = {noop / ceiling:.0%} of the raw consume rate",
                  flush=True)
            rate = worker_rate(tmp, env, clickhouse, "rate-example", args.events)
            print(f"one worker: {rate:,.0f} events/s = {rate / ceiling:.0%} of the raw consume rate", flush=True)

            env["BK_KAFKA_TOPIC"] = f"fresh-{uuid.uuid4().hex[:6]}"
            api_port, ingest_port = free_port(), free_port()
            api, ingest = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ingest_port}"
            with (process([*CLI, "api", "--port", str(api_port)], tmp / "api.log", env, ready_url=f"{api}/api/v1/openapi.json"),
                  process([*CLI, "ingest", "--port", str(ingest_port)], tmp / "ingest.log", env, ready_url=f"{ingest}/api/event"),
                  process([*CLI, "worker", "--port", str(free_port())], tmp / "w1.log", env),
                  process([*CLI, "worker", "--port", str(free_port())], tmp / "w2.log", env) as victim):
                wait_until(lambda: stable_group_size(broker.bootstrap, "besokskollen") == 2, 120, "two workers")
                r = httpx.post(f"{api}/api/v1/sites", json={"domain": "s.example"},
                               headers={"authorization": f"Bearer {ADMIN_KEY}"})
                site = r.json()["data"]["id"]
                cap = asyncio.run(capacity(ingest, site, 8))
                print(f"ingest capacity: {cap:,.0f} events/s; sending {cap / 2:,.0f}/s for {args.seconds:.0f} s, "
                      f"a worker killed at {args.seconds / 2:.0f} s", flush=True)
                f = asyncio.run(steady(ingest, api, site, cap / 2, args.seconds, args.seconds / 2, victim))
                print(f"freshness (202 → counted by the API) over {f['accepted']:,} events: p50 {f['p50']:.2f} s, "
                      f"p99 {f['p99']:.2f} s; p99 before the kill {f['before_kill_p99']:.2f} s, "
                      f"worst after the kill {f['worst_after_kill']:.2f} s")
    finally:
        broker.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
