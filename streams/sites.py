"""The site registry: which sites exist, their domain, account and timezone. Written by the query
API and the CLI, read by ingest (to accept or 404 an event) and by the query API."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from clickhouse_connect.driver.client import Client

from streams.read_cache import ReadThroughCache
from streams.storage import INSERT_SETTINGS

DEFAULT_TIMEZONE = "Europe/Stockholm"

_COLUMNS = ["site_id", "account_id", "domain", "name", "timezone", "created_at", "deleted", "version"]
_SELECT = "SELECT site_id, account_id, domain, name, timezone, created_at FROM sites FINAL WHERE deleted = 0"


@dataclass(frozen=True, slots=True)
class Site:
    site_id: str
    account_id: str
    domain: str
    name: str
    timezone: str
    created_at: datetime


def normalize_domain(domain: str) -> str:
    domain = domain.strip().lower()
    domain = re.sub(r"^[a-z]+://", "", domain).split("/")[0]
    return domain.removeprefix("www.")


def site_id_for(domain: str) -> str:
    """`mobildelar.se` → `mobildelar-se`: readable ids, stable for a domain."""
    return re.sub(r"[^a-z0-9]+", "-", normalize_domain(domain)).strip("-")


class SiteRegistry:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._by_id: ReadThroughCache[str, Site] = ReadThroughCache(lambda key: self._load("site_id", key))
        self._by_domain: ReadThroughCache[str, Site] = ReadThroughCache(lambda key: self._load("domain", key))

    def create(self, account_id: str, domain: str, name: str = "", tz: str = DEFAULT_TIMEZONE,
               site_id: str | None = None) -> Site:
        domain = normalize_domain(domain)
        site = Site(site_id or site_id_for(domain), account_id, domain, name or domain, tz,
                    datetime.now(timezone.utc))
        self._client.insert(
            "sites",
            [[site.site_id, site.account_id, site.domain, site.name, site.timezone, site.created_at, 0,
              time.time_ns()]],
            column_names=_COLUMNS, settings=INSERT_SETTINGS,
        )
        return self._remember(site)

    def get(self, site_id: str) -> Site | None:
        return self._by_id.get(site_id)

    def by_domain(self, domain: str) -> Site | None:
        return self._by_domain.get(normalize_domain(domain))

    def answers_without_io(self, site_id: str | None = None, domain: str | None = None) -> bool:
        if site_id is not None:
            return self._by_id.answers_without_io(site_id)
        return self._by_domain.answers_without_io(normalize_domain(domain or ""))

    def list(self, account_id: str) -> list[Site]:
        rows = self._client.query(
            _SELECT + " AND account_id = {account:String} ORDER BY site_id",
            parameters={"account": account_id},
        ).result_rows
        return [self._remember(Site(*row)) for row in rows]

    def _load(self, column: str, key: str) -> Site | None:
        rows = self._client.query(
            _SELECT + f" AND {column} = {{key:String}} LIMIT 1", parameters={"key": key}
        ).result_rows
        return Site(*rows[0]) if rows else None

    def _remember(self, site: Site) -> Site:
        self._by_id.put(site.site_id, site)
        self._by_domain.put(site.domain, site)
        return site
