"""Rollups: every number the query API serves, per UTC quarter hour and per UTC day.

A rollup row is never incremented. After a batch, each (site, kind, bucket) whose activity
changed is recomputed whole from the `activity` table (streams/activity.py, read with FINAL) and
written with a newer `version`; keys the bucket no longer has get a tombstone. The days those
buckets belong to are then recomputed from the quarter hours. So a redelivered or replayed batch
changes no number, and two workers that touch one bucket converge: every rebuild sees at least
what the earlier ones saw.

    rollup_15m  (site, kind, value, bucket)  visitors first seen, returning visitors by gap,
                                             events, pageviews, sessions, bounces, duration
    rollup_1d   (site, kind, value, day)     the same without gaps
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from clickhouse_connect.driver.client import Client


_MEASURES = ["events", "pageviews", "sessions", "bounces", "duration_ms"]

# The fresh rows of the touched buckets, plus a tombstone for every key a touched bucket had
# before but no longer has. `{scope}` limits both. The version is the server's clock when the
# statement starts, which is also when it takes its snapshot: of two workers rebuilding one
# bucket, the later rebuild has seen everything the earlier one saw, and wins.
_REPLACE = """
INSERT INTO {table} ({keys}, {values}, version, is_deleted)
WITH fresh AS ({fresh}), toUInt64(toUnixTimestamp64Nano(now64(9))) AS rebuilt
SELECT {keys}, {values}, rebuilt, 0 FROM fresh
UNION ALL
SELECT {keys}, {zeros}, rebuilt, 1 FROM {table} FINAL
WHERE {scope} AND ({keys}) NOT IN (SELECT {keys} FROM fresh)
"""


def _replace(client: Client, table: str, keys: list[str], values: list[str], zeros: list[str], fresh: str,
             scope: str, parameters: dict) -> None:
    sql = _REPLACE.format(table=table, keys=", ".join(keys), values=", ".join(values), zeros=", ".join(zeros),
                          fresh=fresh, scope=scope)
    client.command(sql, parameters=parameters)


def _scope(column: str, kind_of_time: str) -> str:
    """Rows of the touched sites, kinds and times (all combinations: recomputing a bucket that did
    not change is harmless, and plain IN sets let the primary key prune)."""
    return (f"site_id IN {{sites:Array(String)}} AND kind IN {{kinds:Array(String)}}"
            f" AND {column} IN {{times:Array({kind_of_time})}}")


def _params(touched: set[tuple[str, str, datetime | date]]) -> dict:
    return {"sites": sorted({s for s, _, _ in touched}), "kinds": sorted({k for _, k, _ in touched}),
            "times": sorted({t for _, _, t in touched})}


def rebuild(client: Client, touched: set[tuple[str, str, datetime]]) -> None:
    """Recompute these (site, kind, bucket)s from activity, then the days they are in."""
    if not touched:
        return
    fresh_15m = f"""
        SELECT site_id, kind, value, bucket, countIf(gap = 0) AS visitors,
               sumMapIf(map(gap, toUInt64(1)), gap > 0) AS returning,
               {", ".join(f"sum({m}) AS {m}" for m in _MEASURES)}
        FROM activity FINAL WHERE {_scope("bucket", "DateTime('UTC')")}
        GROUP BY site_id, kind, value, bucket"""
    _replace(client, "rollup_15m", ["site_id", "kind", "value", "bucket"], ["visitors", "returning", *_MEASURES],
             ["0", "map()", *("0" for _ in _MEASURES)], fresh_15m, _scope("bucket", "DateTime('UTC')"),
             _params(touched))

    days = {(site, kind, bucket.date()) for site, kind, bucket in touched}
    fresh_1d = f"""
        SELECT site_id, kind, value, toDate(bucket) AS day, sum(visitors) AS visitors,
               {", ".join(f"sum({m}) AS {m}" for m in _MEASURES)}
        FROM rollup_15m FINAL
        WHERE site_id IN {{sites:Array(String)}} AND kind IN {{kinds:Array(String)}}
          AND bucket >= {{first:Date}} AND bucket < {{end:Date}} AND toDate(bucket) IN {{times:Array(Date)}}
        GROUP BY site_id, kind, value, day"""
    day_params = _params(days)
    _replace(client, "rollup_1d", ["site_id", "kind", "value", "day"], ["visitors", *_MEASURES],
             ["0" for _ in ["visitors", *_MEASURES]], fresh_1d, _scope("day", "Date"),
             {**day_params, "first": day_params["times"][0], "end": day_params["times"][-1] + timedelta(days=1)})


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
