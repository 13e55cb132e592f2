"""Repeated log lines collapsed: while Kafka is away, aiokafka logs an ERROR per failed connection,
metadata refresh, fetch and coordinator lookup — ~140 lines a second in a worker, ~10 in ingest —
which buries every other line of the outage; while ClickHouse takes no connections, urllib3 and
clickhouse-connect log two WARNINGs per failed call (~6.5 a second in an api process, audit 115).
The first line of a kind is logged, the same kind again at most once per `every` seconds with how
many were left out; the processes' own lines ("no Kafka broker is reachable; spooling",
readiness) say what is going on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# aiokafka's module loggers (`aiokafka.conn`, `aiokafka.consumer.fetcher`, …) and the one its
# client logs to, `aiokafka`. A logger's filter sees only the records made on it, not on its
# children, so each gets the filter.
_KAFKA_MODULES = ("aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.consumer.consumer",
                  "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator",
                  "aiokafka.consumer.subscription_state", "aiokafka.producer.producer", "aiokafka.producer.sender",
                  "aiokafka.admin.client")
# What the ClickHouse client's HTTP layer logs per failed call: urllib3's "Retrying (…) after
# connection broken by …" and clickhouse-connect's "Unexpected Http Driver Exception".
_CLICKHOUSE_MODULES = ("urllib3.connectionpool", "clickhouse_connect.driver._backend.http_sync")


class Repeats(logging.Filter):
    """Passes a record whose kind (logger, level, message before its arguments) was not seen in the
    last `every` seconds; the one that passes after some were held back says how many."""

    def __init__(self, every: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every, self.clock = every, clock
        self._seen: dict[tuple[str, int, str], list] = {}  # kind -> [passed at, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        seen = self._seen.get(kind)
        if seen is None or now - seen[0] >= self.every:
            held = seen[1] if seen else 0
            self._seen[kind] = [now, 0]
            if held:
                record.msg = f"{record.getMessage()} ({held} more like this in the last {now - seen[0]:.0f} s)"
                record.args = ()  # not None: Faust's formatter formats (None,) into it
            return True
        seen[1] += 1
        return False


def collapsed_logger(name: str, every: float = 30.0) -> logging.Logger:
    """A logger of its own for a line said once a request while a dependency is away (a 503 each):
    each kind at most once per `every` seconds, with how many more."""
    logger = logging.getLogger(name)
    logger.addFilter(Repeats(every))
    return logger


def collapse_client_repeats(every: float = 30.0) -> Repeats:
    """Attach one `Repeats` to aiokafka's loggers and the ClickHouse client's (they outlive Faust's
    logging setup, which keeps existing loggers)."""
    repeats = Repeats(every)
    for name in (*_KAFKA_MODULES, *_CLICKHOUSE_MODULES):
        logging.getLogger(name).addFilter(repeats)
    return repeats


class FaustsOwnTopic(logging.Filter):
    """Drops the ERRORs Faust's livelock check logs about its own assignor topic. A worker's Faust
    consumer reads no topic of ours (the events topic has an aiokafka consumer of its own,
    streams/worker.py), and after a rebalance that hands it the assignor's partition it says every
    few seconds that it has not fetched from it — "Aiokafka has not sent fetch request for
    TP(topic='…-__assignor-__leader', …)" — though nothing ever waits there. An alert on ERROR
    lines would page for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True
        return "-__assignor-__leader'" not in message


def quiet_faust_own_topic() -> None:
    logging.getLogger("faust.transport.drivers.aiokafka").addFilter(FaustsOwnTopic())
