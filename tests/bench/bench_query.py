"""Query API latency on rollups at 1M and 10M stored events, against the naive raw-events query for
the same question, plus the stream core's cost per 500-event batch at each size. Both sizes are
the same site traffic (~111k events a day); 10M is 90 days of it, 1M nine: the batch cost must not
grow with the history.

    python3 tests/bench/bench_query.py [--sizes 1000000,10000000] [--data /tmp/bk-bench] [--requests 60]

For each size, a child process owns the embedded engine: it generates the traffic for one site
(Europe/Stockholm) and stores it the way the product does — through the stream core, in
time order, in batches — unless the data folder already holds it; then it times 40 live-like
500-event batches, the naive raw-event queries and the API's own SQL in-process. Then
`besokskollen up` serves the folder and every endpoint is timed over HTTP (sequential requests,
keep-alive). Not run by CI: numbers on 2 shared cores are noisy, compare ratios."""

from __future__ import annotations

import argparse
import hashlib
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
sys.path.insert(0, str(ROOT))

SITE, DOMAIN, TZ = "bench-example", "bench.example", "Europe/Stockholm"
KEY = "bk_bench_key_0123456789abcdef"
DAILY_EVENTS = 111_600  # every size has the same traffic: 10M events are 90 days of it, 1M nine
PAGES = ["/"] + [f"/produkt/p{i}" for i in range(150)] + [f"/guide/g{i}" for i in range(40)] + ["/om-oss", "/kontakt"]
REFERRERS = [("", "", "direct", 30), ("https://www.google.se/", "Google", "search", 40),
             ("https://www.bing.com/", "Bing", "search", 5), ("https://l.facebook.com/", "Facebook", "social", 8),
             ("https://www.reddit.com/", "Reddit", "social", 3), ("https://prisjakt.nu/x", "prisjakt.nu", "referral", 9),
             ("https://blog.example.org/p", "blog.example.org", "referral", 5)]
COUNTRIES = [("SE", 70), ("NO", 8), ("FI", 6), ("DK", 5), ("DE", 4), ("US", 4), ("GB", 3)]
DEVICES = [("Mobile", "Mobile Safari", "iOS", 45), ("Desktop", "Chrome", "Windows", 35),
           ("Mobile", "Chrome Mobile", "Android", 15), ("Tablet", "Mobile Safari", "iOS", 5)]


def _weighted(rng: random.Random, items: list[tuple]) -> tuple:
    return rng.choices(items, weights=[i[-1] for i in items])[0]


