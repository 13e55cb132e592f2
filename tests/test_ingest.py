"""POST /api/event: validation, bots, limits — and that nothing accepted is lost around them."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from starlette.requests import ClientDisconnect, Request

from ingest.bodies import BodyTooSlow, read_body
from ingest.spool import SpoolFull, SpoolUnwritable
from streams.read_cache import ReadThroughCache
from tests.conftest import BROWSER, wait_until
from tests.traffic import Traffic


@pytest.fixture
async def site(client):
    response = await client.post("/api/v1/sites", json={"domain": f"ingest-{uuid.uuid4().hex[:10]}.example"})
    assert response.status_code == 201, response.text
    return response.json()["data"]["id"]


def pageview(site_id: str, **extra) -> dict:
    return {"site_id": site_id, "name": "pageview", "url": "https://ingest.example/a", **extra}


async def post(client, body: bytes | dict, **headers):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    return await client.post("/api/event", headers={"user-agent": BROWSER, **headers}, **kwargs)


@pytest.mark.parametrize("body, status, code, field", [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({"site_id": "x", "url": "https://a.example/"}, 400, "missing_field", "name"),
    ({"name": "pageview", "url": "https://a.example/"}, 400, "invalid_field", "site_id"),
    ({"site_id": "x", "name": "pageview"}, 400, "missing_field", "url"),
    ({"site_id": "x", "name": "pageview", "url": "/relative/path"}, 400, "invalid_field", "url"),
    ({"site_id": "x", "name": "click", "url": "https://a.example/"}, 400, "invalid_field", "product"),
    ({"site_id": "x", "name": "click", "url": "https://a.example/", "product": {"id": "c\u00851"}}, 400, "invalid_field",
     "product.id"),  # a C1 control character (NEL), as a C0 one
    ({"site_id": "x", "name": "sign\u009fup", "url": "https://a.example/"}, 400, "invalid_field", "name"),
    ({"site_id": "x", "name": "pageview", "url": "https://a.example/", "props": {"k": 1}}, 400, "invalid_field", "props.k"),
    ({"site_id": "x", "name": "pageview", "url": "https://a.example/", "props": {f"k{i}": "v" for i in range(31)}},
     400, "invalid_field", "props"),
    ({"site_id": "no-such-site", "name": "pageview", "url": "https://a.example/"}, 404, "unknown_site", "no-such-site"),
    ({"domain": "no-such.example", "name": "pageview", "url": "https://a.example/"}, 404, "unknown_site", "no-such.example"),
])
async def test_bad_input_is_a_clear_4xx(client, body, status, code, field):
    response = await post(client, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    if field:
        assert field in error["message"]
    assert response.headers["access-control-allow-origin"] == "*"


async def test_other_methods_are_405_naming_post_and_options_with_cors(client):
    response = await client.get("/api/event")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST, OPTIONS"
    assert response.headers["access-control-allow-origin"] == "*"
    preflight = await client.options("/api/event")
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]


async def test_oversized_body_is_413(client, site):
    response = await post(client, pageview(site, props={"big": "x" * 1999, **{f"k{i}": "y" * 1999 for i in range(9)}}))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def _request(messages: list[dict], headers: list[tuple[bytes, bytes]] = ()) -> Request:
    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/api/event", "headers": list(headers)}, receive)


async def test_a_body_is_read_whole_from_its_messages_and_no_further_than_the_limit():
    def parts(*chunks: bytes) -> list[dict]:
        return [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    assert await read_body(_request(parts(b'{"a":')), 100, 10) == b'{"a":'
    assert await read_body(_request(parts(b'{"a"', b"", b':1}')), 100, 10) == b'{"a":1}'
    assert await read_body(_request(parts(b"", b"x" * 10)), 100, 10) == b"x" * 10
    assert await read_body(_request([{"type": "http.request"}]), 100, 10) == b""
    # Past the limit without a declared length (chunked): no further message is read.
    messages = parts(b"x" * 60, b"x" * 60, b"never read")
    assert await read_body(_request(messages), 100, 10) is None and len(messages) == 1
    assert await read_body(_request(parts(b"x"), [(b"content-length", b"101")]), 100, 10) is None
    with pytest.raises(ClientDisconnect):  # the client went away mid-body
        await read_body(_request([{"type": "http.request", "body": b"x", "more_body": True}]), 100, 10)


async def test_a_body_that_trickles_in_is_cut_at_its_deadline():
    """A byte every few seconds held a request, and its socket, open for hours (a security audit
    kept 200 open for 90 s and one for 240 s; 16 KiB at that pace is 22 hours)."""
    import asyncio

    async def trickle() -> dict:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    request = Request({"type": "http", "method": "POST", "path": "/api/event", "headers": []}, trickle)
    with pytest.raises(BodyTooSlow):
        await read_body(request, 16_384, deadline_s=0.3)


async def test_a_body_deadline_cancels_only_its_own_read():
    """Body deadlines are kept by a sweep that cancels the reading task, as `asyncio.timeout` does
    (ingest/bodies.py `_BodyDeadlines`): a task cut at its deadline goes on uncancelled, and a
    cancellation from elsewhere while it reads stays a cancellation."""
    import asyncio

    from ingest import bodies

    async def never() -> dict:
        await asyncio.Event().wait()

    def request() -> Request:
        return Request({"type": "http", "method": "POST", "path": "/api/event", "headers": []}, never)

    with pytest.raises(BodyTooSlow):
        await read_body(request(), 16_384, deadline_s=0.1)
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0.01)  # not cancelled again

    reader = asyncio.create_task(read_body(request(), 16_384, deadline_s=10))
    await asyncio.sleep(0.05)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader

    # Cancelled from elsewhere as its deadline expires: the cancellation wins.
    reader = asyncio.create_task(read_body(request(), 16_384, deadline_s=0.01))
    await asyncio.sleep(0.05)
    bodies._deadlines._sweep(asyncio.get_running_loop())
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert not bodies._deadlines._due and not bodies._deadlines._expired


async def test_a_failed_question_whose_askers_were_all_cancelled_logs_no_unretrieved_error(caplog):
    """Requests that share a question about sessions open at midnight (`CarryQuestions`) wait on
    its future through `asyncio.shield`. With every one of them cancelled before it failed, no one
    read the failure, and asyncio logged "Future exception was never retrieved" with a traceback."""
    import asyncio
    import gc
    from datetime import datetime, timedelta, timezone

    from ingest.visitors import CarryQuestions

    class Visitors:
        lenient, timeout = False, timedelta(minutes=30)

        def question(self, *args):
            return ("s", 1)

        def latest_ends(self, keys, since):
            raise RuntimeError("the store refused (a test)")

    carries = CarryQuestions(Visitors())

    async def ask_and_cancel() -> None:  # its frames, which hold the question, go when it returns
        askers = [asyncio.create_task(carries.settle("s", "192.0.2.1", "ua", datetime.now(timezone.utc)))
                  for _ in range(2)]
        await asyncio.sleep(0)
        for asker in askers:
            asker.cancel()
        assert all(isinstance(r, asyncio.CancelledError) for r in await asyncio.gather(*askers, return_exceptions=True))

    await ask_and_cancel()
    await asyncio.to_thread(wait_until, lambda: not carries._answering, 5, "the question answered")
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_trickling_event_is_answered_408_and_its_connection_closed(embedded, monkeypatch):
    """Kept open after the 408, the connection went on taking the rest of the body as slowly as
    the client sent it (an audit's was open 130 s later)."""
    import asyncio

    from ingest import app as ingest_app

    monkeypatch.setattr(ingest_app, "EVENT_BODY_DEADLINE_S", 0.3)
    sent: list[dict] = []

    async def trickle() -> dict:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/event", "raw_path": b"/api/event", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"5000")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    await asyncio.wait_for(embedded[0](scope, trickle, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    assert b"body_timeout" in b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("headers", [
    {"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"},
    {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0 Safari/537.36"},
    {"sec-purpose": "prefetch"},
])
async def test_bots_are_accepted_and_dropped_visibly(client, site, headers):
    response = await post(client, pageview(site), **headers)
    assert response.status_code == 202
    assert response.headers["x-dropped"] == "bot"


