"""A worker's memory as it fills: the stream core alone, talking to ClickHouse over HTTP (the front
in tests/chfront.py, in its own process, so the engine's memory is not counted), fed batches of
new visitors. Prints this process's resident memory and the objects the garbage collector tracks
after every few batches: a core keeps nothing between batches (streams/core.py), so both should
stay flat after the first batches (caches: user agents, session ids, goals).

    python3 tests/bench/bench_core_memory.py [--visitors 150000] [--batch 5000]

A soak measures the same in a real worker over hours (tests/bench/soak_distributed.py); this takes
a few minutes. Not run by CI: it prints numbers."""

from __future__ import annotations

import argparse
import gc
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=150_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    from ingest.event import Event
    from streams import replay, storage
    from streams.core import StreamCore

    folder = Path(tempfile.mkdtemp(prefix="bk-core-memory-"))
    ready = folder / "ready"
    front = subprocess.Popen([sys.executable, "-m", "tests.chfront", "--path", str(folder / "data"), "--port", "0",
                              "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        while not (ready.exists() and ready.read_text().strip()):
            time.sleep(0.1)
        client = storage.connect(f"http://127.0.0.1:{ready.read_text().strip()}/?compress=false")
        replay.upgrade(client, 1800, 400, None)
        core = StreamCore(client, 1800)
        rng, now = random.Random(7), datetime.now(timezone.utc)
        per_batch = args.batch // 3  # visitors of three events each, as in a soak
        print(f"{per_batch:,} new visitors a batch")
        print(f"{'visitors':>9} {'RSS MB':>7} {'gc objects':>10} {'batch s':>7}")
        start_rss = rss_mb()
        for first in range(0, args.visitors, per_batch):
            batch = [Event(event_id=str(uuid.uuid4()), site_id=f"mem-{v % 20}",
                           timestamp=now - timedelta(minutes=20) + timedelta(seconds=v % 900 + 60 * n),
                           name="pageview" if n < 2 else "click", visitor_id=v, pathname=f"/p/{rng.randrange(500)}",
                           country=rng.choice(["SE", "NO", "DK", "FI", "DE"]), channel="direct",
                           source=rng.choice(["", "Google", "Facebook"]))
                     for v in range(first, first + per_batch) for n in range(3)]
            started = time.perf_counter()
            core.process(batch)
            took = time.perf_counter() - started
            done = first + per_batch
            if done % (per_batch * 5) == 0 or done >= args.visitors:
                print(f"{done:9,} {rss_mb():7.0f} {len(gc.get_objects()):10,} {took:7.2f}",
                      flush=True)
        print(f"RSS grew {rss_mb() - start_rss:.0f} MB over {args.visitors:,} visitors")
    finally:
        front.terminate()
        front.wait(10)


if __name__ == "__main__":
    main()
