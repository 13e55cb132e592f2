"""Rollups: every number the query API serves, per UTC quarter hour (clicks per UTC hour).

A rollup bucket is never incremented. After a batch, each bucket it touched is recomputed whole
from its source table (deduplicated raw events, sessions or visitor spans, read with FINAL) and
written with a newer `version`; keys the bucket no longer has get a tombstone. So a redelivered or
replayed batch changes no number, and two workers that touch one bucket converge: every rebuild
sees at least what the earlier ones saw.

    event_counts_15m   (site, bucket, name, page)               events; page set for pageviews only
    sessions_15m       (site, bucket, source, channel, country)  sessions, bounces, duration
    visitors_15m       (site, kind, value, bucket)               visitors first seen (streams/spans.py)
    affiliate_clicks_hourly (site, hour, product dimensions)     clicks
"""

from __future__ import annotations

from datetime import datetime, timedelta

from clickhouse_connect.driver.client import Client

from streams.buckets import BUCKET
from streams.storage import INSERT_SETTINGS

# Each rebuild writes the fresh rows of the touched buckets; where a key can vanish from a bucket
# (a session that merged into an earlier one, a visitor whose first visit moved), also a tombstone
# for every key a touched bucket had before but no longer has. `{scope}` limits both.
_FRESH = """
INSERT INTO {table} ({keys}, {values}, version{deleted_column})
WITH fresh AS ({fresh})
SELECT {keys}, {values}, {{version:UInt64}}{not_deleted} FROM fresh
"""
_TOMBSTONES = """
UNION ALL
SELECT {keys}, {zeros}, {{version:UInt64}}, 1 FROM {table} FINAL
WHERE {scope} AND ({keys}) NOT IN (SELECT {keys} FROM fresh)
"""


def _replace(client: Client, table: str, keys: list[str], values: list[str], fresh: str, scope: str | None,
             parameters: dict) -> None:
    parts = dict(table=table, keys=", ".join(keys), values=", ".join(values), fresh=fresh, scope=scope,
                 zeros=", ".join("0" for _ in values), deleted_column=", is_deleted" if scope else "",
                 not_deleted=", 0" if scope else "")
    sql = _FRESH.format(**parts) + (_TOMBSTONES.format(**parts) if scope else "")
    client.command(sql, parameters=parameters, settings=INSERT_SETTINGS)


def _scope(column: str, bucket_expr: str | None = None) -> str:
    """Rows of the touched (site, bucket)s; the range lets the primary key prune."""
    return (f"site_id IN {{sites:Array(String)}}"
            f" AND {column} >= {{first:DateTime('UTC')}} AND {column} < {{end:DateTime('UTC')}}"
            f" AND (site_id, {bucket_expr or column}) IN {{buckets:Array(Tuple(String, DateTime('UTC')))}}")


def _params(buckets: set[tuple[str, datetime]], version: int, width: timedelta = BUCKET) -> dict:
    times = [b for _, b in buckets]
    return {"sites": sorted({s for s, _ in buckets}), "buckets": sorted(buckets), "first": min(times),
            "end": max(times) + width, "version": version}


def rebuild_event_counts(client: Client, buckets: set[tuple[str, datetime]], version: int) -> None:
    """Events per name (and pageviews per page) of these (site, bucket)s, from raw events. An
    event never leaves its bucket, so no tombstones are needed."""
    if not buckets:
        return
    fresh = f"""
        SELECT site_id, toStartOfFifteenMinutes(timestamp) AS bucket, name,
               if(name = 'pageview', pathname, '') AS page, count() AS events
        FROM events FINAL
        WHERE {_scope('timestamp', 'toStartOfFifteenMinutes(timestamp)')}
        GROUP BY site_id, bucket, name, page"""
    _replace(client, "event_counts_15m", ["site_id", "bucket", "name", "page"], ["events"], fresh, None,
             _params(buckets, version))


def rebuild_sessions(client: Client, buckets: set[tuple[str, datetime]], version: int) -> None:
    """Sessions, bounces and total duration by the session's start bucket, entry source and country."""
    if not buckets:
        return
    fresh = f"""
        SELECT site_id, toStartOfFifteenMinutes(start) AS bucket, source, channel, country,
               count() AS sessions, sum(bounce) AS bounces, sum(duration_ms) AS duration_ms
        FROM sessions FINAL
        WHERE {_scope('start', 'toStartOfFifteenMinutes(start)')}
        GROUP BY site_id, bucket, source, channel, country"""
    _replace(client, "sessions_15m", ["site_id", "bucket", "source", "channel", "country"],
             ["sessions", "bounces", "duration_ms"], fresh, _scope("bucket"), _params(buckets, version))


def rebuild_visitors(client: Client, firsts: set[tuple[str, str, datetime]], version: int) -> None:
    """Visitors first seen per (site, kind, value, bucket), from the visitor spans."""
    if not firsts:
        return
    times = [b for _, _, b in firsts]
    scope = ("site_id IN {sites:Array(String)} AND kind IN {kinds:Array(String)}"
             " AND {col} >= {first:DateTime('UTC')} AND {col} <= {last:DateTime('UTC')}"
             " AND (site_id, kind, {col}) IN {firsts:Array(Tuple(String, String, DateTime('UTC')))}")
    fresh = f"""
        SELECT site_id, kind, value, first_bucket AS bucket, count() AS visitors
        FROM visitor_spans FINAL
        WHERE {scope.replace('{col}', 'first_bucket')} AND multi IN (0, 1)
        GROUP BY site_id, kind, value, bucket"""
    _replace(client, "visitors_15m", ["site_id", "kind", "value", "bucket"], ["visitors"], fresh,
             scope.replace("{col}", "bucket"), {
                 "sites": sorted({s for s, _, _ in firsts}), "kinds": sorted({k for _, k, _ in firsts}),
                 "firsts": sorted(firsts), "first": min(times), "last": max(times), "version": version})


def rebuild_clicks(client: Client, hours: set[tuple[str, datetime]], version: int) -> None:
    """Affiliate clicks per UTC hour and product dimensions (a click never changes its hour)."""
    if not hours:
        return
    fresh = f"""
        SELECT site_id, toStartOfHour(timestamp) AS hour, product_id, product_slug, category_slug,
               brand_slug, partner_slug, count() AS clicks
        FROM events FINAL
        WHERE {_scope('timestamp', 'toStartOfHour(timestamp)')} AND name = 'click'
        GROUP BY site_id, hour, product_id, product_slug, category_slug, brand_slug, partner_slug"""
    _replace(client, "affiliate_clicks_hourly",
             ["site_id", "hour", "product_id", "product_slug", "category_slug", "brand_slug", "partner_slug"],
             ["clicks"], fresh, None, _params(hours, version, timedelta(hours=1)))
