"""The distributed driver: a Faust app whose agent feeds batches from the events topic to the
same stream core the embedded runner uses. Run N of them; Kafka shares the partitions.

Faust's transactional mode and windowed tables are not used (see SPEC §6 and INFRA-NOTES:
known defects); the agent runs with concurrency 1 (#606) and the core's writes are idempotent."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import faust
import prometheus_client

from besokskollen import health, metrics
from besokskollen.config import Settings
from ingest.event import Event
from streams import monitor, replay, storage
from streams.core import StreamCore, process_until_written
from streams.topic import ensure_topic

log = logging.getLogger(__name__)

GROUP = "besokskollen"
BATCH_MAX = 5000
LAG_METRICS_EVERY_S = 5.0
BATCH_WITHIN_S = 0.2
SESSION_TIMEOUT_S = 6.0
REBALANCE_TIMEOUT_S = 10.0
STARVED_CHECK_S = 2.0
STARVED_AFTER_S = 4.0


def broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def create_app(settings: Settings, host: str = "127.0.0.1", port: int = 8083) -> faust.App:
    if settings.kafka_bootstrap is None:
        raise SystemExit("the worker needs BK_KAFKA_BOOTSTRAP (without Kafka, `besokskollen up` runs the stream core)")
    app = faust.App(
        GROUP,
        broker=broker_urls(settings.kafka_bootstrap),
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        # Faust's web server carries /healthz, /readyz and /metrics (nothing else of Faust's).
        web_enabled=True,
        web_bind=host,
        web_port=port,
        web_host=host,
        consumer_auto_offset_reset="earliest",
        # Fast recovery: a worker that dies without leaving the group (kill -9) is noticed after
        # the session timeout, and a rebalance waits at most the rebalance timeout for members to
        # rejoin (Faust's defaults are 60 s each). Heartbeats go three times per session timeout.
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=SESSION_TIMEOUT_S / 6,
        broker_rebalance_timeout=REBALANCE_TIMEOUT_S,
        # Offsets are committed often: what a killed worker had processed but not committed is
        # processed again (idempotently) by whoever takes its partitions.
        broker_commit_interval=1.0,
    )
    topic = app.topic(settings.kafka_topic, key_serializer="raw", value_serializer="raw",
                      partitions=settings.kafka_partitions)
    client = storage.connect(settings.clickhouse_url)
    replay.upgrade(client, settings.session_timeout_s, settings.raw_events_ttl_days, settings.clickhouse_cluster)
    core = StreamCore(client, settings.session_timeout_s)

    stats = monitor.BatchStats()
    name = settings.worker_instance_id or f"{socket.gethostname()}:{os.getpid()}"
    checks = {"clickhouse": health.store_check(client), "kafka": health.broker_check(settings.kafka_bootstrap)}

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

    @app.agent(topic, concurrency=1)
    async def process(stream: faust.StreamT) -> None:
        async for values in stream.take(BATCH_MAX, within=BATCH_WITHIN_S):
            # take() acks a batch's offsets when control returns to it, even when the agent is
            # cancelled (worker shutdown): so a batch being written is finished first.
            started = time.perf_counter()
            writing = asyncio.ensure_future(process_until_written(core, _decode(values)))
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                await writing
                raise
            elapsed = time.perf_counter() - started
            stats.add(len(values), elapsed * 1000)
            metrics.BATCH_SECONDS.observe(elapsed)
            metrics.EVENTS_PROCESSED.inc(len(values))

    starved = {"since": None}

    @app.timer(STARVED_CHECK_S)
    async def rejoin_if_starved() -> None:
        """After a broker restart, the group leader's metadata can lack the topic for good
        (Faust 0.15.3 logs "Ignoring missing topic") and its assignor then hands every member an
        empty assignment: the group sits idle. A worker with no partitions, while there are at
        least as many partitions as members, refreshes its metadata and asks for a rebalance."""
        if app.consumer.assignment():
            starved["since"] = None
            return
        now = time.monotonic()
        if starved["since"] is None:
            starved["since"] = now
            return
        if now - starved["since"] < STARVED_AFTER_S:
            return
        members, partitions = await monitor.group_size(settings.kafka_bootstrap, settings.kafka_topic, GROUP)
        if partitions and members <= partitions:
            log.warning("no partitions for %.0f s with %d members and %d partitions: asking for a rebalance",
                        now - starved["since"], members, partitions)
            _refresh_and_rejoin(app, settings.kafka_topic)
            starved["since"] = now

    @app.timer(LAG_METRICS_EVERY_S)
    async def lag_metrics() -> None:
        try:
            lags = await monitor.partition_lags(settings.kafka_bootstrap, settings.kafka_topic, GROUP)
        except Exception:  # noqa: BLE001 - the once-a-minute report logs trouble
            return
        for lag in lags:
            metrics.CONSUMER_LAG.labels(str(lag.partition)).set(lag.lag)

    @app.timer(monitor.REPORT_EVERY_S)
    async def report() -> None:
        rate, p50, worst, events = stats.take()
        try:
            lags = await monitor.partition_lags(settings.kafka_bootstrap, settings.kafka_topic, GROUP)
            await asyncio.to_thread(monitor.report, client, name, rate, p50, worst, events)
        except Exception as exc:  # noqa: BLE001 - a report is not worth stopping the worker for
            log.warning("could not report the stream's status: %s", exc)
            return
        log.info("%s: %.0f events/s, batch p50 %.0f ms, max %.0f ms; %s", name, rate, p50, worst,
                 monitor.describe(lags))

    return app


def _refresh_and_rejoin(app: faust.App, topic: str) -> None:
    """Reload the consumer's metadata (with the topic in it) and make it rejoin its group. The
    aiokafka consumer lives in Faust's consumer thread, on that thread's loop."""
    thread = app.consumer._thread
    consumer = thread._consumer

    async def refresh() -> None:
        await consumer._client.add_topic(topic)
        await consumer._client.force_metadata_update()
        consumer._coordinator.request_rejoin()

    asyncio.run_coroutine_threadsafe(refresh(), thread.thread_loop)


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


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8083, loglevel: str = "info") -> None:
    app = create_app(settings, host, port)
    asyncio.run(ensure_topic(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_partitions,
                             settings.kafka_replication_factor))
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
