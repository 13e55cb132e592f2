"""`POST /api/event`'s handler alone, in-process: the real routes, site registry and visitor ids
(chDB in a temporary folder), called as an ASGI app without a server or a network, with a hand-off
that only counts. The requests are bench_ingest.py's (tests/bench/load.lua): pageviews, custom
events and clicks with varied paths and referrers, a new X-Forwarded-For address each. Prints µs
per request, the best of `--rounds`; far steadier here than wrk, so two versions (`--repo`, a
worktree of an older commit) can be compared in alternating runs.

    python3 tests/bench/bench_event_handler.py [--requests 20000] [--rounds 3] [--repo PATH] [--profile]

As the CLI does before it serves, what starting made is frozen out of garbage collection first.
Not run by CI."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

BROWSER = b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
REFERRERS = ["https://www.google.com/", "https://www.bing.com/", "https://l.facebook.com/", "", "https://prisjakt.nu/x"]


def bodies(site: str, rng: random.Random) -> bytes:
    path, kind = f"/p/{rng.randint(1, 500)}", rng.randint(1, 10)
    if kind <= 7:
        return (f'{{"site_id":"{site}","name":"pageview","url":"https://bench.example{path}",'
                f'"referrer":"{rng.choice(REFERRERS)}"}}').encode()
    if kind <= 8:
        return (f'{{"site_id":"{site}","name":"newsletter","url":"https://bench.example{path}",'
                f'"props":{{"plan":"p{rng.randint(1, 5)}"}}}}').encode()
    return (f'{{"site_id":"{site}","name":"click","url":"https://bench.example{path}","product":{{"id":"prod-'
            f'{rng.randint(1, 200)}","category_slug":"c{rng.randint(1, 20)}","partner_slug":"kjell"}}}}').encode()


def scope(body: bytes, rng: random.Random) -> dict:
    address = f"81.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}".encode()
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/api/event", "raw_path": b"/api/event", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", BROWSER), (b"x-forwarded-for", address),
                        (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from starlette.applications import Starlette

    from besokskollen.app import _Dispatch, open_services
    from besokskollen.config import Settings
    from ingest import app as ingest_app
    from ingest import useragents
    from ingest.visitors import CarryQuestions

    settings = Settings(clickhouse_url=f"chdb://{tempfile.mkdtemp(prefix='bk-handler-')}/ch")
    services = open_services(settings)
    site = services.sites.create("bench", "bench.example").site_id

    class Counted:
        taken = 0

        async def send(self, event, incarnation: int) -> None:
            Counted.taken += 1

    useragents.warm_up()
    routes = ingest_app.routes(settings, services.sites, services.visitors, CarryQuestions(services.visitors),
                               Counted())
    app = _Dispatch(Starlette(routes=routes), None)
    rng = random.Random(7)
    requests = [(scope(body, rng), body) for body in (bodies(site, rng) for _ in range(args.requests))]
    statuses: set[int] = set()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    async def run(batch: list) -> None:
        for request_scope, body in batch:
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive(messages: list = messages) -> dict:
                return messages.pop() if messages else {"type": "http.disconnect"}

            await app(request_scope, receive, send)

    async def measure() -> None:
        await run(requests[:2000])  # warms the caches up, loads the day's salts and open sessions
        gc.collect()
        gc.freeze()
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            await run(requests)
            times.append(time.perf_counter() - started)
        print(f"{args.repo}: {min(times) / args.requests * 1e6:.1f} µs per request (best of {args.rounds}; "
              f"all: {', '.join(f'{t / args.requests * 1e6:.1f}' for t in times)}), answers {sorted(statuses)}, "
              f"{Counted.taken:,} events handed on")
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            await run(requests)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)

    asyncio.run(measure())


if __name__ == "__main__":
    main()
