"""Would a stream core that derives inside ClickHouse reach issue 7's target? An experiment, not a
second core: the same batches go through `StreamCore` in one process and through a SQL-only
derivation in another (chDB opens one folder per process), and the two databases must hold the
same sessions, activity rows, rollups and raw events. Prints events/s for both and the SQL's time
per statement group.

    python3 tests/bench/bench_sql_core.py [--events 40000] [--batch 5000]

The SQL derivation covers what `StreamCore.process` derives for plain batches (no goals, retries,
moved visitors or redeliveries): every event of the batch's visitors within two days, from
`events FINAL` and a Memory staging table, is sessionized per visitor with arrays (`arraySplit`
at gaps ≥ the timeout), then activity rows with their gaps;
sessions and activity rows that differ from the stored ones are written, stored ones no longer
derived get tombstones; the changed keys' rollups are rebuilt (`streams/rollups.py`); raw events whose
session changed are written last. Session ids use another hash than `streams/sessions.py`, so
they are left out of the comparison. Not run by CI."""

from __future__ import annotations

import argparse
import json
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

from ingest.event import Event  # noqa: E402
from streams import events as raw_events  # noqa: E402
from streams import replay, rollups, storage  # noqa: E402
from streams.buckets import BUCKET_S  # noqa: E402
from streams.core import StreamCore  # noqa: E402

TIMEOUT_S = 1800
_SESSION_COLUMNS = ("site_id, visitor_id, session_id, start, end, entry_page, exit_page, pageviews, events, bounce,"
                    " duration_ms, source, channel, referrer, utm_source, utm_medium, utm_campaign, country, device,"
                    " browser, os, event_names, event_pages")
_ACTIVITY_COLUMNS = "site_id, kind, value, bucket, visitor_id, events, pageviews, sessions, bounces, duration_ms, gap"
_TOUCHED = "(site_id, visitor_id) IN (SELECT DISTINCT site_id, visitor_id FROM staging)"
_IN_WINDOW = "{col} >= {{lo:DateTime64(3, 'UTC')}} AND {col} < {{hi:DateTime64(3, 'UTC')}}"

# Every stored and staged event of the batch's visitors, the staged copy of an id winning.
_COMBINED = f"""
SELECT *, toString(event_id) AS eid FROM events FINAL
WHERE {_TOUCHED} AND {_IN_WINDOW.format(col="timestamp")}
  AND (site_id, event_id) NOT IN (SELECT site_id, event_id FROM staging)
UNION ALL SELECT *, toString(event_id) AS eid FROM staging"""
# Per event: 1 time, 2 id, 3 name, 4 page ("" unless a pageview), 5-14 the session attributes,
# 15 stored session id, 16 an affiliate click, 17 its product value (streams/activity.py).
_EVENT_TUPLE = ("(timestamp, eid, CAST(name AS String), if(name = 'pageview', pathname, ''), CAST(source AS String),"
                " CAST(channel AS String), referrer, utm_source, utm_medium, utm_campaign, CAST(country AS String),"
                " CAST(device AS String), CAST(browser AS String), CAST(os AS String), session_id,"
                " toUInt8(product_id != '' AND CAST(name AS String) = 'click'),"
                " concat(product_id, '\\x1f', product_slug, '\\x1f', category_slug, '\\x1f', brand_slug, '\\x1f',"
                " partner_slug))")
