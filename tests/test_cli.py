"""The command line as a user runs it: `up --demo` prints working curl lines, `migrate` is
idempotent, `keys create` prints keys the API accepts."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from besokskollen.http_protocol import HEAD_TIMEOUT_S
from tests.conftest import ROOT, free_port, process, wait_until

CLI = [sys.executable, "-m", "besokskollen"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def python_c(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`code` in a Python process of its own (a chDB folder opens in one process at a time)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def json_of(code: str, url: str):
    """What `code`, run on the ClickHouse at `url` by `python_c`, prints as JSON."""
    out = python_c(code, url)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def migrate(url: str, *args: str) -> subprocess.CompletedProcess:
    """`besokskollen migrate` on the ClickHouse at `url`."""
    return subprocess.run([*CLI, "migrate", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BK_CLICKHOUSE_URL": url})


@pytest.mark.slow
def test_up_demo_prints_curl_lines_that_answer(tmp_path):
    port = free_port()
    log = tmp_path / "up.log"
    with process([*CLI, "up", "--demo", "--data", str(tmp_path / "data"), "--port", str(port)], log,
                 ready_url=f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=180):
        lines = [line for line in log.read_text().splitlines() if line.startswith("curl ")]
        popular = next(line for line in lines if "/popular/products" in line)
        # Run the printed line as a user would paste it.
        argv = shlex.split(popular)
        header, url = argv[argv.index("-H") + 1], argv[-1]
        response = httpx.get(url, headers=[tuple(part.strip() for part in header.split(":", 1))])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["data"] and all(set(p) == {"product_id", "product_slug", "clicks"} for p in body["data"])
        assert [p["clicks"] for p in body["data"]] == sorted((p["clicks"] for p in body["data"]), reverse=True)
        assert set(body["meta"]) == {"period", "total_clicks", "confidence"}
        assert body["meta"]["total_clicks"] >= sum(p["clicks"] for p in body["data"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00Z", body["meta"]["period"]["from"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT23:59:59Z", body["meta"]["period"]["to"])

        # The printed tracking call is accepted (a browser user agent, so it is not dropped as a bot).
        argv = shlex.split(next(line for line in lines if "/api/event" in line))
        headers = [tuple(p.strip() for p in argv[i + 1].split(":", 1)) for i, a in enumerate(argv) if a == "-H"]
        tracked = httpx.post(argv[-1], content=argv[argv.index("-d") + 1], headers=headers)
        assert tracked.status_code == 202 and "x-dropped" not in tracked.headers, tracked.text

        argv = shlex.split(next(line for line in lines if "/trending/products" in line))
        trending = httpx.get(argv[-1], headers=[tuple(p.strip() for p in argv[argv.index("-H") + 1].split(":", 1))])
        assert trending.status_code == 200 and trending.json()["data"], trending.text  # hot products at the defaults

        overview_line = next(line for line in lines if "/stats/overview" in line)
        argv = shlex.split(overview_line)
        overview = httpx.get(argv[-1], headers=[tuple(p.strip() for p in argv[argv.index("-H") + 1].split(":", 1))]).json()
        daily = overview["data"]["daily"]
        assert len(daily) == 30 and sum(d["pageviews"] for d in daily) == overview["data"]["pageviews"] > 0
        assert 0 < overview["data"]["bounce_rate"] < 100


@pytest.mark.slow
def test_migrate_is_idempotent_and_keys_create_prints_working_keys(tmp_path):
    data = str(tmp_path / "data")
    first, second = run("migrate", "--data", data), run("migrate", "--data", data)
    assert first.returncode == 0 and "applied migrations: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]" in first.stdout, first.stderr
    assert second.returncode == 0 and "schema is up to date" in second.stdout, second.stderr

    created = run("keys", "create", "--account", "acme", "--data", data)
    assert created.returncode == 0 and "no data folder" not in created.stderr, created.stderr
    key = created.stdout.strip()
    # A key made in a folder that was not there is said to be (a mistyped --data).
    elsewhere = run("keys", "create", "--account", "acme", "--data", str(tmp_path / "typo"))
    assert elsewhere.returncode == 0 and re.fullmatch(r"bk_[A-Za-z0-9_-]{20,}", elsewhere.stdout.strip())
    assert f"there was no data folder at {tmp_path / 'typo'}; made a new, empty one" in elsewhere.stderr
    assert re.fullmatch(r"bk_[A-Za-z0-9_-]{20,}", key)
    unknown_site = run("keys", "create", "--account", "acme", "--site", "nope", "--data", data)
    assert unknown_site.returncode != 0 and "no site with id 'nope'" in unknown_site.stderr

    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    with process([*CLI, "up", "--data", data, "--port", str(port)], tmp_path / "up.log",
                 ready_url=f"{base}/openapi.json"):
        # A connection that never sends a request is closed (HEAD_TIMEOUT_S), not held forever.
        idle = socket.create_connection(("127.0.0.1", port), timeout=HEAD_TIMEOUT_S + 20)
        auth = {"authorization": f"Bearer {key}"}
        created_site = httpx.post(f"{base}/sites", json={"domain": "acme.example"}, headers=auth)
        assert created_site.status_code == 201
        listed = httpx.get(f"{base}/sites", headers=auth).json()
        assert listed == {"data": [created_site.json()["data"]], "meta": {"total": 1}}
        assert httpx.get(f"{base}/sites", headers={"authorization": "Bearer bk_wrong"}).status_code == 401
        with idle:
            assert idle.recv(1) == b""


_AT_SCHEMA_5 = """
import sys, uuid
from datetime import datetime, timedelta, timezone
from ingest.event import Event
from streams import replay, storage
from streams.core import StreamCore
client = storage.connect(sys.argv[1])
replay.upgrade(client, 1800, 400)
at = datetime.now(timezone.utc) - timedelta(hours=2)
StreamCore(client, 1800).process([Event(event_id=str(uuid.uuid4()), site_id="s", timestamp=at + timedelta(minutes=n),
                                        name="pageview", visitor_id=n % 3, pathname=f"/{n}") for n in range(9)])
# A database from before migration 6: raw events stored, derived rows not yet rebuilt for it.
for table in ("sessions", "activity", "rollup_15m", "rollup_1d"):
    client.command(f"TRUNCATE TABLE {table}")
client.command("ALTER TABLE schema_migrations DELETE WHERE version = 6", settings={"mutations_sync": 2})
"""

_KILLED_MID_REPLAY = """
import os, signal, sys
from streams import replay, storage
replay.replay = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill, a deploy
replay.upgrade(storage.connect(sys.argv[1]), 1800, 400)
"""


def test_an_upgrade_killed_mid_replay_replays_at_the_next_start(tmp_path):
    """Migration 6 asks for the derived tables to be rebuilt from the raw events. A migrate killed
    during that replay had already recorded 6, so the next start skipped the replay and the
    derived tables stayed as they were, for good."""
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_SCHEMA_5, url)
    assert seeded.returncode == 0, seeded.stderr
    killed = python_c(_KILLED_MID_REPLAY, url)
    assert killed.returncode == -9, killed.stderr
    again = migrate(url)
    assert again.returncode == 0 and "applied migrations: [6]" in again.stdout, again.stdout + again.stderr
    check = "import sys; from streams import storage; print(storage.connect(sys.argv[1]).query(" \
            "'SELECT count() FROM sessions FINAL').result_rows[0][0])"
    sessions = python_c(check, url)
    assert sessions.stdout.strip() == "3", sessions.stderr  # three visitors' sessions rebuilt


@pytest.mark.slow
def test_migrate_rebuild_fills_derived_tables_a_killed_replay_of_an_old_release_left_empty(tmp_path):
    """Releases up to 63e0d0d recorded a migration before its replay: one killed mid-replay left
    derived rows missing with nothing left to apply, so no start ever rebuilt them. `migrate
    --rebuild` rebuilds them from the raw events on request."""
    url = f"chdb://{tmp_path / 'ch'}"
    seed = _AT_SCHEMA_5.replace("client.command(\"ALTER TABLE schema_migrations DELETE", "# (\"ALTER TABLE")
    seeded = python_c(seed, url)
    assert seeded.returncode == 0, seeded.stderr
    check = ("import sys; from streams import storage; c = storage.connect(sys.argv[1]); print("
             "c.query('SELECT count() FROM sessions FINAL').result_rows[0][0], c.query(\"SELECT sum(pageviews)"
             " FROM rollup_1d FINAL WHERE kind = 'total'\").result_rows[0][0])")

    def derived() -> list[str]:
        out = python_c(check, url)
        return out.stdout.split()

    plain = migrate(url)
    assert "schema is up to date" in plain.stdout and derived() == ["0", "0"], plain.stdout + plain.stderr
    rebuilt = migrate(url, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt sessions, activity and rollups from 9 stored events" in rebuilt.stdout
    assert derived() == ["3", "9"]  # three visitors' sessions, nine pageviews
    again = migrate(url, "--rebuild")
    assert again.returncode == 0 and derived() == ["3", "9"], again.stderr  # idempotent


_PAST_THE_CUT = """
import json, sys, uuid
from datetime import date, datetime, timedelta, timezone
from ingest.event import Event
from query_api.periods import Period
from query_api.stats import overview
from streams import replay, storage
from streams.core import StreamCore
client = storage.connect(sys.argv[1])
if sys.argv[2] == "seed":
    replay.upgrade(client, 1800, 36500)
    # 30 visitors whose sessions cross into November (three pageviews 10 minutes apart), and one
    # on 2 November, all of whose events stay.
    at = datetime(2026, 10, 31, 23, 40, tzinfo=timezone.utc)
    events = [Event(site_id="cut", timestamp=at + timedelta(seconds=37 * i, minutes=10 * k), name="pageview",
                    visitor_id=i + 1, pathname=f"/p{k}", event_id=str(uuid.uuid4())) for i in range(30) for k in range(3)]
    events += [Event(site_id="cut", timestamp=datetime(2026, 11, 2, 12, k, tzinfo=timezone.utc), name="pageview",
                     visitor_id=99, pathname="/", event_id=str(uuid.uuid4())) for k in range(2)]
    StreamCore(client, 1800).process(events)
    # What the raw-event TTL does once October's rows expired (whole parts, ttl_only_drop_parts);
    # and the 2 November visitor's derived rows lost (what a rebuild is for).
    client.command("ALTER TABLE events DROP PARTITION '202610'")
    for table, where in (("sessions", "visitor_id = 99"), ("activity", "visitor_id = 99"),
                         ("rollup_15m", "bucket >= '2026-11-02'"), ("rollup_1d", "day >= '2026-11-02'")):
        client.command(f"ALTER TABLE {table} DELETE WHERE {where}", settings={"mutations_sync": 2})
