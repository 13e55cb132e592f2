"""How the stream is doing: consumer lag per partition and the age of the oldest event not yet
processed (read from Kafka), and each worker's throughput and batch latency (reported by the
workers into `worker_status` once a minute). The worker logs the same once a minute;
`besokskollen status` prints it for a running deployment."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError
from clickhouse_connect.driver.client import Client

REPORT_EVERY_S = 60.0
# How long a report's row may take to write or read: well under the minute between reports.
STATUS_READ_TIMEOUT_S = 10
# A broker that takes the connection and never answers: `status` says so after 10 s, not after
# aiokafka's default of 40.
KAFKA_REQUEST_TIMEOUT_MS = STATUS_READ_TIMEOUT_S * 1000


@dataclass(frozen=True, slots=True)
class PartitionLag:
    partition: int
    committed: int
    end: int
    oldest_age_s: float | None  # age of the first event not yet processed; None when caught up

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


@asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client whose requests end after `KAFKA_REQUEST_TIMEOUT_MS`, closed however its
    use ends (its start too may fail: the broker may be away)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS)
    try:
        await admin.start()
        yield admin
    finally:
        await admin.close()


async def topic_exists(bootstrap: str, topic: str) -> bool:
    """Asked of the list of every topic: metadata asked for one topic by name lets the broker
    auto-create it, with the broker's default partitions (1 on a stock broker), which ingest and
    the workers would then keep."""
    async with admin_client(bootstrap) as admin:
        return topic in await admin.list_topics()


async def partition_lags(bootstrap: str, topic: str, group: str, ages: bool = True) -> list[PartitionLag]:
    """Lag of the consumer group on every partition of the topic, which must exist (`topic_exists`):
    asking about one that does not may create it. `ages=False` leaves `oldest_age_s` None and reads
    no record: the worker's lag gauge, every 5 s, needs none."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS)
    try:  # both are closed whichever start fails (the broker may be away)
        await consumer.start()
        await admin.start()
        (metadata,) = await admin.describe_topics([topic])
        partitions = [TopicPartition(topic, p["partition"]) for p in sorted(metadata.get("partitions", ()),
                                                                              key=lambda p: p["partition"])]
        if not partitions:
            return []
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        committed = await _committed(admin, group)
        offsets = {}
        for tp in partitions:
            offset = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else starts[tp]
            # Records the topic's retention deleted before they were processed are not waiting:
            # the workers (auto_offset_reset earliest) go on from the first record left.
            offsets[tp] = max(offset, starts[tp])
        waiting = {tp: offset for tp, offset in offsets.items() if offset < ends[tp]}
        found = await _ages_at(consumer, waiting) if ages and waiting else {}
        return [PartitionLag(tp.partition, offsets[tp], ends[tp], found.get(tp)) for tp in partitions]
    finally:
        await consumer.stop()
        await admin.close()


async def group_members(bootstrap: str, group: str) -> int:
    """How many consumers (workers) are in the group now, whatever its state."""
    async with admin_client(bootstrap) as admin:
        try:
            (response,) = await admin.describe_consumer_groups([group])
        except GroupCoordinatorNotAvailableError:  # no member ever joined
            return 0
        return len(response.groups[0][5])  # (error, group, state, protocol type, protocol, members, …)


def written_since(lags: list[PartitionLag], moment: float, now: float) -> bool:
    """Whether every event the topic took before `moment` (epoch seconds) is processed: each
    partition caught up, or its oldest unprocessed event taken after `moment`."""
    return all(p.lag == 0 or (p.oldest_age_s is not None and now - p.oldest_age_s > moment) for p in lags)


async def _committed(admin: AIOKafkaAdminClient, group: str, tries: int = 20) -> dict:
    """The group's committed offsets. A broker where no group ever committed (no worker has
    started yet) has no offsets topic: asking creates it, and the coordinator is "not available"
    until then (a second or so), which is no reason to say Kafka does not answer."""
    for _ in range(tries - 1):
        try:
            return await admin.list_consumer_group_offsets(group)
        except GroupCoordinatorNotAvailableError:
            await asyncio.sleep(0.25)
    return await admin.list_consumer_group_offsets(group)


