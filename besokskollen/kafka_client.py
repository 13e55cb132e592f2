"""aiokafka's client with its metadata updates paced: each client starts one at most once per 0.1 s.

aiokafka asks for metadata again the moment the last update ended while a partition it needs has
no leader: its producer's sender when it holds events for one, its consumer's fetcher when it
fetches one. A broker stopped cleanly under load (an upgrade, a rollout restart) can name no
leaders in its last metadata, every update after it fails at once (connection refused), and the
loop spun a whole core until the broker was back: ingest 8,400 failed updates a second, a worker
4,000 (in 2 of 21 clean stops; a SIGKILL leaves the leaders known, and connecting is paced).
Java's client too waits `retry.backoff.ms` before a metadata update after a failed one."""

from __future__ import annotations

import asyncio
import time

from aiokafka.client import AIOKafkaClient

EVERY_S = 0.1  # aiokafka's own retry backoff


def pace_metadata_updates() -> None:
    """Pace every aiokafka client of this process, Faust's included; once is enough."""
    update = AIOKafkaClient._metadata_update  # the one call every update goes through (aiokafka 0.14)
    if getattr(update, "paced", False):
        return

    async def paced(client: AIOKafkaClient, cluster_metadata, topics):
        last = getattr(client, "_bk_metadata_started", float("-inf"))
        if (wait := last + EVERY_S - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        client._bk_metadata_started = time.monotonic()
        return await update(client, cluster_metadata, topics)

    paced.paced, paced.unpaced = True, update
    AIOKafkaClient._metadata_update = paced
