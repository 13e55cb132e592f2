"""Identical questions sent at once, as a Next.js build or a wave of ISR revalidations sends them:
`--requests` concurrent GETs of one endpoint against `up --demo`'s site, per endpoint, timed from
the first send to each answer. With `--repo` (a worktree of an older commit) the same herds go
to that release's `up` on the same data folder, alternating by round, so the two can be compared
as ratios on this noisy 2-core machine. The rate limit is raised out of the way.

    python3 tests/bench/bench_herd.py [--requests 90] [--rounds 3] [--repo PATH] [--port 23180]

Not run by CI: it prints numbers."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import http_ok, wait_until  # noqa: E402
KEY = "bk_benchherd_0123456789abcdef0123"
SITE = "mobildelar-se"
ENDPOINTS = {
    "overview 30d": f"stats/overview?site_id={SITE}&period=30d",
    "pages 30d": f"stats/pages?site_id={SITE}&period=30d",
    "popular products 7d": f"popular/products?site_id={SITE}&days=7",
    "trending": f"trending/products?site_id={SITE}",
}


def start(checkout: Path, data: Path, port: int, demo: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout), "BK_ADMIN_KEY": KEY, "BK_RATE_LIMIT_PER_MINUTE": "1000000"}
    process = subprocess.Popen([sys.executable, "-m", "besokskollen", "up", "--data", str(data), "--port", str(port),
                                *(["--demo"] if demo else [])], cwd=checkout, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def ready() -> bool:
        if process.poll() is not None:
            raise SystemExit(f"up from {checkout} exited with {process.returncode}")
        return http_ok(f"http://127.0.0.1:{port}/readyz")

    wait_until(ready, 300, f"up from {checkout}", 0.5)
    return process


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


async def herd(port: int, path: str, n: int) -> list[float]:
    url, headers = f"http://127.0.0.1:{port}/api/v1/{path}", {"authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(url, headers=headers) as r:  # warm: caches, the site's first read
            assert r.status == 200, await r.text()
        started = time.perf_counter()

        async def one() -> float:
            async with session.get(url, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
                return time.perf_counter() - started

        return sorted(await asyncio.gather(*(one() for _ in range(n))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repo", type=Path, help="an older checkout to compare with")
    parser.add_argument("--port", type=int, default=23180)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="bk-herd-")) / "ch"
    stop(start(ROOT, data, args.port, demo=True))
    checkouts = {"this": ROOT, **({"baseline": args.repo.resolve()} if args.repo else {})}
    p50: dict[tuple[str, str], list[float]] = {}
    last: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for label, checkout in (checkouts.items() if round_ % 2 == 0 else reversed(checkouts.items())):
            process = start(checkout, data, args.port)
            try:
                for name, path in ENDPOINTS.items():
                    times = asyncio.run(herd(args.port, path, args.requests))
                    p50.setdefault((label, name), []).append(statistics.median(times))
                    last.setdefault((label, name), []).append(times[-1])
            finally:
                stop(process)
    print(f"{args.requests} identical requests at once, median of {args.rounds} rounds, ms (p50 / last answer)")
    for name in ENDPOINTS:
        line = f"{name:22s}"
        for label in checkouts:
            line += (f"  {label} {statistics.median(p50[(label, name)]) * 1000:6.0f} /"
                     f" {statistics.median(last[(label, name)]) * 1000:6.0f}")
        if args.repo:
            line += (f"  last-answer ratio this/baseline "
                     f"{statistics.median(last[('this', name)]) / statistics.median(last[('baseline', name)]):.2f}")
        print(line)


if __name__ == "__main__":
    main()