numbers = {}
for first, last in ((date(2026, 10, 31), date(2026, 10, 31)), (date(2026, 11, 1), date(2026, 11, 1)),
                    (date(2026, 10, 31), date(2026, 11, 1)), (date(2026, 11, 2), date(2026, 11, 2))):
    o = overview(client, "cut", Period(first, last, "UTC"))
    numbers[f"{first}..{last}"] = [o["visitors"], o["sessions"], o["pageviews"], o["bounce_rate"]]
print(json.dumps(numbers))
"""


def test_migrate_rebuild_keeps_what_visitors_past_the_raw_event_ttl_counted(tmp_path):
    """The raw-event TTL drops whole month partitions: of a session crossing into the month kept,
    its later pageviews stay. A rebuild derived a second, later session from them beside the
    stored one: sessions and visitors counted twice on the first day kept and across the two.
    Those visitors keep their stored rows; one whose events are all there is rebuilt."""
    url = f"chdb://{tmp_path / 'ch'}"
    before = json_of(_PAST_THE_CUT.replace("sys.argv[2]", "'seed'"), url)
    assert before["2026-10-31..2026-11-01"][:3] == [30, 30, 90] and before["2026-11-02..2026-11-02"][:2] == [0, 0]
    rebuilt = migrate(url, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "from 45 stored events" in rebuilt.stdout and "of 30 visitors" in rebuilt.stdout, rebuilt.stdout
    after = json_of(_PAST_THE_CUT.replace("sys.argv[2]", "'read'"), url)
    assert after == {**before, "2026-11-02..2026-11-02": [1, 1, 2, 0]}


_AT_1A1FA3D = _AT_SCHEMA_5 + """
# Releases 1a1fa3d-9bccdc2 recorded a 6 of their own (an event-id bloom filter), never a 7.
client.command("ALTER TABLE schema_migrations DELETE WHERE version = 7", settings={"mutations_sync": 2})
client.insert("schema_migrations", [[6, "event-id bloom filter"]], column_names=["version", "name"])
client.command("ALTER TABLE events ADD INDEX IF NOT EXISTS event_id_bloom event_id TYPE bloom_filter(0.01) GRANULARITY 1")
"""


def test_a_database_whose_migration_6_was_the_bloom_filter_gets_the_countries_replay(tmp_path):
    """Releases 1a1fa3d-9bccdc2 shipped migration 6 as "event-id bloom filter"; the number was
    given to "countries by the period's events" later. Their databases had 6 recorded, so an
    upgrade skipped the replay and stats/countries answered [] for the stored events."""
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_1A1FA3D, url)
    assert seeded.returncode == 0, seeded.stderr
    first = migrate(url)
    assert first.returncode == 0 and "applied migrations: [6, 7]" in first.stdout, first.stdout + first.stderr
    second = migrate(url)
    assert second.returncode == 0 and "schema is up to date" in second.stdout, second.stdout + second.stderr
    check = ("import sys; from streams import storage; c = storage.connect(sys.argv[1]); print("
             "c.query('SELECT count() FROM sessions FINAL').result_rows[0][0], "
             "c.query(\"SELECT count() FROM system.data_skipping_indices WHERE table = 'events'\").result_rows[0][0])")
    out = python_c(check, url)
    assert out.stdout.split() == ["3", "0"], out.stdout + out.stderr  # rebuilt; the unused index dropped


_AT_SCHEMA_7 = """
import sys, uuid
from datetime import datetime, timedelta, timezone
from ingest.event import Event
from streams import migrations, replay, storage
from streams.core import StreamCore
client = storage.connect(sys.argv[1])
# The release before 8, with raw events and sessions as the stream core writes them now (10, 12).
migrations.MIGRATIONS = [m for m in migrations.MIGRATIONS if m[0] <= 7 or m[0] in (10, 12)]
replay.upgrade(client, 1800, 400)
at = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
StreamCore(client, 1800).process([
    Event(event_id=str(uuid.uuid4()), site_id=f"s{n % 2}", timestamp=at + timedelta(minutes=7 * n),
          name="pageview", visitor_id=n % 5, pathname=f"/{n % 4}") for n in range(400)])
"""

_ROLLUPS = """
import json, sys
from streams import storage
c = storage.connect(sys.argv[1])
print(json.dumps([
    c.query("SELECT sorting_key FROM system.tables WHERE database = currentDatabase() AND name = 'rollup_15m'").result_rows,
    c.query("SELECT site_id, kind, value, bucket, visitors, returning, events, pageviews, sessions, bounces, duration_ms,"
            " version, is_deleted FROM rollup_15m FINAL ORDER BY ALL").result_rows,
    c.query("SELECT name FROM system.tables WHERE database = currentDatabase() AND name LIKE 'rollup_15m%'").result_rows,
], default=str))
"""


_AT_SCHEMA_8_WITH_GOALS = """
import sys
from streams import migrations, replay, storage
from streams.goals import GoalRegistry
client = storage.connect(sys.argv[1])
migrations.MIGRATIONS = [m for m in migrations.MIGRATIONS if m[0] <= 8 or m[0] in (10, 12)]  # as above, before 9
replay.upgrade(client, 1800, 400)
goals = GoalRegistry(client)
goals.create("s1", "Kept", "event", match_event="purchase")
goals.delete(goals.create("s1", "Deleted", "event", match_event="signup"))
"""


def test_migration_9_takes_the_goals_so_far_as_backfilled(tmp_path):
    """Goals of earlier releases had both passes in their process (no record was kept): after the
    migration each existing goal is recorded, so no process backfills them all again."""
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_SCHEMA_8_WITH_GOALS, url)
    assert seeded.returncode == 0, seeded.stderr
    first = migrate(url)
    assert first.returncode == 0 and "applied migrations: [9, 11, 13, 14]" in first.stdout, first.stdout + first.stderr
    check = ("import sys; from streams import goals, storage; c = storage.connect(sys.argv[1]); print(c.query("
             "'SELECT g.name FROM goal_backfills b JOIN goals g USING (site_id, goal_id)').result_rows, "
             "goals.UNFINISHED_AFTER_S, end=' '); goals.UNFINISHED_AFTER_S = 0; print(goals.finish_backfills(c))")
    out = python_c(check, url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[('Kept',)]", "30", "0"]


_AT_SCHEMA_9 = """
import sys
from streams import migrations, replay, storage
client = storage.connect(sys.argv[1])
migrations.MIGRATIONS = [m for m in migrations.MIGRATIONS if m[0] <= 9]  # the release before 10
replay.upgrade(client, 1800, 400)
client.command("SYSTEM STOP MERGES events")
# Raw events as that release wrote them (no version): 300 events, then a second copy of one of them
# (a rewrite into another session) in a part of its own, not merged.
client.command("INSERT INTO events (event_id, site_id, timestamp, name, visitor_id, session_id, pathname)"
               " SELECT generateUUIDv4(number), 's', toDateTime64('2026-11-20 10:00:00', 3, 'UTC') + number * 60,"
               " 'pageview', number % 7, number % 7, concat('/', toString(number % 5)) FROM numbers(300)")
