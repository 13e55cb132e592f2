"""How ingest hands an accepted event on: in-process to the embedded stream core, or to Kafka.
This is the only code path that differs between the two topologies."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer
from clickhouse_connect.driver.client import Client

from ingest.event import Event
from streams.embedded import EmbeddedRunner
from streams.events import stored_event_ids
from streams.topic import ensure_topic


class Handoff(Protocol):
    async def start(self) -> None: ...
    async def send(self, event: Event) -> None: ...

    async def flush(self, events: Sequence[Event]) -> bool:
        """Wait until these sent events are stored; False if that took too long (they are still
        on their way). Imports use it so the next request's visitor ids see these events."""
        ...

    async def stop(self) -> None: ...


class InProcessHandoff:
    def __init__(self, runner: EmbeddedRunner) -> None:
        self.runner = runner

    async def start(self) -> None:
        await self.runner.start()

    async def send(self, event: Event) -> None:
        await self.runner.submit(event)

    async def flush(self, events: Sequence[Event]) -> bool:
        await self.runner.drain()
        return True

    async def stop(self) -> None:
        await self.runner.stop()


class KafkaHandoff:
    """Idempotent producer with acks=all: an event is answered 202 only once the broker has it."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, replication_factor: int, client: Client,
                 store_timeout_s: float = 120.0) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._client = client  # to see when the workers have stored what was sent
        self._store_timeout_s = store_timeout_s
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

    async def flush(self, events: Sequence[Event]) -> bool:
        await self._producer.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._store_timeout_s
        pending = list(events)
        while pending:
            if loop.time() > deadline:
                return False
            stored = await asyncio.to_thread(stored_event_ids, self._client, pending)
            pending = [e for e in pending if e.event_id not in stored]
            if pending:
                await asyncio.sleep(0.5)
        return True

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
