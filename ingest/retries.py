"""Client-id retries follow their first copy. A retry from another address (a phone that changed
networks) hashes to another visitor id: in Kafka that is another partition, where a second worker
with both copies in flight at once would store it too. Given the first copy's visitor id, it
follows that copy and is counted once (README, "Known limits", for retries this memory misses)."""

from __future__ import annotations

from datetime import datetime

from cachetools import LRUCache

from ingest.event import Event
from streams.events import RETRY_WINDOW

# Client event ids whose first copy's visitor id is remembered (~200 bytes each).
REMEMBERED = 100_000


class FirstCopies:
    """(site, event id) → (visitor id, time) of the first copy this process handed on."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._known: LRUCache[tuple[str, str], tuple[int, datetime]] = LRUCache(maxsize=size)

    def follow(self, event: Event) -> Event:
        """The event, with its first copy's visitor id when it is a retry within RETRY_WINDOW."""
        known = self._known.get((event.site_id, event.event_id))
        if known is None or known[0] == event.visitor_id or event.timestamp - known[1] > RETRY_WINDOW:
            return event
        return event.model_copy(update={"visitor_id": known[0]})

    def taken(self, event: Event) -> None:
        """Remember a copy once it is handed on (not before: a copy the spool refused is no first copy)."""
        key = (event.site_id, event.event_id)
        known = self._known.get(key)
        if known is None or event.timestamp - known[1] > RETRY_WINDOW:
            self._known[key] = (event.visitor_id, event.timestamp)
