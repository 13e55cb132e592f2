"""The events topic. Created explicitly, with BK_KAFKA_PARTITIONS partitions, by whichever
process starts first (ingest or worker), rather than left to the broker's auto-creation defaults."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)


async def ensure_topic(bootstrap: str, topic: str, partitions: int, replication_factor: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)])
        log.info("created topic %s with %d partitions", topic, partitions)
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()