client.command("INSERT INTO events (event_id, site_id, timestamp, name, visitor_id, session_id, pathname)"
               " SELECT event_id, site_id, timestamp, name, visitor_id, 99, pathname FROM events"
               " WHERE session_id = 3 ORDER BY timestamp LIMIT 1")
"""

_RAW_EVENTS = """
import json, sys
from streams import migrations, storage
c = storage.connect(sys.argv[1])
print(json.dumps([
    migrations._table_fact(c, None, "events", "engine_full"),
    c.query("SELECT * EXCEPT version FROM events FINAL ORDER BY ALL").result_rows,
    c.query("SELECT count(), countIf(session_id = 99) FROM events FINAL").result_rows,
    c.query("SELECT name FROM system.tables WHERE database = currentDatabase() AND name LIKE 'events%'").result_rows,
], default=str))
"""


def test_migration_10_versions_the_raw_events_and_keeps_what_final_read(tmp_path):
    """A database of the release before migration 10: raw events without a version, the last
    inserted copy of an event winning. `migrate` copies them, deduplicated as FINAL read them,
    into the versioned table and swaps it in, with the retention; a copy written later with a
    version wins over them, and one with a lower version (a batch that read earlier) loses
    whatever its insert order."""
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_SCHEMA_9, url)
    assert seeded.returncode == 0, seeded.stderr
    engine, before, counts, tables = json_of(_RAW_EVENTS, url)
    assert engine.startswith("ReplacingMergeTree PARTITION") and counts == [[300, 1]] and tables == [["events"]]
    first = migrate(url)
    assert first.returncode == 0 and "applied migrations: [10, 11, 12, 13, 14]" in first.stdout, first.stdout + first.stderr
    engine, after, counts, tables = json_of(_RAW_EVENTS, url)
    assert engine.startswith("ReplacingMergeTree(version) PARTITION") and tables == [["events"]]
    assert "TTL toDateTime(least(" in engine and "ttl_only_drop_parts = 1" in engine  # retention kept
    assert after == before and counts == [[300, 1]]
    # What a rebuild's progress counts: the events, not the two copies the migration left unmerged.
    days = python_c("import sys; from streams import events, storage;"
                    " print(sum(n for _, n in events.stored_days(storage.connect(sys.argv[1]))))", url)
    assert days.stdout.strip() == "300", days.stdout + days.stderr
    rewrite = ("import sys; from streams import events, storage; c = storage.connect(sys.argv[1]);"
               " (stored,) = events.of_day(c, __import__('datetime').date(2026, 11, 20))[:1];"
               " events.write(c, [(stored, 1)], 2); events.write(c, [(stored, 2)], 1);"
               " print(c.query('SELECT session_id, version FROM events FINAL WHERE event_id = {i:UUID}',"
               " parameters={'i': stored.event_id}).result_rows)")
    out = python_c(rewrite, url)
    assert out.stdout.strip() == "[(1, 2)]", out.stdout + out.stderr
    second = migrate(url)
    assert second.returncode == 0 and "schema is up to date" in second.stdout, second.stdout + second.stderr


# A database as the stream core of the release before migration 12 left it: every session
# without its events. Written by today's core (the same rows, plus the new columns), then put
# back to that schema: the columns dropped and migration 12 taken off the ledger. The visitors
# return, some within one millisecond, and two events arrive late, one merging two sessions.
_BEFORE_SCHEMA_12 = """
import random, sys, uuid
from datetime import datetime, timedelta, timezone
from ingest.event import Event
from streams import replay, storage
from streams.core import StreamCore
client = storage.connect(sys.argv[1])
replay.upgrade(client, 1800, 400)
core, rng = StreamCore(client, 1800), random.Random(12)
start = datetime(2026, 10, 30, 23, 0, tzinfo=timezone.utc)  # sessions over a month's end
pages = ["/", "/produkt/a", "/produkt/b", "/kassa"]
def event(visitor, at, name="pageview"):
    return Event(event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)), site_id="s", timestamp=at, name=name, visitor_id=visitor,
                 pathname=rng.choice(pages), country="SE", channel="direct")
events = []
for i in range(400):
    at = start + timedelta(seconds=rng.randrange(3 * 86400))
    events.append(event(rng.randrange(40), at, rng.choice(["pageview"] * 3 + ["click", "signup"])))
    if i % 10 == 0:  # another event of the visitor in the same millisecond
        events.append(event(events[-1].visitor_id, at, "click"))
for i in range(0, len(events), 100):
    core.process(sorted(events[i:i + 100], key=lambda e: e.timestamp))
late = events[5]  # an earlier event of a visitor: moves a session's start, or joins two
core.process([event(late.visitor_id, late.timestamp - timedelta(minutes=20)),
              event(late.visitor_id, late.timestamp + timedelta(minutes=25))])
if "--drop" in sys.argv:
    client.command("ALTER TABLE sessions DROP COLUMN event_names, DROP COLUMN event_pages")
    client.command("ALTER TABLE schema_migrations DELETE WHERE version = 12 SETTINGS mutations_sync = 1")
"""

_SESSION_STEPS = """
import json, sys
from datetime import date
from query_api.funnels import funnel_stats
from query_api.periods import Period
from streams import storage
from streams.funnels import Funnel, Step
c = storage.connect(sys.argv[1])
funnel = Funnel("f", "s", "F", (Step("Start", "pageview", "/", "exact"), Step("Produkt", "pageview", "/produkt", "startswith"),
                                Step("Klick", "event", "click", "exact"), Step("Kassa", "pageview", "/kassa", "exact")), None)
print(json.dumps([
    c.query("SELECT session_id, event_names, event_pages FROM sessions FINAL WHERE NOT is_deleted ORDER BY session_id").result_rows,
    funnel_stats(c, funnel, Period(date(2026, 10, 30), date(2026, 11, 2), "UTC")),
    c.query("SELECT count() FROM sessions WHERE is_deleted").result_rows,
    c.query("SELECT count() = uniqExact(site_id, session_id) FROM sessions").result_rows,  # one row a session
], default=str))
"""


def test_migration_12_gives_the_stored_sessions_their_events_in_the_stream_cores_order(tmp_path):
    """A database of the release before migration 12: sessions without their events' names and
    pages. `migrate` fills them from the raw events exactly as the stream core writes them (the
    same sessions, events in the same order, events of one millisecond by id), over a month's
    end, with a merged session's old row still gone; funnels then count as for a database the
    core wrote with them, each session in one row again; a second `migrate` finds nothing to do."""
    written, stripped = f"chdb://{tmp_path / 'written'}", f"chdb://{tmp_path / 'stripped'}"
    for url, args in ((written, ()), (stripped, ("--drop",))):
        seeded = python_c(_BEFORE_SCHEMA_12, url, *args)
        assert seeded.returncode == 0, seeded.stderr
    expected_sessions, expected_funnel, tombstones, _ = json_of(_SESSION_STEPS, written)
    assert len(expected_sessions) > 50 and tombstones[0][0] >= 1
    assert any(len(names) > 3 for _, names, _ in expected_sessions)
    assert [s["sessions"] for s in expected_funnel["steps"]][1] > 0
    first = migrate(stripped)
    assert first.returncode == 0 and "applied migrations: [12]" in first.stdout, first.stdout + first.stderr
    sessions, funnel, _, merged = json_of(_SESSION_STEPS, stripped)
    assert sessions == expected_sessions
    assert funnel == expected_funnel
    assert merged == [[True]]  # filled, then merged: no session is read from two rows
    second = migrate(stripped)
    assert second.returncode == 0 and "schema is up to date" in second.stdout, second.stdout + second.stderr


def test_migration_8_sorts_rollup_15m_by_day_and_keeps_every_row(tmp_path):
    """A database of the release before migration 8: rollup_15m sorted by quarter hour, then value.
    `migrate` copies it into the order by day and swaps it in, every row kept as it was (version
    included); a second `migrate` finds nothing to do."""
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_SCHEMA_7, url)
    assert seeded.returncode == 0, seeded.stderr
    key, before, tables = json_of(_ROLLUPS, url)
    assert key == [["site_id, kind, bucket, value"]] and tables == [["rollup_15m"]] and len(before) > 100
    first = migrate(url)
    assert first.returncode == 0 and "applied migrations: [8, 9, 11, 13, 14]" in first.stdout, first.stdout + first.stderr
    key, after, tables = json_of(_ROLLUPS, url)
    assert key == [["site_id, kind, toDate(bucket), value, bucket"]] and tables == [["rollup_15m"]]
    assert after == before
    second = migrate(url)
    assert second.returncode == 0 and "schema is up to date" in second.stdout, second.stdout + second.stderr


# Two migrators of one database, as two processes starting at once would be. `race`: both copy,
# then both try the swap at the same moment. `late`: one checks, copies and reaches the swap; the
# other then migrates wholly (swap, copy back, drop) before the first one's swap runs.
_TWO_MIGRATORS = """
import json, sys, threading
from streams import migrations, storage
client = storage.connect(sys.argv[1])
rows = "SELECT * FROM rollup_15m FINAL ORDER BY ALL"
before = client.query(rows).result_rows
run = migrations._runner(client, None)
both_copied = threading.Barrier(2)
late_at_swap, early_done = threading.Event(), threading.Event()
def racing(statement):
    if statement == migrations._sort_rollup_15m_by_day.swap:
        both_copied.wait(timeout=60)
    run(statement)
