"""aiokafka's metadata updates, paced in every process that talks to Kafka (besokskollen/kafka_client.py).
The whole loop, a broker stopped cleanly under ingest's load, is in tests/test_spool.py."""

from __future__ import annotations

import time

from aiokafka.client import AIOKafkaClient

from besokskollen.kafka_client import EVERY_S, pace_metadata_updates
from tests.conftest import free_port


def _unpaced(monkeypatch) -> None:
    current = AIOKafkaClient._metadata_update
    monkeypatch.setattr(AIOKafkaClient, "_metadata_update", getattr(current, "unpaced", current))


async def test_a_client_whose_updates_fail_at_once_starts_one_per_tenth_of_a_second(monkeypatch):
    """As aiokafka's sender and fetcher do while a partition has no leader: ask again as soon as
    the last update ended. Nothing answers on the port: each update fails at once."""
    _unpaced(monkeypatch)

    async def updates_in(seconds: float) -> int:
        client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{free_port()}")
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            assert await client._metadata_update(client.cluster, []) is False
            n += 1
        await client.close()
        return n

    unpaced = await updates_in(0.5)
    pace_metadata_updates()
    pace_metadata_updates()  # twice is once
    paced = await updates_in(0.5)
    assert unpaced > 100, unpaced
    assert paced <= 0.5 / EVERY_S + 1, paced


def test_ingest_and_the_worker_pace_every_client_they_make(monkeypatch, clickhouse_http, tmp_path):
    from besokskollen.config import Settings
    from ingest.handoff import KafkaHandoff
    from ingest.spool import Spool
    from streams.worker import create_app

    _unpaced(monkeypatch)
    create_app(Settings(kafka_bootstrap="127.0.0.1:1", clickhouse_url=clickhouse_http), "127.0.0.1", free_port())
    assert AIOKafkaClient._metadata_update.paced

    _unpaced(monkeypatch)
    KafkaHandoff("127.0.0.1:1", "events", 1, 1, None, Spool(tmp_path, 1 << 20), 1.0)
    assert AIOKafkaClient._metadata_update.paced
