"""The distributed driver: a Faust worker that feeds batches from the events topic to the same
stream core the embedded runner uses. Run N of them; Kafka shares the partitions.

Faust hosts the process: its service tree, signals, web server (/healthz, /readyz, /metrics)
and timers (lag metrics, the once-a-minute report). The events topic itself is read in batches by
an aiokafka consumer that Faust runs as a task, not by a Faust agent. Measured here
(`tests/bench/bench_streams.py`, README "Kafka, Faust and aiokafka"): a Faust agent that does
nothing with its records handles ~14k events/s, and in a worker its per-record machinery took
~40 % of the process's time; `getmany` hands over thousands of records in one call. The plain
consumer also leaves two Faust defects behind (its assignor starved static members, and after a
broker restart could assign no partitions at all).

Delivery: offsets are committed after a batch is written, so a crash re-delivers at most the
batches in flight, which the core processes idempotently. A rebalance waits for the batch being
written and its commit before the partitions go, so two workers never write one partition's
events at once (`_FinishBatchFirst`). Records of a deleted site, or of one deleted and created
again with its id since ingest took them, are dropped (`of_current_sites`)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time

import faust
import prometheus_client
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from besokskollen import health, logs, metrics
from besokskollen.config import Settings
from besokskollen.kafka_client import pace_metadata_updates
from ingest.event import Event
from streams import monitor, replay, storage
from streams.core import StreamCore, process_until_written
from streams.sites import SiteRegistry, count_dropped
from streams.topic import METADATA_MAX_AGE_MS, TopicRefused, ensure_topic, stamped_incarnation

log = logging.getLogger(__name__)

BATCH_MAX = 5000
BATCH_WAIT_MS = 200
# A batch that is small when it arrives waits this long for more. Every batch costs the same
# handful of ClickHouse statements: at ~3,000 events/s (tests/bench), the ClickHouse front used
# 51 % of a core without the wait, 25 % with 250 ms, 18 % with 500 ms. Freshness pays up to 250 ms.
BATCH_LINGER_MS = 250
LAG_METRICS_EVERY_S = 5.0
# `status` lists the workers that reported: the first report comes this soon after the start, so
# a worker just started or restarted is not missing from it for a minute.
FIRST_REPORT_AFTER_S = 10.0
# A consumer that ran this long before failing had recovered: its retries start over from 1 s.
HEALTHY_STRETCH_S = 60.0
# Fast recovery: a worker that dies without leaving the group (kill -9) is noticed after the
# session timeout (Kafka's minimum is 6 s), and a rebalance waits at most the rebalance timeout
# for members to rejoin (Kafka clients default to 45 s and 5 min). Heartbeats go six times per
# session timeout.
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_MS = 1000
REBALANCE_TIMEOUT_MS = 10000


def broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


class _FinishBatchFirst(ConsumerRebalanceListener):
    """Partitions are given up only once the batch being written is written and committed. A
    batch fetched while a rebalance began is not written (`generation` moved on): its partitions
    may be another worker's by now. Its records are read again by whoever owns them after the
    rebalance — from the committed offsets, or, where this worker kept them, from `_unread`."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str, seen: PartitionCount) -> None:
        self.writing = asyncio.Lock()
        self.generation = 0
        self._consumer, self._topic, self._seen = consumer, topic, seen

    async def on_partitions_revoked(self, revoked) -> None:
        async with self.writing:
            self.generation += 1

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))
        # A rebalance another member's metadata began can assign partitions this consumer's own
        # metadata does not list yet.
        self._seen.now(self._topic, max(len(self._consumer.partitions_for_topic(self._topic) or ()),
                                        max((tp.partition + 1 for tp in assigned), default=0)))


class PartitionCount:
    """Warns when the topic gains partitions while this worker runs: visitors move partition, and
    until every ingest sends by the new count, two workers writing one visitor at once can count it
    wrong (docs/operations.md, "Adding partitions", has the safe way)."""

    def __init__(self) -> None:
        self.count = 0

    def now(self, topic: str, count: int) -> None:
        if self.count and count > self.count:
            log.warning("topic %s went from %d to %d partitions while this worker ran: visitors move partition; with"
                        " more than one worker running, a visitor active now can be counted wrong. Add partitions"
                        " with `besokskollen partitions` and one worker (docs/operations.md, \"Adding partitions\")",
                        topic, self.count, count)
        self.count = max(self.count, count)