def early(statement):
    if statement == migrations._sort_rollup_15m_by_day.swap:
        late_at_swap.wait(timeout=60)
    run(statement)
def late(statement):
    if statement == migrations._sort_rollup_15m_by_day.swap:
        late_at_swap.set()
        early_done.wait(timeout=60)
    run(statement)
failures = []
def migrate(runner, done=None):
    try:
        migrations._sort_rollup_15m_by_day(client, runner)
    except Exception as exc:
        failures.append(repr(exc))
    if done is not None:
        done.set()
runners = {"race": [(racing,), (racing,)], "late": [(early, early_done), (late,)]}[sys.argv[2]]
threads = [threading.Thread(target=migrate, args=args) for args in runners]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps([failures, client.query(rows).result_rows == before, len(before),
                  migrations._table_fact(client, None, "rollup_15m", "sorting_key"),
                  client.query("SELECT name FROM system.tables WHERE database = currentDatabase()"
                               " AND name LIKE 'rollup_15m%'").result_rows], default=str))
"""

_KILLED_AFTER_SWAP = """
import os, sys
from streams import migrations, storage
client = storage.connect(sys.argv[1])
command = client.command
def command_then_die(sql, *args, **kwargs):
    if sql == "INSERT INTO rollup_15m SELECT * FROM rollup_15m_by_bucket":
        # A batch the old table took after the first copy, then the process dies.
        command("INSERT INTO rollup_15m_by_bucket (site_id, kind, value, bucket, events, version) VALUES"
                " ('late', 'page', '/late', '2026-12-01 10:00:00', 7, 1)")
        os._exit(9)
    return command(sql, *args, **kwargs)
client.command = command_then_die
migrations.migrate(client)
"""


@pytest.mark.parametrize("how", ["race", "late"])
def test_two_processes_migrating_at_once_swap_once_and_keep_every_row(tmp_path, how):
    """Migration 8 run twice at once (two processes starting): both copy, both try the swap; the
    second RENAME fails on its first source, gone, which counts as done. One swap, every row, no
    table left over, also when the second swap runs after the first migrator dropped the old
    table (`late`). A RENAME of several pairs stops at the first that fails without undoing the
    others: the swap used to rename `rollup_15m` first, and then a late swap renamed the new table
    away and failed, leaving no `rollup_15m` (a flaky failure of `race` under load)."""
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_SCHEMA_7, url)
    assert seeded.returncode == 0, seeded.stderr
    raced = python_c(_TWO_MIGRATORS, url, how, timeout=180)
    assert raced.returncode == 0, raced.stderr
    failures, unchanged, rows, key, tables = json.loads(raced.stdout)
    assert failures == [] and unchanged and rows > 100
    assert key == "site_id, kind, toDate(bucket), value, bucket" and tables == [["rollup_15m"]]


def test_a_migrate_killed_after_the_swap_copies_the_old_table_back_at_the_next_start(tmp_path):
    url = f"chdb://{tmp_path / 'ch'}"
    seeded = python_c(_AT_SCHEMA_7, url)
    assert seeded.returncode == 0, seeded.stderr
    killed = python_c(_KILLED_AFTER_SWAP, url)
    assert killed.returncode == 9, killed.stderr
    again = migrate(url)
    assert again.returncode == 0 and "applied migrations: [8, 9, 11, 13, 14]" in again.stdout, again.stdout + again.stderr
    check = ("import sys; from streams import storage; c = storage.connect(sys.argv[1]); print("
             "c.query(\"SELECT sum(events) FROM rollup_15m FINAL WHERE site_id = 'late'\").result_rows[0][0], "
             "c.query(\"SELECT count() FROM system.tables WHERE database = currentDatabase()"
             " AND name LIKE 'rollup_15m%'\").result_rows[0][0])")
    out = python_c(check, url)
    assert out.stdout.split() == ["7", "1"], out.stdout + out.stderr  # the late row carried over; one table


def test_first_start_hands_out_a_key(tmp_path):
    """`keys create` cannot open the data folder while `up` runs, so a first start prints a key."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/api/v1"
    log = tmp_path / "up.log"
    with process([*CLI, "up", "--data", str(tmp_path / "data"), "--port", str(port)], log,
                 ready_url=f"{base}/openapi.json"):
        key = re.search(r"created a user-level API key \(shown only now\): (bk_\S+)", log.read_text()).group(1)
        assert httpx.get(f"{base}/sites", headers={"authorization": f"Bearer {key}"}).status_code == 200
    with process([*CLI, "up", "--data", str(tmp_path / "data"), "--port", str(port)], log,
                 ready_url=f"{base}/openapi.json"):
        assert "created a user-level API key" not in log.read_text()  # only the first start


def test_servers_leave_what_starting_made_out_of_full_garbage_collections(monkeypatch):
    """A full collection walks every tracked object holding the GIL; in `up` the event loop waits
    meanwhile. What starting made (~150,000 objects) lives as long as the process: frozen before
    serving, full collections no longer walk it."""
    import gc

    import uvicorn

    from besokskollen import cli

    frozen = []

    class Server:  # uvicorn's, up to the moment it would serve
        def __init__(self, config) -> None:
            pass

        def run(self, sockets) -> None:
            frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            cli._serve(object(), sock)
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 10_000


_LOADED = """
import sys
import besokskollen.cli
from besokskollen.app import ingest_server_app, open_services
from besokskollen.config import Settings
# Opening inserts (migrations, BK_ADMIN_KEY): clickhouse-connect's first insert loaded pandas.
open_services(Settings(clickhouse_url="chdb://" + sys.argv[1], kafka_bootstrap=None, admin_key=sys.argv[2]))
print(sorted(name for name in ("fastapi", "pandas", "uvicorn") if name in sys.modules))
"""


