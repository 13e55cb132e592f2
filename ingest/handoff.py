"""How ingest hands an accepted event on: in-process to the embedded stream core, or to Kafka
(with the local spool for when Kafka does not answer). This is the only code path that differs
between the two topologies."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, ProducerFenced
from clickhouse_connect.driver.client import Client

from besokskollen import metrics
from besokskollen.kafka_client import pace_metadata_updates
from ingest.event import Event
from ingest.spool import Record, Spool
from streams.embedded import EmbeddedRunner
from streams.events import stored_event_ids
from streams.topic import METADATA_MAX_AGE_MS, TopicRefused, ensure_topic, incarnation_headers

log = logging.getLogger(__name__)

# aiokafka's sender stops for good on these (every later send raises the same error): the broker
# lost the producer's sequence state (an unclean restart, a truncated log) or fenced it. A new
# producer (a new producer id) is the way on; the stream core stores an event id once.
_PRODUCER_DEAD = (OutOfOrderSequenceNumber, ProducerFenced)
# Spooled events go to Kafka this many at a time, each round waiting for every acknowledgement.
_REPLAY_BATCH = 2000
_REPLAY_ACK_TIMEOUT_S = 10.0
# The longest pause between rounds that Kafka did not take. A round sends one record first, so a
# round costs little; a hung broker's round ends at the timeout above. At 5 s the spool's first
# events reached Kafka 3.4-6.5 s after a broker hung for 45-150 s was resumed (audit 116).
_REPLAY_BACKOFF_MAX_S = 2.0
_SYNC_PERIOD_S = 1.0
_CONNECT_TIMEOUT_S = 10.0
# How often, and how patiently, the broker connection is checked. A check of a live connection
# costs no I/O, and the requests that arrive between an outage and its check each wait for it:
# at 250 ms, the first wave of an outage waited ~165 ms (the outage test's p99 is 100 ms).
_WATCH_PERIOD_S = 0.05
_WATCH_TIMEOUT_S = 1.0
# On saturated cores a single late acknowledgement (> BK_SPOOL_AFTER_MS) switches to the spool
# for a moment, ~100 times in 10 minutes in a soak: a WARNING each was noise. One a minute, with
# the count of the others.
_SWITCH_WARN_EVERY_S = 60.0


class Handoff(Protocol):
    async def start(self) -> None: ...

    async def send(self, event: Event, incarnation: int) -> None:
        """Returns once the event is safe (in Kafka, in the spool, or in the embedded queue);
        raises `SpoolRefused` when it cannot be kept. `incarnation`: of the site ingest took it for
        (`Site.incarnation`; a site deleted and created again keeps its id)."""
        ...

    async def send_all(self, events: Sequence[Event], incarnation: int, accepted_ms: int) -> None:
        """`send` for many events of one site (an import's), in order, taken at `accepted_ms`
        (the request's arrival: a worker tells the old site's events from a site created again by
        it, and an import's later parts are sent after that)."""
        ...

    async def flush(self, events: Sequence[Event], gone: Callable[[], bool] = lambda: False) -> bool:
        """Wait until these sent events are stored; False if that took too long (they are still
        on their way), or once `gone()` (asked off the event loop) says they never will be (their
        site was deleted meanwhile). Imports use it so the next request's visitor ids see these
        events."""
        ...

    async def stop(self) -> None: ...


class InProcessHandoff:
    def __init__(self, runner: EmbeddedRunner) -> None:
        self.runner = runner

    async def start(self) -> None:
        await self.runner.start()

    async def send(self, event: Event, incarnation: int) -> None:
        await self.runner.submit(event, incarnation)

    async def send_all(self, events: Sequence[Event], incarnation: int, accepted_ms: int) -> None:
        await self.runner.submit_all(events, incarnation, accepted_ms)

    async def flush(self, events: Sequence[Event], gone: Callable[[], bool] = lambda: False) -> bool:
        await self.runner.drain()  # events of a site deleted meanwhile are dropped, and count as written
        return not await asyncio.to_thread(gone)

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
        pace_metadata_updates()
        self._producer: AIOKafkaProducer | None = None
        self._spooling = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._waiting: set[asyncio.Future] = set()
        # Set while the replay sends the spool's last records: events taken meanwhile wait for
        # them (True: acknowledged, send directly; False: spool) rather than go behind them.
        self._handover: asyncio.Future | None = None
        self._warned_at = float("-inf")
        self._switches_unsaid = 0
        # Whether this spell of spooling was said (its switch, or that Kafka is still away): then
        # its end is said too, or the log's last word is events waiting that were long sent.
        self._spell_said = False

    @property
    def connected(self) -> bool:
        """Whether the topic is there and the producer made (until then, every event is spooled)."""
        return self._producer is not None

    async def start(self) -> None:
        """Opens the spool and connects; when Kafka is down, starts anyway (spooling) and keeps
        trying: an ingest process must take beacons through an outage, restarts included."""
        self.spool.open()
        metrics.watch_spool(self.spool)
        metrics.SPOOLING.set_function(lambda: int(self._spooling))
        self._spawn(self._sync)
        if self.spool.pending_bytes:
            log.info("the spool holds %d bytes from before; sending them first", self.spool.pending_bytes)
            self._spooling = self._spell_said = True
        try:
            await self._connect()
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("Kafka is unavailable at start (%s); spooling until it is back", exc)
            self._spooling = self._spell_said = True
            self._spawn(self._keep_connecting)
        else:
            self._start_tasks()

    async def _connect(self) -> None:
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            await ensure_topic(self._bootstrap, self._topic, self._partitions, self._replication_factor)
        self._producer = await self._new_producer()

    async def _new_producer(self) -> AIOKafkaProducer:
        # aiokafka binds to the running loop, so the producer is made here, not in __init__.
        # 5 ms of linger: a produce request carries what 5 ms of requests sent, and the broker's
        # cost is mostly per request. Under wrk with a worker running (every process on 2 cores),
        # two alternating pairs: the broker took 226-230 µs of CPU per event against 285-313
        # without linger, and /api/event ran 1.19-1.24x faster; 10 ms gained nothing more, 20 ms
        # lost. lz4 and zstd (through cramjam) were no cheaper than gzip here.
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type="gzip",
            linger_ms=5,
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
        )
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _renew_producer(self, why: Exception) -> None:
        log.warning("the Kafka producer stopped for good (%s: the broker lost or fenced its sequence state); making"
                    " a new one", type(why).__name__)
        old, self._producer = self._producer, await self._new_producer()
        try:
            async with asyncio.timeout(10):
                await old.stop()
        except Exception:  # noqa: BLE001 - the dead one's own errors; its events are in the spool
            pass

    async def _keep_connecting(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except (TimeoutError, KafkaError, OSError) as exc:
                if isinstance(exc, TopicRefused):  # a setting to mend, not an outage to wait out
                    log.error("%s; every event is spooled until it is mended", exc)
                else:
                    log.info("Kafka still unavailable (%s)", type(exc).__name__)
                delay = min(delay * 2, 10.0)
                continue
            log.info("connected to Kafka")
            self._start_tasks()
            return

    def _start_tasks(self) -> None:
        self._spawn(self._replay)
        self._spawn(self._watch)
        self._wake.set()

    def _spawn(self, loop) -> None:
        """A background loop that is restarted, loudly, if it ever fails: a dead replay task
        would leave events in the spool for good."""
        async def supervised() -> None:
            while True:
                try:
                    await loop()
                    return
                except Exception:
                    log.exception("%s failed; restarting it", loop.__name__)
                    await asyncio.sleep(1)
                    self._wake.set()

        self._tasks.append(asyncio.create_task(supervised(), name=loop.__name__))

    def _start_spooling(self, why: str) -> None:
        if not self._spooling:
            now = time.monotonic()
            if now - self._warned_at >= _SWITCH_WARN_EVERY_S:
                more = f" ({self._switches_unsaid} more switches to the spool since the last such message)" \
                    if self._switches_unsaid else ""
                log.warning("%s; spooling to %s%s", why, self.spool.directory, more)
                self._warned_at, self._switches_unsaid, self._spell_said = now, 0, True
            else:
                self._switches_unsaid += 1
                log.debug("%s; spooling to %s", why, self.spool.directory)
            self._spooling = True
            self._wake.set()
            # Events waiting for an acknowledgement go to the spool now, not at their timeout.
            for outcome in self._waiting:
                if not outcome.done():
                    outcome.set_result(False)

    async def _reachable(self) -> bool:
        """Whether any broker accepts a connection (a refused one is seen at once)."""
        client = self._producer.client
        try:
            async with asyncio.timeout(_WATCH_TIMEOUT_S):
                for broker in client.cluster.brokers():
                    if await client.ready(broker.nodeId):
                        return True
        except (TimeoutError, KafkaError, OSError):
            pass
        return False

    async def _watch(self) -> None:
        """Spool as soon as no broker can be reached, rather than after every waiting request
        has timed out."""
        while True:
            await asyncio.sleep(_WATCH_PERIOD_S)
            if not self._spooling and not await self._reachable():
                self._start_spooling("no Kafka broker is reachable")

    async def send(self, event: Event, incarnation: int, accepted_ms: int | None = None) -> None:
        key, value = event.kafka_key, event.to_bytes()
        if accepted_ms is None:
            accepted_ms = time.time_ns() // 1_000_000
        if self._spooling and not await self._handed_over():
            self.spool.append(key, value, accepted_ms, incarnation)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = loop.create_future()  # True: acknowledged; False: spooling began meanwhile
        self._waiting.add(outcome)
        try:
            async with asyncio.timeout(self._ack_timeout_s):
                acked = await self._producer.send(self._topic, value, key=key, timestamp_ms=accepted_ms,
                                                  headers=incarnation_headers(incarnation))
                acked.add_done_callback(lambda ack: outcome.done() or outcome.set_result(
                    not ack.cancelled() and ack.exception() is None))
                if not await outcome:
                    raise KafkaError("Kafka became unreachable")
            metrics.PRODUCER_LATENCY.observe(loop.time() - started)
        except (TimeoutError, KafkaError) as exc:
            # Spooling begins even when this append fails: Kafka is what is late.
            self._start_spooling(f"Kafka did not acknowledge within {self._ack_timeout_s * 1000:.0f} ms"
                                 f" ({type(exc).__name__})")
            # SpoolRefused goes to the caller: 503, never a silent drop.
            self.spool.append(key, value, accepted_ms, incarnation)
        finally:
            self._waiting.discard(outcome)

    async def _handed_over(self) -> bool:
        """Whether, while spooling, the spool's last records were acknowledged within the usual
        bound, so that this event goes directly to Kafka, after them."""
        if self._handover is None:
            return False
        try:
            async with asyncio.timeout(self._ack_timeout_s):
                return await asyncio.shield(self._handover) and not self._spooling
        except TimeoutError:
            return False

    async def send_all(self, events: Sequence[Event], incarnation: int, accepted_ms: int) -> None:
        # Concurrently, so the producer batches them; each is acknowledged or spooled on its own.
        await asyncio.gather(*(self.send(event, incarnation, accepted_ms) for event in events))

    async def _replay(self) -> None:
        """While spooling: send the spool in order; once it is empty and a broker is reachable,
        go back to sending directly."""
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            sent_one = False  # in this spell: Kafka has taken a round
            while self._spooling:
                if not self.spool.pending_bytes:
                    if await self._reachable():
                        if not self.spool.pending_bytes:  # nothing slipped in during the check
                            self._send_directly_again()
                        continue
                    await asyncio.sleep(delay)
                    continue
                records, end = self.spool.read(_REPLAY_BATCH)
                # The spool's last records, once a round got through: events taken while they are
                # sent wait for them rather than go behind them, or under steady traffic the spool
                # was seldom empty when looked at, and ingest spooled for 12-25 s after a backlog
                # sent in 1 (audit 116). Not while Kafka may be away: each would wait to no end.
                last = sent_one and len(records) == self.spool.pending_records
                handover = self._handover = asyncio.get_running_loop().create_future() if last else None
                try:
                    # One record first while Kafka may still be down: retries then pile up one
                    # copy per round in the producer, not a whole batch.
                    await self._send_all(records[:1])
                    await self._send_all(records[1:])
                except BaseException as exc:
                    self._hand_over(handover, False)
                    if not isinstance(exc, (TimeoutError, KafkaError)):
                        raise
                    sent_one = False
                    log.info("spool: Kafka still unavailable (%s); %d bytes waiting", type(exc).__name__,
                             self.spool.pending_bytes)
                    self._spell_said = True
                    if isinstance(exc, _PRODUCER_DEAD):
                        try:
                            await self._renew_producer(exc)
                        except (TimeoutError, KafkaError, OSError):
                            pass  # Kafka away as well: the same error next round, and another try
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _REPLAY_BACKOFF_MAX_S)
                    continue
                delay, sent_one = 0.5, True
                if handover is not None and self.spool.pending_records == len(records):
                    # Nothing spooled since they were read (a wait that ran out): sent directly
                    # again. Committed after: a crash between sends them twice, stored once.
                    self._send_directly_again()
                self._hand_over(handover, not self._spooling)
                await self.spool.commit_off_loop(end)

    def _send_directly_again(self) -> None:
        self._spooling = False
        # Said when the spell was (not for each short one left unsaid).
        log.log(logging.INFO if self._spell_said else logging.DEBUG, "spool sent; events go to Kafka directly again")
        self._spell_said = False

    def _hand_over(self, handover: asyncio.Future | None, sent: bool) -> None:
        if handover is not None:
            self._handover = None
            handover.set_result(sent)

    async def _send_all(self, records: list[Record]) -> None:
        if not records:
            return
        async with asyncio.timeout(_REPLAY_ACK_TIMEOUT_S):
            # Stamped when ingest took them and for their site's incarnation, as an event sent at
            # once is: a worker drops a deleted site's events by them (streams/worker.py).
            acks = [await self._producer.send(self._topic, r.value, key=r.key, timestamp_ms=r.accepted_ms,
                                              headers=incarnation_headers(r.incarnation))
                    for r in records]
            await asyncio.gather(*acks)

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(_SYNC_PERIOD_S)
            await asyncio.to_thread(self.spool.sync)

    async def flush(self, events: Sequence[Event], gone: Callable[[], bool] = lambda: False) -> bool:
        if self._producer is not None:
            await self._producer.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._store_timeout_s
        pending = list(events)
        while pending:
            # Dropped events are never stored: an import of a site deleted meanwhile waited out the
            # 120 s, holding up every other import of the process.
            if loop.time() > deadline or await asyncio.to_thread(gone):
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
        if self.spool.pending_records:
            log.warning("stopping with %d events in the spool in %s: they are sent to Kafka when ingest starts there"
                        " again", self.spool.pending_records, self.spool.directory)
        self.spool.close()
