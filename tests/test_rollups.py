"""Rollup rebuilds (streams/rollups.py) of one key by two stream cores that interleave: the later
rebuild wins and has read everything the earlier one read."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

from ingest.event import Event
from streams.core import StreamCore


class _PausedAfterActivityRead:
    """A client whose reads of `activity` (a rollup rebuild's) stop after their answer until `go`."""

    def __init__(self, client) -> None:
        self._client = client
        self.read, self.go = threading.Event(), threading.Event()

    def query(self, sql, *args, **kwargs):
        result = self._client.query(sql, *args, **kwargs)
        if "FROM activity FINAL" in sql and not self.read.is_set():
            self.read.set()
            assert self.go.wait(60)
        return result

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_rebuild_that_read_before_another_cores_write_loses_to_that_cores_rebuild(services):
    """Core A reads a quarter hour's activity, stalls; core B writes a second visitor there and
    rebuilds; A's rows, written last, must not win: its clock was taken before its read."""
    client, site = services.client, f"roll-{uuid.uuid4().hex[:12]}"
    now = datetime.now(timezone.utc)
    quarter = now.replace(minute=now.minute // 15 * 15, second=0, microsecond=0) - timedelta(hours=2)

    def pageview(visitor: int, minute: int) -> Event:
        return Event(event_id=str(uuid.uuid4()), site_id=site, timestamp=quarter + timedelta(minutes=minute),
                     name="pageview", visitor_id=visitor, pathname="/")

    paused = _PausedAfterActivityRead(client)
    a = threading.Thread(target=StreamCore(paused, 1800).process, args=([pageview(1, 1)],))
    a.start()
    try:
        assert paused.read.wait(60), "core A never read activity"
        StreamCore(client, 1800).process([pageview(2, 2)])
    finally:
        paused.go.set()
        a.join(60)
    assert not a.is_alive()

    def visitors(table: str, time: str) -> list[tuple]:
        return client.query(
            f"SELECT {time}, visitors, pageviews FROM {table} FINAL WHERE site_id = {{s:String}} AND kind = 'total'",
            parameters={"s": site}).result_rows

    assert [(v, p) for _, v, p in visitors("rollup_15m", "bucket")] == [(2, 2)]
    assert [(v, p) for _, v, p in visitors("rollup_1d", "day")] == [(2, 2)]
