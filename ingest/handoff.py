"""How ingest hands an accepted event on: in-process to the embedded stream core, or to Kafka.
This is the only code path that differs between the two topologies."""

from __future__ import annotations

import logging
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from ingest.event import Event
from streams.embedded import EmbeddedRunner

log = logging.getLogger(__name__)


class Handoff(Protocol):
    async def start(self) -> None: ...
    async def send(self, event: Event) -> None: ...
    async def stop(self) -> None: ...


class InProcessHandoff:
    def __init__(self, runner: EmbeddedRunner) -> None:
        self.runner = runner

    async def start(self) -> None:
        await self.runner.start()

    async def send(self, event: Event) -> None:
        await self.runner.submit(event)

    async def stop(self) -> None:
        await self.runner.stop()


class KafkaHandoff:
    """Idempotent producer with acks=all: an event is answered 202 only once the broker has it."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partitions = partitions
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type="gzip",
            linger_ms=5,
        )

    async def start(self) -> None:
        await ensure_topic(self._bootstrap, self._topic, self._partitions)
        await self._producer.start()

    async def send(self, event: Event) -> None:
        await self._producer.send_and_wait(self._topic, event.to_bytes(), key=event.kafka_key)

    async def stop(self) -> None:
        await self._producer.stop()


async def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        log.info("created topic %s with %d partitions", topic, partitions)
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()
