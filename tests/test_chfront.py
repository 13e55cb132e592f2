"""Round-trips through tests.chfront with clickhouse-connect's HTTP client."""

import datetime as dt
import subprocess
import sys
import time
import uuid
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

REPO = Path(__file__).resolve().parents[1]

# A second process: each writer inserts batches of rows tagged with its name.
WRITER = """
import sys, clickhouse_connect
port, tag = int(sys.argv[1]), sys.argv[2]
client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=False)
for batch in range(20):
    client.insert("writes", [[tag, batch * 500 + i] for i in range(500)], column_names=["tag", "n"])
"""


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    base = tmp_path_factory.mktemp("chfront")
    ready = base / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chfront", "--path", str(base / "data"), "--port", "0",
         "--ready-file", str(ready)],
        cwd=REPO, stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():  # the front writes the file once it listens
            assert proc.poll() is None, "chfront exited before listening"
            assert time.monotonic() < deadline, "chfront did not become ready"
            time.sleep(0.01)
        yield int(ready.read_text())
    finally:
        proc.terminate()
    assert proc.wait(timeout=10) == 0  # SIGTERM is a clean shutdown


@pytest.fixture
def client(port):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=False)
    yield client
    client.close()


def test_handshake_and_ping(client):
    assert client.server_version == client.command("SELECT version()")
    assert client.ping()
    assert client.command("SELECT 1") == 1
    assert client.command("SELECT 1 WHERE 0") == ""  # empty result set, not a DDL summary


def test_insert_and_read_back_many_types(client):
    client.command("""
        CREATE TABLE events (
            site String, n UInt64, ts DateTime64(3, 'UTC'), id UUID, props Map(String, String),
            kind LowCardinality(String), ref Nullable(String), cc FixedString(2), tags Array(String)
        ) ENGINE = MergeTree ORDER BY (site, n)""")
    start = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    rows = [
        [f"site{i % 3}", i, start + dt.timedelta(milliseconds=i), uuid.UUID(int=i),
         {"path": f"/p/{i}", "q": "x"}, ("view", "click")[i % 2], None if i % 2 else f"r{i}",
         b"SE", [f"t{i}", "all"]]
        for i in range(10_000)
    ]
    columns = ["site", "n", "ts", "id", "props", "kind", "ref", "cc", "tags"]
    # Columns in reverse table order: the insert must follow the column list, not the table.
    summary = client.insert("events", [r[::-1] for r in rows], column_names=columns[::-1])
    assert summary.written_rows == 10_000

    assert client.command("SELECT count() FROM events") == 10_000
    assert client.query(
        "SELECT sum(n), uniqExact(id), countIf(ref IS NULL), countIf(kind = 'click') FROM events"
    ).result_rows == [(sum(range(10_000)), 10_000, 5_000, 5_000)]
    row = client.query("SELECT * FROM events WHERE n = 1234").result_rows[0]
    assert row[0] == "site1" and row[1] == 1234
    assert row[2].replace(tzinfo=dt.timezone.utc) == start + dt.timedelta(milliseconds=1234)
    assert row[3:] == (uuid.UUID(int=1234), {"path": "/p/1234", "q": "x"}, "view", "r1234", b"SE",
                       ["t1234", "all"])


def test_query_parameters(client):
    client.command("CREATE TABLE hits (site String) ENGINE = MergeTree ORDER BY site")
    odd = "o'k\t\\ \"x\""  # quotes, a tab and a backslash survive server-side binding
    client.insert("hits", [["a.se"], ["a.se"], ["b.se"], [odd]], column_names=["site"])
    server_side = "SELECT count() FROM hits WHERE site = {site:String}"
    assert client.query(server_side, parameters={"site": "a.se"}).result_rows == [(2,)]
    assert client.query(server_side, parameters={"site": odd}).result_rows == [(1,)]
    client_side = "SELECT count() FROM hits WHERE site = %(site)s"
    assert client.query(client_side, parameters={"site": "b.se"}).result_rows == [(1,)]
    # A long value makes clickhouse-connect send the query as multipart form data.
    long_value = "x" * 100_000
    assert client.query("SELECT length({v:String})", parameters={"v": long_value}).result_rows == [
        (100_000,)]


def test_errors_carry_engine_message_and_code(client):
    with pytest.raises(DatabaseError, match="Syntax error") as err:
        client.query("SELEC 1")
    assert err.value.code == 62
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        client.command("SELECT * FROM no_such_table")
    with pytest.raises(DatabaseError, match="Multi-statements are not allowed"):
        client.command("SELECT 1; SELECT 2")


def test_insert_deduplication_token(client):
    client.command("""
        CREATE TABLE visits (k UInt64, v String) ENGINE = ReplacingMergeTree ORDER BY k
        SETTINGS non_replicated_deduplication_window = 100""")

    def insert(first, token=None):
        rows = [[k, "v"] for k in range(first, first + 10)]
        settings = {"insert_deduplication_token": token} if token else None
        client.insert("visits", rows, column_names=["k", "v"], settings=settings)

    insert(0, "t1")
    insert(100, "t1")  # other rows, same token: dropped because of the token alone
    assert client.command("SELECT count() FROM visits") == 10
    insert(10, "t2")
    insert(20)  # the token was per-request: had it stuck to the session, this would be dropped
    assert client.command("SELECT count() FROM visits") == 30


def test_session_state_and_per_query_settings(client):
    def block_size(**settings):
        return client.command("SELECT getSetting('max_block_size')", settings=settings or None)

    client.command("SET max_block_size = 777")
    assert block_size() == 777
    assert block_size(max_block_size=1234) == 1234  # a URL setting applies to that query only
    assert block_size() == 777
    client.command("CREATE TEMPORARY TABLE scratch (x UInt8)")
    client.command("INSERT INTO scratch VALUES (1), (2)")
    assert client.command("SELECT sum(x) FROM scratch") == 3


def test_compressed_requests(port):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=True)
    client.command("CREATE TABLE packed (n UInt64) ENGINE = MergeTree ORDER BY n")
    client.insert("packed", [[i] for i in range(1000)], column_names=["n"])
    assert client.query("SELECT sum(n) FROM packed").result_rows == [(sum(range(1000)),)]


def test_sessionless_client(port):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=False,
                                           autogenerate_session_id=False)
    client.command("CREATE TABLE loose (n UInt64) ENGINE = MergeTree ORDER BY n")
    client.insert("loose", [[1], [2]], column_names=["n"])
    assert client.command("SELECT sum(n) FROM loose", settings={"max_threads": 1}) == 3


def test_concurrent_writer_processes(client, port):
    client.command("CREATE TABLE writes (tag String, n UInt64) ENGINE = MergeTree ORDER BY tag")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(port), tag]) for tag in "ab"]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    per_tag = client.query("SELECT tag, count() FROM writes GROUP BY tag ORDER BY tag").result_rows
    assert per_tag == [("a", 10_000), ("b", 10_000)]
