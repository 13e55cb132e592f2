"""besokskollen/logs.py: repeated lines of a kind come once per window, with a count."""

from __future__ import annotations

import io
import logging

from mode.utils.logging import ExtensionFormatter

from besokskollen.logs import Repeats, collapse_client_repeats


def _logger(repeats: Repeats, name: str = "test.repeats") -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    # Faust's formatter: it formats a record's args again, and broke on a rewritten record whose
    # args were None ("not all arguments converted", a traceback in the worker's log).
    handler.setFormatter(ExtensionFormatter(stream=out, fmt="%(levelname)s %(message)s"))
    logger = logging.getLogger(name)
    logger.handlers[:], logger.propagate = [handler], False
    logger.filters[:] = [repeats]
    return logger, out


def test_a_kind_of_line_comes_once_per_window_with_how_many_were_held_back():
    now = [100.0]
    log, out = _logger(Repeats(30, clock=lambda: now[0]))
    for second in range(0, 65):
        now[0] = 100.0 + second
        log.error("Unable connect to node with id %s: %s", 1, "[Errno 111] 100% refused")
        if second % 2 == 0:
            log.error("Unable to update metadata from [%s]", 1)
    log.warning("Unable to update metadata from [%s]", 1)  # another level is another kind
    lines = out.getvalue().splitlines()
    assert lines == [
        "ERROR Unable connect to node with id 1: [Errno 111] 100% refused",
        "ERROR Unable to update metadata from [1]",
        "ERROR Unable connect to node with id 1: [Errno 111] 100% refused (29 more like this in the last 30 s)",
        "ERROR Unable to update metadata from [1] (14 more like this in the last 30 s)",
        "ERROR Unable connect to node with id 1: [Errno 111] 100% refused (29 more like this in the last 30 s)",
        "ERROR Unable to update metadata from [1] (14 more like this in the last 30 s)",
        "WARNING Unable to update metadata from [1]",
    ]
    now[0] += 100  # held back since the last one: seconds 62 and 64
    log.error("Unable to update metadata from [%s]", 2)
    assert out.getvalue().splitlines()[-1] == "ERROR Unable to update metadata from [2] (2 more like this in the last 104 s)"
    now[0] += 100  # nothing held back: as it is
    log.error("Unable to update metadata from [%s]", 3)
    assert out.getvalue().splitlines()[-1] == "ERROR Unable to update metadata from [3]"


def test_the_kafka_and_clickhouse_clients_loggers_get_the_filter():
    repeats = collapse_client_repeats()
    names = ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator",
             "aiokafka.producer.sender", "urllib3.connectionpool", "clickhouse_connect.driver._backend.http_sync")
    try:
        for name in names:
            assert repeats in logging.getLogger(name).filters, name
    finally:
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("aiokafka", "urllib3", "clickhouse_connect")):
                logging.getLogger(name).removeFilter(repeats)


def test_fausts_errors_about_its_own_assignor_topic_go_and_others_stay():
    """After a rebalance that gives Faust's consumer its assignor's partition (a worker killed in a
    group of three), Faust logged an ERROR every few seconds that it had not fetched from it; our
    events are read by another consumer. Logged here as Faust logs it."""
    import io

    from faust.transport.drivers import aiokafka as driver
    from faust.types import TP
    from mode.utils.logging import CompositeLogger

    from besokskollen.logs import quiet_faust_own_topic

    logger = logging.getLogger("faust.transport.drivers.aiokafka")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet_faust_own_topic()
        log = CompositeLogger(logger, formatter=lambda severity, message, *args, **kw: f"[^--AIOKafkaConsumerThread]: {message}")
        log.error(driver.SLOW_PROCESSING_NO_FETCH_SINCE_START, TP("bk-worker-__assignor-__leader", 0), "2 minutes ago")
        log.error(driver.SLOW_PROCESSING_NO_RECENT_FETCH, TP("bk-worker-__assignor-__leader", 0), "1 minute ago")
        log.error(driver.SLOW_PROCESSING_NO_RECENT_FETCH, TP("events", 3), "1 minute ago")
        log.info("assigned %r", TP("bk-worker-__assignor-__leader", 0))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.filters.clear()
    lines = out.getvalue().splitlines()
    assert lines == ["[^--AIOKafkaConsumerThread]: Aiokafka stopped fetching from TP(topic='events', partition=3)"
                     " (last done 1 minute ago)",
                     "[^--AIOKafkaConsumerThread]: assigned TP(topic='bk-worker-__assignor-__leader', partition=0)"], lines


async def test_a_batch_failing_the_same_way_again_logs_its_traceback_once(caplog):
    """While ClickHouse was away under load, the worker logged urllib3's whole chain (~100 lines)
    at every retry of its batch: once, then a line a retry; a new kind of failure brings its own."""
    from streams import core

    def refused() -> Exception:
        try:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError as exc:
                raise RuntimeError("HTTPConnectionPool: Max retries exceeded") from exc
        except RuntimeError as exc:
            return exc

    failures = [refused(), refused(), refused(), ValueError("bad row"), ValueError("bad row")]

    class Core:
        def process(self, events, still_current=None):
            if failures:
                raise failures.pop(0)

    caplog.set_level(logging.ERROR, logger=core.__name__)
    assert await core.process_until_written(Core(), []) == 0
    lines = [(r.exc_info is not None, r.getMessage()) for r in caplog.records]
    assert [traceback for traceback, _ in lines] == [True, False, False, True, False], lines
    assert "again (RuntimeError: Connection refused)" in lines[1][1]
    assert "again (ValueError: bad row)" in lines[4][1]
