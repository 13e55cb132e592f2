"""End to end through real processes: events posted to /api/event come back from the query API
with exactly the numbers the events imply — in the embedded topology (`besokskollen up`) and the
distributed one (Kafka, two Faust worker processes, separate ingest and API processes, one
ClickHouse behind the HTTP front)."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from tests.conftest import (ADMIN_KEY, clear_of_utc_midnight, free_port, process, stable_group_size, up_server,
                            wait_until)
from tests.traffic import PRODUCTS, Traffic

VISITORS = 350  # ≈ 1,100 events
DOMAIN = "shop.example"
SITE = "shop-example"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
CLI = [sys.executable, "-m", "besokskollen"]
# The API is polled until it agrees: more than the default 100 requests a minute of one key.
ENV = {"BK_ADMIN_KEY": ADMIN_KEY, "BK_RATE_LIMIT_PER_MINUTE": "100000"}
# Each topology's run (posting, then polling until the numbers agree) takes well under this;
# `days=1` and the daily rows are today's, so a UTC midnight must not fall within one.
RUN_SECONDS = 300


def traffic() -> Traffic:
    return Traffic.generate(SITE, VISITORS, seed=11)


def expected_answers(t: Traffic) -> dict:
    clicks = t.expected_clicks()
    ranked = sorted(clicks.items(), key=lambda kv: (-kv[1], kv[0]))
    apple = {pid for pid, _, brand in PRODUCTS if brand == "apple"}
    total = sum(clicks.values())
    return {
        "overview": t.expected_overview(),
        "products": [{"product_id": p, "product_slug": p, "clicks": n} for p, n in ranked],
        "total_clicks": total,
        "apple_total": sum(n for p, n in clicks.items() if p in apple),
    }


def answers(api: str) -> dict:
    """The API's answers for the numbers `expected_answers` predicts, plus the raw responses."""
    with httpx.Client(base_url=api, headers=AUTH, timeout=10) as c:
        responses = [c.get(f"/api/v1/stats/overview?site_id={SITE}&period=7d"),
                     c.get(f"/api/v1/popular/products?site_id={SITE}&days=1"),
                     c.get(f"/api/v1/popular/products?site_id={SITE}&days=7&brand_slug=apple")]
    if failed := [r for r in responses if r.status_code != 200]:
        return {"failed": [(str(r.url), r.status_code, r.text) for r in failed]}
    overview, products, apple = (r.json() for r in responses)
    overview = overview["data"]
    return {
        "overview": {k: overview[k] for k in ("visitors", "pageviews", "sessions", "bounce_rate")},
        "products": products["data"],
        "total_clicks": products["meta"]["total_clicks"],
        "apple_total": apple["meta"]["total_clicks"],
        "raw": {"overview": overview, "products": products, "apple": apple},
    }


def settle(api: str, expected: dict, timeout: float = 90) -> dict:
    """Poll until the API agrees with `expected` (freshness is seconds) or time runs out; the
    caller asserts on what came back, so a mismatch shows as a diff."""
    last: dict = {}

    def agrees() -> bool:
        nonlocal last
        last = answers(api)
        return {k: last.get(k) for k in expected} == expected

    try:
        wait_until(agrees, timeout, "the query API to reflect every event", interval=0.5)
    except TimeoutError:
        pass
    return last


def create_site(api: str) -> None:
    response = httpx.post(f"{api}/api/v1/sites", json={"domain": DOMAIN}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["data"]["id"] == SITE


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    clear_of_utc_midnight(RUN_SECONDS)
    with up_server(tmp / "data", tmp / "up.log", env=ENV) as base:
        create_site(base)
        t = traffic()
        asyncio.run(t.send(base))
        expected = expected_answers(t)
        yield expected, settle(base, expected)


@pytest.mark.slow
def test_embedded_topology_counts_exactly(embedded_run):
    expected, got = embedded_run
    assert len(traffic().posts) >= 1000
    assert {k: got.get(k) for k in expected} == expected
    overview = got["raw"]["overview"]
    assert len(overview["daily"]) == 7 and overview["daily"][-1]["pageviews"] == expected["overview"]["pageviews"]
    meta = got["raw"]["products"]["meta"]
    assert meta["confidence"] == "high" and set(meta["period"]) == {"from", "to"}


@pytest.mark.slow
def test_distributed_topology_matches_events_and_embedded(embedded_run, kafka, clickhouse_http, tmp_path):
    expected, embedded = embedded_run
    env = {"BK_KAFKA_BOOTSTRAP": kafka, "BK_CLICKHOUSE_URL": clickhouse_http, **ENV,
           "BK_KAFKA_TOPIC": f"events-{tmp_path.name}", "BK_SPOOL_DIR": str(tmp_path / "spool")}
    ingest_port, api_port = free_port(), free_port()
    ingest, api = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{api_port}"
    with (
        process([*CLI, "api", "--port", str(api_port)], tmp_path / "api.log", env,
                ready_url=f"{api}/api/v1/openapi.json"),
        process([*CLI, "ingest", "--port", str(ingest_port)], tmp_path / "ingest.log", env,
                ready_url=f"{ingest}/api/event"),
        process([*CLI, "worker", "--port", str(free_port())], tmp_path / "worker-1.log", env),
        process([*CLI, "worker", "--port", str(free_port())], tmp_path / "worker-2.log", env),  # the partitions are shared
    ):
        # Both workers in the group, sharing the partitions, before the first event is sent.
        wait_until(lambda: stable_group_size(kafka, "besokskollen") == 2, 90, "two workers in the consumer group",
                   interval=0.5)
        create_site(api)
        clear_of_utc_midnight(RUN_SECONDS)
        t = traffic()
        asyncio.run(t.send(ingest))
        got = settle(api, expected)
        assert stable_group_size(kafka, "besokskollen") == 2

    assert {k: got.get(k) for k in expected} == expected
    # Same events, same answers as the embedded topology, response for response, where both runs
    # were on one UTC day (each waits for a midnight due during it, but they may run hours apart).
    same_day = got["raw"]["products"]["meta"]["period"] == embedded["raw"]["products"]["meta"]["period"]
    for name in ("overview", "products", "apple"):
        assert got["raw"][name] == embedded["raw"][name] or not same_day, name