_SESSIONS = f"""
CREATE TABLE work_sessions ENGINE = Memory AS
SELECT site_id, visitor_id, s, s[1].1 AS start, s[-1].1 AS end,
  bitShiftLeft(toUInt64(toUnixTimestamp(start)), 32) + cityHash64(site_id, visitor_id, start) % 4294967296 AS session_id,
  arrayFilter(x -> x.3 = 'pageview', s) AS pvs,
  if(empty(pvs), '', pvs[1].4) AS entry_page, if(empty(pvs), '', pvs[-1].4) AS exit_page,
  toUInt32(length(pvs)) AS pageviews, toUInt32(length(s)) AS events,
  toUInt8(events <= 1 AND pageviews = events) AS bounce, toUInt64(dateDiff('millisecond', start, end)) AS duration_ms,
  s[1].5 AS source, s[1].6 AS channel, s[1].7 AS referrer, s[1].8 AS utm_source, s[1].9 AS utm_medium,
  s[1].10 AS utm_campaign, s[1].11 AS country, s[1].12 AS device, s[1].13 AS browser, s[1].14 AS os,
  arrayMap(x -> x.3, s) AS event_names, arrayMap(x -> x.4, s) AS event_pages
FROM (SELECT site_id, visitor_id, arraySort(x -> (x.1, x.2), groupArray({_EVENT_TUPLE})) AS a,
             arraySplit((x, i) -> i = 1 OR dateDiff('millisecond', a[i - 1].1, x.1) >= {TIMEOUT_S * 1000}, a,
                        arrayEnumerate(a)) AS parts
      FROM ({_COMBINED}) GROUP BY site_id, visitor_id) ARRAY JOIN parts AS s"""
_STORED_SESSIONS = f"""SELECT {_SESSION_COLUMNS} FROM sessions FINAL
WHERE {_TOUCHED} AND {_IN_WINDOW.format(col="start")} AND NOT is_deleted"""
# (kind, value, events, pageviews, sessions, bounces, duration, time) per event and per session start.
_KEYS = """arrayConcat(
  [('total', '', 0, 0, 1, bounce, duration_ms, start),
   ('source', concat(source, '\\x1f', channel), 0, 0, 1, bounce, duration_ms, start)],
  arrayFlatten(arrayMap(x -> arrayConcat(
    [('total', '', 1, x.3 = 'pageview', 0, 0, 0, x.1),
     if(x.3 = 'pageview', ('page', x.4, 1, 0, 0, 0, 0, x.1), ('name', x.3, 1, 0, 0, 0, 0, x.1)),
     ('country', x.11, 1, 0, 0, 0, 0, x.1)],
    if(x.16, [('click', x.17, 1, 0, 0, 0, 0, x.1)], [])), s)))"""
_ACTIVITY = f"""
CREATE TABLE work_activity ENGINE = Memory AS
SELECT site_id, visitor_id, kind, value, r.1 AS bucket, r.2 AS events, r.3 AS pageviews, r.4 AS sessions,
       r.5 AS bounces, r.6 AS duration_ms, r.7 AS gap
FROM (SELECT site_id, visitor_id, kind, value,
             arraySort(groupArray((bucket, events, pageviews, sessions, bounces, duration_ms))) AS rs,
             arrayMap((x, i) -> (x.1, x.2, x.3, x.4, x.5, x.6,
                                 toUInt32(if(i = 1, 0, (toUInt32(x.1) - toUInt32(rs[i - 1].1)) / {BUCKET_S}))),
                      rs, arrayEnumerate(rs)) AS rr
      FROM (SELECT site_id, visitor_id, k.1 AS kind, k.2 AS value,
                   toDateTime(intDiv(toUInt32(k.8), {BUCKET_S}) * {BUCKET_S}, 'UTC') AS bucket, toUInt32(sum(k.3)) AS events,
                   toUInt32(sum(k.4)) AS pageviews, toUInt32(sum(k.5)) AS sessions, toUInt32(sum(k.6)) AS bounces,
                   toUInt64(sum(k.7)) AS duration_ms
            FROM (SELECT site_id, visitor_id, {_KEYS} AS ks FROM work_sessions) ARRAY JOIN ks AS k
            GROUP BY site_id, visitor_id, kind, value, bucket)
      GROUP BY site_id, visitor_id, kind, value) ARRAY JOIN rr AS r"""