async def test_each_step_of_an_event_is_timed_and_counts_the_requests_that_got_to_it(client, site, monkeypatch):
    """`/api/event` runs as named steps, each timed (one request in TIME_EVERY; here every one):
    a request refused or dropped by a step runs no later one, and the drops count by reason."""
    from ingest import app as ingest_app

    monkeypatch.setattr(ingest_app, "TIME_EVERY", 1)

    async def scraped() -> dict[str, float]:
        text = (await client.get("/metrics")).text
        return {name: float(value) for name, _, value in
                (line.rpartition(" ") for line in text.splitlines() if line.startswith("bk_event"))}

    before = await scraped()
    assert (await post(client, pageview(site))).status_code == 202
    assert (await post(client, pageview(site), **{"user-agent": "Mozilla/5.0 (compatible; bingbot/2.0)"})).headers[
        "x-dropped"] == "bot"
    assert (await post(client, pageview(site), **{"sec-purpose": "prefetch;prerender"})).headers["x-dropped"] == "bot"
    assert (await post(client, b"{not json")).status_code == 400
    assert (await post(client, pageview("no-such-site"))).status_code == 404
    after = await scraped()

    def moved(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    steps = ingest_app.EventSteps.ORDER
    assert [moved(f'bk_event_steps_total{{step="{step}"}}') for step in steps] == [5, 5, 4, 3, 1, 1, 1]
    assert all(moved(f'bk_event_step_seconds_total{{step="{step}"}}') > 0 for step in steps)
    assert moved('bk_events_dropped_total{reason="bot"}') == moved('bk_events_dropped_total{reason="prefetch"}') == 1


async def test_a_long_user_agent_is_judged_by_its_start(client, site, monkeypatch):
    """The libraries see no more than the first 512 characters, longer than any browser's (with
    Python's `re`, crawlerdetect's patterns held the event loop 80 s for 20,000 characters). The
    visitor id still hashes the whole header."""
    from ingest import useragents

    seen = []
    monkeypatch.setattr(useragents._crawlers, "is_crawler", lambda ua: seen.append(len(ua)) or False)
    monkeypatch.setattr(useragents.ua_parser, "parse", lambda ua: seen.append(len(ua)) or useragents.ua_parser.Result(
        None, None, None, ua))
    agent = BROWSER + " " + uuid.uuid4().hex + "a" * 20_000
    response = await post(client, pageview(site), **{"user-agent": agent})
    assert response.status_code == 202 and "x-dropped" not in response.headers
    assert seen and max(seen) <= 512, seen
    assert useragents.parse(agent) == useragents.parse(agent[:512])


async def test_text_plain_beacons_and_domain_lookup_are_accepted(client, site):
    response = await post(client, orjson.dumps(pageview(site)), **{"content-type": "text/plain"})
    assert response.status_code == 202, response.text
    assert response.content == b""
    listing = (await client.get(f"/api/v1/sites/{site}")).json()["data"]
    response = await post(client, {"domain": "www." + listing["domain"], "name": "pageview", "url": "https://x.example/"})
    assert response.status_code == 202, response.text
    both = {"site_id": site, "domain": listing["domain"].upper(), "name": "pageview", "url": "https://x.example/"}
    assert (await post(client, both)).status_code == 202  # one site, named twice
    # two sites named: it was counted on site_id's, the domain ignored (the import refuses that)
    for other in ("another-site.example", "not a domain"):
        refused = await post(client, {**both, "domain": other})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "wrong_site", refused.text


async def test_nothing_accepted_is_lost_around_bad_input(client, embedded, site):
    """Bad requests interleaved with good ones: every accepted event is counted, no bad one is."""
    traffic = Traffic.generate(site, visitors=40, seed=3)
    bad = [b"{", {"site_id": site, "url": "https://a/"}, {"site_id": "nope", "name": "pageview", "url": "https://a/"}]
    for i, item in enumerate(traffic.posts):
        if i % 7 == 0:
            assert (await post(client, bad[i % len(bad)])).status_code in (400, 404)
        response = await post(client, item.body, **{"user-agent": item.agent, "x-forwarded-for": item.ip})
        assert response.status_code == 202
    await embedded[1].runner.drain()

    overview = (await client.get(f"/api/v1/stats/overview?site_id={site}&period=7d")).json()["data"]
    expected = traffic.expected_overview()
    assert {k: overview[k] for k in expected} == expected


@pytest.mark.parametrize("refusal, code", [(SpoolUnwritable("cannot write"), "unavailable"),
                                           (SpoolFull("full"), "spool_full")])
async def test_a_journal_that_cannot_take_an_event_is_a_503_with_retry_after(client, embedded, site, monkeypatch,
                                                                           caplog, refusal, code):
    """A journal (or spool) that cannot be written answered 503 without Retry-After, with a
    traceback logged for every event; the spool says once a minute why (tests/test_spool.py)."""
    def refuse(records):
        raise refusal

    monkeypatch.setattr(embedded[1].runner._journal, "append_all", refuse)
    with caplog.at_level("WARNING"):
        response = await post(client, pageview(site))
    assert response.status_code == 503 and response.headers["retry-after"] == "30"
    assert response.json()["error"]["code"] == code and "Traceback" not in caplog.text
    assert "could not accept" not in caplog.text


async def test_a_store_short_of_resources_is_a_503_with_retry_after_and_no_traceback(client, monkeypatch, caplog):
    """`up` out of open files (an audit held 19,900 idle connections): the embedded ClickHouse
    cannot open a descriptor for a lookup. A 503 to come back to, said once per 30 s, not a
    traceback an event."""
    from clickhouse_connect.driver.exceptions import DatabaseError

    from besokskollen.logs import Repeats
    from ingest import app as ingest_app

    def short(*args, **kwargs):
        raise DatabaseError("DB::ErrnoException: Cannot open epoll descriptor, errno: 24, strerror: Too many open"
                            " files. (EPOLL_ERROR)")

    monkeypatch.setattr(ingest_app._away_log, "filters", [Repeats()])  # not what earlier tests said
    monkeypatch.setattr("streams.sites.SiteRegistry.get", short)
    monkeypatch.setattr("streams.sites.SiteRegistry.answers_without_io", lambda self, **kwargs: True)
    with caplog.at_level("WARNING"):
        answers = [await post(client, pageview("s1-not-cached")) for _ in range(3)]
    assert [(r.status_code, r.headers.get("retry-after"), r.json()["error"]["code"]) for r in answers] \
        == [(503, "5", "unavailable")] * 3
    assert "Traceback" not in caplog.text and caplog.text.count("short of resources") == 1


def test_a_row_read_before_is_served_while_the_store_cannot_be_read():
    """Ingest keeps taking events for sites it knows while ClickHouse is restarted."""
    store = {"known": "site"}
    reads = []

    def load(key):
        reads.append(key)
        if store is None:
            raise ConnectionError("ClickHouse is restarting")
        return store.get(key)

    cache = ReadThroughCache(load, miss_ttl_s=0, hit_ttl_s=0)  # every get reads
    assert cache.get("known") == "site"
    store = None
    assert cache.get("known") == "site"  # served on
    with pytest.raises(ConnectionError):
        cache.get("unknown")  # nothing to serve: the caller answers 503
    cache = ReadThroughCache(load, miss_ttl_s=0, hit_ttl_s=0.2)
    store = {"known": "site"}
    cache.get("known")
    time.sleep(0.25)  # stale
    store = None
    reads.clear()
    assert cache.get("known") == cache.get("known") == "site"
    assert reads == ["known"]  # a failed read is not repeated on every request


def test_while_one_caller_reads_a_row_again_the_others_get_it_as_last_read():
    """On a hung ClickHouse a read waits out its timeout: when a site's row was due, every thread
    of ingest's pool read it and waited (an audit: nothing answered for 4 s in every 9). One reads
    it again; the others, and the check that keeps a request off the thread pool, answer from
    memory. A key never read has nothing to serve: each caller reads it."""
    import threading

    release, reading = threading.Event(), threading.Event()
    store, reads = {"known": "site", "new": "other"}, []

    def load(key):
        reads.append(key)
        if store["known"] == "site v2":
            reading.set()
            release.wait(10)
        return store.get(key)

    cache = ReadThroughCache(load, miss_ttl_s=0, hit_ttl_s=0.1)
    assert cache.get("known") == "site"
    time.sleep(0.15)  # due
    store["known"] = "site v2"
    assert not cache.answers_without_io("known")
    first = threading.Thread(target=lambda: reads.append(("first got", cache.get("known"))))
    first.start()
    assert reading.wait(10)
    assert cache.answers_without_io("known") and not cache.answers_without_io("new")
    assert [cache.get("known") for _ in range(3)] == ["site"] * 3  # no read of their own
    release.set()
    first.join(10)
    assert reads == ["known", "known", ("first got", "site v2")]
    assert cache.get("known") == "site v2" and reads[-1] == ("first got", "site v2")  # fresh: no read


def test_a_row_asked_for_is_read_again_ahead_of_its_time_by_a_thread_of_its_own():
    """With `read_ahead` (sites and API keys), a row asked for past half its time is read again in
    the background: the request that found it due waited for that read (~4 s on a hung ClickHouse,
    one request in every ~9 s in an audit). While the read hangs, the row is served as last read,
    also past its time; a failed read keeps it. A row not asked for meanwhile is read when next
    asked, as before: it is never served past its time without a read being made."""
    import threading

    release, store, reads = threading.Event(), {"known": "v1"}, []

    def load(key):
        reads.append(key)
        if len(reads) > 1:
            release.wait(10)
        if store is None:
            raise ConnectionError("ClickHouse is restarting")
        return store.get(key)

    cache = ReadThroughCache(load, miss_ttl_s=0, hit_ttl_s=0.4, read_ahead=True)
    assert cache.get("known") == "v1" and reads == ["known"]
    assert cache.get("known") == "v1" and reads == ["known"]  # not half its time yet: no read
    time.sleep(0.25)
    store["known"] = "v2"
    assert cache.get("known") == "v1"  # answered at once, the read goes on in the background
    wait_until(lambda: len(reads) == 2, 10, "the read ahead", 0.005)
    time.sleep(0.2)  # past its time, the read still hanging
    assert cache.answers_without_io("known")
    assert [cache.get("known") for _ in range(3)] == ["v1"] * 3 and len(reads) == 2
    release.set()
    wait_until(lambda: cache.get("known") == "v2", 10, "the read ahead", 0.005)
    assert len(reads) == 2

    time.sleep(0.25)
    store = None
    assert cache.get("known") == "v2"
    wait_until(lambda: len(reads) == 3, 10, "the read ahead", 0.005)  # failed: served on
    wait_until(lambda: not cache._reading_ahead, 10, "the read ahead", 0.005)
    assert cache.get("known") == "v2"

    time.sleep(0.45)  # not asked for meanwhile: past its time, read before it is served
    store = {"known": "v3"}
    assert not cache.answers_without_io("known")
    assert cache.get("known") == "v3" and len(reads) == 4


def test_while_the_cache_reads_ahead_on_a_hung_database_no_request_waits_for_any_row():
    """Many sites in use on a hung ClickHouse: while the read ahead hangs, every row is served as
    last read, also those past their time that it does not read; once it fails, all are served on
    for another while. An audit found requests for the other sites waiting 1–2 s each, their rows
    read one after another by the requests themselves."""
    import threading

    hung, release, reads = threading.Event(), threading.Event(), []

    def load_many(keys):
        reads.append(list(keys))
        if hung.is_set():
            release.wait(10)
            raise TimeoutError("ClickHouse does not answer")
        return {key: f"row of {key}" for key in keys}

    keys = [f"site-{n}" for n in range(5)]
    cache = ReadThroughCache(lambda key: load_many([key]).get(key), hit_ttl_s=0.4, load_many=load_many,
                             read_ahead=True)
    assert cache.get_many(keys) == {key: f"row of {key}" for key in keys}
    for key in keys:
        cache.get(key)
    hung.set()
    time.sleep(0.25)
    cache._hits["site-4"] = ("row of site-4", time.monotonic())  # fresh as the read ahead starts: not in it
    assert cache.get("site-0") == "row of site-0"  # past half: the read ahead starts, and hangs
    wait_until(lambda: len(reads) == 2, 10, "the read ahead", 0.005)
    assert "site-4" not in reads[1]
    time.sleep(0.45)  # every row past its time
    served = []
    asking = threading.Thread(target=lambda: served.extend(cache.get(key) for key in keys))
    asking.start()
    asking.join(5)
    assert not asking.is_alive() and served == [f"row of {key}" for key in keys]  # none waited for a read
    assert all(cache.answers_without_io(key) for key in keys) and len(reads) == 2
    release.set()
    wait_until(lambda: not cache._reading_ahead, 10, "the read ahead to fail", 0.005)
    assert all(cache.answers_without_io(key) for key in keys)  # failed: all served on
    assert [cache.get(key) for key in keys] == served and len(reads) == 2


def test_a_read_ahead_without_a_thread_to_run_on_leaves_the_cache_as_it_was(monkeypatch):
    """A thread that cannot be started ("can't start new thread") raised out of `get` and left
    the cache reading ahead for good: every value served on past its time, never read again (a
    fuzzer). Now the value is read when due, as without reading ahead."""
    import threading

    store, reads = {"known": "v1"}, []
    cache = ReadThroughCache(lambda key: reads.append(key) or store.get(key), miss_ttl_s=0, hit_ttl_s=1.0,
                             read_ahead=True)
    assert cache.get("known") == "v1"
    time.sleep(0.6)  # past half its time
    start = threading.Thread.start

    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    assert cache.get("known") == "v1" and not cache._reading_ahead
    monkeypatch.setattr(threading.Thread, "start", start)
    store["known"] = "v2"
    time.sleep(0.5)  # past its time
    assert cache.get("known") == "v2" and reads == ["known", "known"]


def test_a_put_while_a_flooded_cache_reads_its_key_list_is_kept():
    """Under a flood of made-up keys, a key missing from the list of keys (read as the flood
    began) was noted a miss, and that took away a value `put` meanwhile (an API key created
    here while made-up keys flooded in: refused for a second). Found by a fuzzer."""
    import threading

    from streams import read_cache

    store, listing, put_done = {}, threading.Event(), threading.Event()

    def known():
        keys = list(store)
        if listing.is_set():
            put_done.wait(10)  # the put lands while the list is read
        return keys

    cache = ReadThroughCache(store.get, known=known)
    for i in range(read_cache.MISSES_PER_S + 2):
        cache.get(f"made-up-{i}")
    # Flooded this second, and the list of keys due (set here: waiting a second for it on a busy
    # machine could outlast the flood's second)
    cache._miss_second, cache._misses_in_second = int(time.monotonic()), read_cache.MISSES_PER_S + 1
    cache._known = (cache._known[0], time.monotonic() - 10)
    assert cache._flooded()
    listing.set()
    racing = threading.Thread(target=cache.get, args=("new-key",))
    racing.start()
    time.sleep(0.05)
    store["new-key"] = "created here"
    cache.put("new-key", "created here")
    put_done.set()
    racing.join(10)
    assert cache.get("new-key") == "created here"


def test_a_flood_of_unknown_keys_costs_one_list_query_a_second_not_one_each():
    """Made-up site ids on /api/event (no key needed) or made-up API keys: past MISSES_PER_S
    unknown keys a second, the list of keys that exist answers; a key that exists is still
    found, and below the flood every unknown key is asked for (a row just created elsewhere)."""
    from streams import read_cache

    store, loads, lists = {"known": "site"}, [], []

    def load(key):
        loads.append(key)
        return store.get(key)

    def known():
        lists.append(1)
        return list(store)

    cache = ReadThroughCache(load, known=known)
    for i in range(read_cache.MISSES_PER_S):
        assert cache.get(f"made-up-{i}") is None
    assert len(loads) == read_cache.MISSES_PER_S and not lists  # no flood yet: each one asked
    for i in range(1000):
        assert cache.get(f"flood-{i}") is None
    # (Counted per clock second: a second that ends midway lets up to MISSES_PER_S more through.)
    assert len(loads) <= 2 * read_cache.MISSES_PER_S + 2 and len(lists) <= 3
    assert cache.answers_without_io("flood-x")  # ingest does not even hop to a thread for it
    assert cache.get("known") == "site"
    store["created-elsewhere"] = "new site"
    time.sleep(1.05)  # the list is a second old: read again
    assert cache.get("created-elsewhere") == "new site"


async def test_no_table_or_spool_file_holds_an_ip_a_user_agent_or_a_key(client, embedded, services, site):
    """SPEC §5.2 and §7: raw IPs, user agents and API keys are never stored (keys as hashes only),
    live or imported; a referrer's query string neither (README). Every table and the journal are
    read back for them."""
    from datetime import datetime, timedelta, timezone

    from tests.conftest import ADMIN_KEY

    agent = BROWSER + " Probe/" + uuid.uuid4().hex[:8]
    for ip in ("81.2.69.199", "2a02:aa1:1234:5678::beef"):
        response = await post(client, pageview(site, referrer="https://mail.example/in?email=anna%40probe.example"),
                              **{"user-agent": agent, "x-forwarded-for": ip})
        assert response.status_code == 202
    line = {"name": "pageview", "url": "https://ingest.example/i", "ip": "81.2.69.177", "user_agent": agent,
            "timestamp": (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()}
    imported = await client.post(f"/api/v1/events/import?site_id={site}", content=orjson.dumps(line) + b"\n",
                                 headers={"content-type": "application/x-ndjson"})
    assert imported.json()["data"]["accepted"] == 1, imported.text
    await embedded[1].runner.drain()
    secrets = ["81.2.69.199", "2a02:aa1:1234:5678::beef", "81.2.69.177", agent, ADMIN_KEY, "anna%40probe"]
    tables = [row[0] for row in services.client.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()").result_rows]
    assert {"events", "sessions", "api_keys", "salts"} <= set(tables)
    for table in tables:
        dump = services.client.raw_query(f"SELECT * FROM {table} FORMAT TSV").decode(errors="replace")
        assert not [s for s in secrets if s in dump], table
    for path in services.settings.spool_path.rglob("*"):
        if path.is_file():
            assert not [s for s in secrets if s.encode() in path.read_bytes()], path


def test_a_products_null_slugs_are_none_as_a_null_referrer_is():
    """`"brand_slug": null` (what `{brand: item.brand ?? null}` sends) was a 400, and the click lost."""
    from ingest.event import IncomingEvent

    click = IncomingEvent.model_validate({"site_id": "s", "name": "click", "url": "https://s.se/", "product": {
        "id": " p1 ", "slug": None, "category_slug": None, "brand_slug": None, "partner_slug": "adtraction"}})
    assert click.product.model_dump() == {"id": "p1", "slug": "p1", "category_slug": "", "brand_slug": "",
                                          "partner_slug": "adtraction"}


def test_a_read_takes_along_every_value_due_soon_and_a_batch_reads_what_it_needs_at_once():
    """Thousands of sites, each seen less often than every few seconds, each cost a query of their
    own when their cached row aged out (ingest's site, the stream core's goals): 2,040 → 183
    events/s in a many-tenant audit. With `load_many`, one read refreshes every value asked for
    lately and past half its time; `get_many` reads what is not cached in one query. A value
    changed here (`forget`, `put`) while such a read ran is not overwritten by it."""
    from streams import read_cache

    store = {f"site-{n}": f"row-{n}" for n in range(500)}
    singles, many = [], []

    def load_many(keys):
        many.append(list(keys))
        return {key: store[key] for key in keys if key in store}

    cache = ReadThroughCache(lambda key: singles.append(key) or store.get(key), hit_ttl_s=0.4, load_many=load_many)
    assert cache.get_many([*store, "no-such-site"]) == store and len(many) == 1 and not singles
    assert cache.get_many(list(store)) == store and len(many) == 1  # all fresh: no query
    for key in store:
        assert cache.get(key) == store[key]
    assert not singles and len(many) == 1
    time.sleep(0.25)  # past half their time: the next read takes them along
    store["site-0"] = "row-0, renamed"
    cache._hits["site-1"] = (cache._hits["site-1"][0], time.monotonic() - 1)  # aged out
    assert cache.get("site-1") == "row-1" and len(many) == 2 and len(many[-1]) == 500 and many[-1][0] == "site-1"
    time.sleep(0.25)  # the first read's time is over; the taken along ones are fresh
    assert [cache.get(key) for key in store] == list(store.values()) and len(many) == 2 and not singles
    # Only values asked for lately are taken along.
    cache._used = {key: at if key == "site-2" else at - read_cache.TAKEN_ALONG_IF_USED_S - 1
                   for key, at in cache._used.items()}
    cache._hits["site-2"] = (cache._hits["site-2"][0], time.monotonic() - 1)
    cache._hits["site-3"] = (cache._hits["site-3"][0], time.monotonic() - 1)
    assert cache.get("site-3") == "row-3" and many[-1] == ["site-3", "site-2"]
    # A read begun before a row changed here keeps nothing of what it read for others.
    del store["site-4"]
    cache._hits["site-5"] = (cache._hits["site-5"][0], time.monotonic() - 1)
    cache._used["site-4"] = time.monotonic()
    cache._hits["site-4"] = ("row-4", time.monotonic() - 1)

    def forgotten_meanwhile(keys):
        cache.put("site-4", "row-4, as written here")
        return load_many(keys)

    cache._load_many = forgotten_meanwhile
    assert cache.get("site-5") == "row-5" and "site-4" in many[-1]
    assert cache.get("site-4") == "row-4, as written here"
    # Nor does a read of one key: a site deleted here while its read was on the way stays gone.
    cache._load_many = None
    cache._hits["site-6"] = (cache._hits["site-6"][0], time.monotonic() - 1)

    def deleted_meanwhile(key):
        cache.forget(key)
        return store.get(key)

    cache._load = deleted_meanwhile
    assert cache.get("site-6") == "row-6" and "site-6" not in cache._hits


def test_a_cache_read_by_many_threads_while_rows_change_here_ends_with_what_is_stored():
    """Eight threads read (one key, or fifty at once) while another deletes and writes rows and
    tells the cache (`forget`, `put`), as a process's own site deletes and creates do: nothing
    raises, and once every entry's time is over each key reads as stored."""
    import random
    import threading

    store = {f"k{n}": ("row", 0) for n in range(3000)}

    def load_many(keys):
        time.sleep(0.002)
        return {key: store[key] for key in keys if key in store}

    cache = ReadThroughCache(lambda key: time.sleep(0.0005) or store.get(key), miss_ttl_s=0.2, hit_ttl_s=0.4,
                             load_many=load_many)
    errors, stop = [], threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                if rng.random() < 0.05:
                    cache.get_many([f"k{rng.randrange(3200)}" for _ in range(50)])
                else:
                    cache.get(f"k{rng.randrange(3200)}")
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(repr(exc))

    def changes() -> None:
        rng, n = random.Random(99), 0
        while not stop.is_set():
            key, n = f"k{rng.randrange(3200)}", n + 1
            if key in store and rng.random() < 0.5:
                del store[key]
                cache.forget(key)
            else:
                store[key] = ("row", n)
                cache.put(key, store[key])
            time.sleep(0.001)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)] + [threading.Thread(target=changes)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    time.sleep(0.5)  # every hit and miss past its time
    assert [key for key in (f"k{n}" for n in range(3200)) if cache.get(key) != store.get(key)] == []
