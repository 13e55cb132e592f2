"""Versioned, idempotent schema migrations: the one place that owns table DDL.

Each migration runs once per database; its statements are `IF NOT EXISTS` so two processes that
start at the same moment and both migrate end in the same schema. Append new migrations at the
end; never edit one that has shipped.

Cluster mode (BK_CLICKHOUSE_CLUSTER): the same migrations, rewritten by `Cluster`. Every table T
becomes `T_local` — `Replicated…MergeTree` of its own variant, created `ON CLUSTER` — behind a
`Distributed` table named T, sharded by `cityHash64(site_id)` where the table has a site, so all
of a site's rows (and so every visitor's events, sessions and rollup buckets that the stream
core rebuilds, and every key FINAL collapses) live on one shard. The stream core and the API
keep issuing the same SQL against T; only DDL and mutations (`Cluster.mutation`) differ.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from streams.buckets import VISITOR_LIFETIME

log = logging.getLogger(__name__)

# Keyed by event_id (+ time in the sort key): a redelivered event collapses into one row, and
# every read of raw events uses FINAL, so duplicates never reach a number.
_EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    event_id      UUID,
    site_id       LowCardinality(String),
    timestamp     DateTime64(3, 'UTC'),
    name          LowCardinality(String),
    visitor_id    UInt64,
    session_id    UInt64,
    hostname      String,
    pathname      String,
    referrer      String,
    source        LowCardinality(String),
    channel       LowCardinality(String),
    utm_source    String,
    utm_medium    String,
    utm_campaign  String,
    country       LowCardinality(String),
    device        LowCardinality(String),
    browser       LowCardinality(String),
    os            LowCardinality(String),
    props         Map(String, String),
    product_id    String,
    product_slug  String,
    category_slug String,
    brand_slug    String,
    partner_slug  String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (site_id, timestamp, event_id)
"""

# Rebuilt from raw events after every batch that touches a session; `version` is the rebuild
# time, so the newest rebuild wins under FINAL. Sorted by visitor so the stream core finds a
# visitor's open session fast.
_SESSIONS = """
CREATE TABLE IF NOT EXISTS sessions (
    site_id       LowCardinality(String),
    visitor_id    UInt64,
    session_id    UInt64,
    start         DateTime64(3, 'UTC'),
    end           DateTime64(3, 'UTC'),
    entry_page    String,
    exit_page     String,
    pageviews     UInt32,
    events        UInt32,
    source        LowCardinality(String),
    channel       LowCardinality(String),
    referrer      String,
    utm_source    String,
    utm_medium    String,
    utm_campaign  String,
    country       LowCardinality(String),
    device        LowCardinality(String),
    browser       LowCardinality(String),
    os            LowCardinality(String),
    version       UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, visitor_id, session_id)
"""

# Clicks per UTC hour, rebuilt from raw events for every hour a batch touches; the latest
# rebuild (highest `version`) wins under FINAL.
_AFFILIATE_CLICKS_HOURLY = """
CREATE TABLE IF NOT EXISTS affiliate_clicks_hourly (
    site_id       LowCardinality(String),
    hour          DateTime('UTC'),
    product_id    String,
    product_slug  String,
    category_slug LowCardinality(String),
    brand_slug    LowCardinality(String),
    partner_slug  LowCardinality(String),
    clicks        UInt64,
    version       UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(hour)
ORDER BY (site_id, hour, product_id, product_slug, category_slug, brand_slug, partner_slug)
"""

_SITES = """
CREATE TABLE IF NOT EXISTS sites (
    site_id     String,
    account_id  String,
    domain      String,
    name        String,
    timezone    String,
    created_at  DateTime64(3, 'UTC'),
    deleted     UInt8,
    version     UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY site_id
"""

_API_KEYS = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash    String,
    prefix      String,
    account_id  String,
    site_id     String,
    created_at  DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY key_hash
