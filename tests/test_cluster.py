"""Cluster mode (issue 9, streams/migrations.py): the DDL a ClickHouse cluster gets — every table
replicated, created ON CLUSTER, behind a Distributed front sharded by site — is checked statement
by statement and parsed by the real engine (EXPLAIN AST); the embedded schema is unchanged; and
the SQL the stream core and the API issue names only the fronts, so it is the same in both modes."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from ingest.event import Event
from streams import migrations
from streams.core import StreamCore
from streams.migrations import Cluster, cluster_ddl
from tests.conftest import ROOT

CLUSTER = Cluster("bk_cluster")


@pytest.fixture
def embedded_tables(services) -> dict[str, tuple[str, str]]:
    """The embedded schema the session's engine was migrated to (one chDB data path per process):
    table -> (engine, create statement)."""
    assert migrations.migrate(services.client) == []  # all applied already
    return {name: (engine, ddl) for name, engine, ddl in services.client.query(
        "SELECT name, engine, create_table_query FROM system.tables WHERE database = currentDatabase()").result_rows}


def test_every_table_is_replicated_on_the_cluster_behind_a_distributed_front(embedded_tables):
    ddl = cluster_ddl(CLUSTER)
    creates: dict[str, tuple[str, str]] = {}  # table → (its create, the name it was created as)
    for statement in ddl:
        if m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+) ON CLUSTER bk_cluster ", statement):
            creates[m.group(1)] = (statement, m.group(1))
        elif m := re.match(r"RENAME TABLE (.*) ON CLUSTER", statement):  # a rewrite's swap (migrations 8, 10)
            for old, new in re.findall(r"(\w+) TO (\w+)", m.group(1)):
                creates[new] = creates.pop(old)
    for table, (engine, plain) in embedded_tables.items():
        (local, created_as), (front, _) = creates[f"{table}_local"], creates[table]
        assert f"ENGINE = Replicated{engine}('/clickhouse/tables/{{shard}}/{{database}}/{created_as}'," \
               " '{replica}'" in local, table
        # The engine's own arguments (version, is_deleted) survive.
        arguments = re.search(rf"ENGINE = {engine}\(([^)]*)\)", plain)
        if arguments and arguments.group(1):
            assert f"'{{replica}}', {arguments.group(1)})" in local, table
        shard = "cityHash64(site_id)" if re.search(r"\bsite_id\b", plain) else "rand()"
        assert front == (f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER bk_cluster AS {table}_local "
                         f"ENGINE = Distributed(bk_cluster, currentDatabase(), {table}_local, {shard})"), table
    assert all(" ON CLUSTER bk_cluster" in statement for statement in ddl)
    alters = [s for s in ddl if s.startswith("ALTER")]
    assert alters and all(re.match(r"ALTER TABLE \w+ ON CLUSTER", s) for s in alters)
    assert {"events", "sessions", "activity", "rollup_15m", "rollup_1d"} <= {
        t for t in embedded_tables if "cityHash64(site_id)" in creates[t][0]}


def test_the_cluster_ddl_parses_in_the_real_engine(services):
    for statement in cluster_ddl(CLUSTER):
        services.client.query(f"EXPLAIN AST {statement}")  # a syntax error raises
    for rewrite in (migrations._sort_rollup_15m_by_day, migrations._version_events):  # their copies back
        old = f"cluster('{CLUSTER.name}', currentDatabase(), {rewrite.old}_local)"
        services.client.query(f"EXPLAIN AST INSERT INTO {rewrite.table} {rewrite.rows.format(source=old)}")


def test_the_embedded_schema_has_no_cluster_parts(embedded_tables):
    for table, (engine, ddl) in embedded_tables.items():
        assert not engine.startswith(("Replicated", "Distributed")) and "ON CLUSTER" not in ddl, table
        assert not table.endswith("_local")


def test_mutations_and_retention_go_to_the_shards():
    assert CLUSTER.mutation("ALTER TABLE events DELETE WHERE site_id = {site:String}") == \
        "ALTER TABLE events_local ON CLUSTER bk_cluster DELETE WHERE site_id = {site:String}"
    # A stored retry that its original replaces (streams/events.py `delete`).
    assert CLUSTER.statements("DELETE FROM events WHERE (site_id, event_id) IN {rows:Array(Tuple(String, UUID))}") == \
        ["DELETE FROM events_local ON CLUSTER bk_cluster WHERE (site_id, event_id) IN {rows:Array(Tuple(String, UUID))}"]


def test_the_table_rewrites_swap_the_shards_tables():
    """Migrations 8 and 10 swap the local tables: each Distributed front names its local table, so
    the front reads the new one after the swap. The front `events` takes the new column itself."""
    swap = ("RENAME TABLE rollup_15m_by_day TO rollup_15m_swapping, rollup_15m TO rollup_15m_by_bucket,"
            " rollup_15m_swapping TO rollup_15m")
    assert migrations._sort_rollup_15m_by_day.swap == swap
    assert CLUSTER.statements(swap) == [
        "RENAME TABLE rollup_15m_by_day_local TO rollup_15m_swapping_local, rollup_15m_local TO"
        " rollup_15m_by_bucket_local, rollup_15m_swapping_local TO rollup_15m_local ON CLUSTER bk_cluster"]
    events = ["RENAME TABLE events_versioned_local TO events_swapping_local, events_local TO"
              " events_unversioned_local, events_swapping_local TO events_local ON CLUSTER bk_cluster"]
    assert CLUSTER.statements(migrations._version_events.swap) == events
    ddl = cluster_ddl(CLUSTER)
    assert [s for s in ddl if s.startswith("RENAME")] == CLUSTER.statements(swap) + events
    front = "ALTER TABLE events ON CLUSTER bk_cluster ADD COLUMN IF NOT EXISTS version UInt64"
    assert front in ddl and ddl.index(front) > ddl.index(events[0])


def test_migration_12_adds_the_session_events_on_the_shards_and_the_front_and_merges_the_shards():
    """The columns go to the shards' tables and the front; the merge after a month's fill runs on
    the shards' tables (a Distributed table has no parts)."""
    ddl = cluster_ddl(CLUSTER)
    for table in ("sessions_local", "sessions"):
        assert f"ALTER TABLE {table} ON CLUSTER bk_cluster {migrations._SESSION_EVENT_COLUMNS.split(' ', 3)[3]}" in ddl
    assert CLUSTER.statements("OPTIMIZE TABLE sessions PARTITION ID '202611' FINAL") == [
        "OPTIMIZE TABLE sessions_local ON CLUSTER bk_cluster PARTITION ID '202611' FINAL"]


