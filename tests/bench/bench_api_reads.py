"""ClickHouse's cost of the query API's reads, in-process: wall time and the process's CPU (the
embedded engine's threads included) per call of each endpoint's query, with the rollup reads'
settings as the API runs them (`query_api.deps.ROLLUP_READ`) against ClickHouse's defaults, side
by side in one run (alternating blocks, so drift hits both).

    python3 tests/bench/bench_api_reads.py [--events 1000000] [--data /tmp/bk-bench-reads] [--repeats 30]

The data is bench_query.py's traffic (one site, Europe/Stockholm, ~111k events a day with
affiliate clicks), stored through the stream core once per data folder. Not run by CI: numbers on
2 shared cores are noisy, compare the ratios."""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_query import SITE, TZ, store_once  # noqa: E402


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--data", default="/tmp/bk-bench-reads")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    from besokskollen.app import open_services
    from besokskollen.config import Settings
    from query_api import affiliate, stats
    from query_api.deps import ROLLUP_READ
    from query_api.periods import stats_period, utc_days
    from streams.core import StreamCore

    data = Path(args.data)
    services = open_services(Settings(clickhouse_url=f"chdb://{data}", kafka_bootstrap=None))
    client = services.client
    store_once(services, StreamCore(client, 1800), data, args.events, datetime.now(timezone.utc))
    stored = client.query("SELECT count() FROM events").result_rows[0][0]
    ours = dict(ROLLUP_READ)
    month, week = stats_period(client, "30d", TZ, None, None), stats_period(client, "7d", TZ, None, None)
    calls = {
        "overview 30d": lambda: stats.overview(client, SITE, month),
        "overview 30d compare": lambda: stats.overview(client, SITE, month, compare=True),
        "pages 30d": lambda: stats.pages(client, SITE, month, 10),
        "referrers 30d": lambda: stats.referrers(client, SITE, month, 10, True),
        "countries 7d": lambda: stats.countries(client, SITE, week, 10),
        "popular products 7d": lambda: affiliate.popular_products(client, SITE, *utc_days(7), 20),
        "popular partners 30d": lambda: affiliate.popular_partners(client, SITE, *utc_days(30), 20),
    }
    print(f"{stored:,} events stored; {args.repeats} calls per block, 4 blocks per setting, alternating")
    print(f"{'query':24s} {'default wall/CPU ms':>20s} {'ROLLUP_READ wall/CPU ms':>24s}  CPU ratio")
    ratios = []
    for name, call in calls.items():
        samples: dict[str, list[tuple[float, float]]] = {"default": [], "ours": []}
        answers = {}
        for block in range(8):
            label = ("default", "ours")[block % 2]
            ROLLUP_READ.clear()
            ROLLUP_READ.update({} if label == "default" else ours)
            answers[label] = call()
            wall, cpu = time.perf_counter(), _cpu_s()
            for _ in range(args.repeats):
                call()
            samples[label].append(((time.perf_counter() - wall) * 1000 / args.repeats,
                                   (_cpu_s() - cpu) * 1000 / args.repeats))
        assert answers["default"] == answers["ours"], f"{name}: the answers differ"
        (dw, dc), (ow, oc) = ([statistics.median(x) for x in zip(*samples[k])] for k in ("default", "ours"))
        ratios.append(oc / dc)
        print(f"{name:24s} {dw:9.1f} / {dc:7.1f} {ow:12.1f} / {oc:8.1f}  {oc / dc:9.2f}")
    ROLLUP_READ.clear()
    ROLLUP_READ.update(ours)
    print(f"CPU with ROLLUP_READ / default, median over the queries: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
