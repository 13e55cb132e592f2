"""Rollups: every number the query API serves, per UTC quarter hour and per UTC day.

A rollup row is never incremented. After a batch, each (site, kind, value, bucket) whose activity
changed is recomputed whole from the `activity` table (streams/activity.py, read with FINAL) and
written with a newer `version`; a key left without activity gets a tombstone. The same keys' days
are then recomputed from the quarter hours. So a redelivered or replayed batch changes no number,
and two workers that touch one key converge: every rebuild sees at least what the earlier ones saw.

Only the touched values are recomputed, not every value of a touched bucket: a rollup row is a
function of the activity rows with its own key alone. Rebuilding whole buckets made a batch read
every activity row of the current quarter hour (and every quarter hour of the day's rollup for
the day), so its cost grew through each quarter hour and each day (`tests/bench/bench_rollups.py`).

    rollup_15m  (site, kind, value, bucket)  visitors first seen, returning visitors by gap,
                                             events, pageviews, sessions, bounces, duration
    rollup_1d   (site, kind, value, day)     the same without gaps
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from clickhouse_connect.driver.client import Client


_MEASURES = ["events", "pageviews", "sessions", "bounces", "duration_ms"]

# One row per touched key: its fresh measures, or a tombstone (zeros, is_deleted) when it has no
# activity left. `{fresh}` is read once, limited by `_scope` (which the primary key prunes by);
# the join keeps the touched keys of it. The version is the server's clock when the statement
# starts, which is also when it takes its snapshot: of two workers rebuilding one key, the later
# rebuild has seen everything the earlier one saw, and wins.
_REPLACE = """
INSERT INTO {table} (site_id, kind, value, {time}, {values}, version, is_deleted)
SELECT site_id, kind, value, {time}, {values}, toUInt64(toUnixTimestamp64Nano(now64(9))), present = 0
FROM (SELECT key.1 AS site_id, key.2 AS kind, key.3 AS value, key.4 AS {time}
      FROM (SELECT arrayJoin(arrayZip({{key_sites:Array(String)}}, {{key_kinds:Array(String)}},
                                      {{key_values:Array(String)}}, {{key_times:Array({time_type})}})) AS key)) AS touched
LEFT JOIN ({fresh}) AS fresh USING (site_id, kind, value, {time})
SETTINGS join_use_nulls = 0
"""
# Unmatched keys get the columns' defaults (0, an empty map, present = 0): a tombstone's values
# (set here: a server profile may turn NULLs on).


def _replace(client: Client, table: str, time: str, time_type: str, values: list[str], fresh: str,
             touched: set[tuple[str, str, str, datetime | date]], parameters: dict) -> None:
    keys = sorted(touched)
    sql = _REPLACE.format(table=table, time=time, time_type=time_type, values=", ".join(values), fresh=fresh)
    # `raw_query`, not `command`: over HTTP it moves large parameters (a big batch touches ~10,000
    # keys) from the URL into a form body, where no URL length limit refuses them (HTTP 414).
    client.raw_query(sql, parameters={**parameters, "key_sites": [k[0] for k in keys], "key_kinds": [k[1] for k in keys],
                                      "key_values": [k[2] for k in keys], "key_times": [k[3] for k in keys]})


def _scope(column: str, kind_of_time: str) -> str:
    """Rows of the touched sites, kinds, values and times (all combinations, of which the join keeps
    the touched keys: plain IN sets let the primary key prune)."""
    return (f"site_id IN {{sites:Array(String)}} AND kind IN {{kinds:Array(String)}}"
            f" AND {column} IN {{times:Array({kind_of_time})}} AND value IN {{values:Array(String)}}")


def _params(touched: set[tuple[str, str, str, datetime | date]]) -> dict:
    return {"sites": sorted({s for s, _, _, _ in touched}), "kinds": sorted({k for _, k, _, _ in touched}),
            "values": sorted({v for _, _, v, _ in touched}), "times": sorted({t for _, _, _, t in touched})}


def rebuild(client: Client, touched: set[tuple[str, str, str, datetime]]) -> None:
    """Recompute these (site, kind, value, bucket)s from activity, then their days."""
    if not touched:
        return
    fresh_15m = f"""
        SELECT site_id, kind, value, bucket, countIf(gap = 0) AS visitors,
               sumMapIf(map(gap, toUInt64(1)), gap > 0) AS returning,
               {", ".join(f"sum({m}) AS {m}" for m in _MEASURES)}, 1 AS present
        FROM activity FINAL WHERE {_scope("bucket", "DateTime('UTC')")}
        GROUP BY site_id, kind, value, bucket"""
    _replace(client, "rollup_15m", "bucket", "DateTime('UTC')", ["visitors", "returning", *_MEASURES], fresh_15m,
             touched, _params(touched))

    days = {(site, kind, value, bucket.date()) for site, kind, value, bucket in touched}
    fresh_1d = f"""
        SELECT site_id, kind, value, toDate(bucket) AS day, sum(visitors) AS visitors,
               {", ".join(f"sum({m}) AS {m}" for m in _MEASURES)}, 1 AS present
        FROM rollup_15m FINAL
        WHERE (site_id, kind, value) IN {{keys:Array(Tuple(String, String, String))}}
          AND bucket >= {{first:Date}} AND bucket < {{end:Date}} AND toDate(bucket) IN {{times:Array(Date)}}
        GROUP BY site_id, kind, value, day"""
    # Asked by whole (site, kind, value)s: rollup_15m is sorted by day, then value (migration 8), so
    # the primary key finds the touched keys' rows of each day; separate IN sets for sites, kinds
    # and values read 469 granules where this reads 28 (`tests/bench/bench_day_rollup.py`).
    times = sorted({day for _, _, _, day in days})
    _replace(client, "rollup_1d", "day", "Date", ["visitors", *_MEASURES], fresh_1d, days,
             {"keys": sorted({key[:3] for key in days}), "times": times, "first": times[0],
              "end": times[-1] + timedelta(days=1)})


def sites_with_events(client: Client, site_ids: list[str]) -> set[str]:
    """The sites among `site_ids` that have had an event (`verified`, `has_data`). Read from the
    daily totals, not the raw events: those expire (BK_RAW_EVENTS_TTL_DAYS), and a site whose last
    event is older than that turned unverified while its stats still counted it."""
    if not site_ids:
        return set()
    rows = client.query(
        "SELECT DISTINCT site_id FROM rollup_1d FINAL WHERE site_id IN {ids:Array(String)} AND kind = 'total'"
        " AND events > 0", parameters={"ids": site_ids}
    ).result_rows
    return {row[0] for row in rows}
