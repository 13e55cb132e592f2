"""How ingest hands an accepted event on: in-process to the embedded stream core, or to Kafka
(with the local spool for when Kafka does not answer). This is the only code path that differs
between the two topologies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from clickhouse_connect.driver.client import Client

from ingest.event import Event
from ingest.spool import Spool
from streams.embedded import EmbeddedRunner
from streams.events import stored_event_ids
from streams.topic import ensure_topic

log = logging.getLogger(__name__)

# Spooled events go to Kafka this many at a time, each round waiting for every acknowledgement.
_REPLAY_BATCH = 2000
_REPLAY_ACK_TIMEOUT_S = 10.0
_SYNC_PERIOD_S = 1.0


class Handoff(Protocol):
    async def start(self) -> None: ...

    async def send(self, event: Event) -> None:
        """Returns once the event is safe (in Kafka, in the spool, or in the embedded queue);
        raises `SpoolFull` when it cannot be kept."""
        ...

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
    """Idempotent producer with acks=all. An event is answered 202 once the broker has it, or,
    when the broker has not acknowledged within `ack_timeout_s`, once it is in the spool.

    While the spool holds anything, every new event goes to its end too, so events reach Kafka in
    the order they arrived; a background task sends the spool and switches back to Kafka directly
    when it is empty. An event whose acknowledgement was late may reach Kafka twice (from the
    producer's own retry and from the spool): the stream core stores an event id once."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, replication_factor: int, client: Client,
                 spool: Spool, ack_timeout_s: float, store_timeout_s: float = 120.0) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._client = client  # to see when the workers have stored what was sent
        self.spool = spool
        self._ack_timeout_s = ack_timeout_s
        self._store_timeout_s = store_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._spooling = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def spooling(self) -> bool:
        return self._spooling

    async def start(self) -> None:
        self.spool.open()
        if self.spool.pending_bytes:
            log.info("the spool holds %d bytes from before; sending them first", self.spool.pending_bytes)
            self._spooling = True
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
        self._tasks = [asyncio.create_task(self._replay(), name="spool-replay"),
                       asyncio.create_task(self._sync(), name="spool-sync")]
        self._wake.set()

    async def send(self, event: Event) -> None:
        key, value = event.kafka_key, event.to_bytes()
        if self._spooling:
            self.spool.append(key, value)
            return
        try:
            async with asyncio.timeout(self._ack_timeout_s):
                acked = await self._producer.send(self._topic, value, key=key)
                await acked
        except (TimeoutError, KafkaError) as exc:
            self.spool.append(key, value)  # SpoolFull goes to the caller: 503, never a silent drop
            if not self._spooling:
                log.warning("Kafka did not acknowledge within %.0f ms (%s); spooling to %s",
                            self._ack_timeout_s * 1000, type(exc).__name__, self.spool.directory)
                self._spooling = True
                self._wake.set()

    async def _replay(self) -> None:
        """Send the spool in order whenever it holds something; back to direct sends when empty."""
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.spool.pending_bytes:
                records, end = self.spool.read(_REPLAY_BATCH)
                try:
                    # One record first while Kafka may still be down: retries then pile up one
                    # copy per round in the producer, not a whole batch.
                    await self._send_all(records[:1])
                    await self._send_all(records[1:])
                except (TimeoutError, KafkaError) as exc:
                    log.info("spool: Kafka still unavailable (%s); %d bytes waiting", type(exc).__name__,
                             self.spool.pending_bytes)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.5
                self.spool.commit(end)
            if self._spooling:  # no await since the spool was seen empty: nothing slipped in
                self._spooling = False
                log.info("spool sent; events go to Kafka directly again")

    async def _send_all(self, records: list[tuple[bytes, bytes]]) -> None:
        if not records:
            return
        async with asyncio.timeout(_REPLAY_ACK_TIMEOUT_S):
            acks = [await self._producer.send(self._topic, value, key=key) for key, value in records]
            await asyncio.gather(*acks)

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(_SYNC_PERIOD_S)
            await asyncio.to_thread(self.spool.sync)

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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._producer is not None:
            try:
                async with asyncio.timeout(10):
                    await self._producer.stop()  # whatever Kafka acknowledged was answered already
            except TimeoutError:
                log.warning("Kafka producer did not stop within 10 s")
        self.spool.close()