def test_migration_12s_fill_reads_as_sql_in_the_real_engine(services):
    services.client.query(f"EXPLAIN AST {migrations._FILL_SESSION_EVENTS}", parameters={
        "month": datetime(2026, 11, 1, tzinfo=timezone.utc), "next": datetime(2026, 12, 1, tzinfo=timezone.utc),
        "until": datetime(2026, 12, 4, tzinfo=timezone.utc)})


def test_a_waited_for_site_purge_waits_for_the_shards_local_tables_on_every_replica(services):
    """On a cluster, `mutations(wait=True)` issues each DELETE to the shards, then asks every
    replica's `system.mutations` about the local tables until none is left to do."""
    sent: list[tuple[str, dict]] = []
    answers = iter([[(2, "")], [(0, "")]])  # two left to do, then none

    class Recording:
        def command(self, sql, parameters=None, settings=None):
            sent.append((sql, settings))

        def query(self, sql, parameters=None):
            sent.append((sql, parameters))
            if "engine_full" in sql:
                return SimpleNamespace(result_rows=[("Distributed('bk_cluster', 'default', 'events_local', rand())",)])
            return SimpleNamespace(result_rows=next(answers))

    migrations.mutations(Recording(), [f"ALTER TABLE {t} DELETE WHERE site_id = {{site:String}}" for t in ("events", "goals")],
                         {"site": "s"}, wait=True)
    deletes = [sql for sql, _ in sent if sql.startswith("ALTER")]
    assert deletes == [f"ALTER TABLE {t}_local ON CLUSTER bk_cluster DELETE WHERE site_id = {{site:String}}"
                       for t in ("events", "goals")]
    waits = [(sql, params) for sql, params in sent if "system.mutations" in sql]
    assert len(waits) == 2 and all("clusterAllReplicas(bk_cluster, system.mutations)" in sql
                                   and params == {"tables": ["events_local", "goals_local"]} for sql, params in waits)
    services.client.query(f"EXPLAIN AST {waits[0][0]}", parameters=waits[0][1])  # a syntax error raises