async def _ages_at(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, float]:
    """Age of the record at each offset (left out when none came within 5 s). One `assign` for all:
    each logs a table of the subscription at INFO (Faust's logging in a worker), and one per
    lagging partition every 5 s made ~95 % of a worker's log under steady traffic."""
    consumer.assign(list(offsets))
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)
    out = {}
    for tp in offsets:
        try:
            record = await asyncio.wait_for(consumer.getone(tp), 5)
        except TimeoutError:
            continue
        out[tp] = max(0.0, time.time() - record.timestamp / 1000)
    return out


@dataclass
class BatchStats:
    """What a worker processed since its last report."""
    events: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)

    def add(self, events: int, latency_ms: float) -> None:
        self.events += events
        self.latencies_ms.append(latency_ms)

    def take(self) -> tuple[float, float, float, int]:
        """(events/s, batch p50 ms, batch max ms, events) since the last take; resets."""
        elapsed = max(time.monotonic() - self.since, 1e-9)
        rate = self.events / elapsed
        p50 = statistics.median(self.latencies_ms) if self.latencies_ms else 0.0
        worst = max(self.latencies_ms, default=0.0)
        events = self.events
        self.events, self.latencies_ms, self.since = 0, [], time.monotonic()
        return rate, p50, worst, events


def report(client: Client, worker: str, rate: float, p50: float, worst: float, events: int) -> None:
    client.insert("worker_status", [[worker, datetime.now(timezone.utc), rate, p50, worst, events]],
                  column_names=["worker", "reported_at", "events_per_s", "batch_p50_ms", "batch_max_ms", "events"])


def recent_reports(client: Client, within_s: int = 300) -> list[tuple]:
    """(worker, reported_at, events/s, batch p50 ms, batch max ms, events, seconds since) of each
    worker's last report in the last `within_s` seconds; none before the schema exists."""
    if not client.command("EXISTS TABLE worker_status"):  # nothing has run against this ClickHouse yet
        return []
    return client.query(
        "SELECT worker, max(reported_at), argMax(events_per_s, reported_at), argMax(batch_p50_ms, reported_at),"
        " argMax(batch_max_ms, reported_at), argMax(events, reported_at),"
        " dateDiff('second', max(reported_at), now64(3)) FROM worker_status"
        " WHERE reported_at >= now64(3) - toIntervalSecond({within:UInt32}) GROUP BY worker ORDER BY worker",
        parameters={"within": within_s}).result_rows


def describe_reports(reports: list[tuple], within_s: int = 300) -> list[str]:
    """A line per worker; one whose report is overdue is marked, as it is no longer processing."""
    if not reports:
        return [f"no worker has reported in the last {within_s} s"]
    lines = []
    for worker, at, rate, p50, worst, events, since in reports:
        line = (f"worker {worker} at {at:%H:%M:%S}Z: {rate:.0f} events/s, batch p50 {p50:.0f} ms, max {worst:.0f} ms,"
                f" {events} events in the last report")
        # A running worker reports every REPORT_EVERY_S; one skipped report is allowed for.
        if since > 2 * REPORT_EVERY_S:
            line += (f"; no report for {since} s (one is due every {REPORT_EVERY_S:.0f} s): stopped, or it cannot"
                     " write to ClickHouse")
        lines.append(line)
    return lines


def describe(lags: list[PartitionLag]) -> str:
    total = sum(p.lag for p in lags)
    ages = [p.oldest_age_s for p in lags if p.oldest_age_s is not None]
    parts = " ".join(f"{p.partition}:{p.lag}" for p in lags)
    if ages:
        return f"lag {total} ({parts}); oldest unprocessed event {max(ages):.1f} s old"
    # A record is read for its age within 5 s (_ages_at); a lag without one is not "caught up".
    return f"lag {total} ({parts}); " + ("age of the oldest unprocessed event unknown" if total else "caught up")