def test_ingest_and_one_shot_commands_load_neither_the_query_api_nor_pandas(tmp_path):
    """What a process does not use, it does not import: FastAPI (for the query API only),
    pandas (clickhouse-connect's, for DataFrames we never insert) and uvicorn (servers only) were
    ~1.5 s of CPU at every start of `ingest`, `keys`, `import`, `copy`: a restarted ingest took
    that much longer to take beacons again."""
    loaded = subprocess.run([sys.executable, "-c", _LOADED, str(tmp_path / "data"), "bk_test_admin_key_0123456789"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


@pytest.mark.slow
def test_up_stopped_by_sigterm_drains_and_exits_0(tmp_path):
    """uvicorn raises the SIGTERM it shut down for again once it is done: `up` died of it (exit
    status 143) after a complete, graceful stop, which systemd, Docker and Kubernetes report as a
    failure. The stop still drains what was answered 202 first."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    env = {"BK_ADMIN_KEY": "bk_test_admin_key_0123456789"}
    auth = {"authorization": f"Bearer {env['BK_ADMIN_KEY']}"}
    with process([*CLI, "up", "--data", str(tmp_path / "data"), "--port", str(port)], log, env,
                 ready_url=f"{base}/api/v1/openapi.json") as up:
        site = httpx.post(f"{base}/api/v1/sites", json={"domain": "stopped.example"}, headers=auth).json()["data"]["id"]
        event = {"site_id": site, "name": "pageview", "url": "https://stopped.example/"}
        browser = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0"}
        assert httpx.post(f"{base}/api/event", json=event, headers=browser).status_code == 202
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, log.read_text()[-3000:]
    assert "Application shutdown complete" in log.read_text()
    assert "journaled before the last stop" not in log.read_text()
    with process([*CLI, "up", "--data", str(tmp_path / "data"), "--port", str(port)], log, env,
                 ready_url=f"{base}/api/v1/openapi.json") as again:
        assert "journaled before the last stop" not in log.read_text()  # the stop wrote it
        overview = httpx.get(f"{base}/api/v1/stats/overview", params={"site_id": site}, headers=auth).json()
        assert overview["data"]["pageviews"] == 1
        again.send_signal(signal.SIGINT)  # Ctrl+C is a stop too: it exited 130, "interrupted"
        assert again.wait(60) == 0, log.read_text()[-3000:]
    assert "interrupted" not in log.read_text()


@pytest.mark.slow
def test_servers_wait_for_clickhouse_and_one_shot_commands_say_where_it_failed(tmp_path):
    """An `api` started before ClickHouse answers waits for it (and says so) instead of exiting
    with a traceback; `migrate` and `copy` exit 2 naming the server (never its password)."""
    ch_port, api_port = free_port(), free_port()
    env = {"BK_CLICKHOUSE_URL": f"http://bk:secret@127.0.0.1:{ch_port}/?compress=false"}
    failed = subprocess.run([*CLI, "migrate"], capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (
        f"besokskollen migrate: ClickHouse does not answer at http://127.0.0.1:{ch_port}: Connection refused")
    assert "secret" not in failed.stderr and "Traceback" not in failed.stderr
    (tmp_path / "up").mkdir()  # a data folder (empty) to copy from
    copy = subprocess.run([*CLI, "copy", "--data", str(tmp_path / "up"), "--to", env["BK_CLICKHOUSE_URL"]],
                          capture_output=True, text=True, timeout=120)
    assert copy.returncode == 2  # the target is named, not the source
    assert copy.stderr.strip().splitlines()[-1] == (
        f"besokskollen copy: ClickHouse does not answer at http://127.0.0.1:{ch_port}: Connection refused")

    log = tmp_path / "api.log"
    with process([*CLI, "api", "--port", str(api_port)], log, env) as api:
        wait_until(lambda: "ClickHouse does not answer" in log.read_text(), 30, "the api to say it waits")
        assert api.poll() is None
        with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp_path / "ch"), "--port", str(ch_port)],
                     tmp_path / "chfront.log", ready_url=f"http://127.0.0.1:{ch_port}/ping"):
            wait_until(lambda: _answers(f"http://127.0.0.1:{api_port}/api/v1/openapi.json"), 60, "the api to start")
    assert "secret" not in log.read_text()


def test_a_second_server_on_one_spool_directory_stops_with_one_line(clickhouse_http, tmp_path):
    """Two `up`s sharing a ClickHouse server and BK_SPOOL_DIR (the embedded journal): the second
    exits 2 naming the directory, the first keeps serving."""
    env = {"BK_CLICKHOUSE_URL": clickhouse_http, "BK_SPOOL_DIR": str(tmp_path / "spool")}
    port = free_port()
    with process([*CLI, "up", "--port", str(port)], tmp_path / "up.log", env,
                 ready_url=f"http://127.0.0.1:{port}/api/v1/openapi.json") as first:
        second = subprocess.run([*CLI, "up", "--port", str(free_port())], capture_output=True, text=True,
                                env={**os.environ, **env}, timeout=60)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"besokskollen up: spool directory {tmp_path / 'spool'} is in use by another process;"
            " give each ingest process its own BK_SPOOL_DIR")
        assert "Traceback" not in second.stderr
        assert first.poll() is None and _answers(f"http://127.0.0.1:{port}/api/v1/openapi.json")


def test_two_api_processes_racing_for_a_domain_give_it_to_one_account(clickhouse_http, tmp_path):
    """Two `api` processes on one ClickHouse, each sent creates of one domain from two accounts at
    once: every 201 is one account's, the other's all get 409 (each process's lock alone let both
    win), and both processes serve the site to its account only."""
    import asyncio

    from query_api.keys import KeyStore
    from streams import migrations, storage

    client = storage.connect(clickhouse_http)
    migrations.migrate(client)  # as the processes will at start; the keys go first
    store = KeyStore(client)
    keys = {account: store.create(account) for account in (f"race-{uuid.uuid4().hex[:6]}", f"race-{uuid.uuid4().hex[:6]}")}
    domain = f"race-{uuid.uuid4().hex[:8]}.example"
    ports = [free_port(), free_port()]
    env = {"BK_CLICKHOUSE_URL": clickhouse_http}
    with process([*CLI, "api", "--port", str(ports[0])], tmp_path / "api0.log", env,
                 ready_url=f"http://127.0.0.1:{ports[0]}/api/v1/openapi.json"), \
         process([*CLI, "api", "--port", str(ports[1])], tmp_path / "api1.log", env,
                 ready_url=f"http://127.0.0.1:{ports[1]}/api/v1/openapi.json"):
        async def race() -> list[tuple[str, int]]:
            async with httpx.AsyncClient(timeout=30) as client:
                sent = [(account, port) for account in keys for port in ports for _ in range(2)]
                answers = await asyncio.gather(*(client.post(
                    f"http://127.0.0.1:{port}/api/v1/sites", json={"domain": domain},
                    headers={"authorization": f"Bearer {keys[account]}"}) for account, port in sent))
                return [(account, r.status_code, r.json().get("data", {}).get("id"))
                        for (account, _), r in zip(sent, answers)]

        answered = asyncio.run(race())
        # The owner's later creates may find its site already (409) or pass as repeats (201), and
        # a repeat is the same site (it was a `-2` site of the same domain).
        owners = {account for account, status, _ in answered if status == 201}
        assert len(owners) == 1 and {status for _, status, _ in answered} == {201, 409}, answered
        (owner,) = owners
        site = domain.replace(".", "-")
        assert {site_id for _, status, site_id in answered if status == 201} == {site}, answered
        for port in ports:
            for account, key in keys.items():
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/sites/{site}", headers={"authorization": f"Bearer {key}"})
                assert r.status_code == (200 if account == owner else 403), (port, account, r.text)
            listed = httpx.get(f"http://127.0.0.1:{port}/api/v1/sites", headers={"authorization": f"Bearer {keys[owner]}"})
            assert [s["id"] for s in listed.json()["data"] if s["domain"] == domain] == [site], listed.text


def test_site_changes_across_two_api_processes_act_on_the_site_as_stored(clickhouse_http, tmp_path):
    """An audit with three `api` processes on one ClickHouse: one account's creates of a domain
    sent to several at once each answered 201 with its own time zone, of which one was stored;
    a domain deleted through one process and created again through another got 409 there (its
    cache still had the site); and the old owner's key, through a process whose cache still had
    the deleted site, put a goal on the site another account had just created again."""
    import asyncio

    from query_api.keys import KeyStore
    from streams import migrations, storage

    client = storage.connect(clickhouse_http)
    migrations.migrate(client)
    store = KeyStore(client)
    old, new = store.create(f"old-{uuid.uuid4().hex[:6]}"), store.create(f"new-{uuid.uuid4().hex[:6]}")
    domain = f"change-{uuid.uuid4().hex[:8]}.example"
    site = domain.replace(".", "-")
    ports = [free_port(), free_port()]
    env = {"BK_CLICKHOUSE_URL": clickhouse_http}
    api = [f"http://127.0.0.1:{port}/api/v1" for port in ports]
    with process([*CLI, "api", "--port", str(ports[0])], tmp_path / "api0.log", env,
                 ready_url=f"{api[0]}/openapi.json"), \
         process([*CLI, "api", "--port", str(ports[1])], tmp_path / "api1.log", env,
                 ready_url=f"{api[1]}/openapi.json"):
        def auth(key: str) -> dict:
            return {"authorization": f"Bearer {key}"}

        async def creates() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as c:
                return await asyncio.gather(*(c.post(f"{api[n % 2]}/sites", headers=auth(old), json={
                    "domain": domain, "timezone": tz}) for n, tz in enumerate(["UTC", "Asia/Kolkata", "Europe/Stockholm",
                                                                              "America/Adak"])))

        answered = asyncio.run(creates())
        stored = httpx.get(f"{api[0]}/sites/{site}", headers=auth(old)).json()["data"]
        made = [r.json()["data"] for r in answered if r.status_code == 201]
        same = [k for k in stored if k not in ("has_data", "verified")]  # the site as stored, not its traffic
        assert made and all({k: body[k] for k in same} == {k: stored[k] for k in same} for body in made), (made, stored)
        assert {r.status_code for r in answered} <= {201, 409}, [r.text for r in answered]

        # Every process has the site cached; it is deleted through one, created again through the other.
        for base in api:
            assert httpx.get(f"{base}/stats/overview", params={"site_id": site}, headers=auth(old)).status_code == 200
        assert httpx.delete(f"{api[0]}/sites/{site}", headers=auth(old)).status_code == 204
        goal = {"site_id": site, "name": "planted", "event_type": "event", "match_event": "x"}
        assert httpx.post(f"{api[1]}/goals", json=goal, headers=auth(old)).status_code == 404  # deleted: nothing to add to
        again = httpx.post(f"{api[1]}/sites", json={"domain": domain}, headers=auth(new))
        assert again.status_code == 201, again.text
        planted = httpx.post(f"{api[0]}/goals", json=goal, headers=auth(old))
        assert planted.status_code == 403, planted.text
        assert httpx.get(f"{api[1]}/goals", params={"site_id": site}, headers=auth(new)).json()["data"] == []


def test_a_server_whose_port_is_taken_stops_with_one_line(tmp_path):

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*CLI, "up", "--data", str(tmp_path / "data"), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"besokskollen up: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("variable, value", [("BK_SESSION_TIMEOUT_S", "abc"), ("BK_SESSION_TIMEOUT_S", "-5"),
                                             ("BK_TRUSTED_PROXIES", "garbage"), ("BK_CLICKHOUSE_URL", "chdb://relative"),
                                             ("BK_CLICKHOUSE_URL", "http://127.0.0.1:abc/"), ("BK_PORT", "70000"),
                                             ("BK_KAFKA_BOOTSTRAP", "kafka:abc"), ("BK_KAFKA_BOOTSTRAP", "kafka:9092,k2:0"),
                                             ("BK_REDIS_URL", "localhost:6379"), ("BK_RAW_EVENTS_TTL_DAYS", "6"),
                                             ("BK_RAW_EVENTS_TTL_DAYS", "1000000"), ("BK_KAFKA_TOPIC", "bad topic!"),
                                             ("BK_KAFKA_TOPIC", ".."), ("BK_CLICKHOUSE_CLUSTER", "with-chdb"),
                                             # each of these started a command that then failed with a traceback
                                             ("BK_HISTORIC_SALT_DAYS", "1000000"), ("BK_KAFKA_PARTITIONS", "3000000000"),
                                             ("BK_KAFKA_REPLICATION_FACTOR", "40000"), ("BK_REDIS_URL", "redis://h:abc/0"),
                                             ("BK_REDIS_URL", "redis://h:99999/0"), ("BK_KAFKA_BOOTSTRAP", ","),
                                             ("BK_KAFKA_BOOTSTRAP", "a b:9092"), ("BK_ADMIN_KEY", "bk_aaaaaaaaaaaaaaaa"),
                                             ("BK_ADMIN_KEY", "bk_0101010101010101"),
                                             # lax numbers, taken as such before
                                             ("BK_RAW_EVENTS_TTL_DAYS", "7.0"), ("BK_SESSION_TIMEOUT_S", "1_800"),
                                             ("BK_PORT", "+8080")])
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path, variable, value):
    data = [] if variable == "BK_CLICKHOUSE_URL" else ["--data", str(tmp_path / "d")]  # --data would override it
    result = subprocess.run([*CLI, "migrate", *data], capture_output=True, text=True, timeout=60,
                            env={**os.environ, variable: value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"besokskollen migrate: {variable}: ")
    assert "Traceback" not in result.stderr


def test_a_bad_clickhouse_url_is_shown_without_its_password():
    result = subprocess.run([*CLI, "migrate"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "BK_CLICKHOUSE_URL": "http://bk:s3cret-pw@127.0.0.1:abc/db"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("besokskollen migrate: BK_CLICKHOUSE_URL: ")
    assert "127.0.0.1:abc" in result.stderr and "s3cret-pw" not in result.stderr


@pytest.mark.parametrize("placeholder", ["bk_change_me", "bk_change_me_0000000000000000000000",
                                         "bk_change_me_1234567890abcdef"])
def test_the_admin_key_placeholder_of_the_deploy_files_is_refused(tmp_path, placeholder):
    """deploy/compose.yml and deploy/k8s/config.yaml publish a placeholder key: a deployment that
    kept it would give every reader of this repository a user-level key."""
    result = subprocess.run([*CLI, "migrate", "--data", str(tmp_path / "d")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "BK_ADMIN_KEY": placeholder})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("besokskollen migrate: BK_ADMIN_KEY: ")
    assert placeholder not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_one_shot_commands_on_a_data_folder_up_holds_stop_with_one_line(tmp_path):
    port, data = free_port(), str(tmp_path / "data")
    with process([*CLI, "up", "--data", data, "--port", str(port)], tmp_path / "up.log",
                 ready_url=f"http://127.0.0.1:{port}/api/v1/openapi.json"):
        keys = run("keys", "create", "--account", "x", "--data", data)
        second = run("up", "--data", data, "--port", str(free_port()))
    assert keys.returncode == 2 and "Traceback" not in keys.stderr
    assert keys.stderr.strip().splitlines()[-1].startswith(f"besokskollen keys: the data folder {data} is in use")
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == f"besokskollen up: the data folder {data} is in use by another `up`"


def test_copy_from_a_data_folder_that_does_not_exist_stops(tmp_path):
    copy = run("copy", "--data", str(tmp_path / "typo"), "--to", "http://127.0.0.1:1")
    assert copy.returncode == 2 and copy.stderr.strip().splitlines()[-1] == (
        f"besokskollen copy: no data folder at {tmp_path / 'typo'}")
    assert not (tmp_path / "typo").exists()


def test_copy_refuses_a_data_folder_whose_journal_holds_unwritten_events(tmp_path):
    from ingest.spool import Spool

    journal = Spool(tmp_path / "data" / "spool", 1 << 20)
    journal.open()
    journal.append(b"k", b"{}")  # as a kill -9 of `up` can leave it
    journal.close()
    copy = subprocess.run([*CLI, "copy", "--data", str(tmp_path / "data"), "--to", "http://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert copy.returncode == 2
    assert copy.stderr.strip().splitlines()[-1] == (
        f"besokskollen copy: {tmp_path / 'data' / 'spool'} holds 1 event not written yet;"
        " start and stop `up` on this data folder once to write them")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("command", ["up", "ingest", "api", "worker"])
def test_a_port_flag_out_of_range_is_refused_as_bk_port_is(command, tmp_path):
    """`--port 70000` used to listen on 70000 mod 65536 = 4464 while logging :70000, and
    `--port 0` fell back to BK_PORT or the default; BK_PORT itself is checked (1–65535)."""
    for port in ("70000", "0", "http"):
        # A server that starts instead would run until the timeout.
        result = subprocess.run([*CLI, command, "--data", str(tmp_path / "d"), "--port", port], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 2, (port, result.stderr)
        assert result.stderr.strip().splitlines()[-1] == (
            f"besokskollen {command}: error: argument --port: {port!r} is not a port (1–65535)")


def test_one_shot_commands_that_find_no_server_say_so_in_one_line(tmp_path):
    """README: `status` exits 2 with one line when Kafka does not answer, and one-shot commands
    exit 2 with `ClickHouse does not answer at …`. The client libraries' own log lines (aiokafka's
    "Unable connect", urllib3's retry, clickhouse-connect's "Unexpected Http Driver Exception")
    came first, so the one line was three; and `import` without --url said it its own way, with
    the whole BK_CLICKHOUSE_URL, password included."""
    kafka_port, ch_port = free_port(), free_port()
    env = {**os.environ, "BK_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
           "BK_CLICKHOUSE_URL": f"http://bk:s3cret@127.0.0.1:{ch_port}/default"}
    status = subprocess.run([*CLI, "status"], capture_output=True, text=True, env=env, timeout=60)
    assert status.returncode == 2, status.stderr
    assert status.stderr.strip().splitlines() == [
        f"besokskollen status: Kafka does not answer at 127.0.0.1:{kafka_port}: KafkaConnectionError:"
        f" Unable to bootstrap from [('127.0.0.1', {kafka_port}, <AddressFamily.AF_INET: 2>)]"]
    events = tmp_path / "events.ndjson"
    events.write_text('{"name": "pageview", "url": "https://example.com/", "timestamp": "2026-01-01T00:00:00Z",'
                      ' "ip": "81.2.69.160", "user_agent": "Mozilla/5.0"}\n')
    for command in (["migrate"], ["keys", "create", "--account", "a"], ["import", str(events), "--site", "example-com"]):
        result = subprocess.run([*CLI, *command], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "s3cret" not in result.stderr
        assert result.stderr.strip().splitlines() == [
            f"besokskollen {command[0]}: ClickHouse does not answer at http://127.0.0.1:{ch_port}: Connection refused"]


@pytest.mark.parametrize("command", ["copy", "migrate"])
def test_ctrl_c_ends_a_one_shot_command_in_one_line(command, monkeypatch, capsys, tmp_path):
    """A copy stopped with Ctrl-C ended in Python's KeyboardInterrupt traceback (the import said
    so in one line, exit 130)."""
    from besokskollen import cli

    def interrupted(args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command}", interrupted)
    argv = {"copy": ["copy", "--data", str(tmp_path), "--to", "http://127.0.0.1:1/db"], "migrate": ["migrate"]}
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv[command])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"besokskollen {command}: interrupted; running the same command again is safe"]


def test_an_admin_key_of_another_shape_is_refused_in_one_line(tmp_path):
    """`up` ended in a traceback (ValueError from the key store) on a key without `bk_`, and
    `migrate` took it silently; a short one would be a user-level key anyone could guess."""
    for key in ("abc", "bk_short", "bk_0123456789abcde f"):
        for command in (["migrate", "--data", str(tmp_path / "d")], ["up", "--data", str(tmp_path / "d"),
                                                                       "--port", str(free_port())]):
            result = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=60,
                                    env={**os.environ, "BK_ADMIN_KEY": key})
            assert result.returncode == 2, (key, result.stderr)
            assert result.stderr.strip().splitlines() == [
                f"besokskollen {command[0]}: BK_ADMIN_KEY: must be bk_ and at least 16 more letters, digits, '-' or '_'"
                " (such as bk_$(openssl rand -hex 24))"], key
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())  # refused before the folder was used
    empty = subprocess.run([*CLI, "migrate", "--data", str(tmp_path / "d")], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "BK_ADMIN_KEY": ""})
    assert empty.returncode == 0, empty.stderr  # empty is unset


def test_a_data_folder_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path):
    """Each of these ended in a traceback (FileExistsError, NotADirectoryError) with exit 1."""
    afile = tmp_path / "afile"
    afile.write_text("")
    events = tmp_path / "events.ndjson"
    events.write_text("{}\n")
    cases = [(["migrate", "--data", str(afile)], f"the data folder {afile} is a file"),
             (["up", "--data", str(afile), "--port", str(free_port())], f"the data folder {afile} is a file"),
             (["keys", "create", "--account", "a", "--data", str(afile / "d")],
              f"cannot use the data folder {afile / 'd'}: Not a directory ({afile / 'd'})"),
             (["up", "--data", str(afile / "d"), "--port", str(free_port())],
              f"cannot use the data folder {afile / 'd'}: Not a directory ("),
             (["import", str(events), "--site", "s", "--data", str(afile / "d" / "e")],
              f"cannot use the data folder {afile / 'd' / 'e'}: Not a directory ("),
             (["import", str(tmp_path / "missing.ndjson"), "--site", "s"], f"no such file: {tmp_path / 'missing.ndjson'}"),
             (["import", str(tmp_path), "--site", "s"], f"not a regular file: {tmp_path}"),
             # A mistyped folder: revoking there made an empty database, and said only "no such key".
             (["keys", "revoke", "bk_" + "x" * 20, "--data", str(tmp_path / "typo")], f"no data folder at {tmp_path / 'typo'}")]
    for command, message in cases:
        result = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.strip().startswith(f"besokskollen {command[0]}: {message}"), result.stderr


def test_commands_the_configuration_does_not_allow_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BK_KAFKA_BOOTSTRAP"}
    result = subprocess.run([*CLI, "status"], capture_output=True, text=True, timeout=60, env=env)
    assert (result.returncode, result.stderr.strip()) == (
        2, "besokskollen status: `status` reports on the distributed topology: set BK_KAFKA_BOOTSTRAP")
    result = subprocess.run([*CLI, "worker", "--data", str(tmp_path / "d"), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, env=env)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2, "besokskollen worker: the worker reads Kafka: set BK_KAFKA_BOOTSTRAP (without Kafka, `besokskollen up` runs"
           " the stream core)")


def test_a_spool_directory_that_cannot_be_made_or_used_is_one_line(tmp_path):
    """`up` and `ingest` ended in a traceback (FileExistsError, FileNotFoundError), exit 1, without
    naming the variable."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for command, extra in (("up", {}), ("ingest", {"BK_KAFKA_BOOTSTRAP": "127.0.0.1:1"})):
        for spool, error in ((afile, "File exists"), (afile / "spool", "Not a directory")):
            result = subprocess.run([*CLI, command, "--data", str(tmp_path / "d"), "--port", str(free_port())],
                                    capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **extra, "BK_SPOOL_DIR": str(spool)})
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip().splitlines()[-1].startswith(
                f"besokskollen {command}: BK_SPOOL_DIR: cannot use the spool directory {spool}: {error}"), result.stderr
            assert "Traceback" not in result.stderr


