"""Moving from `up` to a ClickHouse server keeping the data (issue 9, docs/operations.md):
`besokskollen copy` puts every table of the embedded data folder into an empty server, and the
API over the server answers exactly what `up` answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from query_api.keys import KeyStore
from streams import replay
from tests.conftest import ADMIN_KEY, ROOT, SSL_CONTEXT, free_port, process, wait_until
from tests.test_crash import API, AUTH, CLI

BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


def answers(base: str, site: str) -> dict:
    with httpx.Client(base_url=f"{base}{API}", headers=AUTH, verify=SSL_CONTEXT) as client:
        get = lambda path, **p: client.get(f"/{path}", params={"site_id": site, **p}).json()  # noqa: E731
        return {path: get(path, period="7d")["data"] for path in ("stats/overview", "stats/pages", "stats/referrers",
                                                                  "stats/countries", "goals")} | {
            "products": get("popular/products", days=7)["data"], "sites": client.get("/sites").json()}


@pytest.mark.slow
def test_copy_moves_every_number_from_up_to_a_server(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    up = f"http://127.0.0.1:{port}"
    with process([*CLI, "up", "--data", str(data), "--port", str(port)], tmp_path / "up.log",
                 env={"BK_ADMIN_KEY": ADMIN_KEY}, ready_url=f"{up}/readyz"):
        site = httpx.post(f"{up}{API}/sites", json={"domain": "flytt.example"}, headers=AUTH).json()["data"]["id"]
        goal = {"site_id": site, "name": "Köp", "event_type": "event", "match_event": "purchase"}
        assert httpx.post(f"{up}{API}/goals", json=goal, headers=AUTH).status_code == 201
        with httpx.Client(base_url=up) as client:
            for n in range(60):
                body = {"site_id": site, "name": ["pageview", "pageview", "purchase", "click"][n % 4],
                        "url": f"https://flytt.example/p/{n % 7}", "referrer": ["", "https://www.google.se/"][n % 2],
                        "product": {"id": f"prod-{n % 3}"}}
                headers = {"user-agent": BROWSER, "x-forwarded-for": f"81.227.{n % 9}.{n % 5 + 1}", "cf-ipcountry": "SE"}
                assert client.post("/api/event", json=body, headers=headers).status_code == 202
        wait_until(lambda: answers(up, site)["stats/overview"]["pageviews"] == 30, 30, "the events in up")
        before = answers(up, site)

    ready = tmp_path / "front.ready"
    with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp_path / "server"), "--port", "0",
                  "--ready-file", str(ready)], tmp_path / "front.log"):
        front = f"http://127.0.0.1:{wait_until(lambda: ready.exists() and ready.read_text().strip(), 30, 'front')}/?compress=false"
        copied = subprocess.run([*CLI, "copy", "--data", str(data), "--to", front], capture_output=True, text=True,
                                cwd=ROOT, timeout=300)
        assert copied.returncode == 0, copied.stderr
        assert "events: 60" in copied.stdout, copied.stdout

        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}"
        with process([*CLI, "api", "--port", str(api_port)], tmp_path / "api.log",
                     env={"BK_CLICKHOUSE_URL": front, "BK_ADMIN_KEY": ADMIN_KEY}, ready_url=f"{api}/readyz"):
            assert answers(api, site) == before

        again = subprocess.run([*CLI, "copy", "--data", str(data), "--to", front], capture_output=True, text=True,
                               cwd=ROOT, timeout=300)
        assert again.returncode == 2 and "already holds events" in again.stderr


@contextmanager
def _front(tmp_path: Path, name: str = "server"):
    ready = tmp_path / f"{name}.ready"
    with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp_path / name), "--port", "0",
                  "--ready-file", str(ready)], tmp_path / f"{name}.log"):
        yield f"http://127.0.0.1:{wait_until(lambda: ready.exists() and ready.read_text().strip(), 30, 'front')}/?compress=false"


# Creates keys and revokes every other one, each in an insert of its own, as `keys create` and
# `keys revoke` do: a revocation is a newer row of the same key (ReplacingMergeTree without a
# version), so it wins only while it stays *after* the key's first row.
_KEYS = """
import json, sys
from besokskollen.app import open_services
from besokskollen.config import Settings
keys = open_services(Settings(clickhouse_url="chdb://" + sys.argv[1], kafka_bootstrap=None)).keys
made = [keys.create("default") for _ in range(12)]
for key in made[::2]:
    assert keys.revoke(key)
