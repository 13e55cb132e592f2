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

from datetime import date, datetime, timedelta, timezone

from clickhouse_connect.driver.client import Client

from streams.buckets import BUCKET_S


_MEASURES = ["events", "pageviews", "sessions", "bounces", "duration_ms"]
_QUARTERS_A_DAY = 86_400 // BUCKET_S
_EPOCH = date(1970, 1, 1)

# The version of a rebuild's rows: the server's clock, taken before its read. Of two rebuilds of
# one key, the later version wins; every activity row was written before its own batch's rebuild
# took its clock, so the rebuild with the latest clock read every row written before any
# other's, and its numbers are whole. One clock (the server's) orders rebuilds from every worker.
_CLOCK = "SELECT toUInt64(toUnixTimestamp64Nano(now64(9)))"


def _replace(client: Client, table: str, time: str, fresh: str, touched: set[tuple], parameters: dict,
             measures: list[str], empty: tuple) -> None:
    """Write each touched (site, kind, value, time) as `fresh` reads it (its first four columns
    the key, as `touched` holds it), or a tombstone (`empty` measures, is_deleted) when it has no
    rows left. `fresh` reads every combination of the touched sites, kinds, values and times
    (plain IN sets, which the primary key prunes by); only the touched keys of it are written.

    Read here and inserted by column, not one INSERT … SELECT joined with the touched keys: bound
    as four arrays, an import batch's ~10,000 keys took longer to pass to the server than the read
    and the write together."""
    version = client.query(_CLOCK).result_rows[0][0]
    rows = {row[:4]: row[4:] for row in client.query(fresh, parameters=parameters).result_rows}
    keys = sorted(touched)
    found = [rows.get(key) for key in keys]
    columns = [list(column) for column in zip(*keys)]
    columns += [list(column) for column in zip(*(row if row is not None else empty for row in found))]
    columns += [[version] * len(keys), [int(row is None) for row in found]]
    client.insert(table, columns, column_names=["site_id", "kind", "value", time, *measures, "version", "is_deleted"],
                  column_oriented=True)


def rebuild(client: Client, touched: set[tuple[str, str, str, int]]) -> None:
    """Recompute these (site, kind, value, quarter hour)s from activity, then their days. A quarter
    hour is its UTC seconds // BUCKET_S: the keys are hashed and sorted as plain integers (as
    datetimes, a big batch's keys cost more in Python than their read), and written as seconds."""
    if not touched:
        return
    quarters = sorted({q for _, _, _, q in touched})
    fresh_15m = f"""
        SELECT site_id, kind, value, toUInt32(bucket) AS seconds, countIf(gap = 0) AS visitors,
               sumMapIf(map(gap, toUInt64(1)), gap > 0) AS returning,
               {", ".join(f"sum({m}) AS {m}" for m in _MEASURES)}
        FROM activity FINAL
        WHERE site_id IN {{sites:Array(String)}} AND kind IN {{kinds:Array(String)}}
          AND bucket IN {{times:Array(DateTime('UTC'))}} AND value IN {{values:Array(String)}}
        GROUP BY site_id, kind, value, bucket"""
    _replace(client, "rollup_15m", "bucket", fresh_15m, {(s, k, v, q * BUCKET_S) for s, k, v, q in touched},
             {"sites": sorted({s for s, _, _, _ in touched}), "kinds": sorted({k for _, k, _, _ in touched}),
              "values": sorted({v for _, _, v, _ in touched}),
              "times": [datetime.fromtimestamp(q * BUCKET_S, timezone.utc) for q in quarters]},
             ["visitors", "returning", *_MEASURES], (0, {}, *[0] * len(_MEASURES)))

    day_of = {q: _EPOCH + timedelta(days=q // _QUARTERS_A_DAY) for q in quarters}
    days = {(site, kind, value, day_of[q]) for site, kind, value, q in touched}
    fresh_1d = f"""
        SELECT site_id, kind, value, toDate(bucket) AS day, sum(visitors) AS visitors,
               {", ".join(f"sum({m}) AS {m}" for m in _MEASURES)}
        FROM rollup_15m FINAL
        WHERE (site_id, kind, value) IN {{keys:Array(Tuple(String, String, String))}}
          AND bucket >= {{first:Date}} AND bucket < {{end:Date}} AND toDate(bucket) IN {{times:Array(Date)}}
        GROUP BY site_id, kind, value, day"""
    # Asked by whole (site, kind, value)s: rollup_15m is sorted by day, then value (migration 8), so
    # the primary key finds the touched keys' rows of each day; separate IN sets for sites, kinds
    # and values read 469 granules where this reads 28 (`tests/bench/bench_day_rollup.py`).
    times = sorted(set(day_of.values()))
    _replace(client, "rollup_1d", "day", fresh_1d, days,
             {"keys": sorted({key[:3] for key in days}), "times": times, "first": times[0],
              "end": times[-1] + timedelta(days=1)}, ["visitors", *_MEASURES], (0, *[0] * len(_MEASURES)))


def events_before(client: Client, site_id: str, until: datetime) -> int:
    """How many events a site has in the quarter hours before `until` (`up --demo`: whether its
    seeding was done)."""
    return client.query(
        "SELECT sum(events) FROM rollup_15m FINAL WHERE site_id = {site:String} AND kind = 'total'"
        " AND bucket < {until:DateTime('UTC')}", parameters={"site": site_id, "until": until}).result_rows[0][0]


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
