"""Opens ClickHouse through clickhouse-connect: `chdb:///abs/path` runs the engine in-process,
`http(s)://…` talks to a server. Every other module gets its client from here."""

from __future__ import annotations

import logging
import time
from datetime import timezone
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver import options as clickhouse_options
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError

log = logging.getLogger(__name__)

# Settings of every connection, so the embedded engine and a server behave the same:
# - an insert is visible when it returns (the embedded engine 26.x defaults to async inserts);
# - no block deduplication: every write is idempotent by design, and hashing blocks costs ~15 ms;
# - every ReplacingMergeTree is partitioned by a time column of its sorting key, so the rows of
#   one key share a partition and FINAL need not merge across partitions;
# - on a cluster (BK_CLICKHOUSE_CLUSTER), an insert into a Distributed table returns once the
#   shard has it, so the stream core reads back what it wrote.
SETTINGS = {"async_insert": 0, "insert_deduplicate": 0, "do_not_merge_across_partitions_select_final": 1,
            "distributed_foreground_insert": 1}


def connect(url: str, wait: bool = False) -> Client:
    """`wait`: a server process started before ClickHouse answers waits for it, saying so, rather
    than exit (one-shot commands fail at once; the CLI says where it could not connect)."""
    if url.startswith("chdb://"):
        path = Path(url.removeprefix("chdb://"))
        if not path.is_absolute():
            raise ValueError(f"chdb URL needs an absolute path, got {url!r}")
        path.mkdir(parents=True, exist_ok=True)
        return _utc(clickhouse_connect.get_client(interface="chdb", path=str(path), settings=SETTINGS))
    delay = 0.5
    while True:
        try:
            # No session id: a server session runs one query at a time, and this client is shared
            # by the threads of a process (request handlers, the stream core).
            client = clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False, settings=SETTINGS)
        except OperationalError as exc:
            if not wait:
                raise
            log.warning("ClickHouse does not answer at %s (%s); waiting", server(url), reason(exc))
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        # clickhouse-connect imports pandas (when installed; chDB brings it) on the first insert,
        # to check whether the data is a DataFrame: 0.3-0.7 s holding the GIL. Paid here, at
        # start, rather than by the first requests of a fresh ingest process (measured: every
        # request of its first wave waited ~0.7 s, for today's salt).
        _ = clickhouse_options.pd
        return _utc(client)


def _utc(client: Client) -> Client:
    """Every column here is UTC and the SQL names 'UTC' wherever it turns a bound moment into a
    DateTime (`toDateTime(%(start)s, 'UTC')`). clickhouse-connect writes a bound datetime in the
    server's own timezone (the machine's, for the embedded engine), which would move every
    window by the server's UTC offset: bound moments are written in UTC."""
    client.server_tz = timezone.utc
    return client


def server(url: str) -> str:
    """Where a ClickHouse URL points, without its credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or (8443 if parts.scheme == 'https' else 8123)}"


def reason(exc: BaseException) -> str:
    """The root cause of a connection error in a few words ("Connection refused"):
    clickhouse-connect's own message carries the whole urllib3 chain."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(exc)[:200]
