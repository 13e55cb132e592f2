"""How ingest hands an accepted event on: in-process to the embedded stream core, or to Kafka.
This is the only code path that differs between the two topologies."""

from __future__ import annotations

from typing import Protocol

from aiokafka import AIOKafkaProducer

from ingest.event import Event
from streams.embedded import EmbeddedRunner
from streams.topic import ensure_topic


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

    def __init__(self, bootstrap: str, topic: str, partitions: int, replication_factor: int) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await ensure_topic(self._bootstrap, self._topic, self._partitions, self._replication_factor)
        # aiokafka binds to the running loop, so the producer is made here, not in __init__.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type="gzip",
            linger_ms=5,
        )
        await self._producer.start()

    async def send(self, event: Event) -> None:
        await self._producer.send_and_wait(self._topic, event.to_bytes(), key=event.kafka_key)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
