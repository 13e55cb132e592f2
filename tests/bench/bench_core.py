"""The stream core alone, in-process (chDB in a temporary folder, no Kafka, no HTTP): events/s for
returning visitors in fixed-size batches — the number behind a worker's rate, without Faust or
Kafka in the way. `--repo` times another checkout (a worktree of an older commit) with the same
events, so two versions can be run alternately, as ratios on this noisy 2-core machine.

    python3 tests/bench/bench_core.py [--events 40000] [--batch 5000] [--per-visitor 3]
                                      [--seconds-apart 1] [--repo PATH] [--profile]

`--per-visitor`: events a visitor has on average; `--seconds-apart`: between consecutive events of
the whole stream (with the defaults a visitor's events are ~3 hours apart, a session each; 20 and
0.1 give visitors of ~20 events ~3 minutes apart, mostly in one session).

The first batch warms up (caches, imports) and is not timed. `--profile` prints cProfile's top
functions by own time (the rate under the profiler is far lower). Not run by CI."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--per-visitor", type=float, default=3)
    parser.add_argument("--seconds-apart", type=float, default=1)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from ingest.event import Event
    from streams import replay, storage
    from streams.core import StreamCore

    client = storage.connect(f"chdb://{tempfile.mkdtemp(prefix='bk-core-')}/ch")
    replay.upgrade(client, 1800, 400, None)
    core = StreamCore(client, 1800)
    rng, now, n = random.Random(5), datetime.now(timezone.utc), args.events
    events = [Event(event_id=str(uuid.uuid4()), site_id="bench",
                    timestamp=now - timedelta(seconds=(n - i) * args.seconds_apart),
                    name="pageview", visitor_id=rng.randrange(int(n / args.per_visitor)),
                    pathname=f"/p/{rng.randrange(200)}",
                    country="SE", channel="direct") for i in range(n)]
    core.process(events[:args.batch])
    profiler = cProfile.Profile() if args.profile else None
    started, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for i in range(args.batch, n, args.batch):
        core.process(events[i:i + args.batch])
    if profiler:
        profiler.disable()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    # Per CPU second too (chDB's threads included), which leaves out time spent waiting for a core
    # (still noisy here: compare several alternating runs).
    print(f"{args.repo}: {(n - args.batch) / elapsed:,.0f} events/s, {(n - args.batch) / cpu:,.0f} per CPU second"
          f" ({n - args.batch:,} events in {args.batch:,}-event batches{', under cProfile' if profiler else ''})")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
