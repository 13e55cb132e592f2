"""Trending on a busy site: the cost of `/trending/products` when the quarter hours its windows'
edges cut hold many events (it reads them from the raw events: README, Known limits).

    python3 tests/bench/bench_trending.py [--events 300000] [--data /tmp/bk-bench-trending]
                                          [--repo PATH] [--rounds 3] [--calls 20]

One site: `--events` events (8 % affiliate clicks over 200 products) in the quarter hour before
`now`, which is 14 min 30 s into it, and 40,000 clicks over the 8 days before, stored through the
stream core once per data folder. Each version (this checkout; with `--repo`, another one, e.g. a
worktree of an older commit) then answers trending (24 h against 7 days) in a process of its
own, in alternating rounds; the answers must be equal. Not run by CI: numbers on 2 shared cores
are noisy, compare the ratio."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = "trending-bench"

_CHILD = """
import json, resource, sys, time
from datetime import datetime
sys.path.insert(0, sys.argv[1])
from query_api.affiliate import trending_products
from streams import storage
client = storage.connect(sys.argv[2])
now, calls = datetime.fromisoformat(sys.argv[3]), int(sys.argv[4])
def ask():
    return trending_products(client, "trending-bench", now, 24, 7, 0, 3, 10)
answer = ask()
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu, wall = usage.ru_utime + usage.ru_stime, time.perf_counter()
for _ in range(calls):
    ask()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_ms": (time.perf_counter() - wall) * 1000 / calls,
                  "cpu_ms": (usage.ru_utime + usage.ru_stime - cpu) * 1000 / calls, "answer": answer}, default=str))
"""


def store(data: Path, size: int) -> None:
    """The bench site's events, stored through the stream core, and its `now` in loaded.json."""
    sys.path.insert(0, str(ROOT))
    from besokskollen.app import DEFAULT_ACCOUNT, open_services
    from besokskollen.config import Settings
    from ingest.event import Event
    from streams.core import StreamCore

    services = open_services(Settings(clickhouse_url=f"chdb://{data}", kafka_bootstrap=None))
    services.sites.create(DEFAULT_ACCOUNT, "trending-bench.example", "Bench", "UTC", site_id=SITE)
    core = StreamCore(services.client, 1800)
    rng = random.Random(1)
    now = datetime.now(timezone.utc).replace(minute=14, second=30, microsecond=0) - timedelta(hours=1)
    quarter = now.replace(minute=0, second=0)

    def event(at: datetime, click: bool) -> Event:
        product = f"p{min(int(rng.expovariate(0.03)), 199)}" if click else ""
        return Event(event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), site_id=SITE, timestamp=at,
                     name="click" if click else "pageview", visitor_id=rng.randrange(50_000),
                     pathname=f"/p/{rng.randrange(500)}", country="SE", channel="direct", product_id=product,
                     product_slug=product, category_slug=f"c{rng.randrange(8)}" if click else "",
                     partner_slug=f"partner{rng.randrange(5)}" if click else "")

    span = (now - quarter).total_seconds()
    busy = sorted((event(quarter + timedelta(seconds=rng.random() * span), rng.random() < 0.08) for _ in range(size)),
                  key=lambda e: e.timestamp)
    before = sorted((event(quarter - timedelta(seconds=rng.random() * 8 * 86400), True) for _ in range(40_000)),
                    key=lambda e: e.timestamp)
    started = time.perf_counter()
    for events in (before, busy):
        for i in range(0, len(events), 25_000):
            core.process(events[i:i + 25_000])
            done = min(i + 25_000, len(events))
            print(f"  {done:,} of {len(events):,} stored ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
                  flush=True)
    (data / "loaded.json").write_text(json.dumps({"now": now.isoformat()}))
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/bk-bench-trending"))
    parser.add_argument("--repo", type=Path, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--store", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.data.resolve()
    if args.store:
        return store(data, args.events)
    # Stored by a process of its own: a chDB folder is open in one process at a time.
    if not (data / "loaded.json").exists():
        subprocess.run([sys.executable, __file__, "--store", "--events", str(args.events), "--data", str(data)],
                       check=True)
    now = datetime.fromisoformat(json.loads((data / "loaded.json").read_text())["now"])
    versions = {"this checkout": ROOT} | ({f"{args.repo}": args.repo.resolve()} if args.repo else {})
    results: dict[str, list[dict]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, path in versions.items():
            out = subprocess.run([sys.executable, "-c", _CHILD, str(path), f"chdb://{data}", now.isoformat(),
                                  str(args.calls)], capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.splitlines()[-1]))
    answers = {json.dumps(r["answer"], sort_keys=True) for runs in results.values() for r in runs}
    assert len(answers) == 1, "the versions' answers differ"
    print(f"{args.events:,} events in the quarter hour before {now:%H:%M:%S}; trending 24 h against 7 days, "
          f"{args.calls} calls a round, {args.rounds} rounds alternating (median)")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["wall_ms"] for r in runs)
        print(f"{name:40s} {medians[name]:8.1f} ms wall {statistics.median(r['cpu_ms'] for r in runs):8.1f} ms CPU")
    if args.repo:
        print(f"ratio this checkout / {args.repo}: {medians['this checkout'] / medians[str(args.repo)]:.2f}")


if __name__ == "__main__":
    main()
