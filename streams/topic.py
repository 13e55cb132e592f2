"""The events topic. Created explicitly, with BK_KAFKA_PARTITIONS partitions, by whichever
process starts first (ingest or worker), rather than left to the broker's auto-creation defaults.

A record: the key `Event.kafka_key`, the value `Event.to_bytes()`, the timestamp when ingest took
the event, and the header `bk-site`: the incarnation of the event's site that ingest took it for
(`Site.incarnation`, decimal). A site deleted and created again keeps its id, and its old events
may still be on their way: workers drop those of another incarnation (streams/worker.py)."""

from __future__ import annotations

import logging

from aiokafka.admin import NewPartitions, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from streams.monitor import admin_client  # a broker that hangs: 10 s, not aiokafka's 40

log = logging.getLogger(__name__)

INCARNATION_HEADER = "bk-site"
# How often ingest's producer and the workers' consumers ask for the topic's partitions. Added
# partitions move visitors, and until every producer sends by the new count one visitor's events
# can go to two partitions (docs/operations.md, "Adding partitions"); aiokafka's default is 5 minutes.
METADATA_MAX_AGE_MS = 30_000


def incarnation_headers(incarnation: int | None) -> list[tuple[str, bytes]] | None:
    return None if incarnation is None else [(INCARNATION_HEADER, str(incarnation).encode())]


def stamped_incarnation(record) -> int | None:
    """The incarnation a consumed record carries; None without one (sent by an ingest release
    before 2026-12-03, or not by ingest)."""
    for name, value in record.headers or ():
        if name == INCARNATION_HEADER:
            try:
                return int(value)
            except ValueError:
                return None
    return None


class TopicRefused(KafkaError):
    """The broker would not create the topic as configured (BK_KAFKA_PARTITIONS,
    BK_KAFKA_REPLICATION_FACTOR). Sending anyway would let the broker auto-create it with its own
    defaults; as a KafkaError, callers keep trying (and logging why) as for a broker away."""


async def ensure_topic(bootstrap: str, topic: str, partitions: int, replication_factor: int) -> None:
    try:
        async with admin_client(bootstrap) as admin:
            response = await admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                                           replication_factor=replication_factor)])
    except TopicAlreadyExistsError:
        return
    # Refusals come back per topic in the response, not as an exception.
    for _name, code, *message in response.topic_errors:
        if code == TopicAlreadyExistsError.errno:
            return
        if code:
            raise TopicRefused(f"Kafka would not create topic {topic!r} with {partitions} partitions and replication"
                               f" factor {replication_factor}: {for_code(code).__name__} {''.join(message)}".rstrip())
    log.info("created topic %s with %d partitions", topic, partitions)


async def partition_count(bootstrap: str, topic: str) -> int:
    """How many partitions the topic has; 0 when it does not exist (asked of the list of every
    topic, so that asking does not create it: see `monitor.topic_exists`)."""
    async with admin_client(bootstrap) as admin:
        if topic not in await admin.list_topics():
            return 0
        (metadata,) = await admin.describe_topics([topic])
        return len(metadata.get("partitions", ()))


async def add_partitions(bootstrap: str, topic: str, total: int) -> None:
    """Grow the topic to `total` partitions (Kafka cannot take any away). Added partitions move
    visitors: `besokskollen partitions` waits until that is safe (docs/operations.md)."""
    async with admin_client(bootstrap) as admin:
        await admin.create_partitions({topic: NewPartitions(total_count=total)})  # a refusal raises
