"""Hourly affiliate-click rollups: clicks per UTC hour and product dimensions."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.storage import INSERT_SETTINGS

_COLUMNS = ["site_id", "hour", "product_id", "product_slug", "category_slug", "brand_slug", "partner_slug", "clicks"]


def click_counts(events: Iterable[Event]) -> Counter:
    counts: Counter = Counter()
    for e in events:
        if e.name == "click":
            hour = e.timestamp.replace(minute=0, second=0, microsecond=0)
            counts[(e.site_id, hour, e.product_id, e.product_slug, e.category_slug, e.brand_slug, e.partner_slug)] += 1
    return counts


def write_clicks(client: Client, events: list[Event]) -> None:
    counts = click_counts(events)
    if not counts:
        return
    # The same batch written again (a retry) carries the same token and is dropped by the table.
    token = hashlib.sha256(
        "".join(sorted(e.event_id for e in events if e.name == "click")).encode()
    ).hexdigest()
    client.insert(
        "affiliate_clicks_hourly", [[*key, n] for key, n in counts.items()],
        column_names=_COLUMNS, settings={**INSERT_SETTINGS, "insert_deduplication_token": token},
    )
