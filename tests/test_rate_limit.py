"""Rate limits under /api/v1 (query_api/rate_limit.py): 100 requests per 60-s window per API key,
failed authentication throttled per client address, the X-RateLimit-* headers on every response,
429 with Retry-After. Each test counts with keys of its own, on the `up` app of its own (a new
one per test), with an injected clock."""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

import httpx
import pytest

from query_api.rate_limit import DEFAULT_FAILED_AUTH_LIMIT, DEFAULT_LIMIT, RateLimiter, SharedRateLimiter
from tests.test_query_api import API, assert_error, bearer, create_site

T0 = 1_900_000_000.25  # a fixed epoch second (with a fraction: Reset rounds up)
ADDRESS = "198.51.100.7"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(embedded) -> Clock:
    clock = Clock(T0)
    embedded[0].state.rate_limiter.clock = clock
    return clock


def limits(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return int(h["x-ratelimit-limit"]), int(h["x-ratelimit-remaining"]), int(h["x-ratelimit-reset"])


def assert_rate_limited(response: httpx.Response, retry_after: int) -> None:
    error = assert_error(response, 429)
    assert error["code"] == "rate_limited"
    assert response.headers["retry-after"] == str(retry_after)
    assert int(response.headers["x-ratelimit-remaining"]) == 0


def no_key(headers: dict | None = None) -> dict:
    return {"authorization": "", **(headers or {})}


async def test_100_requests_pass_and_the_101st_is_429(client, services, clock):
    site = await create_site(client)
    key = services.keys.create("default")
    url = f"{API}/sites/{site['id']}"
    for i in range(DEFAULT_LIMIT):
        response = await client.get(url, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert limits(response) == (100, 99 - i, math.ceil(T0 + 60))
        assert "retry-after" not in response.headers

    refused = await client.get(url, headers=bearer(key))
    assert_rate_limited(refused, 60)
    assert limits(refused) == (100, 0, math.ceil(T0 + 60))
    assert "100" in refused.json()["error"]["message"]
    # Whatever the method or path: the key is out of requests.
    assert_rate_limited(await client.post(f"{API}/sites", json={"domain": "x.example"}, headers=bearer(key)), 60)
    head = await client.head(url, headers=bearer(key))
    assert (head.status_code, head.headers["retry-after"], head.content) == (429, "60", b"")

    clock.now = T0 + 41.5
    assert_rate_limited(await client.get(url, headers=bearer(key)), 19)

    # Limits are per key: another key, and the admin key, are untouched.
    other = services.keys.create("default")
    response = await client.get(url, headers=bearer(other))
    assert response.status_code == 200
    assert limits(response) == (100, 99, math.ceil(T0 + 41.5 + 60))
    assert (await client.get(url)).status_code == 200


async def test_the_window_resets(client, services, clock):
    site = await create_site(client)
    key = services.keys.create("default", site["id"])
    url = f"{API}/stats/overview?site_id={site['id']}&period=7d"
    # The window starts at the key's first request, not at the minute.
    clock.now = T0 + 7
    for _ in range(DEFAULT_LIMIT):
        assert (await client.get(url, headers=bearer(key))).status_code == 200
        clock.now += 0.5
    assert clock.now == T0 + 57
    assert_rate_limited(await client.get(url, headers=bearer(key)), 10)

    clock.now = T0 + 67 - 0.001
    assert_rate_limited(await client.get(url, headers=bearer(key)), 1)
    clock.now = T0 + 67
    response = await client.get(url, headers=bearer(key))
    assert response.status_code == 200
    assert limits(response) == (100, 99, math.ceil(T0 + 127))


async def test_every_response_carries_the_headers_counting_down(client, services):
    site = await create_site(client)
    key = services.keys.create("default")  # user level, account "default"
    # A site of another account: 403 for `key`.
    stranger = services.keys.create(f"acct-{uuid.uuid4().hex[:8]}")
    foreign_site = (await client.post(f"{API}/sites", json={"domain": f"o-{uuid.uuid4().hex[:8]}.example"},
                                      headers=bearer(stranger))).json()["data"]
    before = time.time()

    ok = await client.get(f"{API}/sites/{site['id']}", headers=bearer(key))
    not_modified = await client.get(f"{API}/sites/{site['id']}",
                                    headers={**bearer(key), "if-none-match": ok.headers["etag"]})
    bad = await client.get(f"{API}/stats/overview?site_id={site['id']}&period=5d", headers=bearer(key))
    forbidden = await client.get(f"{API}/sites/{foreign_site['id']}", headers=bearer(key))
    missing = await client.get(f"{API}/sites/no-such-{uuid.uuid4().hex[:8]}", headers=bearer(key))
    too_large = await client.post(f"{API}/sites", content=b"x" * (1024 * 1024 + 1),
                                  headers={**bearer(key), "content-type": "application/json"})
    not_allowed = await client.put(f"{API}/sites", headers=bearer(key))
    imported = await client.post(f"{API}/events/import?site_id={site['id']}", content=b"{}",
                                 headers={**bearer(key), "content-type": "multipart/form-data; boundary=x"})
    head = await client.head(f"{API}/sites/{site['id']}", headers=bearer(key))
    responses = [ok, not_modified, bad, forbidden, missing, too_large, not_allowed, imported, head]
    assert [r.status_code for r in responses] == [200, 304, 400, 403, 404, 413, 405, 415, 200]

    resets = set()
    for i, response in enumerate(responses):
        limit, remaining, reset = limits(response)
        assert (limit, remaining) == (100, 99 - i), (i, response.status_code)
        assert reset > before and reset <= math.ceil(time.time() + 60)
        assert response.headers["x-ratelimit-reset"].isdigit()  # whole epoch seconds
        resets.add(reset)
    assert len(resets) == 1

    # 401s count against the address (failed authentication), with their own limit.
    for i, headers in enumerate([no_key(), bearer("bk_no_such_key_0000000000"), {"authorization": "Basic eDp5"}]):
        response = await client.get(f"{API}/sites", headers=headers)
        assert_error(response, 401)
        limit, remaining, reset = limits(response)
        assert (limit, remaining) == (DEFAULT_FAILED_AUTH_LIMIT, DEFAULT_FAILED_AUTH_LIMIT - 1 - i)
        assert reset > before


async def test_a_500_carries_the_headers_and_no_details(embedded, services, monkeypatch):
    import query_api.sites

    app, _ = embedded
    site_id = f"crash-{uuid.uuid4().hex[:8]}"
    services.sites.create("default", f"{site_id}.example", site_id=site_id)
    key = services.keys.create("default")

    def boom(*args, **kwargs):
        raise RuntimeError("SELECT secret FROM somewhere")

    monkeypatch.setattr(query_api.sites, "sites_with_events", boom)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        response = await c.get(f"{API}/sites/{site_id}", headers=bearer(key))
    assert assert_error(response, 500)["code"] == "internal_error"
    assert "SELECT" not in response.text
    assert limits(response)[:2] == (100, 99)
    assert "authorization" in response.headers["vary"].lower()


async def test_failed_authentication_is_throttled_per_address(client, services, clock):
    url = f"{API}/sites"
    attacker = {"x-forwarded-for": ADDRESS}  # the test client's peer, 127.0.0.1, is a trusted proxy
    for i in range(DEFAULT_FAILED_AUTH_LIMIT):
        headers = no_key(attacker) if i % 2 else {**attacker, **bearer(f"bk_guess_{i:04d}_abcdefghijkl")}
        response = await client.get(url, headers=headers)
        assert_error(response, 401)
        assert limits(response)[:2] == (DEFAULT_FAILED_AUTH_LIMIT, DEFAULT_FAILED_AUTH_LIMIT - 1 - i)
    assert_rate_limited(await client.get(url, headers={**attacker, **bearer("bk_guess_again_abcdefghijkl")}), 60)
    assert_rate_limited(await client.get(url, headers=no_key(attacker)), 60)

    # Another address still gets its 401s; a valid key from the throttled address still works.
    assert_error(await client.get(url, headers=no_key({"x-forwarded-for": "198.51.100.8"})), 401)
    key = services.keys.create("default")
    response = await client.get(url, headers={**attacker, **bearer(key)})
    assert response.status_code == 200
    assert limits(response)[:2] == (100, 99)

    clock.now = T0 + 60
    assert_error(await client.get(url, headers=no_key(attacker)), 401)


async def test_forwarded_for_is_ignored_from_untrusted_peers(embedded, clock):
    app, _ = embedded
    transport = httpx.ASGITransport(app=app, client=("203.0.113.50", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        for i in range(DEFAULT_FAILED_AUTH_LIMIT):
            # A spoofed X-Forwarded-For per attempt does not make a fresh address.
            assert_error(await c.get(f"{API}/sites", headers={"x-forwarded-for": f"192.0.2.{i}"}), 401)
        assert_rate_limited(await c.get(f"{API}/sites", headers={"x-forwarded-for": "192.0.2.200"}), 60)
    # Through a trusted proxy, X-Forwarded-For names the client: the same address, or another.
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        assert_rate_limited(await c.get(f"{API}/sites", headers={"x-forwarded-for": "203.0.113.50"}), 60)
        assert_error(await c.get(f"{API}/sites", headers={"x-forwarded-for": "203.0.113.51"}), 401)


async def test_openapi_and_docs_are_not_limited(client, clock):
    for _ in range(DEFAULT_FAILED_AUTH_LIMIT + 5):
        for path in ("/openapi.json", "/docs"):
            response = await client.get(API + path, headers=no_key())
            assert response.status_code == 200
            assert "x-ratelimit-limit" not in response.headers


async def test_openapi_and_docs_have_the_cache_headers_of_every_get(client):
    """SPEC §7: every GET answers the cache headers and a strong ETag, and If-None-Match a 304."""
    from query_api.deps import CACHE_CONTROL

    for path, media_type in (("/openapi.json", "application/json"), ("/docs", "text/html")):
        response = await client.get(API + path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
        assert response.headers["cache-control"] == CACHE_CONTROL
        etag = response.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"')
        again = await client.get(API + path, headers={"if-none-match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag and not again.content
        assert (await client.head(API + path)).headers["etag"] == etag
    assert "paths" in (await client.get(f"{API}/openapi.json")).json()
    assert b"/api/v1/openapi.json" in (await client.get(f"{API}/docs")).content


async def test_batch_internal_requests_are_not_counted(embedded, client, services, clock):
    app, _ = embedded
    site = await create_site(client)
    key = services.keys.create("default", site["id"])
    path = f"{API}/stats/overview"
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    for _ in range(DEFAULT_LIMIT + 5):
        sent.clear()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": f"site_id={site['id']}&period=7d".encode(),
                 "headers": [(b"authorization", f"Bearer {key}".encode())],
                 "client": ("127.0.0.1", 5000), "server": ("testserver", 80), "state": {"batch_internal": True}}
        await app(scope, receive, send)
        start = sent[0]
        assert start["status"] == 200
        assert not any(name.lower().startswith(b"x-ratelimit") for name, _ in start["headers"])

    response = await client.get(f"{path}?site_id={site['id']}&period=7d", headers=bearer(key))
    assert response.status_code == 200
    assert limits(response)[:2] == (100, 99)


async def test_a_batch_counts_as_one_request(embedded, client, services, clock):
    if not any(getattr(r, "path", "") == f"{API}/batch" for r in embedded[0].routes) and \
            f"{API}/batch" not in (await client.get(f"{API}/openapi.json")).json()["paths"]:
        pytest.skip("no batch endpoint")
    site = await create_site(client)
    key = services.keys.create("default", site["id"])
    body = {"site_id": site["id"], "requests": [{"endpoint": "stats/overview", "params": {"period": "7d"}},
                                                 {"endpoint": "stats/pages"}, {"endpoint": "popular/products"}]}
    first = await client.post(f"{API}/batch", json=body, headers=bearer(key))
    assert first.status_code == 200, first.text
    assert limits(first)[:2] == (100, 99)
    second = await client.post(f"{API}/batch", json=body, headers=bearer(key))
    assert limits(second)[:2] == (100, 98)


def test_ended_windows_are_dropped():
    """Clients choose keys and addresses: the counters of ended windows do not pile up."""
    clock = Clock(T0)
    limiter = RateLimiter(clock=clock)
    for i in range(10_000):
        limiter.hit([(f"addr:{i}", 30)])
    clock.now = T0 + 60
    for i in range(10):
        assert limiter.hit([(f"addr:new-{i}", 30)]).remaining == 29
    assert len(limiter._windows) <= 10


def test_refused_requests_leave_no_counters():
    """An address over its limit that sends a new token each time (guessing keys) opens no window
    per token: refused requests are not counted, in memory as in Redis."""
    limiter = RateLimiter(clock=Clock(T0))
    for i in range(5_000):
        decision = limiter.hit([(f"key:{i}", 100), ("addr:198.51.100.7", 30)])
        assert decision.allowed == (i < 30)
    assert len(limiter._windows) == 30 + 1


async def test_the_import_on_ingest_is_limited_like_the_rest_of_the_api(services, embedded):
    """`ingest` serves /api/v1/events/import: per key, with the headers, and refused keys per address."""
    from besokskollen.app import ingest_server_app

    services_limited = dataclasses.replace(services, settings=services.settings.model_copy(
        update={"rate_limit_per_minute": 2, "kafka_bootstrap": "127.0.0.1:1"}))  # the hand-off is the embedded one
    app = ingest_server_app(services_limited, embedded[1])
    transport = httpx.ASGITransport(app=app, client=(ADDRESS, 5000))
    key = services.keys.create("default")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        answers = [await c.post("/api/v1/events/import?site_id=none", content=b"{}\n",
                                headers={"authorization": f"Bearer {key}", "content-type": "application/x-ndjson"})
                   for _ in range(3)]
        assert [r.status_code for r in answers] == [404, 404, 429]
        assert limits(answers[0])[:2] == (2, 1) and answers[2].headers["retry-after"]
        refused = [await c.post("/api/v1/events/import?site_id=none", content=b"{}\n",
                                headers={"authorization": "Bearer bk_wrong"}) for _ in range(DEFAULT_FAILED_AUTH_LIMIT + 1)]
        assert refused[-1].status_code == 429


async def test_an_unreachable_redis_is_asked_again_only_after_a_pause():
    """Without Redis, requests are counted in the process (fail open, never a 5xx); a Redis that
    hangs would otherwise cost every request the socket timeout until it answers again."""
    clock = Clock(100.0)
    limiter = SharedRateLimiter("redis://127.0.0.1:1/0", limit=3)
    limiter.clock = clock
    calls = []

    async def failing(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("Redis hangs")

    limiter._decide = failing
    decisions = [await limiter.decide([("key:x", 3)]) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]  # counted in memory meanwhile
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert len(calls) == 1
    clock.now += 5.0  # SharedRateLimiter's retry_s
    await limiter.decide([("key:x", 3)])
    assert len(calls) == 2

    # An error Redis answers costs no timeout: it is asked again at once.
    import redis.exceptions

    async def refusing(**kwargs):
        calls.append(kwargs)
        raise redis.exceptions.ResponseError("BUSY")

    clock.now += 5.0
    limiter._decide = refusing
    await limiter.decide([("key:y", 3)])
    await limiter.decide([("key:y", 3)])
    assert len(calls) == 4


async def test_query_time_counts_a_429_under_the_endpoint_asked_for_and_no_probe(client, embedded, services, clock):
    """The rate limit answers before routing: its 429s were `unmatched`, beside 404s, probes and
    scrapes, and each endpoint's request rate on /metrics was short by them."""
    from prometheus_client import REGISTRY

    def count(endpoint: str) -> float:
        return REGISTRY.get_sample_value("bk_query_seconds_count", {"endpoint": endpoint}) or 0.0

    site = await create_site(client)
    key = services.keys.create("default")
    url = f"{API}/sites/{site['id']}"
    endpoint = "GET /sites/{site_id}"
    before, unmatched = count(endpoint), count("unmatched")
    embedded[0].state.rate_limiter.limit = 2
    answers = [(await client.get(url, headers=bearer(key))).status_code for _ in range(3)]
    assert answers == [200, 200, 429]
    await client.get("/healthz")
    await client.get("/metrics")
    assert count(endpoint) - before == 3 and count("unmatched") == unmatched
    await client.get(f"{API}/no-such-endpoint", headers=bearer(services.keys.create("default")))
    assert count("unmatched") == unmatched + 1
