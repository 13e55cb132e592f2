"""The stream core: one batch of enriched events → raw events, sessions and click rollups.

Plain Python with no knowledge of who delivers the batch: the embedded runner calls it with events
from ingest in the same process, the Faust agent with events from a Kafka partition."""

from __future__ import annotations

import asyncio
import logging

from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams import events as raw_events
from streams import rollups
from streams import sessions
from streams.sessions import OpenSession, SessionStore

log = logging.getLogger(__name__)

# Drop idle sessions from memory every this many batches.
_EVICT_EVERY = 50


class StreamCore:
    def __init__(self, client: Client, session_timeout_s: int) -> None:
        self._client = client
        self.sessions = SessionStore(client, session_timeout_s)
        self._batches = 0

    def process(self, batch: list[Event]) -> None:
        """Idempotent: processing a batch again, whole or in part, changes no number."""
        if not batch:
            return
        batch = sorted(batch, key=lambda e: e.timestamp)  # stable: per-visitor order is kept
        self.sessions.load_missing(batch)
        touched: dict[tuple[str, int], OpenSession] = {}
        assigned = []
        for event in batch:
            session = self.sessions.assign(event)
            touched[(event.site_id, session.session_id)] = session
            assigned.append((event, session.session_id))
        # Raw events first: sessions and rollups are rebuilt from them.
        raw_events.write(self._client, assigned)
        sessions.rebuild(self._client, touched)
        rollups.rebuild_clicks(self._client, batch)
        self._batches += 1
        if self._batches % _EVICT_EVERY == 0:
            self.sessions.evict_idle()


async def process_until_written(core: StreamCore, batch: list[Event]) -> None:
    """Run a batch on a worker thread (the ClickHouse client is synchronous), retrying until it
    is written: the events were already answered 202 and are never dropped."""
    delay = 0.1
    while True:
        try:
            await asyncio.to_thread(core.process, batch)
            return
        except Exception:
            log.exception("stream core failed on a batch of %d events; retrying in %.1fs", len(batch), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
