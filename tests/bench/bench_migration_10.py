"""How long migration 10 (raw events versioned, `streams/migrations.py`) takes: it copies `events`
deduplicated (FINAL) into the versioned table, swaps, copies what the old table took meanwhile
(here nothing, but the copy still reads it all) and drops it. Synthetic raw events in chDB, as
the release before 10 stored them, at two sizes; one plain copy of the table (no FINAL) is timed
beside it as a baseline.

    python3 tests/bench/bench_migration_10.py [--events 1000000 4000000]

Not run by CI: it prints numbers (docs/operations.md, "Schema upgrades")."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from streams import migrations, storage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return measure(args.one)
    for n in args.events:  # a process each: chDB opens one data folder per process
        subprocess.run([sys.executable, __file__, "--one", str(n)], check=True)


def measure(n: int) -> None:
    before_10 = [m for m in migrations.MIGRATIONS if m[0] <= 9]
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:  # merges may still write
        client = storage.connect(f"chdb://{folder}/ch")
        everything, migrations.MIGRATIONS = migrations.MIGRATIONS, before_10
        migrations.migrate(client)
        migrations.MIGRATIONS = everything
        client.command(
            "INSERT INTO events (event_id, site_id, timestamp, name, visitor_id, session_id, hostname, pathname,"
            " referrer, source, country, device, browser, os) SELECT generateUUIDv4(number),"
            " concat('site-', toString(number % 20)),"
            " toDateTime64('2026-09-01 00:00:00', 3, 'UTC') + toIntervalSecond(intDiv(number * 7776000, {n:UInt64})),"
            " 'pageview', cityHash64(number % 200000), cityHash64(number % 400000), 'example.com',"
            " concat('/produkt/', toString(number % 3000)), 'https://www.google.com/', 'Google', 'SE', 'desktop',"
            " 'Chrome', 'Windows' FROM numbers({n:UInt64})", parameters={"n": n})
        client.command("CREATE TABLE plain_copy AS events")
        started = time.perf_counter()
        client.command("INSERT INTO plain_copy SELECT * FROM events")
        baseline = time.perf_counter() - started
        client.command("DROP TABLE plain_copy")
        started = time.perf_counter()
        applied = migrations.migrate(client)
        took = time.perf_counter() - started
        rows = client.query("SELECT count() FROM events FINAL").result_rows[0][0]
        assert applied == [10] and rows == n, (applied, rows)
        print(f"{n:>10,} events: migration 10 {took:6.1f} s ({n / took:,.0f} events/s);"
              f" one plain copy of the table {baseline:5.2f} s ({took / baseline:.1f}×)", flush=True)


if __name__ == "__main__":
    main()