_STORED_ACTIVITY = f"""SELECT {_ACTIVITY_COLUMNS} FROM activity FINAL
WHERE {_TOUCHED} AND bucket >= toDateTime({{lo:DateTime64(3, 'UTC')}}) AND bucket < toDateTime({{hi:DateTime64(3, 'UTC')}})
  AND NOT is_deleted"""
_PICK = ", ".join(f"if(f.site_id = '', o.{c}, f.{c}) AS {c}" for c in _ACTIVITY_COLUMNS.split(", "))
_MEASURES = ("events", "pageviews", "sessions", "bounces", "duration_ms", "gap")
_CHANGED = f"""
CREATE TABLE work_changed ENGINE = Memory AS
SELECT {_PICK}, toUInt8(f.site_id = '') AS is_deleted
FROM work_activity AS f FULL OUTER JOIN ({_STORED_ACTIVITY}) AS o
  ON f.site_id = o.site_id AND f.visitor_id = o.visitor_id AND f.kind = o.kind AND f.value = o.value
     AND f.bucket = o.bucket
WHERE f.site_id = '' OR o.site_id = ''
   OR ({", ".join(f"f.{m}" for m in _MEASURES)}) != ({", ".join(f"o.{m}" for m in _MEASURES)})
SETTINGS join_use_nulls = 0"""
_EVENTS = f"""
INSERT INTO events ({", ".join(raw_events._COLUMNS)})
SELECT {", ".join(f"e.{f}" for f in raw_events._FIELDS)}, a.session_id, {{v:UInt64}}
FROM ({_COMBINED}) AS e
JOIN (SELECT site_id, x.2 AS eid, x.15 AS stored_session, session_id FROM work_sessions ARRAY JOIN s AS x) AS a
  ON e.site_id = a.site_id AND e.eid = a.eid
WHERE a.stored_session != a.session_id"""


