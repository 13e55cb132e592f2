"""What the daily rollup's rebuild reads as a UTC day fills, and what another sort order of
`rollup_15m` would read: the cause of the stream core's per-batch ClickHouse cost rising through
each day (docs/benchmarks.md, the soaks).

Each batch recomputes its touched (site, kind, value, day) keys of `rollup_1d` from the day's
quarter hours (`streams/rollups.py`). `rollup_15m` is sorted by (site_id, kind, bucket, value), so
the day's range of buckets cannot be narrowed to the touched values: the read takes every row of
the touched sites and kinds so far that day. Sorted by (site_id, kind, toDate(bucket), value,
bucket) and asked with a tuple IN, it takes the touched keys' rows only; the same sort asked with
today's separate IN sets (every combination of the touched sites, kinds and values) is timed too.

Synthetic quarter hours (10 sites, 8 kinds with 1–1,500 values each, every value in every bucket)
in chDB, with 4, 32 and 96 buckets of the day filled; the same 30 touched keys each time.

    python3 tests/bench/bench_day_rollup.py

Not run by CI: it prints numbers."""

from __future__ import annotations

import random
import re
import tempfile
import time

from chdb import session

KINDS = {"total": 1, "page": 1500, "country": 60, "source": 40, "device": 3, "browser": 12, "os": 8, "product": 300}
ORDERS = {"now": "(site_id, kind, bucket, value)", "by day": "(site_id, kind, toDate(bucket), value, bucket)",
          "by day, tuple": "(site_id, kind, toDate(bucket), value, bucket)"}


def main() -> None:
    rng = random.Random(1)
    keys = sorted({(f"site-{rng.randrange(10)}", kind, f"v{rng.randrange(KINDS[kind])}")
                   for kind in rng.choices(list(KINDS), k=30)})
    sets = (f"site_id IN {sorted({k[0] for k in keys})} AND kind IN {sorted({k[1] for k in keys})}"
            f" AND value IN {sorted({k[2] for k in keys})}")  # as streams/rollups.py asks
    where = {"now": sets, "by day": sets, "by day, tuple": f"(site_id, kind, value) IN {keys}"}
    for buckets in (4, 32, 96):
        db = session.Session(tempfile.mkdtemp(prefix="bk-day-rollup-"))
        for n, (name, order) in enumerate(ORDERS.items()):
            db.query(f"""CREATE TABLE r{n} (site_id LowCardinality(String), kind LowCardinality(String), value String,
                bucket DateTime('UTC'), visitors UInt64, events UInt64, version UInt64, is_deleted UInt8)
                ENGINE = ReplacingMergeTree(version, is_deleted) PARTITION BY toYYYYMM(bucket) ORDER BY {order}
                SETTINGS index_granularity = 1024""")
            db.query(f"""INSERT INTO r{n} SELECT concat('site-', toString(s)), k.1, concat('v', toString(v)),
                toDateTime('2026-11-29 00:00:00', 'UTC') + b * 900, 1, 1, 1, 0
                FROM (SELECT number AS s FROM numbers(10)) AS sites
                CROSS JOIN (SELECT arrayJoin({list(KINDS.items())}) AS k) AS kinds
                CROSS JOIN (SELECT number AS b FROM numbers({buckets})) AS buckets
                CROSS JOIN (SELECT number AS v FROM numbers(1500)) AS vals WHERE v < k.2""")
            db.query(f"OPTIMIZE TABLE r{n} FINAL")
            sql = f"""SELECT site_id, kind, value, toDate(bucket) AS day, sum(visitors), sum(events) FROM r{n} FINAL
                WHERE {where[name]} AND bucket >= '2026-11-29' AND bucket < '2026-11-30'
                AND toDate(bucket) IN ['2026-11-29'] GROUP BY site_id, kind, value, day"""
            db.query(sql, "CSV")
            started = time.perf_counter()
            for _ in range(10):
                db.query(sql, "CSV")
            took = (time.perf_counter() - started) / 10
            granules = re.findall(r"Granules: (\d+/\d+)", db.query("EXPLAIN indexes=1 " + sql).bytes().decode())[-1]
            print(f"{buckets:3d} quarter hours, sorted {name:13s}: {took * 1000:6.1f} ms, granules read {granules}")
        db.close()


if __name__ == "__main__":
    main()