def test_the_stream_core_and_the_api_name_only_the_fronts(services, tmp_path):
    """Record every statement the stream core and the query API send while they work; each names
    tables a cluster has as Distributed fronts, never a local table."""
    fronts = {m.group(1) for s in cluster_ddl(CLUSTER)
              if (m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+) ON CLUSTER \w+ AS", s))}
    seen: list[str] = []
    client = services.client
    originals = {name: getattr(client, name) for name in ("query", "command", "insert")}

    def recording(name):
        def call(first, *args, **kwargs):
            seen.append(f"INSERT INTO {first}" if name == "insert" else str(first))
            return originals[name](first, *args, **kwargs)
        return call

    for name in originals:
        setattr(client, name, recording(name))
    try:
        import asyncio

        import httpx

        from besokskollen.app import make_handoff, server_app
        from tests.conftest import ADMIN_KEY

        site = f"cluster-{uuid.uuid4().hex[:8]}"
        at = datetime.now(timezone.utc) - timedelta(hours=1)
        StreamCore(client, 1800).process([Event(event_id=str(uuid.uuid4()), site_id=site, timestamp=at + timedelta(minutes=n),
                                                name="pageview", visitor_id=1, pathname=f"/{n}") for n in range(3)])

        async def api() -> None:
            handoff = make_handoff(services)
            await handoff.start()
            try:
                transport = httpx.ASGITransport(app=server_app(services, handoff), client=("127.0.0.1", 5000))
                async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                             headers={"authorization": f"Bearer {ADMIN_KEY}"}) as c:
                    created = (await c.post("/api/v1/sites", json={"domain": f"{site}.example"})).json()["data"]["id"]
                    for path in ("stats/overview", "stats/pages", "stats/referrers", "stats/countries", "goals",
                                 "popular/products", "trending/products"):
                        assert (await c.get(f"/api/v1/{path}", params={"site_id": created})).status_code == 200
                    assert (await c.delete(f"/api/v1/sites/{created}")).status_code == 204
            finally:
                await handoff.stop()

        asyncio.run(api())
    finally:
        for name, original in originals.items():
            setattr(client, name, original)

    named = set()
    for sql in seen:
        assert "_local" not in sql and "ON CLUSTER" not in sql, sql
        ctes = {m.group(1) for m in re.finditer(r"\b(\w+) AS \(", sql)}
        named |= {m.group(1) for m in re.finditer(r"\b(?:FROM|INTO|JOIN|TABLE)\s+(\w+)", sql)} - ctes
    named -= {"system", "numbers"}
    assert named and named <= fronts | {"tables", "columns", "time_zones"}, named - fronts
    assert {"events", "sessions", "activity", "rollup_15m"} <= named


def test_no_module_outside_migrations_knows_about_the_cluster():
    for path in [*ROOT.glob("streams/*.py"), *ROOT.glob("query_api/*.py"), *ROOT.glob("ingest/*.py")]:
        if path.name == "migrations.py":
            continue
        text = path.read_text()
        assert "_local" not in text and "ON CLUSTER" not in text, path
