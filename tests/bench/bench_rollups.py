"""The stream core's cost per batch as a quarter hour fills: small batches of live-like traffic
(20 sites, returning and new visitors, pageviews, custom events and clicks) in-process (chDB in a
temporary folder), timestamps advancing as at `--rate` events/s. Per simulated minute it prints
the time per batch and its parts: the id lookup (`owners`), the history read, the four writes and
the rollup rebuild, whose reads grow with the activity of the current quarter hour and day.
`--repo` runs another checkout (a worktree of an older commit) on the same events. `--fill-hours H`
first stores H hours of the same UTC day at `--fill-rate` events/s (in 5,000-event batches,
untimed), so the timed minutes come late in a day whose quarter hours are mostly filled: the
daily rollup's rebuild reads them (migration 8).

    python3 tests/bench/bench_rollups.py [--minutes 5] [--rate 300] [--batch 90] [--repo PATH]
                                         [--fill-hours 0] [--fill-rate 5]

Not run by CI: it prints numbers (2 cores shared with other work; expect noise)."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--rate", type=int, default=300, help="simulated events per second")
    parser.add_argument("--batch", type=int, default=90, help="events per batch")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--fill-hours", type=float, default=0)
    parser.add_argument("--fill-rate", type=float, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from ingest.event import Event
    from streams import core, replay, storage

    client = storage.connect(f"chdb://{tempfile.mkdtemp(prefix='bk-rollups-')}/ch")
    replay.upgrade(client, 1800, 400, None)
    stream_core = core.StreamCore(client, 1800)
    spent: dict[str, float] = defaultdict(float)

    def timed(module, name: str, label: str) -> None:
        original = getattr(module, name)

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[label] += time.perf_counter() - started
        setattr(module, name, wrapper)

    for module, name in ((core.raw_events, "owners"), (core.raw_events, "history"), (core.raw_events, "write"),
                         (core.sessions, "write"), (core.activity, "write"), (core.rollups, "rebuild")):
        timed(module, name, f"{module.__name__.split('.')[-1]}.{name}")

    rng = random.Random(5)
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=1) if not args.fill_hours else now.replace(hour=0) - timedelta(days=1)
    sites = [f"site-{i}" for i in range(20)]
    returning = {site: [rng.getrandbits(63) for _ in range(2000)] for site in sites}

    def event(at: datetime) -> Event:
        site = rng.choice(sites)
        r = rng.random()
        name = "pageview" if r < 0.6 else "signup" if r < 0.75 else "click"
        return Event(
            event_id=str(uuid.uuid4()), site_id=site, timestamp=at, name=name,
            visitor_id=rng.choice(returning[site]) if rng.random() < 0.7 else rng.getrandbits(63),
            pathname=f"/sida/{rng.randrange(190)}", country=rng.choice(["SE", "NO", "DE", "US"]), channel="direct",
            product_id=f"p{rng.randrange(40)}" if name == "click" else "")

    if args.fill_hours:
        filled = int(args.fill_hours * 3600 * args.fill_rate)
        print(f"{args.repo}: storing {args.fill_hours} h of the day first ({filled:,} events)", flush=True)
        for i in range(0, filled, 5000):
            stream_core.process([event(start + timedelta(seconds=n / args.fill_rate))
                                 for n in range(i, min(i + 5000, filled))])
        start += timedelta(hours=args.fill_hours)
        spent.clear()
    per_minute, batch, sent = 60 * args.rate, [], 0
    wall = time.perf_counter()
    print(f"{args.repo}: {args.rate} events/s simulated over 20 sites, {args.batch}-event batches")
    while sent < args.minutes * per_minute:
        batch.append(event(start + timedelta(seconds=sent / args.rate)))
        sent += 1
        if len(batch) == args.batch:
            stream_core.process(batch)
            batch = []
        if sent % per_minute == 0:
            batches = per_minute / args.batch
            parts = "  ".join(f"{label} {seconds / batches * 1000:5.1f}" for label, seconds in sorted(spent.items()))
            print(f"minute {sent // per_minute:3d}: {(time.perf_counter() - wall) / batches * 1000:6.1f} ms/batch  ({parts})",
                  flush=True)
            spent.clear()
            wall = time.perf_counter()


if __name__ == "__main__":
    main()
