"""Import speed: `--events` events of the reference generator (3 sites, 90 days) put through
`POST /api/v1/events/import` of the `up` application in this process (chDB in a temporary folder),
in 20,000-line requests, site by site as the reference test does. Prints events/s overall and the
seconds per request. `--repo` runs another checkout (a worktree of an older commit) on the same
lines; run both in turn, more than once: 2 shared cores make single runs noisy.

    python3 tests/bench/bench_import.py [--events 100000] [--repo PATH]

Not run by CI: it prints numbers."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

CHUNK = 20_000


async def run(lines: list[dict], sites) -> list[float]:
    import httpx

    from besokskollen.app import make_handoff, open_services, server_app
    from besokskollen.config import Settings
    from tests.conftest import ADMIN_KEY
    from tests.reference import to_ndjson

    services = open_services(Settings(clickhouse_url=f"chdb://{tempfile.mkdtemp()}", admin_key=ADMIN_KEY,
                                      kafka_bootstrap=None, rate_limit_per_minute=1_000_000))
    handoff = make_handoff(services)
    await handoff.start()
    took = []
    try:
        transport = httpx.ASGITransport(app=server_app(services, handoff), client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                     headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=600) as client:
            for site in sites:
                r = await client.post("/api/v1/sites", json={"domain": site.domain, "timezone": site.timezone})
                assert r.status_code == 201, r.text
            for site in sites:
                mine = [line for line in lines if line["site_id"] == site.site_id]
                for i in range(0, len(mine), CHUNK):
                    started = time.perf_counter()
                    r = await client.post("/api/v1/events/import", params={"site_id": site.site_id},
                                          content=to_ndjson(mine[i:i + CHUNK]),
                                          headers={"content-type": "application/x-ndjson"})
                    assert r.status_code == 200 and r.json()["data"]["stored"], r.text
                    took.append(time.perf_counter() - started)
    finally:
        await handoff.stop()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    import ingest.import_route
    assert ingest.import_route.__file__.startswith(str(args.repo.resolve())), ingest.import_route.__file__
    from tests.reference import generate
    from tests.test_stats_reference import sites_for

    sites = sites_for("bench")
    lines = generate(seed=20261129, sites=sites, now=datetime.now(timezone.utc), target_events=args.events, clicks=True)
    took = asyncio.run(run(lines, sites))
    print(f"{args.repo}: {len(lines)} events in {sum(took):.1f} s = {len(lines) / sum(took):,.0f} events/s; "
          f"per request: {' '.join(f'{t:.1f}' for t in took)} s")


if __name__ == "__main__":
    main()
