"""A long soak of the embedded topology (`besokskollen up`): a steady stream of events for many
minutes, looking for what a short test never shows — memory, descriptors, threads, ClickHouse
parts or latency that keep growing, and numbers that drift.

1. starts `up` on a free port with a fresh data folder (BK_ADMIN_KEY, and a rate limit high
   enough for the query loop: the soak is not about the limiter), creates 20 load sites and one
   marker site through the API;
2. for `--minutes` sends ~`--rate` events/s to `/api/event`: pageviews, custom events with props,
   affiliate clicks with product fields; many visitors (X-Forwarded-For from 127.0.0.1, a trusted
   proxy; a returning pool plus new addresses all the time), client `event_id`s on most events,
   some sent again later (some from another address), some invalid bodies, an unknown site, bot
   user agents. Every few seconds it queries stats, popular, trending and batch endpoints;
3. every `--sample` seconds prints: RSS, open fds, threads and CPU seconds of the process, the
   size of the data folder and of the journal, ClickHouse parts on disk per table (active and
   outdated alike: `system.parts` is not reachable while `up` holds the folder), the journal's
   backlog, p50/p99 of `/api/event` and of the API queries over the interval, and the lag (a
   marker pageview posted, time until the API counts it);
4. at the end waits for the lag to reach zero, stops `up` with SIGTERM (exit code and time),
   reads `system.parts`/`system.merges` with the folder closed, starts a new `up` on the same
   folder and checks its totals — pageviews per site, clicks per product — against the script's
   own count of what was answered 202 (an event with an `event_id` counted once per id).

    PYTHONPATH=. python3 tests/bench/soak_embedded.py [--minutes 12] [--rate 300] [--sample 30] [--keep]
                                                     [--launcher SCRIPT] [--json FILE]

Not run by CI: it prints numbers (2 cores shared with other work; expect noise)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import ADMIN_KEY, free_port  # noqa: E402

CLI = [sys.executable, "-m", "besokskollen"]
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
N_SITES = 20
N_PRODUCTS = 40
PAGES = [f"/sida/{i}" for i in range(150)] + [f"/produkt/p{i}" for i in range(N_PRODUCTS)] + ["/"]
REFERRERS = ["", "", "", "https://www.google.com/", "https://www.bing.com/", "https://l.facebook.com/",
             "https://news.ycombinator.com/item?id=1", "https://duckduckgo.com/"]
BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
]
# Crawlers only: HTTP libraries and tools (curl, python-requests) are counted (README, /api/event).
BOTS = ["Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)"]
PART = re.compile(r"^[0-9A-Za-z-]+_\d+_\d+_\d+(_\d+)?$")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def random_ip(rng: random.Random) -> str:
    while True:
        a = rng.randrange(1, 224)
        if a not in (10, 100, 127, 169, 172, 192, 198, 203):
            return f"{a}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


# --- the process under test ---------------------------------------------------------------------

def proc_stats(pid: int) -> dict:
    """RSS, descriptors, threads and CPU seconds of a process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return {"rss_mb": float("nan"), "threads": 0, "fds": 0, "cpu_s": float("nan")}
    return {"rss_mb": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024,
            "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)), "fds": fds,
            "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}


class Proc:
    """A child process (its output in a log), stoppable with SIGTERM or SIGKILL and startable again."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict, ready_url: str | None) -> None:
        self.name, self.args, self.log, self.env, self.ready_url = name, args, log, env, ready_url
        self.proc: subprocess.Popen | None = None
        self.cpu_before = 0.0  # CPU seconds of earlier incarnations (a restart starts from 0)

    def start(self) -> None:
        env = {name: value for name, value in {**os.environ, **self.env}.items() if value is not None}  # None: unset
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                async with http.get(self.ready_url) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def stats(self) -> dict:
        st = proc_stats(self.pid)
        st["cpu_s"] += self.cpu_before
        return st

    def _forget_cpu(self) -> None:
        st = proc_stats(self.pid)
        if st["cpu_s"] == st["cpu_s"]:
            self.cpu_before += st["cpu_s"]

    def term(self, timeout: float = 60) -> tuple[int | None, float]:
        """SIGTERM; (exit code, or None when it had to be killed; seconds until it exited)."""
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        self._forget_cpu()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        return rc, time.monotonic() - started

    def kill(self) -> None:
        self._forget_cpu()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Up(Proc):
    """`besokskollen up` on a free port with the data folder, started at once."""

    launcher: list[str] = CLI  # `--launcher`: another script that runs the CLI (a profiler around it)

    def __init__(self, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"PYTHONPATH": str(ROOT), "BK_ADMIN_KEY": ADMIN_KEY, "BK_RATE_LIMIT_PER_MINUTE": "1000000",
               "BK_KAFKA_BOOTSTRAP": None, "BK_CLICKHOUSE_URL": None, "BK_SPOOL_DIR": None}
        super().__init__("up", [*self.launcher, "up", "--port", str(self.port), "--data", str(data)], log, env,
                         f"{self.url}/readyz")
        self.start()


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def parts_on_disk(data: Path) -> dict[str, int]:
    """Part folders per table (active and outdated ones not yet removed)."""
    out = {}
    base = data / "data" / "default"
    for table in sorted(os.listdir(base)) if base.exists() else []:
        try:
            out[table] = sum(1 for name in os.listdir(base / table) if PART.match(name))
        except FileNotFoundError:
            pass
    return out


# --- the load ------------------------------------------------------------------------------------

class Tally:
    """What the server should count: every valid, non-bot event answered 202, once per event id."""

    def __init__(self) -> None:
        self.pageviews: Counter[str] = Counter()
        self.clicks: Counter[tuple[str, str]] = Counter()
        self.custom: Counter[tuple[str, str]] = Counter()
        self.ids: set[tuple[str, str]] = set()
        self.statuses: Counter[str] = Counter()
        self.sent = 0
        self.retries_sent = 0

    def accepted(self, site: str, body: dict) -> None:
        if body.get("event_id"):
            key = (site, body["event_id"])
            if key in self.ids:
                return
            self.ids.add(key)
        if body["name"] == "pageview":
            self.pageviews[site] += 1
        elif body["name"] == "click":
            self.clicks[(site, body["product"]["id"])] += 1
        else:
            self.custom[(site, body["name"])] += 1


class Load:
    def __init__(self, url: str, sites: list[tuple[str, str]], rate: float, seed: int = 1,
                 api_url: str | None = None) -> None:
        # Events go to `url`; queries to `api_url` (the distributed soak: ingest and api apart).
        self.url, self.sites, self.rate = url, sites, rate
        self._api_url = api_url
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.event_latency: list[float] = []
        self.api_latency: list[float] = []
        self.api_statuses: Counter[str] = Counter()
        self.returning = {site: [random_ip(self.rng) for _ in range(2000)] for site, _ in sites}
        self.retry_queue: list[tuple[float, str, dict, str, str]] = []
        self.stopping = False
        self.inflight = 0

    def visitor(self, site: str) -> tuple[str, str]:
        ip = self.rng.choice(self.returning[site]) if self.rng.random() < 0.7 else random_ip(self.rng)
        return ip, BROWSERS[hash(ip) % len(BROWSERS)]

    def make_event(self) -> tuple[str, dict | bytes, str, str, str]:
        """(site, body, ip, user agent, kind) where kind is valid | invalid | bot | unknown."""
        site, domain = self.rng.choice(self.sites)
        ip, ua = self.visitor(site)
        r = self.rng.random()
        page = self.rng.choice(PAGES)
        body: dict = {"site_id": site, "url": f"https://{domain}{page}"}
        ref = self.rng.choice(REFERRERS)
        if ref:
            body["referrer"] = ref
        if r < 0.60:
            body["name"] = "pageview"
            if self.rng.random() < 0.2:
                body["url"] += f"?utm_source=nyhetsbrev&n={self.rng.randrange(1000)}"
        elif r < 0.75:
            body["name"] = self.rng.choice(["signup", "newsletter", "add_to_cart"])
            body["props"] = {"plan": self.rng.choice(["free", "pro", "team"]), "n": str(self.rng.randrange(50))}
        else:
            k = self.rng.randrange(N_PRODUCTS)
            body["name"] = "click"
            body["product"] = {"id": f"prod-{k}", "slug": f"produkt-{k}", "category_slug": f"cat-{k % 6}",
                               "brand_slug": f"brand-{k % 9}", "partner_slug": f"partner-{k % 4}"}
        if self.rng.random() < 0.85:
            body["event_id"] = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        kind = "valid"
        r = self.rng.random()
        if r < 0.03:
            ua, kind = self.rng.choice(BOTS), "bot"
        elif r < 0.045:
            kind = "invalid"
            bad = self.rng.randrange(4)
            if bad == 0:
                return site, b'{"site_id": "' + site.encode() + b'", "name": ', ip, ua, kind
            if bad == 1:
                body.pop("url")
            elif bad == 2:
                body["url"] = "file:///home/x/index.html"
            else:
                body["props"] = {f"k{i}": "v" for i in range(40)}
        elif r < 0.05:
            body["site_id"], kind = "no-such-site-example", "unknown"
        return site, body, ip, ua, kind

    async def post(self, http: aiohttp.ClientSession, site: str, body, ip: str, ua: str, kind: str,
                   retry: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "text/plain", "user-agent": ua, "x-forwarded-for": ip}
        start = time.perf_counter()
        self.inflight += 1
        try:
            async with http.post(f"{self.url}/api/event", data=data, headers=headers) as r:
                await r.read()
                status, dropped = r.status, r.headers.get("x-dropped")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.statuses[f"{kind}:{type(exc).__name__}"] += 1
            return
        finally:
            self.inflight -= 1
        self.event_latency.append(time.perf_counter() - start)
        self.tally.statuses[f"{kind}:{status}{':' + dropped if dropped else ''}"] += 1
        if kind == "valid" and status == 202 and not dropped:
            self.tally.accepted(site, body)
        if kind == "valid" and not retry and body.get("event_id") and self.rng.random() < 0.05:
            # Sent again later with the same id; a third of them from another address.
            again_ip = random_ip(self.rng) if self.rng.random() < 0.33 else ip
            self.retry_queue.append((time.monotonic() + self.rng.uniform(0.2, 20), site, body, again_ip, ua))

    async def run(self, http: aiohttp.ClientSession, seconds: float) -> None:
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        tick = 0.01
        due = 0.0
        next_tick = start
        while time.monotonic() - start < seconds:
            due += self.rate * tick
            while due >= 1:
                due -= 1
                if self.inflight < 256:
                    t = asyncio.create_task(self.post(http, *self.make_event()))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    self.tally.sent += 1
            now = time.monotonic()
            while self.retry_queue and self.retry_queue[0][0] <= now:
                _, site, body, ip, ua = self.retry_queue.pop(0)
                t = asyncio.create_task(self.post(http, site, body, ip, ua, "valid", retry=True))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                self.tally.retries_sent += 1
            self.retry_queue.sort(key=lambda item: item[0])
            next_tick += tick
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        # what is left of the retries goes now, then wait for every request
        for _, site, body, ip, ua in self.retry_queue:
            t = asyncio.create_task(self.post(http, site, body, ip, ua, "valid", retry=True))
            tasks.add(t)
            self.tally.retries_sent += 1
        self.retry_queue.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def api_url(self) -> str:
        return self._api_url or self.url  # follows `url` (a restarted `up` gets another port)

    async def api(self, http: aiohttp.ClientSession, method: str, path: str, **kw) -> tuple[int, dict | None]:
        start = time.perf_counter()
        try:
            async with http.request(method, f"{self.api_url}/api/v1/{path}", headers=AUTH, **kw) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.api_statuses[type(exc).__name__] += 1
            return 0, None
        self.api_latency.append(time.perf_counter() - start)
        self.api_statuses[str(status)] += 1
        return status, (json.loads(body) if body else None)

    async def queries(self, http: aiohttp.ClientSession, every: float) -> None:
        while not self.stopping:
            site, _ = self.rng.choice(self.sites)
            await self.api(http, "GET", "stats/overview", params={"site_id": site, "period": "7d", "compare": "true"})
            await self.api(http, "GET", "stats/pages", params={"site_id": site, "period": "30d", "limit": "20"})
            await self.api(http, "GET", "popular/products", params={"site_id": site, "days": "7"})
            await self.api(http, "GET", "trending/products",
                           params={"site_id": site, "recent_hours": "1", "baseline_days": "1", "min_growth": "0",
                                   "min_recent_clicks": "0"})
            await self.api(http, "POST", "batch", json={"site_id": site, "requests": [
                {"endpoint": "popular/categories", "params": {"days": 7}},
                {"endpoint": "popular/partners", "params": {"days": 7}},
                {"endpoint": "stats/referrers", "params": {"period": "7d"}}]})
            await asyncio.sleep(every)


async def pageviews(load: Load, http: aiohttp.ClientSession, site: str) -> int:
    status, body = await load.api(http, "GET", "stats/overview", params={"site_id": site, "period": "7d"})
    return body["data"]["pageviews"] if status == 200 else -1


async def marker_lag(url: str, http: aiohttp.ClientSession, marker: tuple[str, str], sent: list[int],
                     timeout: float = 300, api: str | None = None) -> float:
    """Post a pageview to the marker site at `url`; seconds until the API (at `api`, else `url`)
    counts it."""
    site, domain = marker
    body = {"site_id": site, "name": "pageview", "url": f"https://{domain}/marker", "event_id": str(uuid.uuid4())}
    async with http.post(f"{url}/api/event", data=json.dumps(body), headers={"user-agent": BROWSERS[0]}) as r:
        assert r.status == 202, r.status
    sent[0] += 1
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        async with http.get(f"{api or url}/api/v1/stats/overview", params={"site_id": site, "period": "7d"},
                            headers=AUTH) as r:
            if r.status == 200 and (await r.json())["data"]["pageviews"] >= sent[0]:
                return time.monotonic() - start
        await asyncio.sleep(0.05)
    return float("inf")


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def read_parts(data: Path) -> str:
    """system.parts and system.merges with `up` stopped (the engine locks the folder)."""
    code = r"""
import sys, clickhouse_connect
c = clickhouse_connect.get_client(interface="chdb", path=sys.argv[1])
for q in ["SELECT table, countIf(active = 1) AS n_active, countIf(active = 0) AS n_inactive,"
          " sumIf(rows, active = 1) AS n_rows, formatReadableSize(sumIf(bytes_on_disk, active = 1)) AS active_size FROM system.parts WHERE database = 'default'"
          " GROUP BY table ORDER BY table",
          "SELECT table, count() FROM system.merges GROUP BY table"]:
    r = c.query(q)
    print(" | ".join(r.column_names))
    for row in r.result_rows:
        print(" | ".join(map(str, row)))
"""
    out = subprocess.run([sys.executable, "-c", code, str(data)], check=False, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out.stdout + (out.stderr[-2000:] if out.returncode else "")


async def totals(load: Load, http: aiohttp.ClientSession) -> tuple[dict, dict]:
    pv, clicks = {}, {}
    for site, _ in load.sites:
        pv[site] = await pageviews(load, http, site)
        status, body = await load.api(http, "GET", "popular/products", params={"site_id": site, "days": "2",
                                                                                 "limit": "100"})
        for row in body["data"] if status == 200 else []:
            clicks[(site, row["product_id"])] = row["clicks"]
    return pv, clicks


def compare(load: Load, pv: dict, clicks: dict) -> list[str]:
    problems = []
    for site, _ in load.sites:
        if pv.get(site) != load.tally.pageviews[site]:
            problems.append(f"pageviews {site}: API {pv.get(site)} expected {load.tally.pageviews[site]}")
    for key in set(clicks) | set(load.tally.clicks):
        if clicks.get(key, 0) != load.tally.clicks[key]:
            problems.append(f"clicks {key}: API {clicks.get(key, 0)} expected {load.tally.clicks[key]}")
    return problems


async def main(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="bk-soak-"))
    if args.launcher:
        Up.launcher = [sys.executable, args.launcher]
    data = work / "data"
    log = work / "up.log"
    print(f"work folder {work}", flush=True)
    up = Up(data, log)
    print(f"up pid {up.pid} port {up.port}", flush=True)
    rows = []
    failures: list[str] = []

    async def check_totals(http, when: str) -> None:
        """Pageviews per site and clicks per product against what the load counted as 202."""
        pv, clicks = await totals(load, http)
        found = compare(load, pv, clicks)
        print(f"{when}: {len(found)} mismatches", *found[:10], sep="\n  ", flush=True)
        failures.extend(f"{when}: {p}" for p in found)

    def stop(which: str) -> None:
        rc, took = up.term(120)
        print(f"{which} SIGTERM: exit code {rc} after {took:.2f} s", flush=True)
        if rc != 0:
            failures.append(f"{which} up exited with {rc} after {took:.1f}s")

    timeout = aiohttp.ClientTimeout(total=60)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=128)) as http:
            await up.ready(http)
            sites = []
            for i in range(N_SITES + 1):
                domain = f"soak{i}.example" if i < N_SITES else "marker.example"
                async with http.post(f"{up.url}/api/v1/sites", json={"domain": domain}, headers=AUTH) as r:
                    assert r.status == 201, (r.status, await r.text())
                    sites.append(((await r.json())["data"]["id"], domain))
            marker, sites = sites[-1], sites[:-1]
            load = Load(up.url, sites, args.rate)
            markers = [0]
            started = time.monotonic()
            last = {"t": started, "cpu": up.stats()["cpu_s"], "sent": 0}

            async def sample(final: bool = False) -> None:
                now = time.monotonic()
                st = up.stats()
                ev, api = load.event_latency, load.api_latency
                load.event_latency, load.api_latency = [], []
                lag = await marker_lag(up.url, http, marker, markers)
                row = {"t": now - started, **st, "cpu%": 100 * (st["cpu_s"] - last["cpu"]) / (now - last["t"]),
                       "ev/s": (load.tally.sent - last["sent"]) / (now - last["t"]),
                       "data_mb": dir_size(data) / 2**20,
                       "journal_mb": dir_size(data / "spool") / 2**20,
                       "backlog": await metric(http, up.url, "bk_spool_records"),
                       "parts": parts_on_disk(data),
                       "ev_p50": percentile(ev, .5) * 1000, "ev_p99": percentile(ev, .99) * 1000,
                       "api_p50": percentile(api, .5) * 1000, "api_p99": percentile(api, .99) * 1000,
                       "n_api": len(api), "lag_s": lag}
                last.update(t=now, cpu=st["cpu_s"], sent=load.tally.sent)
                rows.append(row)
                p = row["parts"]
                print(f"{row['t']:6.0f}s rss {row['rss_mb']:6.1f} MB fds {row['fds']:4d} thr {row['threads']:3d} "
                      f"cpu {row['cpu%']:5.1f}% ev/s {row['ev/s']:5.0f} data {row['data_mb']:6.1f} MB "
                      f"journal {row['journal_mb']:5.2f} MB backlog {row['backlog']:.0f} "
                      f"parts ev/ses/act/r15/r1d {p.get('events')}/{p.get('sessions')}/{p.get('activity')}/"
                      f"{p.get('rollup_15m')}/{p.get('rollup_1d')} (all {sum(p.values())}) "
                      f"event p50/p99 {row['ev_p50']:.1f}/{row['ev_p99']:.1f} ms "
                      f"api p50/p99 {row['api_p50']:.1f}/{row['api_p99']:.1f} ms (n={row['n_api']}) "
                      f"lag {row['lag_s']:.2f} s", flush=True)

            async def sampler() -> None:
                while not load.stopping:
                    await asyncio.sleep(args.sample)
                    if not load.stopping:
                        await sample()

            await sample()
            query_task = asyncio.create_task(load.queries(http, args.query_every))
            sample_task = asyncio.create_task(sampler())
            await load.run(http, args.minutes * 60)
            load.stopping = True
            await query_task
            sample_task.cancel()
            await asyncio.gather(sample_task, return_exceptions=True)
            await sample(final=True)  # the marker waits for everything before it
            print(f"sent {load.tally.sent} events + {load.tally.retries_sent} retries; statuses "
                  f"{dict(sorted(load.tally.statuses.items()))}; API statuses {dict(load.api_statuses)}", flush=True)
            print(f"expected: pageviews {sum(load.tally.pageviews.values())}, clicks {sum(load.tally.clicks.values())}, "
                  f"custom {sum(load.tally.custom.values())}, distinct ids {len(load.tally.ids)}", flush=True)
            await check_totals(http, "before the stop")

        stop("first")
        print(read_parts(data), flush=True)

        up = Up(data, log)
        print(f"restarted: up pid {up.pid} port {up.port}", flush=True)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            start = time.monotonic()
            await up.ready(http)
            print(f"ready after {time.monotonic() - start:.1f} s", flush=True)
            load.url = up.url
            await check_totals(http, "after the restart")
        stop("second")
    finally:
        if up.proc.poll() is None:
            up.term(120)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| t (s) | RSS MB | fds | threads | CPU % | parts on disk | event p50/p99 ms | API p50/p99 ms | lag s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['t']:.0f} | {r['rss_mb']:.0f} | {r['fds']} | {r['threads']} | {r['cpu%']:.0f} | "
              f"{sum(r['parts'].values())} | {r['ev_p50']:.1f} / {r['ev_p99']:.1f} | "
              f"{r['api_p50']:.1f} / {r['api_p99']:.1f} | {r['lag_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print("FAILED:" if failures else "totals exact, clean exits", *failures[:20], sep="\n  ")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=12)
    parser.add_argument("--rate", type=float, default=300, help="events per second")
    parser.add_argument("--sample", type=float, default=30, help="seconds between samples")
    parser.add_argument("--query-every", type=float, default=3, help="seconds between rounds of API queries")
    parser.add_argument("--keep", action="store_true", help="keep the data folder and log")
    parser.add_argument("--json", help="write the samples here")
    parser.add_argument("--launcher", help="a Python script to run instead of `-m besokskollen` (it gets the"
                        " CLI's arguments), e.g. one that wraps the CLI in tracemalloc")
    sys.exit(asyncio.run(main(parser.parse_args())))
