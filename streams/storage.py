"""Opens ClickHouse through clickhouse-connect: `chdb:///abs/path` runs the engine in-process,
`http(s)://…` talks to a server. Every other module gets its client from here."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver import options as clickhouse_options
from clickhouse_connect.driver.binding import must_escape
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from urllib3.exceptions import ConnectTimeoutError

log = logging.getLogger(__name__)

# clickhouse-connect imports pandas (chDB brings it) on a process's first insert, only to ask
# whether the data is a DataFrame: 0.3-0.7 s of CPU holding the GIL, in every process (the first
# requests of a fresh ingest waited ~0.7 s for it). We insert lists, never DataFrames.
clickhouse_options.pd = None

# Settings of every connection, so the embedded engine and a server behave the same:
# - an insert is visible when it returns (the embedded engine 26.x defaults to async inserts);
# - no block deduplication: every write is idempotent by design, and hashing blocks costs ~15 ms;
# - every ReplacingMergeTree is partitioned by a time column of its sorting key, so the rows of
#   one key share a partition and FINAL need not merge across partitions;
# - on a cluster (BK_CLICKHOUSE_CLUSTER), an insert into a Distributed table returns once the
#   shard has it, so the stream core reads back what it wrote.
SETTINGS = {"async_insert": 0, "insert_deduplicate": 0, "do_not_merge_across_partitions_select_final": 1,
            "distributed_foreground_insert": 1}


HANDSHAKE_TIMEOUT_S = 10
# Connections kept open to a ClickHouse server, shared by a process's clients. clickhouse-connect
# keeps 8; the query API answers on up to 40 threads (Starlette's pool), and each connection past
# 8 was closed after its query, with a urllib3 WARNING each (~300 a process under 25 requests at once).
_CONNECTIONS_KEPT = 64


@functools.cache
def _connections():
    from clickhouse_connect.driver.httputil import get_pool_manager

    return get_pool_manager(maxsize=_CONNECTIONS_KEPT)


def connect(url: str, wait: bool = False, read_timeout_s: float | None = None,
            connect_timeout_s: int | None = None) -> Client:
    """`wait`: a server process started before ClickHouse answers waits for it, saying so, rather
    than exit (one-shot commands fail at once; the CLI says where it could not connect).
    `read_timeout_s`: how long a server that took the connection may take to answer, for what must
    answer quickly (a status); clickhouse-connect's default is 300 s, for long queries (imports,
    replays), and a hung server held `status` that long. `connect_timeout_s`: how long to wait for
    a server to take a connection (clickhouse-connect's default: 10 s), tried twice."""
    if url.startswith("chdb://"):
        path = Path(url.removeprefix("chdb://"))
        if not path.is_absolute():
            raise ValueError(f"chdb URL needs an absolute path, got {url!r}")
        path.mkdir(parents=True, exist_ok=True)
        return _lists_written_ahead(_utc(clickhouse_connect.get_client(interface="chdb", path=str(path),
                                                                    settings=SETTINGS)))
    delay = 0.5
    while True:
        try:
            if not wait and read_timeout_s is None:
                # A server that takes the connection and never answers (hung, SIGSTOPped) held a
                # one-shot command for the default read timeout, 300 s (a `migrate` Job 5 minutes),
                # before its one line: its first question gets HANDSHAKE_TIMEOUT_S.
                clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False, settings=SETTINGS,
                                              send_receive_timeout=HANDSHAKE_TIMEOUT_S).close()
            # No session id: a server session runs one query at a time, and this client is shared
            # by the threads of a process (request handlers, the stream core).
            # Plain HTTP only: an https:// URL's TLS options (verify, ca_cert, …) make a pool of their own.
            timeouts = {**({"send_receive_timeout": read_timeout_s} if read_timeout_s else {}),
                        **({"connect_timeout": connect_timeout_s} if connect_timeout_s else {})}
            client = clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False, settings=SETTINGS,
                                                   **timeouts,
                                                   **({"pool_mgr": _connections()} if url.startswith("http://") else {}))
        except OperationalError as exc:
            if not wait:
                raise
            log.warning("ClickHouse does not answer at %s (%s); waiting", server(url), reason(exc))
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        return _lists_written_ahead(_utc(client))


# -- lookups ----------------------------------------------------------------------------------
# What a request waits on (a site, a day's salt, whether a visitor's session carries over
# midnight) gets this long from a server that took the connection: a hung one held each for
# clickhouse-connect's default, 300 s, and `/api/event` with it. After one failed, the next fail at
# once for as long, rather than each waiting out its own timeout (README, "When ClickHouse hangs").
LOOKUP_TIMEOUT_S = 5.0
# How long lookups and the query API's questions wait for a server to take a connection. A hung
# server whose accept queue is full never does, and urllib3 tries twice: with clickhouse-connect's
# 10 s, a lookup waited 20 s (audit 113), and each of the query API's 40 threads a question 20 s
# (audit 115). Twice this is within LOOKUP_TIMEOUT_S; a server that is up takes one in a
# millisecond, after a lost SYN in about 1 s.
CONNECT_TIMEOUT_S = 2


def for_lookups(client: Client, url: str, wait: bool = False) -> Client:
    """A client of their own for lookups (`LOOKUP_TIMEOUT_S`); the embedded engine answers
    in-process, and its one client serves."""
    if url.startswith("chdb://"):
        return client
    return _fails_fast(connect(url, wait, read_timeout_s=LOOKUP_TIMEOUT_S, connect_timeout_s=CONNECT_TIMEOUT_S),
                       _Unanswered(LOOKUP_TIMEOUT_S))


