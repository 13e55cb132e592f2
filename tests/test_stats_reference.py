"""Every stats answer against the independent reference (tests/reference.py): ≥ 100,000 seeded
events over 90 days for three sites (Stockholm, New York, Kolkata), with affiliate clicks, imported
through `POST /api/v1/events/import` into the embedded topology — traffic stats, then goals and
funnels created afterwards, popular and trending; then a 20,000-event sample through the
distributed topology (Kafka, two Faust workers, separate ingest and API processes over the
ClickHouse front), whose answers — every endpoint — must equal both the reference and the embedded
topology's."""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest

from tests.conftest import ADMIN_KEY, free_port, process, stable_group_size, up_server, wait_until
from tests.reference import Reference, SiteSpec, default_sites, generate, period_days, to_ndjson

API = "/api/v1"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
CLI = [sys.executable, "-m", "besokskollen"]
UNLIMITED = {"BK_RATE_LIMIT_PER_MINUTE": "1000000"}  # hundreds of questions with one key
CHUNK = 20_000  # lines per import request (the cap is 100,000 lines and BK_MAX_IMPORT_BYTES)

# Custom ranges across each site's DST change (Kolkata has none: a range across a month end).
CUSTOM = {"Europe/Stockholm": ("2026-10-20", "2026-10-30"), "America/New_York": ("2026-10-28", "2026-11-05"),
          "Asia/Kolkata": ("2026-10-28", "2026-11-03")}


def sites_for(prefix: str) -> list[SiteSpec]:
    """The reference's three sites, with the ids the API derives from their domains."""
    domains = tuple(f"{prefix}-{cc}.example" for cc in ("se", "us", "in"))
    return default_sites(ids=tuple(d.replace(".", "-") for d in domains), domains=domains)


