"""The stream core's two per-batch reads as the events stored around a batch grow: a visitor's
history (`streams/events.py history`: 2,000 visitors, their window of up to three UTC days) and
the retry lookup (`owners`: 2,000 event ids, half of them stored, within ±6 h). One site, chDB in
a temporary folder, synthetic events spread over the window. `--repo` times another checkout (a
worktree of an older commit) with the same data, for a ratio on this noisy machine.

    python3 tests/bench/bench_lookups.py [--sizes 50000,1000000,5000000] [--repo PATH]

Not run by CI."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,1000000,5000000")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from ingest.event import Event
    from streams import events, replay, storage

    now = datetime.now(timezone.utc).replace(microsecond=0)
    print(f"{args.repo}:")
    client = storage.connect(f"chdb://{tempfile.mkdtemp(prefix='bk-lookups-')}/ch")  # one engine a process
    replay.upgrade(client, 1800, 400)
    for n in (int(size) for size in args.sizes.split(",")):
        client.command("TRUNCATE TABLE events")
        # n events over the last 36 h, a visitor every ~5 events.
        client.command(
            "INSERT INTO events (event_id, site_id, timestamp, name, visitor_id, pathname, country)"
            " SELECT generateUUIDv4(number), 'big', {first:DateTime64(3, 'UTC')} + number * (129600 / {n:UInt64}),"
            " 'pageview', cityHash64(number % {visitors:UInt64}), '/p', 'SE' FROM numbers({n:UInt64})",
            parameters={"first": now - timedelta(hours=36), "n": n, "visitors": max(n // 5, 1)})
        client.command("OPTIMIZE TABLE events FINAL")
        recent = client.query("SELECT DISTINCT visitor_id FROM events ORDER BY timestamp DESC LIMIT 2000").result_rows
        visitors = {("big", row[0]) for row in recent}
        stored = [str(row[0]) for row in client.query("SELECT event_id FROM events ORDER BY timestamp DESC LIMIT 1000")
                  .result_rows]
        batch = [Event(event_id=event_id, site_id="big", timestamp=now, name="pageview", visitor_id=1, pathname="/p",
                       country="SE", channel="direct") for event_id in stored + [str(uuid.uuid4()) for _ in range(1000)]]
        timings: dict[str, list[float]] = {"history": [], "owners": []}
        for _ in range(7):
            started = time.perf_counter()
            events.history(client, visitors, now - timedelta(days=2), now + timedelta(days=1))
            timings["history"].append(time.perf_counter() - started)
            started = time.perf_counter()
            events.owners(client, batch)
            timings["owners"].append(time.perf_counter() - started)
        print(f"  {n:>10,} events: history of 2,000 visitors {statistics.median(timings['history']) * 1000:6.1f} ms,"
              f" owners of 2,000 ids {statistics.median(timings['owners']) * 1000:6.1f} ms (medians of 7)")


if __name__ == "__main__":
    main()