def generate(total: int, end: datetime, seed: int = 1):
    """Yields lists of Events, one UTC day at a time, oldest first: sessions of 1–8 events,
    returning visitors, a daily visitor id per person (as the daily salt gives); DAILY_EVENTS a
    day, so `total` decides how many days of history there are."""
    from ingest.event import Event

    rng = random.Random(seed)
    days = max(1, round(total / DAILY_EVENTS))
    first_day = (end - timedelta(days=days - 1)).date()
    people = max(1000, total // 25)
    sessions_per_day = DAILY_EVENTS / 2.3  # events per session: 1 + ⌊Exp(0.55)⌋ ≈ 2.3
    for d in range(days):
        day = first_day + timedelta(days=d)
        midnight = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        out = []
        for _ in range(int(rng.gauss(sessions_per_day, sessions_per_day * 0.05))):
            person = rng.randrange(people)
            visitor = int.from_bytes(hashlib.blake2b(f"{person}:{day}".encode(), digest_size=8).digest(), "big")
            at = midnight + timedelta(seconds=min(86399.0, max(0.0, rng.gauss(15 * 3600, 4.5 * 3600))))
            referrer, source, channel, _ = _weighted(rng, REFERRERS)
            country = _weighted(rng, COUNTRIES)[0]
            device, browser, os_name, _ = _weighted(rng, DEVICES)
            n = min(8, 1 + int(rng.expovariate(0.55)))
            for i in range(n):
                if at > end:
                    break
                roll = rng.random()
                name = "pageview" if i == 0 or roll < 0.82 else ("click" if roll < 0.95 else "signup")
                product = f"p{rng.randrange(150)}" if name == "click" else ""
                out.append(Event.model_construct(
                    event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), site_id=SITE,
                    timestamp=at.replace(microsecond=at.microsecond // 1000 * 1000), name=name,
                    visitor_id=visitor, hostname=DOMAIN, pathname=rng.choice(PAGES[:40] if rng.random() < 0.7 else PAGES),
                    referrer=referrer if i == 0 else "", source=source if i == 0 else "",
                    channel=channel if i == 0 else "direct", utm_source="", utm_medium="", utm_campaign="",
                    country=country, device=device, browser=browser, os=os_name, props={},
                    product_id=product, product_slug=product, category_slug="mobilskal" if product else "",
                    brand_slug="apple" if product else "", partner_slug="kjell" if product else ""))
                at += timedelta(seconds=rng.randint(5, 400))
        out.sort(key=lambda e: e.timestamp)
        yield day, out


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


# -- the child: owns the engine while loading and timing in-process ------------------------------

_RAW_PERIOD = "site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}"
NAIVE = {
    # The question each endpoint answers, asked of the raw events directly. The overview's is two
    # statements: visitors and pageviews per local day and in total, and sessions and bounces
    # from the events' session ids.
    "overview": [f"""SELECT toDate(timestamp, 'Europe/Stockholm') AS day, uniqExact(visitor_id), countIf(name = 'pageview')
                     FROM events WHERE {_RAW_PERIOD} GROUP BY day WITH TOTALS""",
                 """SELECT count(), countIf(n = 1 AND pv = 1) FROM (
                        SELECT session_id, min(timestamp) AS start, count() AS n, countIf(name = 'pageview') AS pv
                        FROM events WHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} - INTERVAL 1 DAY
                          AND timestamp < {end:DateTime64(3, 'UTC')} + INTERVAL 1 DAY GROUP BY session_id)
                    WHERE start >= {start:DateTime64(3, 'UTC')} AND start < {end:DateTime64(3, 'UTC')}"""],
    # The baseline the issue measured: visitors and pageviews alone.
    "visitors+pageviews": f"SELECT uniqExact(visitor_id), countIf(name = 'pageview') FROM events WHERE {_RAW_PERIOD}",
    "pages": """SELECT pathname, uniqExact(visitor_id) AS v, count() FROM events
                WHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
                  AND name = 'pageview' GROUP BY pathname ORDER BY v DESC, pathname LIMIT 10""",
    "referrers": """SELECT source, channel, uniqExact(visitor_id) AS v, uniqExact(session_id) FROM events
                    WHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
                      AND source != '' GROUP BY source, channel ORDER BY v DESC, source LIMIT 10""",
    "countries": """SELECT country, uniqExact(visitor_id) AS v FROM events
                    WHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
                    GROUP BY country ORDER BY v DESC, country LIMIT 10""",
}

# The funnel (bench's four steps) from the raw events, as the API counted it before migration 12:
# every matching event of the period's sessions, grouped by session and sorted there, then the
# same greedy fold (query_api/funnels.py).
NAIVE_FUNNEL = """
SELECT level, count() FROM (
    SELECT arrayFold((done, m) -> done + bitTest(m, done), arrayMap(e -> e.3, arraySort(groupArray((at, id, mask)))),
                     toUInt64(0)) AS level
    FROM (SELECT session_id, timestamp AS at, UUIDToNum(event_id) AS id,
                 toUInt16((name = 'pageview' AND pathname = '/') + 2 * (name = 'pageview' AND startsWith(pathname, '/produkt'))
                          + 4 * (name = 'click') + 8 * (name = 'signup')) AS mask
          FROM events FINAL
          PREWHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')}
               AND timestamp < {end:DateTime64(3, 'UTC')} + INTERVAL 3 DAY
          WHERE mask != 0 AND bitShiftRight(session_id, 32) >= toUnixTimestamp({start:DateTime64(3, 'UTC')})
            AND bitShiftRight(session_id, 32) < toUnixTimestamp({end:DateTime64(3, 'UTC')}))
    GROUP BY session_id)
WHERE level > 0 GROUP BY level ORDER BY level
SETTINGS optimize_move_to_prewhere_if_final = 0
"""


def store_once(services, core, data: Path, size: int, end: datetime) -> dict:
    """The bench site and `size` events of its traffic up to `end`, stored through the stream core
    unless the data folder holds them already: {"events": how many, "seconds": how long it took}."""
    from besokskollen.app import DEFAULT_ACCOUNT

    if services.sites.get(SITE) is None:
        services.sites.create(DEFAULT_ACCOUNT, DOMAIN, "Bench", TZ, site_id=SITE)
    marker = data / "loaded.json"
    if not marker.exists():
        started, stored = time.perf_counter(), 0
        for day, events in generate(size, end):
            for i in range(0, len(events), 25_000):
                core.process(events[i:i + 25_000])
            stored += len(events)
            print(f"  {day}: {stored:,} events, {stored / (time.perf_counter() - started):,.0f} events/s",
                  file=sys.stderr, flush=True)
        marker.write_text(json.dumps({"events": stored, "seconds": time.perf_counter() - started}))
    return json.loads(marker.read_text())


def child(size: int, data: Path, end: datetime, repeats: int) -> dict:
    from besokskollen.app import open_services
    from besokskollen.config import Settings
    from query_api import stats
    from query_api.periods import stats_period
    from streams.core import StreamCore

    services = open_services(Settings(clickhouse_url=f"chdb://{data}", admin_key=KEY, kafka_bootstrap=None))
    client = services.client
    core = StreamCore(client, 1800)
    loaded = store_once(services, core, data, size, end)
    report: dict = {"size": size}
    report.update(define_goals_and_funnel(client, data))
    report["stored_events"] = client.query("SELECT count() FROM events").result_rows[0][0]
    report["load_events_per_s"] = loaded["events"] / loaded["seconds"]

    # Live-like batches after the stored data: new sessions and continuations of recent ones.
    rng = random.Random(size)
    recent = [r[0] for r in client.query(
        "SELECT DISTINCT visitor_id FROM events WHERE site_id = {s:String} AND timestamp >= {t:DateTime64(3, 'UTC')} LIMIT 2000",
        parameters={"s": SITE, "t": end - timedelta(hours=1)}).result_rows]
    from ingest.event import Event
    batch_ms = []
    at = end
    for _ in range(40):
        batch = []
        for _ in range(500):
            at += timedelta(milliseconds=rng.randint(1, 400))
            visitor = rng.choice(recent) if recent and rng.random() < 0.5 else rng.getrandbits(63)
            batch.append(Event(event_id=str(uuid.uuid4()), site_id=SITE, timestamp=at, name="pageview",
                               visitor_id=visitor, pathname=rng.choice(PAGES), country="SE", channel="direct"))
        t0 = time.perf_counter()
        core.process(batch)
        batch_ms.append((time.perf_counter() - t0) * 1000)
    report["batch_ms"] = _percentiles(batch_ms[5:])

    naive, ours = {}, {}
    for period in ("7d", "30d", "90d"):
        span = stats_period(client, period, TZ, now=end)
        params = {"site": SITE, "start": span.start_utc(client), "end": span.end_utc(client)}
        for name, sql in {**NAIVE, "funnel": NAIVE_FUNNEL}.items():
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for statement in sql if isinstance(sql, list) else [sql]:
                    client.query(statement, parameters=params)
                samples.append((time.perf_counter() - t0) * 1000)
            naive[f"{name} {period}"] = _percentiles(samples)
        calls = {"overview": lambda: stats.overview(client, SITE, span),
                 "overview+compare": lambda: stats.overview(client, SITE, span, compare=True),
                 "pages": lambda: stats.pages(client, SITE, span, 10),
                 "referrers": lambda: stats.referrers(client, SITE, span, 10, True),
                 "countries": lambda: stats.countries(client, SITE, span, 10)}
        for name, call in calls.items():
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                samples.append((time.perf_counter() - t0) * 1000)
            ours[f"{name} {period}"] = _percentiles(samples)
    report["naive_ms"], report["sql_ms"] = naive, ours
    return report


def define_goals_and_funnel(client, data: Path) -> dict:
    """Three goals (wildcard path, exact path, event; each backfilled over the stored events, as
    creating one does) and a four-step funnel, once per data folder."""
    from streams.funnels import FunnelRegistry, Step
    from streams.goals import GoalRegistry, backfill

    path = data / "definitions.json"
    if not path.exists():
        goals, seconds = GoalRegistry(client), []
        for name, kind, match_path, match_event in (("Produkt", "pageview", "/produkt/*", ""),
                                                    ("Start", "pageview", "/", ""), ("Signup", "event", "", "signup")):
            t0 = time.perf_counter()
            backfill(client, goals.create(SITE, name, kind, match_path, match_event))
            seconds.append(time.perf_counter() - t0)
        funnel = FunnelRegistry(client).create(SITE, "Köpresa", [
            Step("Start", "pageview", "/", "exact"), Step("Produkt", "pageview", "/produkt", "startswith"),
            Step("Klick", "event", "click", "exact"), Step("Signup", "event", "signup", "exact")])
        path.write_text(json.dumps({"funnel": funnel.funnel_id, "goal_backfill_s": seconds}))
    return json.loads(path.read_text())


# -- the parent: children per size, then HTTP against `besokskollen up` ---------------------------

def _timed(call, repeats: int) -> tuple[float, float]:
    call()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        response = call()
        samples.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200, response.text
    return _percentiles(samples)


def http_latencies(data: Path, repeats: int, funnel: str) -> dict:
    import httpx

    from tests.conftest import free_port, process

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = {}
    with process([sys.executable, "-m", "besokskollen", "up", "--data", str(data), "--port", str(port)],
                 data.parent / f"up-{data.name}.log", env={"BK_ADMIN_KEY": KEY, "BK_RATE_LIMIT_PER_MINUTE": "100000000"},
                 ready_url=f"{base}/api/v1/openapi.json", timeout=600):
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as c:
            for period in ("7d", "30d", "90d"):
                for name, path in (("overview", f"stats/overview?period={period}"),
                                   ("overview+compare", f"stats/overview?period={period}&compare=true"),
                                   ("pages", f"stats/pages?period={period}"),
                                   ("referrers", f"stats/referrers?period={period}&include_social=true"),
                                   ("countries", f"stats/countries?period={period}")):
                    url = f"/api/v1/{path}&site_id={SITE}"
                    out[f"{name} {period}"] = _timed(lambda: c.get(url), repeats)
            for name, path in (("goals 7d", f"goals?site_id={SITE}&period=7d"),
                               ("goals 30d", f"goals?site_id={SITE}&period=30d"),
                               ("funnel 7d", f"funnels/{funnel}/stats?period=7d"),
                               ("funnel 30d", f"funnels/{funnel}/stats?period=30d"),
                               ("funnel 90d", f"funnels/{funnel}/stats?period=90d"),
                               ("popular/products 30d", f"popular/products?site_id={SITE}&days=30"),
                               ("popular/categories 30d", f"popular/categories?site_id={SITE}&days=30"),
                               ("popular/partners 30d", f"popular/partners?site_id={SITE}&days=30"),
                               ("trending 24h/7d", f"trending/products?site_id={SITE}&min_growth=0")):
                out[f"+{name}"] = _timed(lambda: c.get(f"/api/v1/{path}"), repeats)
            batch = {"site_id": SITE, "requests": [
                {"endpoint": "popular/products", "params": {"limit": 10, "days": 7}},
                {"endpoint": "popular/categories", "params": {"limit": 5, "days": 30}},
                {"endpoint": "trending/products", "params": {"min_growth": 50}}]}
            out["+batch of 3"] = _timed(lambda: c.post("/api/v1/batch", json=batch), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--data", default="/tmp/bk-bench")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--end", default=None, help="end of the generated traffic (ISO); default: now")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    end = datetime.fromisoformat(args.end) if args.end else datetime.now(timezone.utc).replace(microsecond=0)
    if args.child:
        print(json.dumps(child(args.child, Path(args.data) / str(args.child), end, args.requests)))
        return

    reports = []
    for size in (int(s) for s in args.sizes.split(",")):
        folder = Path(args.data) / str(size)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"== {size:,} events in {folder}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(size), "--data", args.data,
                              "--requests", str(args.requests), "--end", end.isoformat()],
                             check=True, capture_output=False, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        report["http_ms"] = http_latencies(folder, args.requests, report["funnel"])
        reports.append(report)

    for r in reports:
        print(f"\n### {r['stored_events']:,} stored events (loaded at {r['load_events_per_s']:,.0f} events/s)")
        print(f"stream core, 500-event batch: p50 {r['batch_ms'][0]:.1f} ms, p95 {r['batch_ms'][1]:.1f} ms")
        print("| endpoint | HTTP p50 | HTTP p95 | SQL p50 | naive p50 | naive p95 | naive/HTTP (p50) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (p50, p95) in r["http_ms"].items():
            if name.startswith("+"):
                continue
            endpoint, period = name.split(" ")
            naive = r["naive_ms"][f"{endpoint.split('+')[0]} {period}"]
            sql = r["sql_ms"][name][0]
            print(f"| {name} | {p50:.1f} | {p95:.1f} | {sql:.1f} | {naive[0]:.1f} | {naive[1]:.1f} | {naive[0] / p50:.1f}x |")
        for period in ("7d", "30d", "90d"):
            p50, p95 = r["naive_ms"][f"visitors+pageviews {period}"]
            print(f"| (issue's baseline: uniqExact + countIf, {period}) | | | | {p50:.1f} | {p95:.1f} | |")
        print(f"\ngoals backfilled over the stored events in {', '.join(f'{t:.1f}' for t in r['goal_backfill_s'])} s")
        print("| endpoint | HTTP p50 | HTTP p95 | naive p50 | naive/HTTP (p50) |\n|---|---:|---:|---:|---:|")
        for name, (p50, p95) in r["http_ms"].items():
            if name.startswith("+"):
                naive = r["naive_ms"].get(name[1:])  # funnels: from the raw events, as before migration 12
                print(f"| {name[1:]} | {p50:.1f} | {p95:.1f} | " + (f"{naive[0]:.1f} | {naive[0] / p50:.1f}x |" if naive else " | |"))
    if len(reports) >= 2:
        a, b = reports[0]["batch_ms"][0], reports[-1]["batch_ms"][0]
        print(f"\nbatch cost {reports[-1]['stored_events']:,} vs {reports[0]['stored_events']:,} stored: {b / a:.2f}x")


if __name__ == "__main__":
    main()
