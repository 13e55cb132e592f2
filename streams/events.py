"""The raw-event sink: enriched events, with the session each belongs to, into `events`."""

from __future__ import annotations

from collections.abc import Iterable

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.storage import INSERT_SETTINGS

_COLUMNS = [
    "event_id", "site_id", "timestamp", "name", "visitor_id", "session_id", "hostname", "pathname",
    "referrer", "source", "channel", "utm_source", "utm_medium", "utm_campaign", "country", "device",
    "browser", "os", "props", "product_id", "product_slug", "category_slug", "brand_slug", "partner_slug",
]


def write(client: Client, events: Iterable[tuple[Event, int]]) -> None:
    rows = [
        [e.event_id, e.site_id, e.timestamp, e.name, e.visitor_id, session_id, e.hostname, e.pathname,
         e.referrer, e.source, e.channel, e.utm_source, e.utm_medium, e.utm_campaign, e.country, e.device,
         e.browser, e.os, e.props, e.product_id, e.product_slug, e.category_slug, e.brand_slug, e.partner_slug]
        for e, session_id in events
    ]
    if rows:
        client.insert("events", rows, column_names=_COLUMNS, settings=INSERT_SETTINGS)


def sites_with_events(client: Client, site_ids: list[str]) -> set[str]:
    if not site_ids:
        return set()
    rows = client.query(
        "SELECT DISTINCT site_id FROM events WHERE site_id IN {ids:Array(String)}", parameters={"ids": site_ids}
    ).result_rows
    return {row[0] for row in rows}