def test_a_database_or_cluster_clickhouse_does_not_have_is_one_line_naming_the_variable(clickhouse_http, tmp_path):
    """A typo in the URL's database, or a cluster the server lacks: a 50-line traceback, exit 1,
    from every command; the `api` server exited with it too. Waiting would not mend them."""
    server = clickhouse_http.split("/?")[0]
    nodb = {"BK_CLICKHOUSE_URL": f"{server}/nosuchdb?compress=false"}
    for command in (["migrate"], ["keys", "create", "--account", "a"], ["api", "--port", str(free_port())]):
        result = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=60, env={**os.environ, **nodb})
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"besokskollen {command[0]}: BK_CLICKHOUSE_URL: names a database that ClickHouse at {server} does not have"
            " (create it, or fix the URL's path): Database nosuchdb does not exist"), result.stderr
        assert "Traceback" not in result.stderr
    result = subprocess.run([*CLI, "migrate"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "BK_CLICKHOUSE_URL": clickhouse_http, "BK_CLICKHOUSE_CLUSTER": "nocluster"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"besokskollen migrate: BK_CLICKHOUSE_CLUSTER: ClickHouse at {server} has no such cluster"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_servers_stopped_while_they_start_exit_0_and_say_so(tmp_path):
    """A SIGTERM while a server waited for ClickHouse or Kafka (or migrated) killed it: exit 143,
    nothing logged, where a stop once it serves exits 0."""
    nothing = f"127.0.0.1:{free_port()}"
    cases = {"api": ({"BK_CLICKHOUSE_URL": f"http://{nothing}/"}, signal.SIGTERM),
             "worker": ({"BK_KAFKA_BOOTSTRAP": nothing, "BK_CLICKHOUSE_URL": f"chdb://{tmp_path / 'd'}"}, signal.SIGTERM),
             "ingest": ({"BK_KAFKA_BOOTSTRAP": nothing, "BK_CLICKHOUSE_URL": f"http://{nothing}/",
                         "BK_SPOOL_DIR": str(tmp_path / "spool")}, signal.SIGINT)}
    for command, (env, stop) in cases.items():
        log = tmp_path / f"{command}.log"
        with process([*CLI, command, "--port", str(free_port())], log, env) as server:
            wait_until(lambda: "waiting" in log.read_text(), 60, f"the {command} to wait")
            server.send_signal(stop)
            assert server.wait(30) == 0, log.read_text()[-3000:]
        assert f"stopped ({stop.name}) while starting" in log.read_text()


@pytest.mark.slow
def test_a_one_shot_command_gives_up_on_a_hung_clickhouse_in_seconds(tmp_path):
    """A ClickHouse that takes connections and never answers held `migrate` for clickhouse-connect's
    default read timeout, 300 s (a Kubernetes migrate Job 5 minutes), before its one line."""

    from streams.storage import HANDSHAKE_TIMEOUT_S

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        result = subprocess.run([*CLI, "migrate"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "BK_CLICKHOUSE_URL": url + "/"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"besokskollen migrate: ClickHouse does not answer at {url}:")
    # Not a speed assertion: what ended it is the handshake's timeout, not the 300 s default.
    assert f"read timeout={HANDSHAKE_TIMEOUT_S}" in result.stderr, result.stderr


def test_a_flag_replaces_its_variable_unread(tmp_path, monkeypatch):
    """`--port` with a bad BK_PORT refused to start, while `--data` with a bad BK_CLICKHOUSE_URL
    did: a flag replaces its variable, which is then not checked."""
    import argparse

    from besokskollen import cli

    monkeypatch.setenv("BK_PORT", "abc")
    monkeypatch.setenv("BK_HOST", "0.0.0.0")
    monkeypatch.setenv("BK_CLICKHOUSE_URL", "chdb://relative")
    args = argparse.Namespace(command="up", data=str(tmp_path), host="127.0.0.1", port=8099, default_port=8080)
    settings = cli._settings(args)
    assert cli._address(args, settings) == ("127.0.0.1", 8099)
    assert settings.clickhouse_url == f"chdb://{tmp_path}"
    monkeypatch.delenv("BK_PORT")
    assert cli._address(argparse.Namespace(command="up", data=str(tmp_path), host=None, port=None, default_port=8080),
                        cli._settings(argparse.Namespace(command="up", data=str(tmp_path), host=None, port=None))
                        ) == ("0.0.0.0", 8080)


def test_sigterm_ends_an_import_as_ctrl_c_does_naming_the_lines_on_their_way(tmp_path):
    """An import stopped by SIGTERM died silently (-15); Ctrl-C's summary said "the lines sent
    before are stored" while the chunk on its way may have been stored too."""

    events = tmp_path / "events.ndjson"
    line = ('{"name": "pageview", "url": "https://example.com/", "timestamp": "2026-01-01T00:00:00Z",'
            ' "ip": "81.2.69.160", "user_agent": "Mozilla/5.0"}\n')
    events.write_text(line * 12_000)
    with socket.socket() as silent:  # accepts the request and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        importing = subprocess.Popen([*CLI, "import", str(events), "--site", "s", "--key", "bk_" + "k" * 20,
                                      "--url", f"http://127.0.0.1:{silent.getsockname()[1]}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connection, _ = silent.accept()
        with connection:
            importing.send_signal(signal.SIGTERM)
            out, err = importing.communicate(timeout=60)
    assert importing.returncode == 130, err
    assert out.strip() == "accepted 0, rejected 0, dropped 0 (bots)"
    assert ("interrupted: the lines counted above are stored, and lines 1–5,000, sent when it stopped, may be;"
            " importing the whole file again is safe (each event is stored once)") in err
    assert "Traceback" not in err


def test_ctrl_c_while_the_cli_starts_ends_in_one_line_not_a_traceback(tmp_path):
    """A Ctrl-C in the first half second (modules still loading) printed a KeyboardInterrupt
    traceback; later ones said "interrupted" in one line. Both console script and `-m` start
    through `besokskollen.__main__.run`."""
    import shutil
    import time
    from pathlib import Path

    def loaded(pid: int) -> bool:
        try:
            return "pydantic_core" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # it has ended
            return True

    script = shutil.which("besokskollen")
    starts = [[script] if script else CLI, CLI]
    for start, delay in ((start, delay) for start in starts for delay in (0, 0.1, 0.25)):
        command = subprocess.Popen([*start, "keys", "create", "--account", "a", "--data", str(tmp_path / "d")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Once our modules load (pydantic's core is mapped): a Ctrl-C before, in the interpreter's
        # own start (its `site`), is Python's to report.
        wait_until(lambda: loaded(command.pid), 30, "its modules to load")
        time.sleep(delay)
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=60)
        if command.returncode == 0:  # finished first: nothing to check at this delay
            continue
        # -2 only with the line said: a Ctrl-C that landed inside an import leaves Python to end the
        # process by the signal at exit, which a shell reports as 130 all the same
        assert command.returncode in (130, -signal.SIGINT), err
        assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`besokskollen status | head -1` printed a BrokenPipeError traceback and exited 1."""
    script = ("import besokskollen.cli as cli, besokskollen.__main__ as entry\n"
              "cli.main = lambda: [print('x' * 100) for _ in range(100_000)]\nentry.run()")
    command = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=ROOT)
    command.stdout.read(10)
    command.stdout.close()
    err = command.stderr.read().decode()
    assert command.wait(timeout=60) == 141, err
    assert err == ""


def test_a_misspelt_variable_is_warned_about(tmp_path):
    """BK_SESSION_TIMEOUT (no _S) was ignored without a word: the default timeout applied."""
    result = subprocess.run([*CLI, "migrate", "--data", str(tmp_path / "d")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "BK_SESSION_TIMEOUT": "60", "BK_KAFKA_VERSION": "4.1.1"})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == ["besokskollen migrate: warning: BK_SESSION_TIMEOUT is not a setting and is ignored;"
                        " did you mean BK_SESSION_TIMEOUT_S?"]  # deploy/kafka's BK_KAFKA_VERSION is not ours


def test_keys_create_refuses_an_empty_site_rather_than_make_a_user_level_key(capsys):
    """`--site "$SITE"` with SITE unset made a key for every site of the account."""
    from besokskollen import cli

    for site in ("", " "):
        with pytest.raises(SystemExit) as stopped:
            cli.main(["keys", "create", "--account", "acme", "--site", site])
        assert stopped.value.code == 2
        assert "argument --site: is empty" in capsys.readouterr().err


def test_blank_settings_are_unset(monkeypatch, tmp_path):
    """Compose and Kubernetes set a variable empty to leave it out: an empty BK_SPOOL_DIR put the
    spool in the working directory, a blank BK_KAFKA_BOOTSTRAP made `up` dial Kafka at ''."""
    from besokskollen.config import Settings

    monkeypatch.setenv("BK_CLICKHOUSE_URL", f"chdb://{tmp_path / 'data'}")
    for blank in ("", " "):
        monkeypatch.setenv("BK_SPOOL_DIR", blank)
        monkeypatch.setenv("BK_KAFKA_BOOTSTRAP", blank)
        settings = Settings()
        assert settings.spool_path == tmp_path / "data" / "spool" and settings.embedded


@pytest.mark.parametrize("account", ["", " acme", "ac\nme"])
def test_keys_create_refuses_an_account_that_is_no_name(account, capsys):
    from besokskollen import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["keys", "create", "--account", account])
    assert stopped.value.code == 2
    assert "is not an account name" in capsys.readouterr().err


@pytest.mark.slow
def test_a_demo_seeding_stopped_half_way_is_done_whole_at_the_next_start(services, monkeypatch):
    """`up --demo` skipped its seeding once the site had any event: one stopped at 61 % stayed so
    for good (found by an audit: the last month empty). The same site gets the same traffic under
    the same event ids, so seeding again stores the rest and each event once. Its trending list
    is not empty at the API's defaults."""
    from besokskollen import demo
    from query_api.affiliate import trending_products
    from streams.core import StreamCore
    from streams.rollups import events_before

    core = StreamCore(services.client, services.settings.session_timeout_s, services.goals)
    process, batches = core.process, []

    def stopped_at_the_fourth_batch(batch):
        batches.append(len(batch))
        if len(batches) == 4:
            raise KeyboardInterrupt
        process(batch)

    monkeypatch.setattr(core, "process", stopped_at_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        demo.seed(services, core)
    site = services.sites.by_domain(demo.DEMO_DOMAIN)
    end = site.created_at.replace(tzinfo=timezone.utc) + timedelta(hours=1)
    assert events_before(services.client, site.site_id, end) == sum(batches[:3])

    monkeypatch.setattr(core, "process", process)
    assert demo.seed(services, core) == site
    seeded = events_before(services.client, site.site_id, end)
    assert seeded > sum(batches)  # the rest of the 90 days too
    stored = services.client.query("SELECT count(), uniqExact(event_id) FROM events FINAL WHERE site_id = {s:String}",
                                   parameters={"s": site.site_id}).result_rows[0]
    assert stored == (seeded, seeded)
    monkeypatch.setattr(core, "process", lambda batch: pytest.fail("seeded again"))
    demo.seed(services, core)  # all there: nothing to do

    hot = trending_products(services.client, site.site_id, datetime.now(timezone.utc), 24, 7, 100, 3, 10)["data"]
    assert {p["product_id"] for p in hot} >= {"airpods-pro-2", "iphone-17-skal"}, hot
    assert any(p["growth_percent"] is None for p in hot) and any(p["growth_percent"] for p in hot), hot


def test_a_demo_site_with_events_not_its_own_is_left_as_it_is(services, monkeypatch):
    """A demo seeded by an earlier release has random event ids: seeding it again would count its
    traffic twice. Nor is a site with imported events of its own topped up."""
    from besokskollen import demo
    from ingest.event import Event
    from streams.core import StreamCore

    monkeypatch.setattr(demo, "DEMO_DOMAIN", f"old-demo-{uuid.uuid4().hex[:6]}.example")
    site = services.sites.create("default", demo.DEMO_DOMAIN, "Mobildelar (demo)")
    core = StreamCore(services.client, services.settings.session_timeout_s, services.goals)
    at = site.created_at.replace(tzinfo=timezone.utc) - timedelta(days=3)
    core.process([Event(event_id=str(uuid.uuid4()), site_id=site.site_id, timestamp=at, name="pageview", visitor_id=1,
                        pathname="/")])
    monkeypatch.setattr(core, "process", lambda batch: pytest.fail("seeded over events not its own"))
    assert demo.seed(services, core) == site


def test_a_server_raises_its_open_files_limit_to_the_hard_one():
    """Every connection holds a descriptor, and the embedded ClickHouse shares the process's: past
    the soft limit (often 1,024 in a container) its queries failed with `Too many open files` and
    new connections got no answer (an audit: 19,900 idle connections against 20,000)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = ("import resource; from besokskollen.cli import raise_open_files_limit;"
              " soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE);"
              " resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard));"
              " print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert out == [str(wanted)] * 2 and wanted > 256
