"""Live visitor ids over a long stretch of (simulated) time: `Visitors.visitor_id` for a steady
stream of new visitors, as `/api/event` asks for them, past the session timeout, when the ids it
holds start to be dropped on every call. Prints µs per id for each 10 simulated minutes: the cost
must not grow once ids are dropped (a plain dict, until 2026-12-03, went from ~6 to ~30 µs).

    python3 tests/bench/bench_visitor_ids.py [--per-second 200] [--minutes 60] [--repo PATH]

Runs in-process against chDB in a temporary folder (the salts and the day's open sessions are
read from it as in a server). Not run by CI."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-second", type=int, default=200, help="new visitors per simulated second")
    parser.add_argument("--minutes", type=int, default=60, help="simulated minutes (the timeout is 30)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from besokskollen.app import open_services
    from besokskollen.config import Settings

    services = open_services(Settings(clickhouse_url=f"chdb://{tempfile.mkdtemp(prefix='bk-ids-')}/ch"))
    visitors = services.visitors
    # Today, from 01:00 UTC: past the first minute of the day, within the day's salt.
    start = datetime.now(timezone.utc).replace(hour=1, minute=0, second=0, microsecond=0)
    step = timedelta(seconds=1) / args.per_second
    person = 0
    print(f"{args.per_second} new visitors per simulated second, session timeout {visitors.timeout}")
    for slice_start in range(0, args.minutes, 10):
        calls, started = 0, time.perf_counter()
        for second in range(slice_start * 60, (slice_start + 10) * 60):
            at = start + timedelta(seconds=second)
            for i in range(args.per_second):
                person += 1
                ip = f"10.{person >> 16 & 255}.{person >> 8 & 255}.{person & 255}"
                visitors.visitor_id("bench", ip, BROWSER, at + i * step)
                calls += 1
        elapsed = time.perf_counter() - started
        print(f"minutes {slice_start:3}-{slice_start + 10:<3} {elapsed / calls * 1e6:6.1f} µs per id "
              f"({len(visitors._latest):,} ids held)", flush=True)


if __name__ == "__main__":
    main()
