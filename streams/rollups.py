"""Hourly affiliate-click rollups: clicks per UTC hour and product dimensions.

The hours a batch touched are recomputed from the deduplicated raw events rather than
incremented, so a redelivered click is never counted twice, and workers that share a site's
hour converge: each rebuild sees at least the events of every earlier one and its `version`
(the rebuild time) wins under FINAL."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.storage import INSERT_SETTINGS

_REBUILD = """
INSERT INTO affiliate_clicks_hourly
SELECT site_id, toStartOfHour(timestamp) AS hour, product_id, product_slug, category_slug, brand_slug,
       partner_slug, count(), toUInt64(toUnixTimestamp64Nano(now64(9)))
FROM events FINAL
WHERE site_id = {site:String} AND name = 'click'
  AND timestamp >= {first:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
  AND toStartOfHour(timestamp) IN {hours:Array(DateTime('UTC'))}
GROUP BY site_id, hour, product_id, product_slug, category_slug, brand_slug, partner_slug
"""


def rebuild_clicks(client: Client, events: Iterable[Event]) -> None:
    hours: dict[str, set] = {}
    for e in events:
        if e.name == "click":
            hours.setdefault(e.site_id, set()).add(e.timestamp.replace(minute=0, second=0, microsecond=0))
    for site_id, site_hours in hours.items():
        client.command(_REBUILD, parameters={
            "site": site_id, "hours": sorted(site_hours),
            "first": min(site_hours), "end": max(site_hours) + timedelta(hours=1),
        }, settings=INSERT_SETTINGS)
