"""Live events spread over many sites, in-process (`up`'s app over chDB in a temporary folder, no
HTTP server): events/s and the site reads they cost, as traffic goes round-robin over K of N
sites. Each round starts at the first site again, so the first round shows what a site costs the
first time a process meets it, and the later ones what it costs once seen (a cached site lives
5 s; a read of one refreshes every site asked for in the last minute: `streams/read_cache.py`).

    python3 tests/bench/bench_many_sites.py [--sites 20000] [--active 2000] [--rounds 2]
                                            [--seconds 15] [--senders 8]

Run from another checkout (a worktree of an older commit), it times that one. Not run by CI."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from besokskollen.app import make_handoff, open_services, server_app  # noqa: E402
from besokskollen.config import Settings  # noqa: E402
from streams.sites import SiteRegistry  # noqa: E402

BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"


def add_sites(client, count: int) -> None:
    """`count` sites as rows (the API's create costs ~35 ms each): s0-many-example, …"""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rows = [[f"s{n}-many-example", "default", f"s{n}.many.example", f"s{n}.many.example", "UTC", now, 0, time.time_ns()]
            for n in range(count)]
    for start in range(0, count, 50_000):
        client.insert("sites", rows[start:start + 50_000],
                      column_names=["site_id", "account_id", "domain", "name", "timezone", "created_at", "deleted",
                                    "version"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=20_000)
    parser.add_argument("--active", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--senders", type=int, default=8)
    args = parser.parse_args()

    services = open_services(Settings(clickhouse_url=f"chdb://{tempfile.mkdtemp(prefix='bk-many-')}",
                                      kafka_bootstrap=None, rate_limit_per_minute=1_000_000))
    add_sites(services.client, args.sites)
    reads = {"one": 0, "many": 0}
    load, load_many = SiteRegistry._load, getattr(SiteRegistry, "_load_many", None)  # (none before 2026-12-05)

    def counted_load(self, column, key, client=None):
        reads["one"] += client is None  # the cache's reads (not a change's fresh one)
        return load(self, column, key, client)

    def counted_load_many(self, column, keys):
        reads["many"] += 1
        return load_many(self, column, keys)

    SiteRegistry._load = counted_load
    if load_many is not None:
        SiteRegistry._load_many = counted_load_many
    handoff = make_handoff(services)
    await handoff.start()
    transport = httpx.ASGITransport(app=server_app(services, handoff), client=("127.0.0.1", 5000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            print(f"{args.sites:,} sites, traffic round-robin over {args.active:,}, {args.senders} senders")
            for round_ in range(1, args.rounds + 1):
                await asyncio.sleep(6)  # every cached site past its time
                await handoff.runner.drain()
                reads.update(one=0, many=0)
                sent, end = 0, time.perf_counter() + args.seconds

                async def sender(first: int) -> None:
                    nonlocal sent
                    n = first
                    while time.perf_counter() < end:
                        response = await client.post(
                            "/api/event", json={"site_id": f"s{n % args.active}-many-example", "name": "pageview",
                                                "url": f"https://s{n % args.active}.many.example/"},
                            headers={"user-agent": BROWSER, "x-forwarded-for": f"10.{first}.{n // 250 % 250}.{n % 250}"})
                        assert response.status_code == 202, response.text
                        sent, n = sent + 1, n + args.senders

                started = time.perf_counter()
                await asyncio.gather(*(sender(first) for first in range(args.senders)))
                accepted = time.perf_counter() - started
                await handoff.runner.drain()
                print(f"round {round_}: {sent / accepted:,.0f} events/s accepted ({sent:,} events, sites "
                      f"{min(sent, args.active):,} of {args.active:,} reached), written {sent / (time.perf_counter() - started):,.0f}/s"
                      f" end to end; site reads: {reads['one']:,} single, {reads['many']:,} for many")
    finally:
        await handoff.stop()


if __name__ == "__main__":
    asyncio.run(main())
