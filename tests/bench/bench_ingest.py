"""Tracking-endpoint throughput, embedded topology: `POST /api/event` on `besokskollen up` against
a bare ASGI app answering 202 under the same uvicorn (the ceiling), both loaded by wrk in the same
run. Then checks that every accepted event shows up in the API, and how long that took.

    python3 tests/bench/bench_ingest.py [--seconds 10] [--connections 64]

Needs wrk (`apt-get install wrk`). Not run by CI: numbers on 2 shared cores are noisy."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import ADMIN_KEY, free_port, process, wait_until  # noqa: E402

HERE = Path(__file__).resolve().parent


def wrk(url: str, seconds: int, connections: int, env: dict[str, str]) -> tuple[float, int, int, str]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(HERE / "post_event.lua"), url],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    p50 = re.search(r"50%\s+(\S+)", out).group(1)
    return rps, total, non2xx, p50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bk-bench-"))

    port = free_port()
    with process([sys.executable, "-m", "uvicorn", "tests.bench.baseline:app", "--port", str(port),
                  "--no-access-log", "--log-level", "warning"], tmp / "baseline.log",
                 ready_url=f"http://127.0.0.1:{port}/"):
        base_rps, _, _, base_p50 = wrk(f"http://127.0.0.1:{port}", args.seconds, args.connections, {})

    port = free_port()
    api = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    with process([sys.executable, "-m", "besokskollen", "up", "--data", str(tmp / "data"), "--port", str(port)],
                 tmp / "up.log", env={"BK_ADMIN_KEY": ADMIN_KEY}, ready_url=f"{api}/api/v1/openapi.json"):
        site = httpx.post(f"{api}/api/v1/sites", json={"domain": "bench.example"}, headers=auth).json()["data"]["id"]
        rps, total, non2xx, p50 = wrk(api, args.seconds, args.connections, {"BK_BENCH_SITE": site})
        accepted = total - non2xx
        done = time.monotonic()

        def counted() -> int:
            r = httpx.get(f"{api}/api/v1/stats/overview?site_id={site}&period=7d", headers=auth).json()
            clicks = httpx.get(f"{api}/api/v1/popular/products?site_id={site}&days=1", headers=auth).json()
            n = r["data"]["pageviews"] + clicks["meta"]["total_clicks"]
            return n if n >= accepted else 0

        seen = wait_until(counted, 300, "every accepted event to be counted", interval=0.2)
        lag = time.monotonic() - done

    print(f"baseline (bare ASGI 202): {base_rps:,.0f} req/s, p50 {base_p50}")
    print(f"/api/event (embedded):    {rps:,.0f} req/s, p50 {p50}  = {rps / base_rps:.2f} x baseline")
    # wrk does not count requests still in flight when it stops, so the server may count a few more.
    print(f"accepted {accepted:,} (+ up to {args.connections} in flight), rejected {non2xx}, counted {seen:,};"
          f" all visible {lag:.1f} s after the load stopped")


if __name__ == "__main__":
    main()