async def _get(client: httpx.AsyncClient, path: str, **params) -> dict:
    response = await client.get(f"{API}/{path}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def compare_all(client: httpx.AsyncClient, ref: Reference, sites: list[SiteSpec]) -> dict:
    """Ask the API every question, assert each answer equals the reference's; return the answers
    (for comparing topologies), each keyed last by the days it is for (`same_answers`)."""
    answers: dict = {}
    for site in sites:
        sid = site.site_id
        for period in ("7d", "30d", "90d", "custom"):
            extra = dict(zip(("from", "to"), CUSTOM[site.timezone])) if period == "custom" else {}
            for compare in (False, True):
                got = (await _get(client, "stats/overview", site_id=sid, period=period, compare=str(compare).lower(),
                                  **extra))["data"]
                first, last = date.fromisoformat(got["period"]["from"]), date.fromisoformat(got["period"]["to"])
                # The API's clock decides "today"; it must agree with the reference's periods.
                expected_days = ref.period(sid, period, *CUSTOM[site.timezone]) if period == "custom" else None
                if expected_days:
                    assert (first, last) == expected_days
                assert got == ref.overview(sid, first, last, compare=compare), (sid, period, compare)
                answers[(sid, "overview", period, compare, (first, last))] = got
            lists = {
                "pages": (dict(limit=1000), lambda a, b: ref.pages(sid, a, b, limit=1000)),
                "pages top 10": ({}, lambda a, b: ref.pages(sid, a, b)),
                "referrers": (dict(limit=1000), lambda a, b: ref.referrers(sid, a, b, include_social=False, limit=1000)),
                "referrers+social": (dict(include_social="true"),
                                     lambda a, b: ref.referrers(sid, a, b, include_social=True)),
                "countries": (dict(limit=1000), lambda a, b: ref.countries(sid, a, b, limit=1000)),
            }
            for name, (params, expected) in lists.items():
                path = "stats/" + name.split()[0].split("+")[0]
                if period == "custom":
                    got = await _get(client, path, site_id=sid, period=period, **params, **extra)
                else:  # the API's clock decides "today", as for the overview
                    (first, last), got = await _asked_on_one_day(
                        site, period, lambda: _get(client, path, site_id=sid, period=period, **params))
                assert got["data"] == expected(first, last), (sid, period, name)
                answers[(sid, name, period, (first, last))] = got["data"]
    now, listed = await _asked_at(lambda now: [period_days("7d", site.timezone, now) for site in sites],
                                  lambda: _get(client, "sites", include_stats="true"))
    listed = {s["id"]: s for s in listed["data"]}
    for site in sites:
        stats = ref.site_stats(site.site_id, now)
        assert (listed[site.site_id]["visitors_7d"], listed[site.site_id]["pageviews_7d"]) == (
            stats["visitors_7d"], stats["pageviews_7d"])
    return answers


GOALS = [{"name": "Checkout", "event_type": "pageview", "match_path": "/checkout"},
         {"name": "Produkt", "event_type": "pageview", "match_path": "/produkt/*"},
         {"name": "Köp", "event_type": "event", "match_event": "purchase"}]
FUNNELS = [
    [{"name": "Startsida", "type": "pageview", "match_value": "/"},
     {"name": "Produktsida", "type": "pageview", "match_value": "/produkt", "match_type": "startswith"},
     {"name": "Checkout", "type": "pageview", "match_value": "/checkout"},
     {"name": "Köp", "type": "event", "match_value": "purchase"}],
    [{"name": "Startsida", "type": "pageview", "match_value": "/"},
     {"name": "Produkt", "type": "pageview", "match_value": "/produkt/", "match_type": "startswith"},
     {"name": "Klick", "type": "event", "match_value": "cli", "match_type": "startswith"}],
]
TRENDING = [{}, {"min_growth": 50}, {"min_growth": 0, "min_recent_clicks": 1}, {"recent_hours": 6, "baseline_days": 3},
            {"recent_hours": 12, "baseline_days": 14, "min_growth": 20}, {"min_growth": 300, "limit": 3}]


async def compare_goals_funnels_affiliate(client: httpx.AsyncClient, ref: Reference, sites: list[SiteSpec],
                                          all_levels: bool = True) -> dict:
    """Goals and funnels created after the data (they apply retroactively), then every answer of
    goals, funnel stats, popular and trending against the reference; returns the answers (goal
    and funnel ids replaced by their place, so two topologies compare), each keyed last by the
    days or the window it is for (`same_answers`)."""
    levels, answers = set(), {}
    for site in sites:
        sid = site.site_id
        goals = []
        for body in GOALS:
            r = await client.post(f"{API}/goals", json={"site_id": sid, **body})
            assert r.status_code == 201, r.text
            goals.append({**body, "id": r.json()["data"]["id"]})
        funnels = []
        for n, steps in enumerate(FUNNELS):
            r = await client.post(f"{API}/funnels", json={"site_id": sid, "name": f"Funnel {n}", "steps": steps})
            assert r.status_code == 201, r.text
            funnels.append({"id": r.json()["data"]["id"], "name": f"Funnel {n}", "steps": steps})
        for period in ("7d", "30d"):
            (first, last), got = await _asked_on_one_day(
                site, period, lambda: _get(client, "goals", site_id=sid, period=period))
            assert got["data"] == ref.goals(sid, first, last, goals), (sid, period, "goals")
            answers[(sid, "goals", period, (first, last))] = [{**g, "id": n} for n, g in enumerate(got["data"])]
            for n, funnel in enumerate(funnels):
                (first, last), got = await _asked_on_one_day(
                    site, period, lambda: _get(client, f"funnels/{funnel['id']}/stats", period=period))
                got = got["data"]
                assert got == ref.funnel_stats(sid, first, last, funnel), (sid, period, funnel["name"])
                assert got["steps"][-1]["sessions"] > 0 or not all_levels  # the 100k data reach every step
                answers[(sid, "funnel", n, period, (first, last))] = {**got, "funnel": {**got["funnel"], "id": n}}
        for days in (1, 7, 30):
            product_filters = [{}, {"limit": 3}, {"min_clicks": 5}, {"category_slug": "mobilskal"}, {"brand_slug": "apple"},
                               {"category_slug": "laddare", "brand_slug": "anker", "limit": 2}]
            for filters in product_filters:
                now, got = await _asked_at(lambda now: now.date(), lambda: _get(
                    client, "popular/products", site_id=sid, days=days, **filters))  # UTC days
                assert got == ref.popular_products(sid, days, now, **filters), (sid, days, filters)
                levels.add(got["meta"]["confidence"])
                answers[(sid, "products", days, str(filters), now.date())] = got
            for name, answer in (("categories", ref.popular_categories), ("partners", ref.popular_partners)):
                for limit in (10, 2):
                    now, got = await _asked_at(lambda now: now.date(), lambda: _get(
                        client, f"popular/{name}", site_id=sid, days=days, limit=limit))
                    assert got == answer(sid, days, now, limit=limit), (sid, days, name, limit)
                    answers[(sid, name, days, limit, now.date())] = got
        for params in TRENDING + [{"category_slug": "mobilskal", "min_growth": 0}, {"brand_slug": "apple", "min_growth": 0}]:
            got = await _get(client, "trending/products", site_id=sid, **params)
            # The API's clock decides the window (to the second); ask the reference for the same one.
            end = datetime.fromisoformat(got["meta"]["recent_period"]["to"].replace("Z", "+00:00"))
            assert got == ref.trending(sid, end - timedelta(seconds=1), **params), (sid, params)
            levels.add(got["meta"]["confidence"])
            answers[(sid, "trending", str(params), end)] = got
    if all_levels:
        assert levels == {"high", "medium", "low"}
    return answers


async def _asked_on_one_day(site: SiteSpec, period: str, question: Callable[[], Awaitable[dict]]
                            ) -> tuple[tuple[date, date], dict]:
    """The days of a relative period as the API's clock resolves it, and its answer. Goals and
    funnel stats carry no period: the site's local date is taken around the question."""
    now, answer = await _asked_at(lambda now: period_days(period, site.timezone, now), question)
    return period_days(period, site.timezone, now), answer


async def _asked_at(depends: Callable[[datetime], object], question: Callable[[], Awaitable[dict]]
                    ) -> tuple[datetime, dict]:
    """An answer and a moment of the API's clock it holds for: `depends(now)` (the days an answer
    is for) is taken before and after the question, which is asked again if a midnight fell in
    between (the suite may run across one)."""
    for _ in range(2):
        before = depends(datetime.now(timezone.utc))
        answer = await question()
        now = datetime.now(timezone.utc)
        if depends(now) == before:
            return now, answer
    raise AssertionError("two midnights during one question")


def same_answers(a: dict, b: dict) -> None:
    """Two topologies' answers (`compare_all`, `compare_goals_funnels_affiliate`) are equal where
    they are for the same days or window, the last part of each key. Both runs take minutes: one
    may ask after a local midnight the other asked before, and trending at another second. Each answer,
    whichever, already equalled the reference's for its own days."""
    assert {key[:-1] for key in a} == {key[:-1] for key in b}
    both = a.keys() & b.keys()
    assert {key: a[key] for key in both} == {key: b[key] for key in both}


async def import_lines(client: httpx.AsyncClient, lines: list[dict], sites: list[SiteSpec],
                       newer_first: bool = False) -> None:
    """Per site, in time order and in chunks, through the import endpoint; every line accepted.
    `newer_first`: the first site's second half (from a UTC noon on) goes in before its first
    half, so older events arrive after newer ones (noon: no session there carries a visitor id
    over a UTC midnight, which needs the earlier events stored first)."""
    for n, site in enumerate(sites):
        mine = [line for line in lines if line["site_id"] == site.site_id]
        chunks = [mine[i:i + CHUNK] for i in range(0, len(mine), CHUNK)]
        if newer_first and n == 0:
            noon = mine[len(mine) // 2]["timestamp"][:10] + "T12:00:00"
            chunks = [[line for line in mine if line["timestamp"] >= noon],
                      [line for line in mine if line["timestamp"] < noon]]
        for chunk in chunks:
            response = await client.post(f"{API}/events/import", params={"site_id": site.site_id},
                                         content=to_ndjson(chunk), headers={"content-type": "application/x-ndjson"},
                                         timeout=600)
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert (data["accepted"], data["rejected"], data["dropped"], data["stored"]) == (len(chunk), [], [], True)


async def create_sites(client: httpx.AsyncClient, sites: list[SiteSpec]) -> None:
    for site in sites:
        response = await client.post(f"{API}/sites", json={"domain": site.domain, "timezone": site.timezone})
        assert response.status_code == 201, response.text
        assert response.json()["data"]["id"] == site.site_id


@pytest.mark.slow
async def test_embedded_answers_equal_the_reference_for_100k_events(embedded):
    app, _ = embedded
    app.state.rate_limiter.limit = 1_000_000  # this test asks hundreds of questions with one key
    sites = sites_for(f"ref{uuid.uuid4().hex[:6]}")
    now = datetime.now(timezone.utc)
    lines = generate(seed=20261129, sites=sites, now=now, target_events=100_000, clicks=True)
    assert len(lines) >= 100_000
    ref = Reference(lines, sites, now)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=AUTH) as client:
        await create_sites(client, sites)
        await import_lines(client, lines, sites, newer_first=True)
        await compare_all(client, ref, sites)
        await compare_goals_funnels_affiliate(client, ref, sites)


@pytest.fixture(scope="module")
def sample():
    """A 20,000-event sample for the distributed comparison with adversarial ids (`with_ids`),
    the corrections imported after it, and the reference of the corrected events."""
    sites = sites_for("dist")
    now = datetime.now(timezone.utc)
    lines, corrections = with_ids(generate(seed=7, sites=sites, now=now, target_events=20_000, clicks=True), sites)
    fixed = {(line["site_id"], line["event_id"]): line for line in corrections}
    final = [fixed.get((line["site_id"], line.get("event_id")), line) for line in lines]
    return sites, lines, corrections, Reference(final, sites, now)


def with_ids(lines: list[dict], sites: list[SiteSpec]) -> tuple[list[dict], list[dict]]:
    """The lines with explicit event ids on a third of them, one id on lines of two sites (two
    events), and events of one millisecond (a click and another pageview beside a pageview, with
    ids that order them as the reference's line order does: ties go by id); and corrections of
    some of the first site's lines (same id and time, another page), to import afterwards."""
    rng = random.Random(5)
    for line in lines:
        if rng.random() < 1 / 3:
            line["event_id"] = str(uuid.uuid4())
    first, second = ([line for line in lines if line["site_id"] == site.site_id] for site in sites[:2])
    for a, b in zip(first[::40], second[::40]):
        a["event_id"] = b["event_id"] = str(uuid.uuid4())
    beside = []
    for line in rng.sample([line for line in lines if line["name"] == "pageview"], 100):
        line["event_id"] = "0" + line.get("event_id", str(uuid.uuid4()))[1:]
        same = {k: v for k, v in line.items() if k not in ("event_id", "props")}
        beside.append({**same, "event_id": "e" + str(uuid.uuid4())[1:], "name": "click",
                       "product": {"id": "same-ms", "slug": "same-ms-slug", "category_slug": "mobilskal",
                                   "brand_slug": "apple", "partner_slug": "teknikdelar"}})
        beside.append({**same, "event_id": "f" + str(uuid.uuid4())[1:], "url": line["url"] + "#/same-ms"})
    lines = sorted(lines + beside, key=lambda line: line["timestamp"])  # stable: the beside ones after
    corrections = [{**line, "url": line["url"].replace("/produkt/", "/produkt/rättad-", 1)}
                   for line in first[7::97]
                   if "event_id" in line and line["event_id"][0] not in "0ef" and "/produkt/" in line["url"]]
    return lines, corrections


async def _load_and_compare(ingest: str, api: str, sites: list[SiteSpec], lines: list[dict], corrections: list[dict],
                            ref: Reference) -> dict:
    """Create the sites, import through `ingest` (where the hand-off is) — the first site's lines
    twice, then its corrections — ask `api`."""
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=60) as client:
        await create_sites(client, sites)
    async with httpx.AsyncClient(base_url=ingest, headers=AUTH) as client:
        await import_lines(client, lines, sites)
        await import_lines(client, lines, sites[:1])
        await import_lines(client, corrections, sites[:1])
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=60) as client:
        return {**await compare_all(client, ref, sites),
                **await compare_goals_funnels_affiliate(client, ref, sites, all_levels=False)}