client = keys._client
client.command("INSERT INTO salts VALUES (today(), 'ab12', now64(6))")  # the one table without a key
client.command("INSERT INTO events (event_id, site_id, timestamp, name) SELECT generateUUIDv4(number), 's',"
               " now64(3) - number, 'pageview' FROM numbers(5000)")
print(json.dumps(made))
"""


def _folder(tmp_path: Path) -> tuple[Path, list[str]]:
    data = tmp_path / "data"
    made = subprocess.run([sys.executable, "-c", _KEYS, str(data)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert made.returncode == 0, made.stderr
    return data, json.loads(made.stdout.strip().splitlines()[-1])


def _copy(data: Path, to: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "copy", "--data", str(data), "--to", to], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_copy_keeps_revoked_keys_revoked(tmp_path):
    """Found by the audit: the rows went in the order the source's parts were read, so a key's
    revocation could land before the key and the key worked again on the server."""
    from query_api.keys import KeyStore
    from streams import storage

    data, keys = _folder(tmp_path)
    with _front(tmp_path) as front:
        copied = _copy(data, front)
        assert copied.returncode == 0, copied.stderr
        target = KeyStore(storage.connect(front))
        assert [target.lookup(key) is not None for key in keys] == [n % 2 == 1 for n in range(len(keys))]


@pytest.mark.slow
def test_a_copy_that_did_not_finish_is_started_over(tmp_path):
    """A copy killed midway (kill -9, the target gone, Ctrl-C) leaves its marker table on the
    target: the next run empties what it left and copies again, rather than refusing a target that
    "already holds events" with nothing to do about it. Without the marker, a second copy is
    still refused."""
    from streams import storage

    data, _ = _folder(tmp_path)
    with _front(tmp_path) as front:
        assert _copy(data, front).returncode == 0
        target = storage.connect(front)
        # Rows as read (keyed tables under FINAL: a key copied again is one row to every reader).
        count = lambda table: target.query(  # noqa: E731
            f"SELECT count() FROM {table}{' FINAL' if table == 'api_keys' else ''}").result_rows[0][0]
        whole = {table: count(table) for table in ("events", "salts", "api_keys")}
        assert whole["events"] == 5000 and whole["salts"] == 1
        # As a run killed after the marker and some rows leaves the target:
        target.command("CREATE TABLE copy_unfinished (started DateTime) ENGINE = MergeTree ORDER BY tuple()")
        target.command("ALTER TABLE events DELETE WHERE timestamp < now64(3) - 1000 SETTINGS mutations_sync = 2")
        # What the target's own processes wrote meanwhile (their BK_ADMIN_KEY, the day's salt) stays:
        # the run started over emptied every table, and a running `api` answered its key 401.
        own_key = KeyStore(target, target).create("default")
        target.command("INSERT INTO salts (day, salt, created_at) VALUES (today() + 1, 'the target''s own salt', now64(6))")
        again = _copy(data, front)
        assert again.returncode == 0, again.stderr
        assert "did not finish" in again.stderr and "starting over" in again.stderr
        whole |= {"salts": whole["salts"] + 1, "api_keys": whole["api_keys"] + 1}
        assert {table: count(table) for table in whole} == whole  # nothing doubled (salts have no key)
        assert KeyStore(target, target).lookup(own_key) is not None
        refused = _copy(data, front)
        assert refused.returncode == 2 and "already holds events" in refused.stderr


def test_a_target_with_sites_of_its_own_is_refused(tmp_path):
    """A site made on the target before the copy stood beside the copied one of its domain, and
    its timezone won: the numbers were no longer `up`'s."""
    from streams import storage
    from streams.sites import SiteRegistry

    data, _ = _folder(tmp_path)
    with _front(tmp_path) as front:
        target = storage.connect(front)
        replay.upgrade(target, 1800, 400)
        SiteRegistry(target, target).create("default", "copy.example", "New deployment", "UTC")
        refused = _copy(data, front)
        assert refused.returncode == 2 and "the target already has sites (copy.example)" in refused.stderr