async def consume(settings: Settings, core: StreamCore, sites: SiteRegistry, stats: monitor.BatchStats,
                  partitions: PartitionCount | None = None) -> None:
    """Read the events topic in batches, write each through the core, then commit its offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.kafka_group,
        group_instance_id=settings.worker_instance_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
        rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
        max_poll_records=BATCH_MAX,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )
    rebalances = _FinishBatchFirst(consumer, settings.kafka_topic, partitions or PartitionCount())
    consumer.subscribe([settings.kafka_topic], listener=rebalances)
    try:
        await consumer.start()
        while True:
            generation = rebalances.generation
            batches = await consumer.getmany(timeout_ms=BATCH_WAIT_MS, max_records=BATCH_MAX)
            if not batches:
                continue
            await _fill(consumer, batches)
            async with rebalances.writing:
                if rebalances.generation != generation:
                    _unread(consumer, batches)
                    continue
                records = [record for records in batches.values() for record in records]
                # Decoded once (a record that is no event is logged once), judged at each attempt.
                decoded = {id(record): event for record, event in
                           zip(records, Event.decode_each([record.value for record in records])) if event is not None}
                kept: list = []  # by the last attempt

                def batch(records: list = records, kept: list = kept, decoded: dict = decoded) -> list[Event]:
                    kept[:] = of_current_sites(records, sites)
                    return [decoded[id(record)] for record in kept if id(record) in decoded]

                def still_current(records: list = records, kept: list = kept) -> bool:
                    return len(of_current_sites(records, sites)) == len(kept)

                started = time.perf_counter()
                # A batch being written is finished even when the worker is asked to stop.
                written = asyncio.ensure_future(process_until_written(core, batch, still_current))
                try:
                    processed = await asyncio.shield(written)
                except asyncio.CancelledError:
                    await written
                    await _commit(consumer, batches)
                    raise
                await _commit(consumer, batches)
            count_dropped(len(records) - len(kept))
            elapsed = time.perf_counter() - started
            stats.add(processed, elapsed * 1000)
            metrics.BATCH_SECONDS.observe(elapsed)
            metrics.EVENTS_PROCESSED.inc(processed)
    finally:
        await consumer.stop()


def of_current_sites(records: list, sites: SiteRegistry) -> list:
    """The records less those of deleted sites (`SiteRegistry.of_current_sites`): of a site deleted
    now, or of another incarnation of its id than the one now, unless ingest took them after its
    creation. A record without an incarnation (from an ingest release before they were stamped)
    is judged by when ingest took it: the producer's timestamp. The record key starts with the
    site id (`Event.kafka_key`)."""
    def judged_by(record) -> tuple[str, int | None, int]:
        site_id = (record.key or b"").rpartition(b":")[0].decode(errors="replace")
        return site_id, stamped_incarnation(record), record.timestamp

    return sites.of_current_sites(records, judged_by)


async def _fill(consumer: AIOKafkaConsumer, batches: dict) -> None:
    """Keep reading for up to BATCH_LINGER_MS while the batch is below BATCH_MAX."""
    size = sum(len(records) for records in batches.values())
    deadline = time.monotonic() + BATCH_LINGER_MS / 1000
    while size < BATCH_MAX and (left := deadline - time.monotonic()) > 0:
        more = await consumer.getmany(timeout_ms=int(left * 1000) + 1, max_records=BATCH_MAX - size)
        for tp, records in more.items():
            batches.setdefault(tp, []).extend(records)
            size += len(records)


def _unread(consumer: AIOKafkaConsumer, batches: dict) -> None:
    """Give a dropped batch back: partitions still (or already again) assigned are read from its
    first record on. The batch may have come from the new assignment, whose positions are past it."""
    assigned = consumer.assignment()
    for tp, records in batches.items():
        if tp in assigned:
            consumer.seek(tp, records[0].offset)


async def _commit(consumer: AIOKafkaConsumer, batches: dict) -> None:
    try:
        await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
    except (CommitFailedError, KafkaError) as exc:
        # The partitions went to another member meanwhile (or the broker is away): it starts from
        # the last committed offsets and processes this batch again, idempotently.
        log.warning("could not commit a written batch (%s); its events will be processed again", exc)


def _faust_dir() -> str:
    """One folder per user for every worker on the host: Faust creates its table folders there at
    the start, and we keep no tables in them. A folder per worker, removed at exit, was left
    behind by every worker killed."""
    return os.path.join(tempfile.gettempdir(), f"besokskollen-faust-{os.getuid()}")


def create_app(settings: Settings, host: str = "127.0.0.1", port: int = 8083) -> faust.App:
    """`settings` name a Kafka (the CLI refuses a worker without one)."""
    pace_metadata_updates()  # Faust's consumers and producer
    app = faust.App(
        f"{settings.kafka_group}-worker",
        broker=broker_urls(settings.kafka_bootstrap),
        # Faust's web server carries /healthz, /readyz and /metrics (nothing else of Faust's).
        web_enabled=True,
        web_bind=host,
        web_port=port,
        web_host=host,
        # Faust's own consumer reads no topic of ours; it still joins a group of its own, which
        # should not hold a restarted worker up for Faust's 60 s defaults either.
        broker_session_timeout=SESSION_TIMEOUT_MS / 1000,
        broker_heartbeat_interval=HEARTBEAT_MS / 1000,
        broker_rebalance_timeout=REBALANCE_TIMEOUT_MS / 1000,
        # Faust declares a topic of its own (its assignor's leader topic), by default with 1 replica.
        topic_replication_factor=settings.kafka_replication_factor,
        # Faust keeps table state there; we have none. Its default, `<id>-data` in the current
        # folder, left an empty folder wherever a worker was started.
        datadir=_faust_dir(),
    )
    client = storage.connect(settings.clickhouse_url, wait=True)
    replay.upgrade(client, settings.session_timeout_s, settings.raw_events_ttl_days, settings.clickhouse_cluster)
    core = StreamCore(client, settings.session_timeout_s)
    sites = SiteRegistry(client)

    stats = monitor.BatchStats()
    # The minute reports' own client: a hung ClickHouse (connections taken, never answered) held
    # the report's insert for the default 300 s, and the timer skipped four minute lines meanwhile.
    reports = storage.connect(settings.clickhouse_url, wait=True, read_timeout_s=monitor.STATUS_READ_TIMEOUT_S)
    name = settings.worker_instance_id or f"{socket.gethostname()}:{os.getpid()}"
    checks = {"clickhouse": health.store_check(client), "kafka": health.broker_check(settings.kafka_servers)}

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web, request):
        status, body = await health.readiness(checks)
        return web.json(body, status=status)

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.bytes(prometheus_client.generate_latest(), content_type="text/plain")

    @app.task
    async def process() -> None:
        delay, partitions = 1.0, PartitionCount()
        while True:
            started = time.monotonic()
            try:
                await consume(settings, core, sites, stats, partitions)
            except KafkaError as exc:  # e.g. no broker reachable (at start, or restarted meanwhile)
                if time.monotonic() - started > HEALTHY_STRETCH_S:  # a new outage starts from 1 s again
                    delay = 1.0
                log.warning("consuming %s failed (%s); retrying in %.0f s", settings.kafka_topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    @app.timer(LAG_METRICS_EVERY_S)
    async def lag_metrics() -> None:
        await update_lag_gauge(settings)

    @app.task
    async def first_report() -> None:
        await asyncio.sleep(FIRST_REPORT_AFTER_S)
        await report_status(settings, reports, name, stats)

    @app.timer(monitor.REPORT_EVERY_S)
    async def report() -> None:
        await report_status(settings, reports, name, stats)

    return app


async def update_lag_gauge(settings: Settings) -> None:
    """The consumer lag gauge, asked within its period: against a hung broker each update waited out
    the 10 s request timeout, and Faust warned every 15 s that the 5 s timer overlapped (audit 116)."""
    try:
        async with asyncio.timeout(LAG_METRICS_EVERY_S * 0.8):
            lags = await monitor.partition_lags(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_group,
                                                ages=False)
    except Exception:  # noqa: BLE001 - the once-a-minute report logs trouble
        return
    for lag in lags:
        metrics.CONSUMER_LAG.labels(str(lag.partition)).set(lag.lag)


async def report_status(settings: Settings, client, name: str, stats: monitor.BatchStats) -> None:
    """The once-a-minute line in the log and row in `worker_status`. Each is given what can be had:
    an outage of Kafka (no lag) or ClickHouse (no row) is when the line matters most."""
    rate, p50, worst, events = stats.take()
    try:
        lag = monitor.describe(await monitor.partition_lags(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_group))
    except Exception as exc:  # noqa: BLE001 - a report is not worth stopping the worker for
        lag = f"lag unknown ({exc or type(exc).__name__})"  # aiokafka's errors name their class
    log.info("%s: %.0f events/s, batch p50 %.0f ms, max %.0f ms; %s", name, rate, p50, worst, lag)
    try:
        await asyncio.to_thread(monitor.report, client, name, rate, p50, worst, events)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the stream's status to ClickHouse: %s", exc)


def run(settings: Settings, sock: socket.socket, host: str, port: int, loglevel: str = "info") -> None:
    """`sock` listens on host:port (the CLI made it): answered on while the worker starts."""
    with health.answering_while_starting(sock):
        app = create_app(settings, host, port)
        # Faust exits at start when no broker answers ("Unable to bootstrap"): a worker (re)started
        # during a broker outage waits for it here instead. Once running, it rides outages out.
        asyncio.run(_until_broker_answers(settings))
    sock.close()  # Faust's web server binds the address itself
    logs.quiet_faust_own_topic()
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()


async def _until_broker_answers(settings: Settings) -> None:
    delay = 0.5
    while True:
        try:
            await ensure_topic(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_partitions,
                               settings.kafka_replication_factor)
            return
        except (KafkaError, OSError) as exc:
            log.warning("Kafka at %s: %s; waiting", settings.kafka_bootstrap, exc if isinstance(exc, TopicRefused)
                        else f"no broker answers ({type(exc).__name__})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