@pytest.mark.slow
def test_distributed_answers_equal_the_reference_and_the_embedded_topology(sample, kafka, clickhouse_http, tmp_path):
    sites, lines, corrections, ref = sample
    assert len(lines) >= 20_000 and corrections

    env = {"BK_KAFKA_BOOTSTRAP": kafka, "BK_CLICKHOUSE_URL": clickhouse_http, "BK_ADMIN_KEY": ADMIN_KEY, **UNLIMITED,
           "BK_KAFKA_TOPIC": f"events-{tmp_path.name}", "BK_SPOOL_DIR": str(tmp_path / "spool")}
    ingest_port, api_port = free_port(), free_port()
    ingest, api = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{api_port}"
    with (
        process([*CLI, "api", "--port", str(api_port)], tmp_path / "api.log", env, ready_url=f"{api}{API}/openapi.json"),
        process([*CLI, "ingest", "--port", str(ingest_port)], tmp_path / "ingest.log", env,
                ready_url=f"{ingest}/api/event"),
        process([*CLI, "worker", "--port", str(free_port())], tmp_path / "worker-1.log", env),
        process([*CLI, "worker", "--port", str(free_port())], tmp_path / "worker-2.log", env),
    ):
        # The embedded topology's run first, while the workers join their group (waiting, mostly).
        with up_server(tmp_path / "up", tmp_path / "up.log", env={"BK_ADMIN_KEY": ADMIN_KEY, **UNLIMITED}) as base:
            embedded_answers = asyncio.run(_load_and_compare(base, base, sites, lines, corrections, ref))
            wait_until(lambda: stable_group_size(kafka, "besokskollen") == 2, 120, "two workers in the consumer group",
                       interval=0.5)
            distributed_answers = asyncio.run(_load_and_compare(ingest, api, sites, lines, corrections, ref))
            assert stable_group_size(kafka, "besokskollen") == 2
            # Trending is for the second it is asked in: both topologies, asked together.
            assert asyncio.run(_trending_at_the_same_second(base, api, sites)) == len(sites) * len(TRENDING)

    # The others are for their days: those for the same ones compare (a run may ask after a
    # midnight the other asked before; each equalled the reference's for its own days).
    same_answers(distributed_answers, embedded_answers)


async def _trending_at_the_same_second(a: str, b: str, sites: list[SiteSpec]) -> int:
    """Trending asked of two APIs at once, again until both answered for the same second: equal.
    How many were compared."""
    compared = 0
    async with (httpx.AsyncClient(base_url=a, headers=AUTH, timeout=60) as first,
                httpx.AsyncClient(base_url=b, headers=AUTH, timeout=60) as second):
        for site in sites:
            for params in TRENDING:
                for _ in range(10):
                    x, y = await asyncio.gather(*(_get(c, "trending/products", site_id=site.site_id, **params)
                                                  for c in (first, second)))
                    if x["meta"]["recent_period"]["to"] == y["meta"]["recent_period"]["to"]:
                        assert x == y, (site.site_id, params)
                        compared += 1
                        break
    return compared
