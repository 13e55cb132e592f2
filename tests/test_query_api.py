"""The query API (SPEC §7, the published reference) through the in-process `up` application:
keys and scopes, errors, cache headers, sites, parameters, the overview and popular products."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import uuid
from collections import Counter
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

import pytest

from ingest.event import Event
from streams.core import StreamCore
from tests.conftest import BROWSER, wait_until

CACHE_CONTROL = "public, max-age=1800, stale-while-revalidate=3600, stale-if-error=86400"
API = "/api/v1"


# -- helpers -------------------------------------------------------------------------------------

def _domain(prefix: str = "qa") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}.example"


async def create_site(client, **body) -> dict:
    response = await client.post(f"{API}/sites", json={"domain": _domain(), **body})
    assert response.status_code == 201, response.text
    return response.json()["data"]


@pytest.fixture
async def site(client) -> dict:
    return await create_site(client)


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


async def post_event(client, site_id: str, ip: str, name: str = "pageview", path: str = "/", **extra):
    response = await client.post(
        "/api/event", json={"site_id": site_id, "name": name, "url": f"https://shop.example{path}", **extra},
        headers={"user-agent": BROWSER, "x-forwarded-for": ip})
    assert response.status_code == 202, response.text
    assert "x-dropped" not in response.headers


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def click(site: str, at: datetime, product_id: str, slug: str = "", category: str = "", brand: str = "",
          partner: str = "kjell", visitor: int = 1) -> Event:
    return Event(event_id=str(uuid.uuid4()), site_id=site, timestamp=at, name="click", visitor_id=visitor,
                 pathname="/p", product_id=product_id, product_slug=slug or product_id, category_slug=category,
                 brand_slug=brand, partner_slug=partner)


def utc_today() -> date:
    return datetime.now(timezone.utc).date()


# -- keys, scopes, errors ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/stats/overview?site_id={site}", "/popular/products?site_id={site}", "/sites",
                                  "/sites/{site}"])
async def test_missing_or_unknown_key_is_401(client, site, path):
    url = API + path.format(site=site["id"])
    request = client.build_request("GET", url)
    del request.headers["authorization"]
    response = await client.send(request)
    assert_error(response, 401)
    assert response.headers["www-authenticate"].lower().startswith("bearer")
    for header in ("", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer bk_no_such_key_0000000000", "bk_test_admin_key_0123456789"):
        assert_error(await client.get(url, headers={"authorization": header}), 401)


async def test_site_level_key_reads_only_its_own_site(client, services, site):
    other = await create_site(client)
    key = services.keys.create("default", site["id"])
    for path in ("stats/overview", "popular/products"):
        response = await client.get(f"{API}/{path}?site_id={site['id']}", headers=bearer(key))
        assert response.status_code == 200, response.text
        assert "data" in response.json()
        error = assert_error(await client.get(f"{API}/{path}?site_id={other['id']}", headers=bearer(key)), 403)
        assert other["id"] in error["message"]
    # Sites are for user-level keys only.
    assert_error(await client.get(f"{API}/sites", headers=bearer(key)), 403)
    assert_error(await client.get(f"{API}/sites/{site['id']}", headers=bearer(key)), 403)
    assert_error(await client.post(f"{API}/sites", json={"domain": _domain()}, headers=bearer(key)), 403)


async def test_site_level_key_sees_clicks_sent_to_its_site(client, embedded, services, site):
    key = services.keys.create("default", site["id"])
    product = {"id": "iphone-15-skal", "category_slug": "mobilskal", "brand_slug": "apple", "partner_slug": "kjell"}
    for ip in ("81.227.0.1", "81.227.0.2", "81.227.0.1"):
        await post_event(client, site["id"], ip, name="click", product=product)
    await embedded[1].runner.drain()
    body = (await client.get(f"{API}/popular/products?site_id={site['id']}&days=1", headers=bearer(key))).json()
    assert body["data"] == [{"product_id": "iphone-15-skal", "product_slug": "iphone-15-skal", "clicks": 3}]
    assert body["meta"]["total_clicks"] == 3


async def test_user_key_of_another_account_is_403(client, services, site):
    key = services.keys.create(f"acct-{uuid.uuid4().hex[:8]}")
    for path in ("stats/overview", "popular/products"):
        assert_error(await client.get(f"{API}/{path}?site_id={site['id']}", headers=bearer(key)), 403)
    assert_error(await client.get(f"{API}/sites/{site['id']}", headers=bearer(key)), 403)
    # Its own account has no sites: the listing does not leak other accounts' sites.
    listing = (await client.get(f"{API}/sites", headers=bearer(key))).json()
    assert listing == {"data": [], "meta": {"total": 0}}


@pytest.mark.parametrize("path", ["/stats/overview?site_id={id}", "/popular/products?site_id={id}", "/sites/{id}"])
async def test_unknown_site_is_404(client, path):
    assert_error(await client.get(API + path.format(id=f"no-such-{uuid.uuid4().hex[:8]}")), 404)


# -- caching -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/stats/overview?site_id={site}", "/popular/products?site_id={site}&days=7",
                                  "/sites", "/sites/{site}"])
async def test_get_has_cache_headers_and_a_strong_etag(client, site, path):
    url = API + path.format(site=site["id"])
    response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == CACHE_CONTROL
    etag = response.headers["etag"]
    assert re.fullmatch(r'"[^"]+"', etag), etag  # quoted, and not weak (no W/)

    again = await client.get(url, headers={"if-none-match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag

    listed = await client.get(url, headers={"if-none-match": f'"nope", {etag}'})
    assert listed.status_code == 304
    stale = await client.get(url, headers={"if-none-match": '"something-else"'})
    assert stale.status_code == 200
    assert stale.json() == response.json()


async def test_if_none_match_uses_weak_comparison_and_star(client, site):
    url = f"{API}/sites/{site['id']}"
    etag = (await client.get(url)).headers["etag"]
    assert (await client.get(url, headers={"if-none-match": "W/" + etag})).status_code == 304
    assert (await client.get(url, headers={"if-none-match": "*"})).status_code == 304


async def test_etag_changes_when_the_data_does(client, embedded, site):
    url = f"{API}/stats/overview?site_id={site['id']}&period=7d"
    before = (await client.get(url)).headers["etag"]
    await post_event(client, site["id"], "81.227.9.9")
    await embedded[1].runner.drain()
    after = await client.get(url, headers={"if-none-match": before})
    assert after.status_code == 200
    assert after.headers["etag"] != before
    assert after.json()["data"]["pageviews"] == 1


def test_identical_questions_asked_at_once_share_a_computation_begun_after_they_were_asked():
    """Questions asked while the same question is computed wait for the next computation, which
    they share and which reads what was written before they were asked (an import, then a read:
    the computation under way may have read before the import). An error of a shared
    computation reaches each as an exception of its own, and so does one of the computation
    they waited for, without a computation of their own (a hung ClickHouse: a second timeout).
    Another question is not held up."""
    from concurrent.futures import ThreadPoolExecutor

    from besokskollen import metrics
    from query_api.coalescing import InFlight

    flight, release, calls, store = InFlight(), threading.Event(), [], {"rows": 1}

    def compute(fail: str = ""):
        rows = store["rows"]  # read as the computation starts
        calls.append(("start", rows))
        release.wait(10)
        calls.append(("end", rows))
        if fail == ("first", "next")[rows - 1]:
            raise ValueError(f"no answer for {rows} rows")
        return {"rows": rows}

    def shared() -> float:
        return metrics.ANSWERS_SHARED._value.get()

    with ThreadPoolExecutor(8) as pool:
        for fail in ("", "next", "first"):
            release.clear()
            calls.clear()
            store["rows"], before = 1, shared()
            first = pool.submit(flight.run, "q", lambda: compute(fail))
            wait_until(lambda: calls == [("start", 1)], 10, "the first computation", 0.005)
            store["rows"] = 2  # written after the first computation read
            later = [pool.submit(flight.run, "q", lambda: compute(fail)) for _ in range(6)]
            # one waits to compute next, five share it
            wait_until(lambda: shared() == before + 5, 10, "five sharing", 0.005)
            assert flight.run("another", lambda: "not held up") == "not held up"
            release.set()
            if fail == "first":
                with pytest.raises(ValueError, match="no answer for 1 rows"):
                    first.result(10)
                # asked after that failure: computed, not answered with it (a fuzzer found such
                # questions sharing the next computation's failure, without a computation at all)
                assert flight.run("q", lambda: "asked after") == "asked after"
            else:
                assert first.result(10) == {"rows": 1}
            if fail:
                errors = []
                for future in later:
                    with pytest.raises(ValueError, match=f"no answer for {1 if fail == 'first' else 2} rows") as raised:
                        future.result(10)
                    errors.append(raised.value)
                assert len({id(e) for e in errors}) == 6  # each its own
            else:
                assert [future.result(10) for future in later] == [{"rows": 2}] * 6
            if fail == "first":  # not asked again
                assert calls == [("start", 1), ("end", 1)]
            else:
                assert calls == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]  # one after the other
            calls.clear()
            assert flight.run("q", compute) == {"rows": 2} and calls == [("start", 2), ("end", 2)]  # computed anew
            assert not flight._questions


async def test_identical_stats_requests_at_once_share_computations(client, embedded, site, monkeypatch):
    """A Next.js build or an ISR wave sends one question for many pages at once: six identical
    requests cost two computations, and get the answer and ETag each would alone. Another period
    is another question."""
    from besokskollen import metrics
    from query_api import stats

    await post_event(client, site["id"], "81.227.9.9")
    await embedded[1].runner.drain()
    url = f"{API}/stats/overview?site_id={site['id']}&period=7d"
    alone = await client.get(url)
    overview, release, periods = stats.overview, threading.Event(), []

    def held(client_, site_id, period, compare):
        periods.append(period.length)
        release.wait(10)
        return overview(client_, site_id, period, compare)

    monkeypatch.setattr(stats, "overview", held)
    before = metrics.ANSWERS_SHARED._value.get()
    requests = asyncio.gather(*(client.get(url) for _ in range(6)),
                              client.get(f"{API}/stats/overview?site_id={site['id']}&period=30d"))
    # one computes, one waits to compute next, four share that; the 30 days have their own
    await asyncio.to_thread(wait_until, lambda: len(periods) == 2 and metrics.ANSWERS_SHARED._value.get() == before + 4,
                            10, "two computations and four sharing", 0.005)
    release.set()
    *same, month = await requests
    assert sorted(periods) == [7, 7, 30]
    assert all(r.status_code == 200 and r.content == alone.content for r in same), [r.text for r in same]
    assert {r.headers["etag"] for r in same} == {alone.headers["etag"]}
    assert month.status_code == 200 and month.json()["data"]["pageviews"] == 1


async def test_a_question_asked_after_a_write_is_not_answered_by_a_computation_begun_before_it(
        client, site, monkeypatch):
    """A goal created while the same goals question is computed: a request sent after the 201
    waits for a computation of its own, which lists the goal (an audit found an import's events
    missed this way, by a request that shared the computation under way)."""
    from query_api import deps, goals

    listed, release = goals.goals_with_stats, threading.Event()

    def held(*args):
        answer = listed(*args)  # read as the computation starts
        release.wait(10)
        return answer

    monkeypatch.setattr(goals, "goals_with_stats", held)
    url = f"{API}/goals?site_id={site['id']}"
    before = asyncio.ensure_future(client.get(url))
    await asyncio.to_thread(wait_until, lambda: deps._ANSWERS._questions, 10, "the first computation", 0.005)
    created = await client.post(f"{API}/goals", json={"site_id": site["id"], "name": "Köp", "event_type": "event",
                                                      "match_event": "purchase"})
    assert created.status_code == 201, created.text
    after = asyncio.ensure_future(client.get(url))
    await asyncio.to_thread(wait_until, lambda: any(q.next for q in deps._ANSWERS._questions.values()), 10,
                            "the next computation", 0.005)
    release.set()
    assert (await before).json()["data"] == []
    assert [g["name"] for g in (await after).json()["data"]] == ["Köp"]


# -- sites ---------------------------------------------------------------------------------------

async def test_create_site_answers_201_with_the_site(client):
    label = f"qa-{uuid.uuid4().hex[:10]}"
    response = await client.post(f"{API}/sites", json={"domain": f"https://www.{label}.example/start", "name": "Min sajt"})
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"data"}
    data = response.json()["data"]
    assert data["id"] == f"{label}-example"
    assert data["domain"] == f"{label}.example"
    assert data["name"] == "Min sajt"
    assert data["timezone"] == "Europe/Stockholm"
    assert data["verified"] is False and data["has_data"] is False

    fetched = await client.get(f"{API}/sites/{data['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["data"] == data


async def test_a_site_of_the_longest_hostname_can_be_used_everywhere(client, embedded):
    """A site id is its domain with dots as dashes: any hostname the API accepts (253 characters)
    gives an id every site_id parameter takes (they stopped at 100: a site created but unusable)."""
    tail = f"{uuid.uuid4().hex[:10]}.example"
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * (253 - 3 * 64 - len(tail) - 1), tail])
    assert len(domain) == 253
    site = (await create_site(client, domain=domain))["id"]
    assert len(site) == 253
    for url in (f"{API}/stats/overview?site_id={site}", f"{API}/goals?site_id={site}",
                f"{API}/funnels?site_id={site}", f"{API}/popular/products?site_id={site}"):
        assert (await client.get(url)).status_code == 200, url
    goal = {"site_id": site, "name": "g", "event_type": "event", "match_event": "purchase"}
    assert (await client.post(f"{API}/goals", json=goal)).status_code == 201
    steps = [{"name": "a", "type": "pageview", "match_value": "/"}, {"name": "b", "type": "event", "match_value": "x"}]
    assert (await client.post(f"{API}/funnels", json={"site_id": site, "name": "f", "steps": steps})).status_code == 201
    batch = await client.post(f"{API}/batch", json={"site_id": site, "requests": [{"endpoint": "stats/overview"}]})
    assert batch.status_code == 200 and "data" in batch.json()["results"][0], batch.text
    await post_event(client, site, "81.227.9.9", path="/")  # the tracker sends the site id
    await embedded[1].runner.drain()
    overview = await client.get(f"{API}/stats/overview", params={"site_id": site, "period": "7d"})
    assert overview.json()["data"]["pageviews"] == 1


async def test_create_site_with_timezone(client):
    data = await create_site(client, timezone="America/New_York")
    assert data["timezone"] == "America/New_York"


async def test_duplicate_domain_is_409(client, site):
    for domain in (site["domain"], "www." + site["domain"], site["domain"].upper()):
        assert_error(await client.post(f"{API}/sites", json={"domain": domain}), 409)


async def test_every_www_is_dropped_once_and_for_all(client, site):
    """`www.www.se` was a 500: validation dropped one `www.`, the site id's normalising another
    and refused what was left (`se`). Every `www.` goes now, full-width ones too."""
    assert_error(await client.post(f"{API}/sites", json={"domain": "www.www.se"}), 400)
    for domain in ("www.www." + site["domain"], "ｗｗｗ." + site["domain"], "https://WWW.www." + site["domain"] + "/x"):
        assert_error(await client.post(f"{API}/sites", json={"domain": domain}), 409)


async def test_domains_whose_readable_ids_are_alike_get_sites_of_their_own(client):
    """`my-shop.se` and `my.shop.se` both read `my-shop-se`: the second domain's site gets the id
    with `-2` (it was a 409 "a site for my.shop.se exists already", whoever's account asked)."""
    prefix = f"alike{uuid.uuid4().hex[:6]}"
    ids = []
    for domain in (f"{prefix}-my-shop.se", f"{prefix}-my.shop.se", f"{prefix}.my-shop.se"):
        r = await client.post(f"{API}/sites", json={"domain": domain})
        assert r.status_code == 201, r.text
        ids.append(r.json()["data"]["id"])
        assert (await client.get(f"{API}/sites/{ids[-1]}")).json()["data"]["domain"] == domain
    assert ids == [f"{prefix}-my-shop-se", f"{prefix}-my-shop-se-2", f"{prefix}-my-shop-se-3"]
    assert_error(await client.post(f"{API}/sites", json={"domain": f"{prefix}-my.shop.se"}), 409)
    for bad in ({"domain": 5}, {"domain": "not a host"}, {"domain": _domain(), "timezone": "Mars/Olympus"}):
        assert assert_error(await client.post(f"{API}/sites", json=bad), 400)["code"] == "invalid_parameter", bad


async def test_names_with_control_characters_are_refused(client, site):
    for path, body in (("/sites", {"domain": _domain(), "name": "a\x00b"}),
                       ("/goals", {"site_id": site["id"], "name": "Köp\n", "event_type": "event", "match_event": "buy"}),
                       ("/funnels", {"site_id": site["id"], "name": "\x00", "steps": [
                           {"name": "a", "type": "pageview", "match_value": "/a"},
                           {"name": "b", "type": "pageview", "match_value": "/b"}]}),
                       ("/goals", {"site_id": site["id"], "name": "K\u0085p", "event_type": "event", "match_event": "buy"}),
                       ("/funnels", {"site_id": site["id"], "name": "F", "steps": [
                           {"name": "a\x7f", "type": "pageview", "match_value": "/a"},
                           {"name": "b", "type": "pageview", "match_value": "/b"}]})):
        error = assert_error(await client.post(API + path, json=body), 400)
        assert error["code"] == "invalid_parameter" and "control characters" in error["message"], (path, error)


async def test_a_trailing_slash_is_another_path_not_a_redirect(client, site):
    for path in ("/sites/", "/sites/%2F", f"/stats/pages/?site_id={site['id']}", "/funnels/f_x/stats/"):
        assert assert_error(await client.get(API + path), 404)["code"] == "not_found", path


async def test_concurrent_creates_of_one_domain_give_one_site(client, services):
    """Sent at once, from two accounts: one 201, the rest 409, and the site is the 201's (each
    used to get a 201, and all but the last writer then found 'their' site was another's: 403)."""
    keys = {account: services.keys.create(account) for account in ("race-a", "race-b")}
    domain = _domain("race")
    answers = await asyncio.gather(*(client.post(f"{API}/sites", json={"domain": domain}, headers=bearer(keys[account]))
                                     for account in ("race-a", "race-b") * 3))
    created = [(account, r) for account, r in zip(("race-a", "race-b") * 3, answers) if r.status_code == 201]
    assert len(created) == 1, [r.status_code for r in answers]
    assert sorted(r.status_code for r in answers) == [201] + [409] * 5
    owner, response = created[0]
    site = response.json()["data"]["id"]
    for account, key in keys.items():
        fetched = await client.get(f"{API}/sites/{site}", headers=bearer(key))
        assert fetched.status_code == (200 if account == owner else 403), (account, owner)


async def test_creates_of_one_domain_in_several_processes_give_one_accounts_site(client, services, monkeypatch):
    """The lock above is per process. Several `api` processes, each past its check that the domain
    has no site, are decided by the domain's claim in ClickHouse: every 201 is one account's, and
    one site (its repeats may all pass, and answer the site the first made), the other's get 409."""
    import contextlib

    from query_api import sites as sites_route

    keys = {account: services.keys.create(account) for account in ("claim-a", "claim-b")}
    monkeypatch.setattr(sites_route, "_creating", contextlib.nullcontext())
    monkeypatch.setattr(type(services.sites), "by_domain", lambda self, domain: None)
    domain = _domain("claim")
    order = ("claim-a", "claim-b") * 3
    answers = await asyncio.gather(*(client.post(f"{API}/sites", json={"domain": domain}, headers=bearer(keys[a]))
                                     for a in order))
    monkeypatch.undo()
    statuses = {account: {r.status_code for a, r in zip(order, answers) if a == account} for account in keys}
    assert sorted(statuses.values(), key=sorted) == [{201}, {409}], statuses
    owner = next(account for account, codes in statuses.items() if codes == {201})
    sites = {r.json()["data"]["id"] for r in answers if r.status_code == 201}
    assert len(sites) == 1, sites  # one account's repeats are one site (they made `-2`, `-3` sites)
    (site,) = sites
    for account, key in keys.items():
        fetched = await client.get(f"{API}/sites/{site}", headers=bearer(key))
        assert fetched.status_code == (200 if account == owner else 403), (account, owner)
    listed = (await client.get(f"{API}/sites", headers=bearer(keys[owner]))).json()["data"]
    assert [s["id"] for s in listed if s["domain"] == domain] == [site]


async def test_a_sites_name_and_time_zone_change_in_place_and_its_numbers_follow(client, services):
    """A time zone could only be changed by deleting the site (and all its data) and creating it
    again. Now in place: the days are drawn in the new zone, past ones too."""
    site = await create_site(client, timezone="UTC", name="Shop")
    # 23:30 UTC yesterday: yesterday in UTC, today in Stockholm (UTC+1 in December).
    at = datetime.combine(utc_today() - timedelta(days=1), time(23, 30), tzinfo=timezone.utc)
    StreamCore(services.client, 1800).process([Event(event_id=str(uuid.uuid4()), site_id=site["id"], timestamp=at,
                                                     name="pageview", visitor_id=1, pathname="/")])

    async def day_of_the_pageview() -> list[str]:
        r = await client.get(f"{API}/stats/overview", params={"site_id": site["id"], "period": "7d"})
        return [point["date"] for point in r.json()["data"]["daily"] if point["pageviews"]]

    assert await day_of_the_pageview() == [str(at.date())]
    changed = await client.patch(f"{API}/sites/{site['id']}", json={"timezone": "Europe/Stockholm"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["data"] | {"has_data": None, "verified": None} == {
        "id": site["id"], "domain": site["domain"], "name": "Shop", "timezone": "Europe/Stockholm",
        "has_data": None, "verified": None}
    assert changed.json()["data"]["has_data"] is True
    # The same pageview, on the Stockholm day.
    assert await day_of_the_pageview() == [str(at.astimezone(ZoneInfo("Europe/Stockholm")).date())]
    renamed = await client.patch(f"{API}/sites/{site['id']}", json={"name": "Butiken"})
    assert renamed.json()["data"]["name"] == "Butiken" and renamed.json()["data"]["timezone"] == "Europe/Stockholm"
    got = (await client.get(f"{API}/sites/{site['id']}")).json()["data"]
    assert (got["name"], got["timezone"]) == ("Butiken", "Europe/Stockholm")
    assert (await client.patch(f"{API}/sites/{site['id']}", json={"name": ""})).json()["data"]["name"] == site["domain"]

    assert assert_error(await client.patch(f"{API}/sites/{site['id']}", json={}), 400)["code"] == "invalid_parameter"
    assert "timezone" in assert_error(await client.patch(f"{API}/sites/{site['id']}", json={"timezone": "Mars/Olympus"}),
                                      400)["message"]
    site_key = services.keys.create("default", site["id"])
    assert_error(await client.patch(f"{API}/sites/{site['id']}", json={"name": "x"}, headers=bearer(site_key)), 403)
    assert_error(await client.patch(f"{API}/sites/no-such-site", json={"name": "x"}), 404)


def test_a_change_never_brings_back_a_site_deleted_since_it_was_read(services):
    """Written under the version read plus one: a delete sent after the read, with the time as its
    version, stays the newest row."""
    site = services.sites.create("default", _domain("change"))
    stale = services.sites.get(site.site_id)
    services.sites.delete(site)
    assert services.sites.change(stale, tz="Asia/Kolkata") is None
    assert services.sites.fresh(site.site_id) is None
    again = services.sites.create("default", site.domain)
    assert services.sites.change(stale, name="old") is None  # another incarnation: not this one's to change
    assert services.sites.fresh(site.site_id).name == again.name


def test_a_domains_claim_is_one_accounts_until_its_site_is_deleted_or_never_came(services, monkeypatch):
    """Claims racing from four processes (registries), two accounts: one account's win. A deleted
    site's domain can be claimed again, by anyone; a claim whose site was never written (its
    process died) stops another account only for CLAIM_TIMEOUT_S."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from streams import sites

    domain = sites.normalize_domain(_domain("claim"))
    registries = [sites.SiteRegistry(services.client) for _ in range(4)]
    at_once = threading.Barrier(4)
    monkeypatch.setattr(sites, "OWN_CLAIM_WAIT_S", 0.5)  # the first claim's create never comes here

    def claim(n: int) -> tuple[str, bool]:
        at_once.wait(timeout=30)
        return f"acc-{n % 2}", registries[n].claim(domain, f"acc-{n % 2}")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(claim, range(4)))
    winners = {account for account, won in results if won}
    assert len(winners) == 1 and sum(won for _, won in results) == 2, results
    (winner,), loser = winners, ({"acc-0", "acc-1"} - winners).pop()
    site = registries[0].create(winner, domain)
    registries[1].delete(site)
    assert registries[2].claim(domain, loser) and not registries[3].claim(domain, winner)
    monkeypatch.setattr(sites, "CLAIM_TIMEOUT_S", 0)  # the loser's create died before its site
    assert registries[3].claim(domain, winner)


def test_one_accounts_creates_of_a_domain_in_two_processes_answer_the_one_site_stored(services):
    """Both passed the claim (one account), and each stored a site with its own name and time zone:
    two 201s, two bodies, one of them the site. The second now waits for the first one's site."""
    import threading
    import time as clock

    from streams import sites

    domain = sites.normalize_domain(_domain("twice"))
    first, second = sites.SiteRegistry(services.client), sites.SiteRegistry(services.client)
    assert first.claim(domain, "acc") is True
    answer = []
    waiting = threading.Thread(target=lambda: answer.append(second.claim(domain, "acc")))
    waiting.start()
    clock.sleep(0.3)
    made = first.create("acc", domain, "First", "Asia/Kolkata")
    waiting.join(timeout=30)
    (got,) = answer
    assert (got.site_id, got.name, got.timezone, got.incarnation) == (made.site_id, "First", "Asia/Kolkata",
                                                                       made.incarnation)


@pytest.mark.parametrize("body", [
    {"domain": "localhost"},
    {"domain": "ab"},
    {"domain": "..."},
    {"domain": _domain(), "timezone": "Mars/Olympus_Mons"},
    {"domain": _domain(), "timezone": ""},
    {"name": "no domain"},
    {"domain": 17},
])
async def test_bad_site_is_400(client, body):
    assert_error(await client.post(f"{API}/sites", json=body), 400)


async def test_a_site_whose_raw_events_expired_still_has_data(client, embedded, services):
    """The raw-event TTL (BK_RAW_EVENTS_TTL_DAYS) drops old raw events and nothing the rollups
    give: a site whose every raw event has expired is still verified, with data, like its stats.
    (It read the raw events: a site untouched for a TTL turned unverified, and `up --demo` would
    have fed its demo site a second time.)"""
    site = await create_site(client)
    await post_event(client, site["id"], "81.227.9.1")
    await embedded[1].runner.drain()
    # What the TTL does to a site whose events all expired, without waiting for it.
    services.client.command("ALTER TABLE events DELETE WHERE site_id = {site:String}",
                            parameters={"site": site["id"]}, settings={"mutations_sync": 2})
    data = (await client.get(f"{API}/sites/{site['id']}")).json()["data"]
    assert data["has_data"] is True and data["verified"] is True
    listed = {s["id"]: s for s in (await client.get(f"{API}/sites")).json()["data"]}
    assert listed[site["id"]]["has_data"] is True
    overview = (await client.get(f"{API}/stats/overview", params={"site_id": site["id"], "period": "7d"})).json()
    assert overview["data"]["visitors"] == 1


async def test_list_sites_with_total_and_stats(client, embedded):
    busy, quiet = await create_site(client), await create_site(client)
    ips = ["81.227.1.1", "81.227.1.2", "81.227.1.3", "81.227.1.1"]
    for ip in ips:
        await post_event(client, busy["id"], ip)
    await embedded[1].runner.drain()

    plain = (await client.get(f"{API}/sites")).json()
    assert plain["meta"]["total"] == len(plain["data"])
    by_id = {s["id"]: s for s in plain["data"]}
    assert {busy["id"], quiet["id"]} <= set(by_id)
    assert all("visitors_7d" not in s for s in plain["data"])
    assert by_id[busy["id"]]["has_data"] is True and by_id[busy["id"]]["verified"] is True
    assert by_id[quiet["id"]]["has_data"] is False

    with_stats = (await client.get(f"{API}/sites?include_stats=true")).json()
    assert with_stats["meta"]["total"] == len(with_stats["data"])
    by_id = {s["id"]: s for s in with_stats["data"]}
    assert by_id[busy["id"]]["visitors_7d"] == len(set(ips))
    assert by_id[quiet["id"]]["visitors_7d"] == 0
    # Ordered like every list (SPEC §7.1): by the first metric descending, then by name.
    order = [(-s.get("visitors_7d", 0), s["name"], s["domain"]) for s in with_stats["data"]]
    assert order == sorted(order) and len({s["visitors_7d"] for s in with_stats["data"]}) > 1
    assert [(s["name"], s["domain"]) for s in plain["data"]] == sorted((s["name"], s["domain"]) for s in plain["data"])


# -- parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    "stats/overview?site_id={site}&period=5d",
    "stats/overview?site_id={site}&period=custom",
    "stats/overview?site_id={site}&period=custom&from=2025-01-10",
    "stats/overview?site_id={site}&period=custom&to=2025-01-10",
    "stats/overview?site_id={site}&period=custom&from=2025-01-10&to=2025-01-09",
    "stats/overview?site_id={site}&period=custom&from=2025-13-01&to=2025-12-31",
    "stats/overview?site_id={site}&period=custom&from=10/01/2025&to=2025-01-12",
    "stats/overview?site_id={site}&period=custom&from=20250110&to=20250112",
    "stats/overview?site_id={site}&period=custom&from=2025-W02-1&to=2025-W02-7",
    "stats/overview?site_id=&period=7d",
    "goals?site_id=",
    "popular/products?site_id=",
    "stats/overview?period=7d",
    "popular/products?site_id={site}&days=0",
    "popular/products?site_id={site}&days=-3",
    "popular/products?site_id={site}&days=seven",
    "popular/products?site_id={site}&limit=1000",
    "popular/products?site_id={site}&limit=0",
    "popular/products?site_id={site}&min_clicks=-1",
    "popular/products",
])
async def test_bad_parameters_are_400(client, site, query):
    assert_error(await client.get(f"{API}/" + query.format(site=site["id"])), 400)


@pytest.mark.parametrize("endpoint, name, value", [
    ("stats/pages", "limit", "5.0"), ("stats/pages", "limit", "+5"), ("stats/pages", "limit", "1_000"),
    ("stats/pages", "limit", " 5"), ("goals", "limit", "2.0"), ("popular/products", "days", "7e0"),
    ("trending/products", "recent_hours", "0x18"), ("trending/products", "min_growth", "1e2"),
    ("trending/products", "min_growth", "1_0"), ("trending/products", "min_growth", "nan"),
    ("trending/products", "min_growth", ".5"),
])
async def test_numbers_are_taken_only_as_written_in_digits(client, site, endpoint, name, value):
    """pydantic's lax mode would read `5.0`, `+5`, `1_000` or ` 5` as 5: a client is told instead."""
    response = await client.get(f"{API}/{endpoint}", params={"site_id": site["id"], name: value})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameter"
    assert response.json()["error"]["message"].startswith(f"{name}: must be a ")


async def test_numbers_in_digits_and_batch_json_numbers_are_taken(client, site):
    for params in ({"limit": "05"}, {"min_growth": "-12.5", "min_recent_clicks": "0"}):
        endpoint = "stats/pages" if "limit" in params else "trending/products"
        assert (await client.get(f"{API}/{endpoint}", params={"site_id": site["id"], **params})).status_code == 200
    # JSON numbers in a batch are numbers, however the sender's JSON library wrote them.
    requests = [{"endpoint": "stats/pages", "params": {"limit": 5.0}},
                {"endpoint": "trending/products", "params": {"min_growth": 1e-7, "baseline_days": 3}},
                {"endpoint": "stats/pages", "params": {"limit": 5.5}}]
    results = (await client.post(f"{API}/batch", json={"site_id": site["id"], "requests": requests})).json()["results"]
    assert ["error" in result for result in results] == [False, False, True]
    assert results[2]["error"]["message"].startswith("limit: must be a whole number")


@pytest.mark.parametrize("query", ["stats/overview?site_id=&period=7d", "goals?site_id=", "popular/products?site_id="])
async def test_an_empty_site_id_is_a_missing_parameter_as_in_the_import(client, query):
    response = await client.get(f"{API}/{query}")
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "missing_parameter", "message": "site_id is required"}
    batch = await client.post(f"{API}/batch", json={"site_id": "", "requests": [{"endpoint": "goals"}]})
    assert batch.json()["error"] == {"code": "missing_parameter", "message": "site_id is required"}


