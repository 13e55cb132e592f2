"""Funnels (SPEC §7): named, ordered steps — a pageview of a path or an event of a name, matched
exactly or by prefix — whose completion is counted when asked from each session's events as
stored with it (query_api/funnels.py), so a funnel applies to all stored data the moment it exists."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from clickhouse_connect.driver.client import Client

_COLUMNS = ["funnel_id", "site_id", "name", "steps", "created_at", "deleted", "version"]
_SELECT = "SELECT funnel_id, site_id, name, steps, created_at FROM funnels FINAL WHERE deleted = 0"


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    type: str         # "pageview" or "event"
    match_value: str
    match_type: str   # "exact" or "startswith"


@dataclass(frozen=True, slots=True)
class Funnel:
    funnel_id: str
    site_id: str
    name: str
    steps: tuple[Step, ...]
    created_at: datetime

    def as_json(self) -> dict:
        return {"id": self.funnel_id, "site_id": self.site_id, "name": self.name,
                "steps": [{"name": s.name, "type": s.type, "match_value": s.match_value, "match_type": s.match_type}
                          for s in self.steps]}


def _funnel(row: tuple) -> Funnel:
    funnel_id, site_id, name, steps, created_at = row
    return Funnel(funnel_id, site_id, name, tuple(Step(**step) for step in orjson.loads(steps)), created_at)


class FunnelRegistry:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, site_id: str, name: str, steps: list[Step]) -> Funnel:
        funnel = Funnel("f_" + secrets.token_hex(8), site_id, name, tuple(steps), datetime.now(timezone.utc))
        self._write(funnel, deleted=0)
        return funnel

    def delete(self, funnel: Funnel) -> None:
        self._write(funnel, deleted=1)

    def get(self, funnel_id: str) -> Funnel | None:
        rows = self._client.query(_SELECT + " AND funnel_id = {id:String}", parameters={"id": funnel_id}).result_rows
        return _funnel(rows[0]) if rows else None

    def for_site(self, site_id: str) -> list[Funnel]:
        """By name (a list without a metric: SPEC §7.1's ties by name; bytes are code point order), then id."""
        rows = self._client.query(_SELECT + " AND site_id = {site:String} ORDER BY name, funnel_id",
                                  parameters={"site": site_id}).result_rows
        return [_funnel(row) for row in rows]

    def _write(self, funnel: Funnel, deleted: int) -> None:
        steps = orjson.dumps([{"name": s.name, "type": s.type, "match_value": s.match_value, "match_type": s.match_type}
                              for s in funnel.steps]).decode()
        self._client.insert("funnels", [[funnel.funnel_id, funnel.site_id, funnel.name, steps, funnel.created_at,
                                         deleted, time.time_ns()]], column_names=_COLUMNS)
