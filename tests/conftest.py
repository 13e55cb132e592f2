"""Shared fixtures: the embedded topology in-process, and real processes (Kafka broker, the
ClickHouse HTTP front, besokskollen ingest/worker/api/up) started and stopped by pid."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bk_test_admin_key_0123456789"
# httpx makes an SSL context for every client it builds, loading certifi's CA bundle (~50 ms of CPU
# here), even for plain http://: helpers that poll pass this one (httpx's `verify=<context>`).
SSL_CONTEXT = ssl.create_default_context()
BROWSER = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"





def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` first in each half of the collection. pytest-xdist's worksteal gives
    each of the two workers one half, which it runs from the front, and an idle worker steals
    from the end of the other's queue: both then end on short tests. In collection order, the
    last minute-long tests ran alone at the end while the other worker idled (~80 s of a 15-minute
    part). A module's slow tests stay in one half, so a module fixture (a server) starts once."""
    slow: dict[str, list[pytest.Item]] = {}
    for item in items:
        if item.get_closest_marker("slow"):
            slow.setdefault(item.module.__name__, []).append(item)
    halves: tuple[list[pytest.Item], list[pytest.Item]] = ([], [])
    functions = lambda tests: len({test.originalname for test in tests})  # noqa: E731 - not parametrisations
    for group in sorted(slow.values(), key=functions, reverse=True):
        min(halves, key=functions).extend(group)
    rest = [item for item in items if not item.get_closest_marker("slow")]
    cut = max(0, len(items) // 2 - len(halves[0]))
    items[:] = halves[0] + rest[:cut] + halves[1] + rest[cut:]


def scrape(base: str) -> dict[str, float]:
    """Every sample of a /metrics page by its series name with labels."""
    text = httpx.get(f"{base}/metrics", timeout=10, verify=SSL_CONTEXT).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def clear_of_utc_midnight(seconds: float) -> None:
    """For a test that compares answers anchored to today's UTC date (`popular` of `days=1`, the
    `daily` rows) taken up to `seconds` apart: a UTC midnight due within them is waited for, as
    across one two answers, or an answer and its expectation, are for different days."""
    now = time.time()
    left = 86_400 - now % 86_400
    if left < seconds:
        time.sleep(left + 1)


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    """Poll `check` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1, verify=SSL_CONTEXT).status_code < 500
    except httpx.HTTPError:
        return False


@contextmanager
def process(args: list[str], log_path: Path, env: dict[str, str] | None = None, ready_url: str | None = None,
            timeout: float = 60) -> Iterator[subprocess.Popen]:
    """A child process with its output in `log_path`, stopped by pid (TERM, then KILL)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
    try:
        if ready_url:
            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{args} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                return http_ok(ready_url)
            wait_until(ready, timeout, f"{args} at {ready_url}", interval=0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def up_server(data: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`besokskollen up` on a free port, ready once its OpenAPI document answers; yields the base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process([sys.executable, "-m", "besokskollen", "up", "--data", str(data), "--port", str(port)], log_path,
                 env, ready_url=f"{base}/api/v1/openapi.json"):
        yield base


# -- embedded topology, in this process -----------------------------------------------------------

@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """One chDB data path per process (the engine allows no second), shared by in-process tests;
    each test uses sites of its own."""
    from besokskollen.app import open_services
    from besokskollen.config import Settings

    path = tmp_path_factory.mktemp("chdb")
    return open_services(Settings(clickhouse_url=f"chdb://{path}", admin_key=ADMIN_KEY, kafka_bootstrap=None))


@pytest.fixture
async def embedded(services):
    """The `up` application (ingest + stream core + query API) and its hand-off, started."""
    from besokskollen.app import make_handoff, server_app

    handoff = make_handoff(services)
    await handoff.start()
    app = server_app(services, handoff)
    try:
        yield app, handoff
    finally:
        await handoff.stop()


@pytest.fixture
async def client(embedded):
    app, _ = embedded
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 headers={"authorization": f"Bearer {ADMIN_KEY}"}) as c:
        yield c


# -- distributed parts, as real processes ----------------------------------------------------------

def free_port() -> int:
    """A free port below the kernel's ephemeral range. Test servers get killed and restarted on
    their port; while one is down, an ephemeral port can go to any outgoing connection (or a
    client's self-connect) and the restart finds it taken. That failed CI once."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # Under pytest-xdist (tests/run.sh) each worker process draws from a slice of its own: two
    # could otherwise both find one port free before either binds it.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = (low - 10_000) // workers
    start = 10_000 + worker * width
    rng = random.Random()
    for _ in range(200 if width > 1_000 else 0):
        port = rng.randrange(start, start + width)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual port range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """The test broker: started by deploy/kafka/start.sh, and killable and restartable by tests."""

    def __init__(self, data: Path) -> None:
        self.data, self.port, self.controller_port = data, free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run([str(KAFKA_SCRIPTS / "start.sh"), "--data", str(self.data), "--port", str(self.port),
                        "--controller-port", str(self.controller_port)], check=True, timeout=180)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        pid = int((self.data / "kafka.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _gone(pid), 30, f"broker pid {pid} to die")

    def stop(self) -> None:
        subprocess.run([str(KAFKA_SCRIPTS / "stop.sh"), "--data", str(self.data)], check=False, timeout=60)

    def running(self) -> bool:
        pid_file = self.data / "kafka.pid"
        return pid_file.exists() and not _gone(int(pid_file.read_text()))


KAFKA_SCRIPTS = ROOT / "deploy" / "kafka"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka(broker) -> str:
    return broker.bootstrap


@pytest.fixture
def killable_broker(broker) -> Iterator[Broker]:
    """The shared broker for a test that kills it: running again afterwards whatever happened, so
    one failed restart does not fail every later Kafka test."""
    try:
        yield broker
    finally:
        if not broker.running():
            broker.start()


def stable_group_size(bootstrap: str, group: str) -> int:
    """Members of a Kafka consumer group once it is Stable (0 while it rebalances)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import GroupCoordinatorNotAvailableError

    async def describe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            try:
                (response,) = await admin.describe_consumer_groups([group])
            except GroupCoordinatorNotAvailableError:  # the group's first member has not joined yet
                return 0
            _error, _group, state, _ptype, _protocol, members, *_ = response.groups[0]
            return len(members) if state == "Stable" else 0
        finally:
            await admin.close()

    return asyncio.run(describe())


@pytest.fixture(scope="session")
def clickhouse_http(tmp_path_factory) -> Iterator[str]:
    """A ClickHouse HTTP endpoint over one chDB data path, shared by child processes."""
    tmp = tmp_path_factory.mktemp("chfront")
    ready = tmp / "ready"
    with process([sys.executable, "-m", "tests.chfront", "--path", str(tmp / "data"), "--port", "0",
                  "--ready-file", str(ready)], tmp / "chfront.log"):
        port = wait_until(lambda: ready.exists() and ready.read_text().strip(), 30, "the ClickHouse HTTP front")
        yield f"http://127.0.0.1:{port}/?compress=false"