def test_a_target_whose_raw_events_expired_is_refused_too(tmp_path):
    """Past BK_RAW_EVENTS_TTL_DAYS a deployment holds its numbers without raw events: a copy into
    it would double them."""
    from streams import storage

    data, _ = _folder(tmp_path)
    with _front(tmp_path) as front:
        assert _copy(data, front).returncode == 0
        target = storage.connect(front)
        # What the TTL leaves (this folder's events were written without rollups): daily totals only.
        target.command("TRUNCATE TABLE events")
        target.command("INSERT INTO rollup_1d (site_id, kind, value, day, events) VALUES ('s', 'total', '', today(), 5)")
        refused = _copy(data, front)
        assert refused.returncode == 2 and "already holds events" in refused.stderr


def test_a_wrong_target_is_one_line_exit_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bad = _copy(data, "127.0.0.1:8123")  # clickhouse-connect took this for localhost, and said "://None:8123"
    assert bad.returncode == 2 and "is not a ClickHouse server URL" in bad.stderr
    with _front(tmp_path) as front:
        missing = _copy(data, front.replace("/?", "/nodb?"))
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1 and "Database nodb does not exist" in lines[0], missing.stderr


_SITE = """
import sys
from besokskollen.app import open_services
from besokskollen.config import Settings
open_services(Settings(clickhouse_url="chdb://" + sys.argv[1], kafka_bootstrap=None)).sites.create("default", "gammal.example")
"""

# What a data folder of a release before migration 6 looks like to this one: the ledger without
# 6, and derived tables that 6 asks to be rebuilt from the raw events (emptied here, so a copy
# that does not rebuild them is seen at once).
_OLDER = """
import sys
from streams import storage
client = storage.connect("chdb://" + sys.argv[1])
client.command("ALTER TABLE schema_migrations DELETE WHERE version = 6 SETTINGS mutations_sync = 2")
for table in ("sessions", "activity", "rollup_15m", "rollup_1d"):
    client.command(f"TRUNCATE TABLE {table}")
"""


@pytest.mark.slow
def test_a_folder_of_an_older_release_is_upgraded_before_it_is_copied(tmp_path):
    """Found by the audit: the source was copied as it lay. A folder last run by an older release
    (not started with this one since) went with the derived tables that release wrote, and the
    target, migrated empty, never replayed them: its numbers were not those `up` would show."""
    from datetime import datetime, timedelta, timezone

    from streams import storage

    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", _SITE, str(data)], cwd=ROOT, env=env, timeout=300).returncode == 0
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=2)
    lines = [json.dumps({"name": "pageview", "url": f"https://gammal.example/p/{n % 3}", "ip": f"81.227.1.{n % 7 + 1}",
                         "user_agent": BROWSER, "timestamp": (start + timedelta(minutes=n)).isoformat()})
             for n in range(40)]
    (tmp_path / "old.ndjson").write_text("\n".join(lines) + "\n")
    imported = subprocess.run([*CLI, "import", str(tmp_path / "old.ndjson"), "--site", "gammal-example",
                               "--data", str(data)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert subprocess.run([sys.executable, "-c", _OLDER, str(data)], cwd=ROOT, env=env, timeout=300).returncode == 0
    with _front(tmp_path) as front:
        copied = _copy(data, front)
        assert copied.returncode == 0, copied.stderr
        target = storage.connect(front)
        pageviews = target.query("SELECT sum(pageviews) FROM rollup_1d FINAL WHERE kind = 'total'").result_rows[0][0]
        sessions = target.query("SELECT count() FROM sessions FINAL").result_rows[0][0]
    assert pageviews == 40 and sessions > 0


def test_a_folder_in_use_is_refused_in_one_line_exit_2(tmp_path):
    data, port = tmp_path / "data", free_port()
    with process([*CLI, "up", "--data", str(data), "--port", str(port)], tmp_path / "up.log",
                 env={"BK_ADMIN_KEY": ADMIN_KEY}, ready_url=f"http://127.0.0.1:{port}/readyz"):
        copied = _copy(data, "http://127.0.0.1:1/")
    assert copied.returncode == 2 and copied.stderr.strip().splitlines() == [
        f"besokskollen copy: the data folder {data} is in use by another process (stop `up` first)"]
