"""Tracking-endpoint throughput, side by side in one run, all loaded by the same wrk script with a
different body per request and a seed per wrk thread:

1. the ceiling: a bare ASGI app answering 202 under the same uvicorn;
2. `POST /api/event` on `besokskollen up` (embedded topology);
3. `POST /api/event` on `besokskollen ingest` → Kafka, with one `besokskollen worker` running
   (distributed topology, ClickHouse behind the HTTP front from tests/chfront.py);
4. with `--goatcounter PATH`, GoatCounter's `GET /count` (build recipe: ../shared/INFRA-NOTES.md;
   never committed).

Afterwards every event accepted by 2 and 3 must show up in the API (pageviews, custom events as a
goal, clicks); the time until it did is printed, and the end-to-end rate: accepted events over the
load's seconds plus that wait. req/s alone rewards a server that answers fast by leaving its
stream work for after the load (an earlier embedded batch collector took ~1.5× the requests of
today's in 10 s, and finished writing them 8-10 s later: docs/benchmarks.md).

    python3 tests/bench/bench_ingest.py [--seconds 10] [--connections 64] [--goatcounter PATH]

Needs wrk (`apt-get install wrk`). Not run by CI: numbers on 2 shared cores are noisy."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import ADMIN_KEY, free_port, process, wait_until  # noqa: E402

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "besokskollen"]
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
UNLIMITED = {"BK_ADMIN_KEY": ADMIN_KEY, "BK_RATE_LIMIT_PER_MINUTE": "1000000"}


def wrk(url: str, seconds: int, connections: int, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(HERE / "load.lua"), url],
        capture_output=True, text=True, check=True, env={**os.environ, **(env or {})},
    ).stdout
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "total": int(re.search(r"(\d+) requests in", out).group(1)), "non2xx": non2xx,
            "p50": re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1),
            "p99": re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1),
            "errors": errors.group(1) if errors else ""}


def prepare_site(api: str) -> str:
    site = httpx.post(f"{api}/api/v1/sites", json={"domain": "bench.example"}, headers=AUTH).json()["data"]["id"]
    goal = {"site_id": site, "name": "Nyhetsbrev", "event_type": "event", "match_event": "newsletter"}
    assert httpx.post(f"{api}/api/v1/goals", json=goal, headers=AUTH).status_code == 201
    return site


def counted(api: str, site: str) -> int:
    """Pageviews + custom events + clicks the API reports for the site."""
    get = lambda path, **p: httpx.get(f"{api}/api/v1/{path}", params={"site_id": site, **p}, headers=AUTH,  # noqa: E731
                                      timeout=60).json()
    return (get("stats/overview", period="7d")["data"]["pageviews"]
            + sum(g["conversions"] for g in get("goals", period="7d")["data"])
            + get("popular/products", days=1, limit=100)["meta"]["total_clicks"])


def load_and_check(name: str, ingest: str, api: str, site: str, args) -> dict:
    result = wrk(ingest, args.seconds, args.connections, {"BK_BENCH_SITE": site})
    accepted, done = result["total"] - result["non2xx"], time.monotonic()
    # wrk does not count requests still in flight when it stops: the server may count a few more.
    seen = wait_until(lambda: (n := counted(api, site)) >= accepted and n, 900, f"{name}: every accepted event",
                      interval=0.5)
    visible_after = time.monotonic() - done
    result.update(accepted=accepted, counted=seen, visible_after=visible_after,
                  end_to_end=accepted / (args.seconds + visible_after))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--goatcounter", type=Path, help="a GoatCounter binary to compare against")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bk-bench-"))
    results: dict[str, dict] = {}

    port = free_port()
    with process([sys.executable, "-m", "uvicorn", "tests.bench.baseline:app", "--port", str(port),
                  "--no-access-log", "--log-level", "warning"], tmp / "baseline.log",
                 ready_url=f"http://127.0.0.1:{port}/"):
        results["ceiling (bare ASGI 202)"] = wrk(f"http://127.0.0.1:{port}", args.seconds, args.connections)

    port = free_port()
    up = f"http://127.0.0.1:{port}"
    with process([*CLI, "up", "--data", str(tmp / "data"), "--port", str(port)], tmp / "up.log", env=UNLIMITED,
                 ready_url=f"{up}/api/v1/openapi.json"):
        results["/api/event embedded (up)"] = load_and_check("embedded", up, up, prepare_site(up), args)

    with ExitStack() as stack:
        kafka_port, controller = free_port(), free_port()
        subprocess.run([str(ROOT / "deploy/kafka/start.sh"), "--data", str(tmp / "kafka"), "--port", str(kafka_port),
                        "--controller-port", str(controller)], check=True)
        stack.callback(subprocess.run, [str(ROOT / "deploy/kafka/stop.sh"), "--data", str(tmp / "kafka")])
        ready = tmp / "chfront.ready"
        stack.enter_context(process([sys.executable, "-m", "tests.chfront", "--path", str(tmp / "ch"), "--port", "0",
                                     "--ready-file", str(ready)], tmp / "chfront.log"))
        ch_port = wait_until(lambda: ready.exists() and ready.read_text().strip(), 60, "the ClickHouse front")
        env = {**UNLIMITED, "BK_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
               "BK_CLICKHOUSE_URL": f"http://127.0.0.1:{ch_port}/?compress=false", "BK_SPOOL_DIR": str(tmp / "spool")}
        api_port, ingest_port = free_port(), free_port()
        api, ingest = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ingest_port}"
        stack.enter_context(process([*CLI, "api", "--port", str(api_port)], tmp / "api.log", env=env,
                                    ready_url=f"{api}/api/v1/openapi.json"))
        stack.enter_context(process([*CLI, "ingest", "--port", str(ingest_port)], tmp / "ingest.log", env=env,
                                    ready_url=f"{ingest}/js/script.js"))
        stack.enter_context(process([*CLI, "worker", "--port", str(free_port())], tmp / "worker.log", env=env))
        results["/api/event distributed (ingest → Kafka, 1 worker)"] = load_and_check(
            "distributed", ingest, api, prepare_site(api), args)

    if args.goatcounter:
        db, port = tmp / "goatcounter.sqlite3", free_port()
        subprocess.run([str(args.goatcounter), "db", "create", "site", "-createdb", "-vhost=stats.localhost",
                        "-user.email=bench@example.com", "-user.password=benchbench", f"-db=sqlite+{db}"],
                       check=True, capture_output=True)
        with process([str(args.goatcounter), "serve", "-listen", f"127.0.0.1:{port}", "-tls", "http",
                      f"-db=sqlite+{db}"], tmp / "goatcounter.log"):
            time.sleep(2)
            results["GoatCounter /count"] = wrk(f"http://127.0.0.1:{port}", args.seconds, args.connections,
                                                {"BK_BENCH_TARGET": "goatcounter"})

    ceiling = results["ceiling (bare ASGI 202)"]["rps"]
    goat = results.get("GoatCounter /count", {}).get("rps")
    print(f"\n{'target':52} {'req/s':>8} {'× ceiling':>9} {'× Goat':>7} {'p50':>8} {'p99':>8}  checked")
    for name, r in results.items():
        check = (f"accepted {r['accepted']:,}, counted {r['counted']:,}, all visible {r['visible_after']:.1f} s later"
                 f" ({r['end_to_end']:,.0f} events/s end to end)" if "accepted" in r else f"non-2xx {r['non2xx']}")
        print(f"{name:52} {r['rps']:8,.0f} {r['rps'] / ceiling:9.2f} {r['rps'] / goat if goat else float('nan'):7.2f}"
              f" {r['p50']:>8} {r['p99']:>8}  {check}{'; socket errors ' + r['errors'] if r['errors'] else ''}")


if __name__ == "__main__":
    main()