"""

# Several ingest processes may propose a salt for the same day; everyone uses the earliest one.
_SALTS = """
CREATE TABLE IF NOT EXISTS salts (
    day         Date,
    salt        String,
    created_at  DateTime64(6, 'UTC')
) ENGINE = MergeTree
ORDER BY (day, created_at, salt)
"""

# -- 2: rollups for every traffic number ------------------------------------------------------
# Every table below is a function of the raw events (streams/core.py rebuilds what a batch
# touches): partitions follow the sorting key's time column, so one key never spans two
# partitions and FINAL need not merge across them. `is_deleted` rows are tombstones. Granules
# are small (1024 rows): the stream core reads and rewrites a few hundred rows at a time.

# Sorted by start so time ranges prune; a session's id is a hash of its start, so the key of a
# session never changes — a session that gains an earlier first event is a new key, the old one
# gets a tombstone. The skip indexes serve the open-session lookup of ingest.
_SESSIONS_V2 = """
CREATE TABLE IF NOT EXISTS sessions (
    site_id       LowCardinality(String),
    visitor_id    UInt64,
    session_id    UInt64,
    start         DateTime64(3, 'UTC'),
    end           DateTime64(3, 'UTC'),
    entry_page    String,
    exit_page     String,
    pageviews     UInt32,
    events        UInt32,
    bounce        UInt8,
    duration_ms   UInt64,
    source        LowCardinality(String),
    channel       LowCardinality(String),
    referrer      String,
    utm_source    String,
    utm_medium    String,
    utm_campaign  String,
    country       LowCardinality(String),
    device        LowCardinality(String),
    browser       LowCardinality(String),
    os            LowCardinality(String),
    version       UInt64,
    is_deleted    UInt8,
    INDEX end_minmax end TYPE minmax GRANULARITY 1,
    INDEX visitor_bloom visitor_id TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = ReplacingMergeTree(version, is_deleted)
PARTITION BY toYYYYMM(start)
ORDER BY (site_id, start, session_id)
SETTINGS index_granularity = 1024
"""

# One row per (visitor, dimension value, quarter hour) it was active in (streams/activity.py):
# the source every rollup is rebuilt from.
_ACTIVITY = """
CREATE TABLE IF NOT EXISTS activity (
    site_id       LowCardinality(String),
    kind          LowCardinality(String),
    value         String,
    bucket        DateTime('UTC'),
    visitor_id    UInt64,
    events        UInt32,
    pageviews     UInt32,
    sessions      UInt32,
    bounces       UInt32,
    duration_ms   UInt64,
    gap           UInt32,
    version       UInt64,
    is_deleted    UInt8
) ENGINE = ReplacingMergeTree(version, is_deleted)
PARTITION BY toYYYYMM(bucket)
ORDER BY (site_id, kind, bucket, value, visitor_id)
SETTINGS index_granularity = 1024
"""

# Per (kind, value) and UTC quarter hour: visitors first seen there, how many visitors came back
# after each gap (in quarter hours), and the additive counts. The query API reads whole periods
# from here (and the daily table below), never the raw events. Every read pays per part, so the
# rollups merge parts older than 30 s without waiting for the usual size tiers (they are small).
_ROLLUP_15M = """
CREATE TABLE IF NOT EXISTS rollup_15m (
    site_id       LowCardinality(String),
    kind          LowCardinality(String),
    value         String,
    bucket        DateTime('UTC'),
    visitors      UInt64,
    returning     Map(UInt32, UInt64),
    events        UInt64,
    pageviews     UInt64,
    sessions      UInt64,
    bounces       UInt64,
    duration_ms   UInt64,
    version       UInt64,
    is_deleted    UInt8
) ENGINE = ReplacingMergeTree(version, is_deleted)
PARTITION BY toYYYYMM(bucket)
ORDER BY (site_id, kind, bucket, value)
SETTINGS index_granularity = 1024, min_age_to_force_merge_seconds = 30
"""

# The same per UTC day (without gaps): long periods read whole days here and only their
# partial first and last days from rollup_15m; affiliate `days` are whole UTC days.
_ROLLUP_1D = """
CREATE TABLE IF NOT EXISTS rollup_1d (
    site_id       LowCardinality(String),
    kind          LowCardinality(String),
    value         String,
    day           Date,
    visitors      UInt64,
    events        UInt64,
    pageviews     UInt64,
    sessions      UInt64,
    bounces       UInt64,
    duration_ms   UInt64,
    version       UInt64,
    is_deleted    UInt8
) ENGINE = ReplacingMergeTree(version, is_deleted)
PARTITION BY toYYYYMM(day)
ORDER BY (site_id, kind, day, value)
SETTINGS index_granularity = 1024, min_age_to_force_merge_seconds = 30
"""


def _drop_visitor_sorted_sessions(client: Client, run: Callable[[str], None]) -> None:
    """The first `sessions` was sorted by visitor, without a time key; its rows are rebuilt from
    the raw events (`streams/replay.py`) after this migration."""
    columns = {row[0] for row in client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'sessions'").result_rows}
    if columns and "is_deleted" not in columns:
        run("DROP TABLE IF EXISTS sessions")


# -- 3: goals and funnels -----------------------------------------------------------------------

_GOALS = """
CREATE TABLE IF NOT EXISTS goals (
    site_id      String,
    goal_id      String,
    name         String,
    event_type   LowCardinality(String),
    match_path   String,
    match_event  String,
    created_at   DateTime64(3, 'UTC'),
    deleted      UInt8,
    version      UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (site_id, goal_id)
"""

# Steps as JSON ([{"name", "type", "match_value", "match_type"}]); read by id, so keyed by id.
_FUNNELS = """
CREATE TABLE IF NOT EXISTS funnels (
    funnel_id    String,
    site_id      String,
    name         String,
    steps        String,
    created_at   DateTime64(3, 'UTC'),
    deleted      UInt8,
    version      UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY funnel_id
"""

# -- 5: what each worker reports once a minute (streams/monitor.py) --------------------------------

_WORKER_STATUS = """
CREATE TABLE IF NOT EXISTS worker_status (
    worker        String,
    reported_at   DateTime64(3, 'UTC'),
    events_per_s  Float64,
    batch_p50_ms  Float64,
    batch_max_ms  Float64,
    events        UInt64
) ENGINE = MergeTree
ORDER BY (worker, reported_at)
TTL toDateTime(reported_at) + INTERVAL 7 DAY
"""

# -- 8: rollup_15m sorted by UTC day first -------------------------------------------------------
# A batch recomputes its touched (site, kind, value, day) keys of rollup_1d from the day's quarter
# hours (streams/rollups.py). Sorted by (site, kind, bucket, value), that read took every
# quarter-hour row of the touched sites and kinds so far that UTC day, so a batch cost more as
# each day filled (`tests/bench/bench_day_rollup.py`: all 1,804 granules with 96 quarter hours
# stored). Sorted by day, then value, it reads the touched keys' rows (28 granules). Reads by
# bucket range (the API's partial days, trending windows) now read whole days: at most twice the
# rows. The table is copied into the new order and swapped in (`_sort_rollup_15m_by_day`).
_ROLLUP_15M_BY_DAY = _ROLLUP_15M.replace("rollup_15m (", "rollup_15m_by_day (").replace(
    "ORDER BY (site_id, kind, bucket, value)", "ORDER BY (site_id, kind, toDate(bucket), value, bucket)")
assert "rollup_15m_by_day (" in _ROLLUP_15M_BY_DAY and "toDate(bucket), value" in _ROLLUP_15M_BY_DAY


@dataclass(frozen=True)
class _Rewrite:
    """A table copied into a new form (`create`, of the table named `new`) and swapped in: copy,
    swap the two in one RENAME, copy the old table (then named `old`) into the new one again (what
    it took meanwhile: every row; copies of a row are one row under FINAL), drop it. `rows` selects
    a table's rows (`{source}`) as the new form takes them; `is_new(fact)` tells the new form by a
    column of `system.tables` (`fact`); `after` runs once swapped (a cluster's front).

    Each step may meet another process migrating at the same time: a step that fails because the
    other has done it (the swap made, the old table copied back and dropped) is done. A process
    killed after the swap leaves the old table: the next migrate copies it back and drops it.
    Rows written to the old table after its last copy would be lost, so workers of the old release
    are stopped while this runs (docs/operations.md)."""
    table: str
    new: str
    old: str
    create: str
    rows: str
    fact: str
    is_new: Callable[[str], bool]
    after: tuple[str, ...] = ()

    # A RENAME of several pairs runs them in turn and stops at the first that fails, without undoing
    # those done. The new table goes first: a migrator that tries the swap after another one has
    # swapped, copied back and dropped the old table then fails before renaming anything. With the
    # table first, that late swap renamed the new table away and failed on the second pair,
    # leaving none (seen in the suite, under load, as a race of two migrators).
    @property
    def swap(self) -> str:
        return (f"RENAME TABLE {self.new} TO {self.table}_swapping, {self.table} TO {self.old},"
                f" {self.table}_swapping TO {self.table}")

    @property
    def leftovers(self) -> list[str]:
        """The old table, and one a concurrent migrator made after the swap, dropped at the end."""
        return [f"DROP TABLE IF EXISTS {self.old}", f"DROP TABLE IF EXISTS {self.new}"]

    @property
    def ddl(self) -> list[str]:
        """The DDL it runs, as `cluster_ddl` lists it."""
        return [self.create, self.swap, *self.after, *self.leftovers]

    def __call__(self, client: Client, run: Callable[[str], None]) -> None:
        cluster = cluster_of(client)

        def swapped() -> bool:
            fact = _table_fact(client, cluster, self.table, self.fact)
            return fact is not None and self.is_new(fact)

        def old_table_gone() -> bool:
            return _table_fact(client, cluster, self.old, "name") is None

        if not swapped():
            run(self.create)
            log.info("copying %s into its new form", self.table)
            _unless_done(lambda: client.command(f"INSERT INTO {self.new} {self.rows.format(source=self.table)}"), swapped)
            if not swapped():
                _unless_done(lambda: run(self.swap), swapped)
        for statement in self.after:
            run(statement)
        if not old_table_gone():
            old = (f"cluster('{cluster.name}', currentDatabase(), {self.old}_local)" if cluster else self.old)
            _unless_done(lambda: client.command(f"INSERT INTO {self.table} {self.rows.format(source=old)}"),
                         old_table_gone)
        for statement in self.leftovers:
            run(statement)


def _unless_done(step: Callable[[], object], done: Callable[[], bool]) -> None:
    try:
        step()
    except DatabaseError:
        if not done():
            raise


_sort_rollup_15m_by_day = _Rewrite(
    "rollup_15m", new="rollup_15m_by_day", old="rollup_15m_by_bucket", create=_ROLLUP_15M_BY_DAY,
    rows="SELECT * FROM {source}", fact="sorting_key", is_new=lambda key: "toDate(bucket)" in key)


# -- 10: raw events versioned --------------------------------------------------------------------
# Of two copies of an event (one key), the last inserted won, as events had no version. A worker
# frozen past the session timeout (SIGSTOP, a VM pause) during its raw insert writes after its
# partitions' new owner, and its copies then replaced the owner's: with a session id the owner had
# since merged away (funnels then read raw events by session; a chaos run left 372 such events). Raw
# rows now carry the batch's version, as sessions and activity do, so the later reader wins
# whatever the insert order. The table is copied (deduplicated: FINAL) with version 0 and swapped.
_EVENTS_VERSIONED = _EVENTS.replace("events (", "events_versioned (").replace(
    "partner_slug  String\n)", "partner_slug  String,\n    version       UInt64\n)").replace(
    "ENGINE = ReplacingMergeTree\n", "ENGINE = ReplacingMergeTree(version)\n")
assert "version       UInt64" in _EVENTS_VERSIONED and "ReplacingMergeTree(version)" in _EVENTS_VERSIONED

_version_events = _Rewrite(
    "events", new="events_versioned", old="events_unversioned", create=_EVENTS_VERSIONED,
    rows="SELECT *, toUInt64(0) FROM {source} FINAL", fact="engine_full",
    is_new=lambda engine: re.search(r"ReplacingMergeTree\((?:.*, )?version\)", engine) is not None,
    # A cluster's front `events` names the shards' table, swapped: it takes the new column too (on
    # a single server, and on the shards, the column is there).
    after=("ALTER TABLE events ADD COLUMN IF NOT EXISTS version UInt64",))


# -- 9: which goals' backfills finished (streams/goals.py) ---------------------------------------

_GOAL_BACKFILLS = """
CREATE TABLE IF NOT EXISTS goal_backfills (
    site_id      String,
    goal_id      String,
    finished_at  DateTime64(3, 'UTC')
) ENGINE = MergeTree
ORDER BY (site_id, goal_id)
"""


def _goals_so_far_were_backfilled(client: Client, run: Callable[[str], None]) -> None:
    """Goals made before this migration are taken as backfilled: no ledger said otherwise."""
    client.command("INSERT INTO goal_backfills SELECT site_id, goal_id, now64(3) FROM goals FINAL WHERE deleted = 0")


# -- 11: claims of a domain by the site creates racing for it (streams/sites.py) -----------------
# ClickHouse has no unique constraint; its block deduplication is the one first-writer-wins step
# every deployment has: of inserts with one token, the first is stored, the others are dropped.
# `site_id` is the domain's readable id, so a domain's claims share a shard on a cluster.
_SITE_CLAIMS = """
CREATE TABLE IF NOT EXISTS site_claims (
    site_id     String,
    domain      String,
    token       String,
    account_id  String,
    claimed_at  DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree
ORDER BY (site_id, domain, token)
SETTINGS non_replicated_deduplication_window = 10000, replicated_deduplication_window = 10000
"""


# -- 12: each session's events, in order, for funnels ---------------------------------------------
# A funnel is counted per session from the order of its events. Read from the raw events, that
# meant grouping and sorting every matching event of the period by session: a 30-day funnel at
# 10M events took 0.5–0.7 s here, against a 300 ms target (docs/benchmarks.md). The stream core
# now writes each session's event names and pages with the session (streams/sessions.py), and
# funnels read those. Sessions written before are filled from the raw events, a month of session
# starts at a time, each row under its own version: a newer row the stream core writes meanwhile
# wins. Sessions whose raw events expired stay without (they had no funnel data before either).
_SESSION_EVENT_COLUMNS = ("ALTER TABLE sessions ADD COLUMN IF NOT EXISTS event_names Array(LowCardinality(String))"
                          " AFTER os, ADD COLUMN IF NOT EXISTS event_pages Array(LowCardinality(String)) AFTER event_names")

_SESSION_FIELDS = ("site_id, visitor_id, session_id, start, end, entry_page, exit_page, pageviews, events, bounce,"
                   " duration_ms, source, channel, referrer, utm_source, utm_medium, utm_campaign, country, device,"
                   " browser, os, version, is_deleted")

# Events in the sessions' order (streams/sessions.py `event_order`): time, then id as text, which
# `UUIDToNum`'s bytes sort as. A session's events lie within VISITOR_LIFETIME of its start, and
# its id starts with its start second (the high 32 bits: streams/sessions.py SESSION_START_SHIFT).
_FILL_SESSION_EVENTS = f"""
INSERT INTO sessions ({_SESSION_FIELDS}, event_names, event_pages)
SELECT {", ".join("s." + f.strip() for f in _SESSION_FIELDS.split(","))}, e.names, e.pages
FROM (SELECT * FROM sessions FINAL
      WHERE start >= {{month:DateTime64(3, 'UTC')}} AND start < {{next:DateTime64(3, 'UTC')}} AND NOT is_deleted) AS s
INNER JOIN (
    SELECT site_id, session_id, arrayMap(x -> x.3, ordered) AS names, arrayMap(x -> x.4, ordered) AS pages
    FROM (SELECT site_id, session_id,
                 arraySort(groupArray((timestamp, UUIDToNum(event_id), name, if(name = 'pageview', pathname, ''))))
                 AS ordered
          FROM events FINAL
          WHERE timestamp >= {{month:DateTime64(3, 'UTC')}} AND timestamp < {{until:DateTime64(3, 'UTC')}}
            AND bitShiftRight(session_id, 32) >= toUnixTimestamp({{month:DateTime64(3, 'UTC')}})
            AND bitShiftRight(session_id, 32) < toUnixTimestamp({{next:DateTime64(3, 'UTC')}})
          GROUP BY site_id, session_id)
) AS e USING (site_id, session_id)
"""


def _fill_session_events(client: Client, run: Callable[[str], None]) -> None:
    """Sessions stored before migration 12 get their events' names and pages, a month at a time."""
    months = [m for (m,) in client.query(
        "SELECT DISTINCT toStartOfMonth(start) AS m FROM sessions WHERE empty(event_names) ORDER BY m").result_rows]
    # The conditions on columns outside the sorting key stay after FINAL. On a cluster, both
    # sides are read through the fronts (each shard's FINAL is whole: a site's rows share a
    # shard) and joined on the server this process asks, then inserted through the front.
    settings = {"optimize_move_to_prewhere_if_final": 0}
    for n, month in enumerate(months, 1):
        start = datetime(month.year, month.month, 1, tzinfo=timezone.utc)
        following = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=timezone.utc)
        log.info("filling sessions with their events for funnels: %s (%d of %d months)", f"{month:%Y-%m}", n,
                 len(months))
        client.command(_FILL_SESSION_EVENTS, settings=settings,
                       parameters={"month": start, "next": following, "until": following + VISITOR_LIFETIME})
        # Each session now has two rows until they merge, which ClickHouse may not do for days
        # (parts this large wait for more), and FINAL merged them at every read: a 30-day funnel
        # at 10M events took as long as from the raw events. Merged once, here (~ a copy).
        run(f"OPTIMIZE TABLE sessions PARTITION ID '{month:%Y%m}' FINAL")


# -- 13: the raw-event TTLs a database has had ------------------------------------------------------
# A TTL raised again keeps only what the shorter one left: the import and trending must know
# since when every raw event is surely stored, not only the TTL of today (streams/retention.py).
_RETENTION_HISTORY = """
CREATE TABLE IF NOT EXISTS raw_events_retention (
    changed_at  DateTime64(3, 'UTC'),
    days        UInt32
) ENGINE = MergeTree
ORDER BY changed_at
"""


Step = str | Callable[[Client, Callable[[str], None]], None]

MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (1, "initial schema", [_EVENTS, _SESSIONS, _AFFILIATE_CLICKS_HOURLY, _SITES, _API_KEYS, _SALTS]),
    (2, "rollups for every traffic number", [_drop_visitor_sorted_sessions, _SESSIONS_V2, _ACTIVITY, _ROLLUP_15M,
                                             _ROLLUP_1D, "DROP TABLE IF EXISTS affiliate_clicks_hourly"]),
    (3, "goals and funnels", [_GOALS, _FUNNELS]),
    # The newest row of a key wins (ReplacingMergeTree without version): revoking inserts one.
    (4, "revocable API keys", ["ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS revoked UInt8 DEFAULT 0"]),
    (5, "worker status reports", [_WORKER_STATUS]),
    # Country rows were written at session starts only; now for every event (streams/activity.py).
    # Releases 1a1fa3d–9bccdc2 shipped another 6, "event-id bloom filter" (SUPERSEDED): the ledger
    # names each migration, and a database with only that 6 gets this one too.
    (6, "countries by the period's events", []),
    # That other 6's index, unused since retries are looked up in a 6-h window (streams/events.py).
    (7, "no event-id bloom filter", ["ALTER TABLE events DROP INDEX IF EXISTS event_id_bloom"]),
    (8, "rollup_15m sorted by day", [_sort_rollup_15m_by_day]),
    (9, "goal backfills recorded", [_GOAL_BACKFILLS, _goals_so_far_were_backfilled]),
    (10, "raw events versioned", [_version_events]),
    (11, "site claims", [_SITE_CLAIMS]),
    (12, "session events for funnels", [_SESSION_EVENT_COLUMNS, _fill_session_events]),
    (13, "raw-event retention history", [_RETENTION_HISTORY]),
    # Which create made a claim (streams/sites.py): one account's creates in two processes at once.
    (14, "site claims name their create", ["ALTER TABLE site_claims ADD COLUMN IF NOT EXISTS claimant String DEFAULT ''"]),
]

# Ledger entries of migrations that shipped under a number now given to another: a database that
# recorded one of these has not applied the migration its number stands for now.
SUPERSEDED = {(6, "event-id bloom filter")}

# Tables holding a site's data: deleting a site deletes its rows from each.
SITE_DATA_TABLES = ("events", "sessions", "activity", "rollup_15m", "rollup_1d", "goals", "goal_backfills", "funnels")

# Migrations after which the derived tables must be rebuilt from the raw events.
REPLAY_AFTER = {2, 6}

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     UInt32,
    name        String,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY version
"""


_CREATE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*)\) ENGINE = (\w+)(?:\(([^)]*)\))?(.*)", re.S)
_ALTER = re.compile(r"ALTER TABLE (\w+) (.*)", re.S)
_DROP = re.compile(r"DROP TABLE IF EXISTS (\w+)$")
_RENAME = re.compile(r"RENAME TABLE (\w+ TO \w+(?:, \w+ TO \w+)*)$")
_OPTIMIZE = re.compile(r"OPTIMIZE TABLE (\w+) (.*)", re.S)
_DELETE = re.compile(r"DELETE FROM (\w+) (WHERE .*)", re.S)


@dataclass(frozen=True)
class Cluster:
    """How DDL reads on a replicated, sharded ClickHouse cluster (module docstring)."""
    name: str

    def statements(self, statement: str) -> list[str]:
        statement = statement.strip()
        if match := _CREATE.fullmatch(statement):
            table, columns, engine, args, rest = match.groups()
            replica_args = f"'/clickhouse/tables/{{shard}}/{{database}}/{table}_local', '{{replica}}'"
            engine_args = f"{replica_args}, {args}" if args else replica_args
            shard_key = "cityHash64(site_id)" if re.search(r"^\s*site_id\s", columns, re.M) else "rand()"
            return [f"CREATE TABLE IF NOT EXISTS {table}_local ON CLUSTER {self.name} ({columns}) "
                    f"ENGINE = Replicated{engine}({engine_args}){rest}",
                    f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER {self.name} AS {table}_local "
                    f"ENGINE = Distributed({self.name}, currentDatabase(), {table}_local, {shard_key})"]
        if match := _ALTER.fullmatch(statement):
            table, action = match.groups()
            out = [f"ALTER TABLE {table}_local ON CLUSTER {self.name} {action}"]
            if re.match(r"(ADD|DROP|MODIFY|RENAME) COLUMN", action):  # the front has the columns too
                out.append(f"ALTER TABLE {table} ON CLUSTER {self.name} {action}")
            return out
        if match := _DROP.fullmatch(statement):
            table = match.group(1)
            return [f"DROP TABLE IF EXISTS {table} ON CLUSTER {self.name} SYNC",
                    f"DROP TABLE IF EXISTS {table}_local ON CLUSTER {self.name} SYNC"]
        if match := _RENAME.fullmatch(statement):  # the shards' tables; each front names its local table
            pairs = re.sub(r"(\w+) TO (\w+)", r"\1_local TO \2_local", match.group(1))
            return [f"RENAME TABLE {pairs} ON CLUSTER {self.name}"]
        if match := _OPTIMIZE.fullmatch(statement):  # the shards' tables
            table, rest = match.groups()
            return [f"OPTIMIZE TABLE {table}_local ON CLUSTER {self.name} {rest}"]
        if match := _DELETE.fullmatch(statement):  # the shards' tables
            table, where = match.groups()
            return [f"DELETE FROM {table}_local ON CLUSTER {self.name} {where}"]
        raise ValueError(f"no cluster form for: {statement[:80]}")

    def mutation(self, statement: str) -> str:
        """`ALTER TABLE t DELETE …` runs on the shards' local tables."""
        (rewritten,) = self.statements(statement)
        return rewritten


def _runner(client: Client, cluster: Cluster | None, settings: dict | None = None) -> Callable[[str], None]:
    def run(statement: str) -> None:
        for sql in cluster.statements(statement) if cluster else [statement]:
            client.command(sql, settings=settings)
    return run


def run_ddl(client: Client, statement: str, cluster: Cluster | None = None) -> None:
    """One `CREATE`/`ALTER`/`DROP TABLE` of the forms above, on a single server or the cluster."""
    _runner(client, cluster)(statement)


def truncate(client: Client, table: str, cluster: Cluster | None = None) -> None:
    """Empty a table (on a cluster, its shards' local tables)."""
    client.command(f"TRUNCATE TABLE IF EXISTS {table}_local ON CLUSTER {cluster.name} SYNC" if cluster
                   else f"TRUNCATE TABLE IF EXISTS {table}")


def _table_fact(client: Client, cluster: Cluster | None, table: str, column: str) -> str | None:
    """A column of `system.tables` for `table` (its local table on a cluster); None if there is none."""
    rows = client.query(f"SELECT {column} FROM system.tables WHERE database = currentDatabase() AND name = {{t:String}}",
                        parameters={"t": f"{table}_local" if cluster else table}).result_rows
    return rows[0][0] if rows else None


def cluster_of(client: Client) -> Cluster | None:
    """The cluster the schema was made for: `events` is then a Distributed table naming it."""
    engine = _table_fact(client, None, "events", "engine_full")
    match = re.match(r"Distributed\('?(\w+)'?,", engine) if engine else None
    return Cluster(match.group(1)) if match else None


def mutations(client: Client, statements: list[str], parameters: dict, wait: bool = False,
              settings: dict | None = None) -> None:
    """Run `ALTER TABLE … DELETE`s (a deleted site's or goal's rows) on a single server or the
    cluster's shards alike; asynchronous unless `wait`. Waited for together, not one after another
    (`mutations_sync`): each waits for its table's background merges, and in a row the seven of
    a site's tables took 17 s in the suite's shared database."""
    cluster = cluster_of(client)
    tables = []
    for statement in statements:
        client.command(cluster.mutation(statement) if cluster else statement, parameters=parameters,
                       settings={**(settings or {}), "mutations_sync": 0})
        table = _ALTER.fullmatch(statement).group(1)
        tables.append(f"{table}_local" if cluster else table)
    if wait:
        _wait_for_mutations(client, tables, cluster)


def delete_rows(client: Client, statement: str, parameters: dict) -> None:
    """A lightweight `DELETE FROM … WHERE …` on a single server or the cluster's shards: the rows
    are masked for every read once it returns."""
    cluster = cluster_of(client)
    for sql in cluster.statements(statement) if cluster else [statement]:
        client.command(sql, parameters=parameters)


def _wait_for_mutations(client: Client, tables: list[str], cluster: Cluster | None) -> None:
    """Until no mutation of `tables` is left to do (on every replica of a cluster); a mutation
    that fails raises, as `mutations_sync` does."""
    source = f"clusterAllReplicas({cluster.name}, system.mutations)" if cluster else "system.mutations"
    while True:
        left, failure = client.query(
            f"SELECT countIf(NOT is_done), anyIf(latest_fail_reason, NOT is_done) FROM {source}"
            " WHERE database = currentDatabase() AND table IN {tables:Array(String)}",
            parameters={"tables": tables}).result_rows[0]
        if not left:
            return
        if failure:
            raise RuntimeError(f"a mutation of {', '.join(tables)} failed: {failure}")
        time.sleep(0.1)


def run_later(delay_s: float, work: Callable[[], object], what: str) -> None:
    """Run `work` once, `delay_s` from now, on a thread of its own; a failure is logged. For the
    second pass of a delete or backfill, once every process's cached lists have the change."""
    def run() -> None:
        time.sleep(delay_s)
        try:
            work()
        except Exception:
            log.exception("%s failed", what)

    threading.Thread(target=run, name=what, daemon=True).start()


def apply_retention(client: Client, days: int, cluster: Cluster | None = None) -> None:
    """Raw events are deleted `days` after their time (BK_RAW_EVENTS_TTL_DAYS); rollups, sessions
    and activity keep every number. Applied at every start when it changed, and each change
    recorded in `raw_events_retention` (the first time, with the TTL an older release set, as in
    effect since ever)."""
    # Added in seconds and capped at DateTime's last second (2106-02-07): `toDateTime(timestamp)
    # + toIntervalDay(days)` wraps around past it, so a retention meant as "for ever" (36500 days)
    # made every event newer than ~2006 expire at once. Written as ClickHouse prints it back in
    # engine_full, so an unchanged TTL is recognised.
    ttl = f"toDateTime(least(toUInt32(toDateTime(timestamp)) + {int(days) * 86400}, 4294967295), 'UTC')"
    engine = _table_fact(client, cluster, "events", "engine_full") or ""
    # Without the table (a schema as a release before migration 13 left it: tests make such
    # ones), nothing is recorded, as nothing was then.
    recorded = bool(client.command("EXISTS TABLE raw_events_retention"))
    found = _ttl_days(engine)  # None on a new table: nothing was deleted yet
    if recorded and found is not None and not client.query("SELECT count() FROM raw_events_retention").result_rows[0][0]:
        _record_retention(client, datetime(1970, 1, 1, tzinfo=timezone.utc), found)
    if f"TTL {ttl}" not in engine:
        # Existing parts are not rewritten now (no heavy mutation): merges apply the TTL to them.
        run = _runner(client, cluster, {"materialize_ttl_after_modify": 0})
        run(f"ALTER TABLE events MODIFY TTL {ttl}")
        run("ALTER TABLE events MODIFY SETTING ttl_only_drop_parts = 1")
        if recorded:
            _record_retention(client, datetime.now(timezone.utc), days)
        log.info("raw events are kept %d days", days)


def _ttl_days(engine: str) -> int | None:
    """The days of the TTL in `events`' engine_full, as this release writes it or as 7e0367d did."""
    if found := re.search(r"TTL toDateTime\(least\(toUInt32\(toDateTime\(timestamp\)\) \+ (\d+),", engine):
        return int(found.group(1)) // 86400
    if found := re.search(r"TTL toDateTime\(timestamp\) \+ toIntervalDay\((\d+)\)", engine):
        return int(found.group(1))
    return None


def _record_retention(client: Client, at: datetime, days: int) -> None:
    client.insert("raw_events_retention", [[at, days]], column_names=["changed_at", "days"])


def retention_history(client: Client) -> list[tuple[datetime, int]]:
    """(changed at, days) of every raw-event TTL the database has had, oldest first."""
    rows = client.query("SELECT changed_at, days FROM raw_events_retention ORDER BY changed_at").result_rows
    return [(at if at.tzinfo else at.replace(tzinfo=timezone.utc), days) for at, days in rows]


def applied_versions(client: Client, cluster: Cluster | None = None) -> set[int]:
    _runner(client, cluster)(_LEDGER)
    return recorded_versions(client)


def recorded_versions(client: Client) -> set[int]:
    """The migrations recorded as applied, read only (readiness probes ask this every few seconds).
    A version recorded only under a SUPERSEDED name is not applied."""
    rows = client.query("SELECT DISTINCT version, name FROM schema_migrations").result_rows
    return {version for version, name in rows if (version, name) not in SUPERSEDED}


def migrate(client: Client, cluster: Cluster | None = None, unrecorded: set[int] = frozenset()) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied now. Those in
    `unrecorded` are left for the caller to `record` once its own work for them is done."""
    done = applied_versions(client, cluster)
    run = _runner(client, cluster)
    applied = []
    for version, _name, statements in MIGRATIONS:
        if version in done:
            continue
        for step in statements:
            step(client, run) if callable(step) else run(step)
        if version not in unrecorded:
            record(client, [version])
        applied.append(version)
    return applied


def record(client: Client, versions: list[int]) -> None:
    names = {version: name for version, name, _ in MIGRATIONS}
    client.insert("schema_migrations", [[version, names[version]] for version in versions],
                  column_names=["version", "name"])
    for version in versions:
        log.info("applied migration %d: %s", version, names[version])


def cluster_ddl(cluster: Cluster) -> list[str]:
    """Every statement a fresh cluster gets (for review and tests; `migrate` runs the same)."""
    out = cluster.statements(_LEDGER)
    for _version, _name, statements in MIGRATIONS:
        for step in statements:
            # Of the callables, the rewrites (8, 10) run DDL on a cluster (listed in their `ddl`);
            # the others adapt old single-server schemas only.
            for statement in getattr(step, "ddl", []) if callable(step) else [step]:
                out += cluster.statements(statement)
    return out