async def test_openapi_is_served_with_the_paths(client):
    response = await client.get(f"{API}/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    paths = spec["paths"]
    for path, method in [("/api/v1/stats/overview", "get"), ("/api/v1/popular/products", "get"),
                         ("/api/v1/sites", "get"), ("/api/v1/sites", "post"), ("/api/v1/sites/{site_id}", "get")]:
        assert method in paths.get(path, {}), path
        responses = paths[path][method]["responses"]
        ok = responses.get("200") or responses.get("201")
        assert ok and "schema" in ok["content"]["application/json"], (path, method)
        assert "401" in responses and "403" in responses
    schemas = spec["components"]["schemas"]
    assert {"OverviewResponse", "PopularProductsResponse", "ErrorResponse"} <= set(schemas)


async def test_openapi_states_parameter_bounds_in_json_schema_words(client):
    """`minimum`/`maximum`, which validators and client generators read; pydantic's own `ge`/`le`
    (what the document said) they ignore, and a client sent `limit=500` into a 400."""
    spec = (await client.get(f"{API}/openapi.json")).json()
    parameters = {(path, p["name"]): p["schema"] for path, ops in spec["paths"].items() for op in ops.values()
                  if isinstance(op, dict) for p in op.get("parameters", [])}

    def pydantic_words(schema) -> list:  # anywhere: an optional parameter's bounds sit in its anyOf
        if isinstance(schema, list):
            return [word for item in schema for word in pydantic_words(item)]
        if not isinstance(schema, dict):
            return []
        return sorted({"ge", "le", "gt", "lt"} & set(schema)) + pydantic_words(list(schema.values()))

    assert not [(key, pydantic_words(schema)) for key, schema in parameters.items() if pydantic_words(schema)]
    limit = parameters[("/api/v1/popular/products", "limit")]
    assert (limit["minimum"], limit["maximum"]) == (1, 100)
    goals_limit = parameters[("/api/v1/goals", "limit")]["anyOf"][0]  # optional: all goals by default
    assert (goals_limit["minimum"], goals_limit["maximum"]) == (1, 1000)
    assert parameters[("/api/v1/trending/products", "min_growth")]["minimum"] == -100


# -- overview ------------------------------------------------------------------------------------

async def test_overview_daily_series_covers_every_day_oldest_first(client, embedded, services, site):
    tz = ZoneInfo(site["timezone"])
    today = datetime.now(tz).date()
    first = today - timedelta(days=4)

    # Today, live through the tracking endpoint: 3 visitors, 5 pageviews, 1 custom event.
    live = [("81.227.2.1", "pageview"), ("81.227.2.1", "pageview"), ("81.227.2.2", "pageview"),
            ("81.227.2.3", "pageview"), ("81.227.2.3", "signup"), ("81.227.2.2", "pageview")]
    for ip, name in live:
        await post_event(client, site["id"], ip, name=name)
    await embedded[1].runner.drain()

    # Two days ago (and before the period), imported with explicit times: one visitor on two days.
    def at(day: date, hour: int) -> datetime:
        return datetime.combine(day, time(hour), tz).astimezone(timezone.utc)

    historic = [(today - timedelta(days=2), 10, 901), (today - timedelta(days=2), 11, 902),
                (today - timedelta(days=2), 11, 902), (today - timedelta(days=3), 9, 901),
                (first - timedelta(days=1), 12, 903)]
    StreamCore(services.client, 1800).process([
        Event(event_id=str(uuid.uuid4()), site_id=site["id"], timestamp=at(day, hour), name="pageview",
              visitor_id=visitor, pathname="/h") for day, hour, visitor in historic])

    response = await client.get(f"{API}/stats/overview?site_id={site['id']}&period=custom"
                                f"&from={first.isoformat()}&to={today.isoformat()}")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["period"] == {"from": first.isoformat(), "to": today.isoformat()}

    days = [first + timedelta(days=i) for i in range((today - first).days + 1)]
    pageviews, visitors = Counter(), {d: set() for d in days}
    for day, _, visitor in historic:
        if day in visitors:
            pageviews[day] += 1
            visitors[day].add(("h", visitor))
    for ip, name in live:
        visitors[today].add(("live", ip))
        pageviews[today] += name == "pageview"
    expected = [{"date": d.isoformat(), "visitors": len(visitors[d]), "pageviews": pageviews[d]} for d in days]
    assert data["daily"] == expected
    assert [p["pageviews"] for p in data["daily"]] == [0, 1, 3, 0, 5]  # sanity: zeros included
    assert data["pageviews"] == sum(pageviews.values())
    # Unique over the period, not a sum of daily uniques: visitor 901 came on two days.
    assert data["visitors"] == len(set().union(*visitors.values())) == 5
    assert data["visitors"] < sum(p["visitors"] for p in data["daily"])


# 12.5 and 62.5 tell half-away-from-zero from Python's round() (half to even: 12 and 62).
@pytest.mark.parametrize("bounces, sessions, rate", [(1, 8, 13), (5, 8, 63), (3, 8, 38), (1, 3, 33)])
async def test_bounce_rate_rounds_half_away_from_zero(client, embedded, bounces, sessions, rate):
    site = await create_site(client)
    for i in range(sessions):
        ip = f"81.227.4.{i + 1}"
        await post_event(client, site["id"], ip, path="/in")
        if i >= bounces:
            await post_event(client, site["id"], ip, path="/next")
    await embedded[1].runner.drain()

    data = (await client.get(f"{API}/stats/overview?site_id={site['id']}&period=7d")).json()["data"]
    assert data["sessions"] == sessions
    assert data["visitors"] == sessions
    assert data["pageviews"] == bounces + 2 * (sessions - bounces)
    assert half_up(Decimal(bounces) * 100 / sessions) == rate
    assert data["bounce_rate"] == rate


async def test_overview_of_an_empty_site_is_zeros(client, site):
    data = (await client.get(f"{API}/stats/overview?site_id={site['id']}&period=7d")).json()["data"]
    assert (data["visitors"], data["pageviews"], data["sessions"], data["bounce_rate"]) == (0, 0, 0, 0)
    assert len(data["daily"]) == 7
    dates = [date.fromisoformat(p["date"]) for p in data["daily"]]
    assert dates == sorted(dates) and dates[-1] == datetime.now(ZoneInfo(site["timezone"])).date()
    assert data["period"] == {"from": dates[0].isoformat(), "to": dates[-1].isoformat()}


# -- popular products ----------------------------------------------------------------------------

@pytest.mark.parametrize("days", [1, 7, 30, None])
async def test_popular_period_is_whole_utc_days(client, site, days):
    url = f"{API}/popular/products?site_id={site['id']}" + (f"&days={days}" if days else "")
    today = utc_today()
    meta = (await client.get(url)).json()["meta"]
    first = today - timedelta(days=(days or 30) - 1)
    assert meta["period"] == {"from": f"{first.isoformat()}T00:00:00Z", "to": f"{today.isoformat()}T23:59:59Z"}
    assert meta["total_clicks"] == 0
    assert meta["confidence"] == "low"


async def test_confidence_follows_total_clicks(client, services, site):
    now = datetime.now(timezone.utc)
    sizes = {"c9": 9, "c10": 10, "c49": 49, "c50": 50}
    batch = [click(site["id"], now - timedelta(minutes=i), f"prod-{category}", category=category)
             for category, n in sizes.items() for i in range(n)]
    StreamCore(services.client, 1800).process(batch)

    def expected(total: int) -> str:
        return "high" if total >= 50 else "medium" if total >= 10 else "low"

    for category, n in sizes.items():
        body = (await client.get(f"{API}/popular/products?site_id={site['id']}&days=2&category_slug={category}")).json()
        assert body["meta"]["total_clicks"] == n
        assert body["meta"]["confidence"] == expected(n)
        assert body["data"] == [{"product_id": f"prod-{category}", "product_slug": f"prod-{category}", "clicks": n}]
    assert [expected(n) for n in sizes.values()] == ["low", "medium", "medium", "high"]
    body = (await client.get(f"{API}/popular/products?site_id={site['id']}&days=2")).json()
    assert body["meta"]["total_clicks"] == sum(sizes.values())
    assert body["meta"]["confidence"] == "high"


# (product_id, product_slug, category, brand, clicks). Ids run against slugs, so a tie ordered by
# slug is told apart from one ordered by id or by arrival.
PRODUCTS = [
    ("id-9", "alpha", "mobilskal", "apple", 5),
    ("id-1", "bravo", "mobilskal", "samsung", 5),
    ("id-5", "charlie", "laddare", "apple", 7),
    ("id-3", "delta", "laddare", "samsung", 1),
    ("id-2", "echo", "mobilskal", "apple", 3),
    ("id-7", "foxtrot", "horlurar", "apple", 5),
]


def expected_popular(category: str = "", brand: str = "", min_clicks: int = 0, limit: int = 20) -> tuple[list, int]:
    chosen = [p for p in PRODUCTS if (not category or p[2] == category) and (not brand or p[3] == brand)]
    total = sum(p[4] for p in chosen)
    ranked = sorted((p for p in chosen if p[4] >= min_clicks), key=lambda p: (-p[4], p[1]))
    return [{"product_id": p[0], "product_slug": p[1], "clicks": p[4]} for p in ranked[:limit]], total


@pytest.fixture
async def catalogue(client, services) -> dict:
    """A site whose clicks of PRODUCTS arrive shuffled over the last three UTC days."""
    site = await create_site(client)
    now = datetime.now(timezone.utc)
    today_start = datetime.combine(now.date(), time.min, timezone.utc)
    rng = random.Random(11)
    events = []
    for pid, slug, category, brand, n in PRODUCTS:
        for _ in range(n):
            moment = today_start - timedelta(days=rng.randint(0, 2)) + timedelta(seconds=rng.randint(0, 86399))
            events.append(click(site["id"], min(moment, now), pid, slug, category, brand, visitor=rng.randint(1, 5)))
    rng.shuffle(events)
    core = StreamCore(services.client, 1800)
    core.process(events[:11])
    core.process(events[11:])
    return site


@pytest.mark.parametrize("params", [
    {},
    {"category_slug": "mobilskal"},
    {"brand_slug": "apple"},
    {"category_slug": "mobilskal", "brand_slug": "apple"},
    {"category_slug": "no-such-category"},
    {"min_clicks": 5},
    {"min_clicks": 6},
    {"limit": 2},
    {"limit": 1, "min_clicks": 4, "brand_slug": "samsung"},
    {"limit": 3, "brand_slug": "apple"},
])
async def test_popular_products_filters_and_ordering(client, catalogue, params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    response = await client.get(f"{API}/popular/products?site_id={catalogue['id']}&days=3&{query}")
    assert response.status_code == 200, response.text
    body = response.json()
    data, total = expected_popular(params.get("category_slug", ""), params.get("brand_slug", ""),
                                   params.get("min_clicks", 0), params.get("limit", 20))
    assert body["data"] == data
    assert body["meta"]["total_clicks"] == total


async def test_popular_default_limit_is_20(client, services, site):
    now = datetime.now(timezone.utc)
    StreamCore(services.client, 1800).process(
        [click(site["id"], now, f"p{i:02d}") for i in range(25) for _ in range(1 + i % 3)])
    data = (await client.get(f"{API}/popular/products?site_id={site['id']}")).json()["data"]
    assert len(data) == 20
    assert [d["clicks"] for d in data] == sorted((d["clicks"] for d in data), reverse=True)


async def test_a_product_renamed_is_one_product_under_its_latest_slug(client, services, site):
    """A product is its id; the slug is how its URL reads (a rename changes it). Listed per (id,
    slug), a renamed product was two entries splitting its clicks, and ranked below a product
    with fewer."""
    today = datetime.combine(utc_today(), time.min, timezone.utc)
    StreamCore(services.client, 1800).process(
        [click(site["id"], today - timedelta(days=2, hours=-i), "sku-1", "iphone-15-skal") for i in range(3)]
        + [click(site["id"], today + timedelta(seconds=i), "sku-1", "iphone-15-skal-svart") for i in range(2)]
        + [click(site["id"], today - timedelta(days=1, hours=-i), "sku-2", "laddare") for i in range(4)])
    body = (await client.get(f"{API}/popular/products?site_id={site['id']}&days=3")).json()
    assert body["data"] == [{"product_id": "sku-1", "product_slug": "iphone-15-skal-svart", "clicks": 5},
                            {"product_id": "sku-2", "product_slug": "laddare", "clicks": 4}]
    assert body["meta"]["total_clicks"] == 9
    body = (await client.get(f"{API}/popular/products?site_id={site['id']}&days=3&min_clicks=5")).json()
    assert [d["product_id"] for d in body["data"]] == ["sku-1"]


async def test_clicks_older_than_the_window_are_excluded(client, services, site):
    today = utc_today()
    window_start = datetime.combine(today - timedelta(days=2), time.min, timezone.utc)  # days=3
    StreamCore(services.client, 1800).process([
        click(site["id"], window_start - timedelta(seconds=1), "just-before"),
        click(site["id"], window_start - timedelta(days=5), "long-ago"),
        click(site["id"], window_start, "first-moment"),
        click(site["id"], datetime.now(timezone.utc), "now"),
    ])

    async def products(days: int) -> dict[str, int]:
        body = (await client.get(f"{API}/popular/products?site_id={site['id']}&days={days}")).json()
        assert body["meta"]["total_clicks"] == sum(d["clicks"] for d in body["data"])
        return {d["product_id"]: d["clicks"] for d in body["data"]}

    assert await products(3) == {"first-moment": 1, "now": 1}
    assert await products(4) == {"first-moment": 1, "now": 1, "just-before": 1}
    assert await products(1) == {"now": 1}
    assert await products(30) == {"first-moment": 1, "now": 1, "just-before": 1, "long-ago": 1}


@pytest.mark.parametrize("error, status", [
    ("Code: 460. DB::Exception: Cannot create timer_fd descriptor: errno: 24, strerror: Too many open files."
     " (CANNOT_CREATE_TIMER)", 503),
    ("DB::ErrnoException: Cannot open epoll descriptor, errno: 24, strerror: Too many open files. (EPOLL_ERROR)", 503),
    ("Code: 241. DB::Exception: Memory limit (total) exceeded: would use 9.31 GiB. (MEMORY_LIMIT_EXCEEDED)", 503),
    ("Code: 47. DB::Exception: Unknown expression identifier `x`. (UNKNOWN_IDENTIFIER)", 500),
])
async def test_a_data_store_short_of_resources_is_a_503_and_a_wrong_question_a_500(services, site, error, status):
    """`up` out of open files (an audit held 19,900 idle connections): the embedded ClickHouse
    could not open an epoll descriptor, and every stats read was a 500 `internal_error` to report.
    A shortage of descriptors, memory or query slots is a 503 to come back to; an error in the
    question is still a 500. Alone and inside a batch."""
    import dataclasses

    import httpx
    from clickhouse_connect.driver.exceptions import DatabaseError

    from query_api.app import create_app
    from tests.conftest import ADMIN_KEY

    class Failing:
        def __getattr__(self, name: str):
            if name in ("query", "command", "insert", "raw_query"):
                def fail(*args, **kwargs):
                    raise DatabaseError(error)
                return fail
            return getattr(services.client, name)

    app = create_app(dataclasses.replace(services.query_context, client=Failing()))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 headers={"authorization": f"Bearer {ADMIN_KEY}"}) as failing:
        alone = await failing.get(f"{API}/stats/overview", params={"site_id": site["id"], "period": "7d"})
        code = {503: "unavailable", 500: "internal_error"}[status]
        assert (alone.status_code, alone.json()["error"]["code"]) == (status, code), alone.text
        assert (alone.headers.get("retry-after"), error not in alone.text) == ("5" if status == 503 else None, True)
        batch = await failing.post(f"{API}/batch", json={"site_id": site["id"], "requests": [
            {"endpoint": "stats/pages", "params": {"period": "7d"}}]})
        assert batch.status_code == 200 and batch.json()["results"][0]["error"]["code"] == code, batch.text


async def test_a_data_store_that_does_not_answer_is_a_503_with_retry_after(services, site, monkeypatch, caplog):
    """ClickHouse restarting (connection refused) answered 500 `internal_error`: a server error
    to report, where a client should keep its copy and come back in seconds. Alone and inside a
    batch; a stats read that needs the store, with the key and site known from before. The log
    says so once per 30 s, not once a request (35 lines a second in an audit)."""
    import dataclasses

    import httpx
    from clickhouse_connect.driver.exceptions import OperationalError

    from besokskollen.logs import Repeats
    from query_api import errors
    from query_api.app import create_app
    from streams.funnels import FunnelRegistry
    from tests.conftest import ADMIN_KEY

    monkeypatch.setattr(errors._away_log, "filters", [Repeats()])  # not what earlier tests said
    caplog.set_level("WARNING", logger="query_api.errors.unavailable")

    class Refusing:
        def __getattr__(self, name: str):
            if name in ("query", "command", "insert", "raw_query"):
                def refused(*args, **kwargs):
                    raise OperationalError("Error HTTPConnectionPool(host='127.0.0.1', port=8123): connection refused")
                return refused
            return getattr(services.client, name)

    app = create_app(dataclasses.replace(services.query_context, client=Refusing(),
                                         funnels=FunnelRegistry(Refusing())))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 headers={"authorization": f"Bearer {ADMIN_KEY}"}) as down:
        alone = await down.get(f"{API}/stats/overview", params={"site_id": site["id"], "period": "7d"})
        assert alone.status_code == 503, alone.text
        assert alone.json() == {"error": {"code": "unavailable", "message": "the data store does not answer; retry shortly"}}
        assert (alone.headers["retry-after"], alone.headers["cache-control"]) == ("5", "no-store")
        # A funnel's stats among them (an audit: its lookup, done by the batch itself, failed the
        # whole batch with a 503, and left the other sub-requests running after that answer).
        batch = await down.post(f"{API}/batch", json={"site_id": site["id"], "requests": [
            {"endpoint": "stats/pages", "params": {"period": "7d"}}, {"endpoint": "funnels/f_0123456789abcdef/stats"}]})
        assert batch.status_code == 200, batch.text
        assert [r["error"]["code"] for r in batch.json()["results"]] == ["unavailable", "unavailable"]
        for _ in range(3):
            again = await down.get(f"{API}/stats/overview", params={"site_id": site["id"], "period": "7d"})
            assert again.status_code == 503
    said = [r.getMessage() for r in caplog.records if "does not answer on" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("ClickHouse does not answer on GET /api/v1/stats/overview"), said