# The query API's questions get this long: a dashboard or a Next.js page behind it gets a 503 it
# can act on (keep what it has, ask again) rather than waiting 300 s on a hung server. Its
# heaviest reads (a funnel over a large site's raw events for a long range) take seconds.
QUERY_TIMEOUT_S = 30.0


def for_queries(client: Client, url: str, lookups: Client, wait: bool = False) -> Client:
    """A client of their own for the query API's reads (`QUERY_TIMEOUT_S`). It fails at once
    while `lookups` (`for_lookups`' client) does, after a call of either found no server to take
    a connection, or one of the lookups' (a key, a site) had no answer in time. A question of its
    own without an answer in time does not start that, since one slow question says nothing about
    the next. Otherwise, on a hung server, every request waited out its own timeout, queued behind
    the others for the thread pool."""
    if url.startswith("chdb://"):
        return client
    return _fails_fast(connect(url, wait, read_timeout_s=QUERY_TIMEOUT_S, connect_timeout_s=CONNECT_TIMEOUT_S),
                       lookups.unanswered, records=no_connection)


class _Unanswered:
    """When a client's call last found no server (refused, or no answer in time), and why: calls
    made within `for_s` after it raise OperationalError at once."""

    def __init__(self, for_s: float) -> None:
        self.for_s, self.at, self.reason = for_s, float("-inf"), ""

    def check(self) -> None:
        ago = time.monotonic() - self.at
        if ago < self.for_s:
            raise OperationalError(f"ClickHouse did not answer {ago:.1f} s ago ({self.reason});"
                                   f" not asked again for {self.for_s - ago:.1f} s")

    def record(self, exc: OperationalError) -> None:
        self.at, self.reason = time.monotonic(), reason(exc)


def _fails_fast(client: Client, state: _Unanswered,
               records: Callable[[OperationalError], bool] = lambda exc: True) -> Client:
    """The client's calls raise OperationalError at once while `state` says so. `records`: which
    of its own calls' failures (no server to connect to, or no answer in time) start that. The
    state is kept as the client's `unanswered`, for another client to share."""

    def wrapped(method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            state.check()
            try:
                return method(*args, **kwargs)
            except OperationalError as exc:
                if records(exc):
                    state.record(exc)
                raise
        return call

    for name in ("query", "raw_query", "command", "insert"):
        setattr(client, name, wrapped(getattr(client, name)))
    client.unanswered = state
    return client


# -- list parameters --------------------------------------------------------------------------
# clickhouse-connect writes a list parameter out element by element in Python, escaping each
# string with a generator over its characters: ~9.5 % of the stream core's time went there
# (`tests/bench/bench_core.py` under py-spy), 20–60 ms for each 10,000 strings here. The lists this
# project binds (sites, kinds, values, ids, times, (site, kind, value) tuples) are written out here
# with `str.translate`, exactly as clickhouse-connect would write them (`tests/test_storage.py`
# compares the two), and handed over as an object it does not know, which it sends as `str(value)`.
_ESCAPES = str.maketrans({c: "\\" + c for c in must_escape})


class _Written:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def _element(x) -> str | None:
    """`x` as clickhouse-connect writes a list element, for the types written here; None for others."""
    kind = type(x)
    if kind is str:
        return "'" + x.translate(_ESCAPES) + "'"
    if kind is int:
        return str(x)
    if kind is datetime and x.tzinfo is timezone.utc:  # others: clickhouse-connect moves them to UTC first
        return x.strftime("'%Y-%m-%d %H:%M:%S'")
    if kind is date:
        return "'" + x.isoformat() + "'"
    if kind is tuple:
        parts = [_element(part) for part in x]
        return None if None in parts else "(" + ", ".join(parts) + ")"
    return None


def written(value):
    """A list parameter written out ahead, or the value as it is (anything else, or a list holding
    an element of another type: clickhouse-connect writes those)."""
    if type(value) is not list:
        return value
    if all(type(x) is str for x in value):  # the common case, without a call per element
        # Ids, sites, kinds: nothing to escape, which a scan of them joined tells (`translate` per
        # string cost ~2 µs: 9 ms for a batch's 5,000 event ids).
        joined = "".join(value)
        if not any(c in joined for c in must_escape):
            return _Written("['" + "', '".join(value) + "']" if value else "[]")
        return _Written("[" + ", ".join(["'" + x.translate(_ESCAPES) + "'" for x in value]) + "]")
    if all(type(x) is int for x in value):  # visitor ids
        return _Written("[" + ", ".join(map(str, value)) + "]")
    parts = [_element(x) for x in value]
    if None in parts:
        return value
    return _Written("[" + ", ".join(parts) + "]")


def _lists_written_ahead(client: Client) -> Client:
    """The client's three methods this project binds parameters with write list parameters ahead."""
    def wrapped(method):
        @functools.wraps(method)
        def call(query, parameters=None, *args, **kwargs):
            if isinstance(parameters, dict):
                parameters = {name: written(value) for name, value in parameters.items()}
            return method(query, parameters, *args, **kwargs)
        return call

    for name in ("query", "raw_query", "command"):
        setattr(client, name, wrapped(getattr(client, name)))
    return client


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


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The error and what caused it, down to the root (clickhouse-connect wraps urllib3's chain)."""
    cause: BaseException | None = exc
    while cause is not None:
        yield cause
        cause = cause.__cause__ or cause.__context__


def no_connection(exc: BaseException) -> bool:
    """Whether no server took the connection (refused, or not in time), rather than a question
    had no answer in time."""
    # NewConnectionError (a refusal) is a ConnectTimeoutError too
    return any(isinstance(cause, ConnectTimeoutError) for cause in _causes(exc))


def reason(exc: BaseException) -> str:
    """The root cause of a connection error in a few words ("Connection refused"):
    clickhouse-connect's own message carries the whole urllib3 chain."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return str(exc)[:200]