def derive(client, batch: list[Event], version: int, parts: dict[str, float]) -> None:
    def timed(name: str, *statements: str) -> None:
        started = time.perf_counter()
        for sql in statements:
            client.command(sql, parameters=window)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - started

    started = time.perf_counter()
    client.command("TRUNCATE TABLE staging")
    client.insert("staging", [[getattr(e, f) for e in batch] for f in raw_events._FIELDS]
                  + [[0] * len(batch), [version] * len(batch)], column_names=raw_events._COLUMNS, column_oriented=True)
    parts["stage"] = parts.get("stage", 0.0) + time.perf_counter() - started
    window = {"lo": min(e.timestamp for e in batch) - timedelta(days=2),
              "hi": max(e.timestamp for e in batch) + timedelta(days=2), "v": version}
    timed("sessionize", "DROP TABLE IF EXISTS work_sessions", _SESSIONS)
    timed("sessions diff+write",
          f"INSERT INTO sessions ({_SESSION_COLUMNS}, version, is_deleted) SELECT {_SESSION_COLUMNS}, {{v:UInt64}}, 0"
          f" FROM work_sessions WHERE ({_SESSION_COLUMNS}) NOT IN ({_STORED_SESSIONS})",
          f"INSERT INTO sessions ({_SESSION_COLUMNS}, version, is_deleted) SELECT {_SESSION_COLUMNS}, {{v:UInt64}}, 1"
          f" FROM ({_STORED_SESSIONS}) WHERE (site_id, session_id) NOT IN (SELECT site_id, session_id FROM work_sessions)")
    timed("activity", "DROP TABLE IF EXISTS work_activity", _ACTIVITY)
    timed("activity diff+write", "DROP TABLE IF EXISTS work_changed", _CHANGED,
          f"INSERT INTO activity ({_ACTIVITY_COLUMNS}, version, is_deleted)"
          f" SELECT {_ACTIVITY_COLUMNS}, {{v:UInt64}}, is_deleted FROM work_changed")
    started = time.perf_counter()
    keys = {(site, kind, value, int(bucket.timestamp()) // BUCKET_S) for site, kind, value, bucket in
            client.query("SELECT DISTINCT site_id, kind, value, bucket FROM work_changed").result_rows}
    rollups.rebuild(client, keys)
    parts["rollups"] = parts.get("rollups", 0.0) + time.perf_counter() - started
    timed("raw events", _EVENTS)


def traffic(n: int) -> list[Event]:
    """Returning visitors (~3 events each, a second apart on average), pageviews, clicks, other events."""
    rng, end = random.Random(5), datetime(2026, 12, 3, 10, 0, 0, 123000, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        name = rng.choice(["pageview"] * 6 + ["click", "signup"])
        product = {"product_id": f"p{rng.randrange(30)}", "product_slug": "s", "partner_slug": "kjell"} \
            if name == "click" else {}
        out.append(Event(event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), site_id="bench",
                         timestamp=end - timedelta(seconds=n - i), name=name, visitor_id=rng.randrange(n // 3),
                         pathname=f"/p/{rng.randrange(200)}", country=rng.choice(["SE", "NO", "DE"]),
                         source=rng.choice(["", "Google"]), channel="direct", **product))
    return out


_COMPARED = {
    "sessions": "SELECT site_id, visitor_id, start, end, entry_page, exit_page, pageviews, events, bounce, duration_ms,"
                " source, channel, country, event_names, event_pages FROM sessions FINAL WHERE NOT is_deleted",
    "activity": f"SELECT {_ACTIVITY_COLUMNS} FROM activity FINAL WHERE NOT is_deleted",
    "rollup_15m": "SELECT * EXCEPT version FROM rollup_15m FINAL WHERE NOT is_deleted",
    "rollup_1d": "SELECT * EXCEPT version FROM rollup_1d FINAL WHERE NOT is_deleted",
    "events": "SELECT toString(event_id), visitor_id, timestamp FROM events FINAL",
}


def run(mode: str, n: int, size: int) -> dict:
    client = storage.connect(f"chdb://{tempfile.mkdtemp(prefix='bk-sqlcore-')}/ch")
    replay.upgrade(client, TIMEOUT_S, 400, None)
    client.command("SET allow_suspicious_low_cardinality_types = 1")  # comparisons of LowCardinality columns
    client.command("CREATE TABLE staging AS events ENGINE = Memory")
    events = traffic(n)
    core = StreamCore(client, TIMEOUT_S)
    core.process(events[:size])  # warms up both alike
    parts: dict[str, float] = {}
    started = time.perf_counter()
    for i in range(size, n, size):
        if mode == "sql":
            derive(client, events[i:i + size], time.time_ns(), parts)
        else:
            core.process(events[i:i + size])
    rate = (n - size) / (time.perf_counter() - started)
    tables = {name: sorted(map(repr, client.query(sql).result_rows)) for name, sql in _COMPARED.items()}
    return {"rate": rate, "parts": parts, "tables": tables}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--mode", choices=["core", "sql"], help=argparse.SUPPRESS)  # one side, in a subprocess
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.events, args.batch)))
        return
    results = {}
    for mode in ("core", "sql"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--events", str(args.events), "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.splitlines()[-1])
    core, sql = results["core"], results["sql"]
    for name in _COMPARED:
        same = core["tables"][name] == sql["tables"][name]
        print(f"{name:11s} {len(core['tables'][name]):>8,} rows  {'same' if same else 'DIFFERENT'}")
    timed = args.events - args.batch
    print(f"stream core:    {core['rate']:8,.0f} events/s")
    print(f"SQL derivation: {sql['rate']:8,.0f} events/s ({sql['rate'] / core['rate']:.2f}×)")
    for name, seconds in sql["parts"].items():
        print(f"  {name:22s} {seconds / timed * 1e6:7.1f} µs/event  {seconds / (timed / args.batch) * 1000:7.1f} ms/batch")
    if any(core["tables"][name] != sql["tables"][name] for name in _COMPARED):
        sys.exit("the SQL derivation stored other numbers than the stream core")


if __name__ == "__main__":
    main()
