"""The distributed driver: a Faust app whose agent feeds batches from the events topic to the
same stream core the embedded runner uses. Run N of them; Kafka shares the partitions.

Faust's transactional mode and windowed tables are not used (see SPEC §6 and INFRA-NOTES:
known defects); the agent runs with concurrency 1 (#606) and the core's writes are idempotent."""

from __future__ import annotations

import asyncio
import logging

import faust

from besokskollen.config import Settings
from ingest.event import Event
from streams import replay, storage
from streams.core import StreamCore, process_until_written
from streams.topic import ensure_topic

log = logging.getLogger(__name__)

BATCH_MAX = 2000
BATCH_WITHIN_S = 0.2


def broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def create_app(settings: Settings) -> faust.App:
    if settings.kafka_bootstrap is None:
        raise SystemExit("the worker needs BK_KAFKA_BOOTSTRAP (without Kafka, `besokskollen up` runs the stream core)")
    app = faust.App(
        "besokskollen",
        broker=broker_urls(settings.kafka_bootstrap),
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    topic = app.topic(settings.kafka_topic, key_serializer="raw", value_serializer="raw",
                      partitions=settings.kafka_partitions)
    client = storage.connect(settings.clickhouse_url)
    replay.upgrade(client, settings.session_timeout_s)
    core = StreamCore(client, settings.session_timeout_s)

    @app.agent(topic, concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        async for values in stream.take(BATCH_MAX, within=BATCH_WITHIN_S):
            # take() acks a batch's offsets when control returns to it, even when the agent is
            # cancelled (worker shutdown): so a batch being written is finished first.
            writing = asyncio.ensure_future(process_until_written(core, _decode(values)))
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                await writing
                raise

    return app


def _decode(values: list[bytes]) -> list[Event]:
    """Events of a batch; a record that is not an event (only a foreign producer can write one)
    is logged and skipped rather than crash the agent on every restart."""
    events = []
    for value in values:
        try:
            events.append(Event.from_bytes(value))
        except ValueError:
            log.error("skipping a record that is not an event: %r", value[:200])
    return events


def run(settings: Settings, loglevel: str = "info") -> None:
    app = create_app(settings)
    asyncio.run(ensure_topic(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_partitions,
                             settings.kafka_replication_factor))
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
