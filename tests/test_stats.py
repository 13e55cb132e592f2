"""Traffic stats from the rollups (SPEC §6–7): local days in odd timezones and on DST days, unique
visitors across buckets and days, order-independent sessions, compare, the breakdown endpoints,
deleting a site, and the bad input a new user tried (issue 5)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from ingest.event import Event
from query_api.periods import Period, day_starts, local_midnight, stats_period
from query_api.stats import countries, overview, pages, referrers
from streams import migrations
from streams.core import StreamCore

API = "/api/v1"
TIMEOUT = 1800


def _site() -> str:
    return f"stats-{uuid.uuid4().hex[:12]}"


def ev(site: str, visitor: int, at: datetime, name: str = "pageview", path: str = "/", **extra) -> Event:
    extra.setdefault("event_id", str(uuid.uuid4()))
    return Event(site_id=site, timestamp=at, name=name, visitor_id=visitor, pathname=path, **extra)


def local(tz: str, *args) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz)).astimezone(timezone.utc)


# -- local days -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tz, day", [
    ("Asia/Kolkata", date(2026, 3, 10)),       # +5:30
    ("Asia/Kathmandu", date(2026, 3, 10)),     # +5:45
    ("Europe/Stockholm", date(2026, 3, 29)),   # 23-hour day
    ("Europe/Stockholm", date(2026, 10, 25)),  # 25-hour day
    ("America/New_York", date(2026, 11, 1)),   # 25-hour day
    ("Australia/Lord_Howe", date(2026, 4, 5)),  # a DST shift of 30 minutes
])
def test_local_days_are_exact_at_every_edge(services, tz, day):
    """Events one millisecond either side of each local midnight land on their own local day."""
    site = _site()
    start = local(tz, day.year, day.month, day.day)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), ZoneInfo(tz)).astimezone(timezone.utc)
    ms = timedelta(milliseconds=1)
    events = [ev(site, 1, start - ms), ev(site, 2, start), ev(site, 3, end - ms), ev(site, 4, end)]
    StreamCore(services.client, TIMEOUT).process(events)
    period = Period(day - timedelta(days=1), day + timedelta(days=1), tz)
    result = overview(services.client, site, period)
    assert [(p["date"], p["pageviews"], p["visitors"]) for p in result["daily"]] == [
        ((day - timedelta(days=1)).isoformat(), 1, 1), (day.isoformat(), 2, 2),
        ((day + timedelta(days=1)).isoformat(), 1, 1)]
    only_day = overview(services.client, site, Period(day, day, tz))
    assert (only_day["pageviews"], only_day["visitors"], only_day["sessions"]) == (2, 2, 2)


# Around the 2026 DST changes in North America and Europe, the day British Columbia stayed on UTC-07
# (in chDB's tzdata 2026c, not in Debian's 2025b) and the day after, a later day the two disagree on,
# one in summer, one long ago.
EDGE_DAYS = [date(2024, 1, 1), date(2026, 3, 8), date(2026, 3, 29), date(2026, 11, 1), date(2026, 11, 2),
             date(2026, 11, 21), date(2027, 6, 1)]


@pytest.mark.slow
def test_period_edges_are_the_days_clickhouse_groups_by_in_every_timezone(services):
    """One set of tz rules for every local-day boundary: in every timezone a site may have, the UTC
    moment the API gives for a local midnight is the first second `toDate(·, tz)` — which forms
    the daily series in SQL — dates on that day. Python's zoneinfo read the system's tzdata (Debian
    2025b) while chDB brings 2026c: Vancouver's and Edmonton's days from 2026-11-02 on, and
    Casablanca's from 2026-09-21, began an hour apart. All zones in one query."""
    client = services.client
    zones = sorted(z for (z,) in client.query("SELECT time_zone FROM system.time_zones").result_rows
                   if services.sites.valid_timezone(z))
    assert len(zones) > 400 and {"America/Vancouver", "Africa/Casablanca", "Europe/Stockholm"} <= set(zones)
    for z in zones:  # one query per zone for all the years (local_midnight asks year by year)
        day_starts(client, z, min(EDGE_DAYS), max(EDGE_DAYS))
    midnights = {z: [int(local_midnight(client, d, z).timestamp()) for d in EDGE_DAYS] for z in zones}
    # Per zone (its name must be a constant): the day each midnight falls on, and the day of the
    # second before it.
    columns = ", ".join(f"arrayMap(s -> (toDate(toDateTime(s), %(z{i})s), toDate(toDateTime(s - 1), %(z{i})s)), %(s{i})s)"
                        for i in range(len(zones)))
    params = {**{f"z{i}": z for i, z in enumerate(zones)}, **{f"s{i}": midnights[z] for i, z in enumerate(zones)}}
    (row,) = client.query(f"SELECT [{columns}]", parameters=params).result_rows
    expected = [(d, d - timedelta(days=1)) for d in EDGE_DAYS]
    wrong = {z: [(d.isoformat(), got) for d, got, want in zip(EDGE_DAYS, days, expected) if tuple(got) != want]
             for z, days in zip(zones, row[0])}
    assert {z: w for z, w in wrong.items() if w} == {}


async def test_vancouver_days_after_british_columbia_stayed_on_summer_time(client, services):
    """An event at 07:30Z on 2026-11-21 is 00:30 that day in Vancouver (UTC-07 from 2026-11-01 on),
    23:30 the day before in the old rules. Python drew the days in the old rules and SQL dated the
    buckets in the new ones: the event was counted on no day at all. Now each event is on exactly
    one local day, the days add up to the events, and the daily series agrees with them."""
    tz = "America/Vancouver"
    sid = (await _create_site(client, timezone=tz))["id"]
    at = [datetime(2026, 11, 20, 20, tzinfo=timezone.utc), datetime(2026, 11, 21, 7, 30, tzinfo=timezone.utc)]
    StreamCore(services.client, TIMEOUT).process([ev(sid, visitor, t) for visitor, t in enumerate(at, 1)])
    days = ["2026-11-20", "2026-11-21"]

    async def overview_of(first: str, last: str) -> dict:
        r = await client.get(f"{API}/stats/overview", params={"site_id": sid, "period": "custom", "from": first, "to": last})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    one_day = [await overview_of(d, d) for d in days]
    both = await overview_of(*days)
    assert [o["pageviews"] for o in one_day] == [1, 1]  # 13:00 on the 20th, 00:30 on the 21st
    assert [o["visitors"] for o in one_day] == [1, 1]
    assert (both["pageviews"], both["visitors"]) == (2, 2)
    assert [(p["date"], p["pageviews"], p["visitors"]) for p in both["daily"]] == [
        (d, o["pageviews"], o["visitors"]) for d, o in zip(days, one_day)]
    # "Today" of a fixed period follows the same rules: the 21st began at 07:00Z.
    midnight = datetime(2026, 11, 21, 7, tzinfo=timezone.utc)
    assert stats_period(services.client, "7d", tz, now=midnight).last == date(2026, 11, 21)
    assert stats_period(services.client, "7d", tz, now=midnight - timedelta(seconds=1)).last == date(2026, 11, 20)


def test_a_visitor_on_two_days_is_one_visitor_for_the_period_and_one_each_day(services):
    """Never a sum of per-day uniques: one id active before and after a local midnight."""
    site, tz = _site(), "Asia/Kolkata"
    midnight = local(tz, 2026, 5, 2)
    StreamCore(services.client, TIMEOUT).process([
        ev(site, 9, midnight - timedelta(minutes=10)), ev(site, 9, midnight + timedelta(minutes=5)),
        ev(site, 9, midnight + timedelta(hours=3)),  # a new session, same visitor
        ev(site, 8, midnight + timedelta(hours=3))])
    two_days = overview(services.client, site, Period(date(2026, 5, 1), date(2026, 5, 2), tz))
    assert two_days["visitors"] == 2
    assert [p["visitors"] for p in two_days["daily"]] == [1, 2]
    assert two_days["sessions"] == 3  # sessions belong to the day they started
    second = overview(services.client, site, Period(date(2026, 5, 2), date(2026, 5, 2), tz))
    assert (second["visitors"], second["sessions"], second["pageviews"]) == (2, 2, 3)


def test_countries_count_the_visitors_of_the_periods_events(services):
    """SPEC §7's visitors, by each event's country: a session begun before local midnight counts
    its visitor on the next day too, as the overview does."""
    site, tz = _site(), "Europe/Stockholm"
    midnight = local(tz, 2026, 5, 2)
    StreamCore(services.client, TIMEOUT).process([
        ev(site, 1, midnight - timedelta(minutes=10), country="NL"), ev(site, 1, midnight + timedelta(minutes=5), country="NL"),
        ev(site, 2, midnight + timedelta(hours=1), country="SE"), ev(site, 2, midnight + timedelta(hours=1, minutes=1), country="SE"),
        ev(site, 3, midnight + timedelta(hours=2), country="SE"), ev(site, 4, midnight + timedelta(hours=2))])
    day = Period(date(2026, 5, 2), date(2026, 5, 2), tz)
    assert countries(services.client, site, day, 10) == [{"country": "SE", "visitors": 2}, {"country": "NL", "visitors": 1}]
    assert overview(services.client, site, day)["visitors"] == 4  # the fourth has no known country
    assert countries(services.client, site, Period(date(2026, 5, 1), date(2026, 5, 1), tz), 10) == [
        {"country": "NL", "visitors": 1}]


def test_returning_visitor_counts_once_in_a_long_period(services):
    site, tz = _site(), "Europe/Stockholm"
    t = local(tz, 2026, 6, 10, 12)
    core = StreamCore(services.client, TIMEOUT)
    for hours in (0, 5, 11, 30):  # four sessions over two days, one visitor id
        core.process([ev(site, 5, t + timedelta(hours=hours))])
    result = overview(services.client, site, Period(date(2026, 6, 1), date(2026, 6, 30), tz))
    assert (result["visitors"], result["sessions"], result["pageviews"]) == (1, 4, 4)
    assert sum(p["visitors"] for p in result["daily"]) == 2  # one on each day


# -- sessions do not depend on arrival ------------------------------------------------------------

def test_any_order_and_any_batching_gives_the_same_numbers(services):
    """Late events that bridge or split sessions, duplicates, clients' retries (the id again,
    later) and redeliveries: same answers as processing the originals at once in time order."""
    rng = random.Random(5)
    tz = "America/New_York"
    t0 = local(tz, 2026, 7, 1, 22)
    template = []
    for visitor in range(30):
        at = t0 + timedelta(minutes=rng.randint(0, 180))
        for _ in range(rng.randint(1, 6)):
            template.append((visitor, at, rng.choice(["pageview", "pageview", "signup"]),
                             rng.choice(["/", "/a", "/b"]), rng.choice(["", "Google", "Facebook"])))
            at += timedelta(minutes=rng.choice([1, 5, 20, 29, 31, 45]))

    def events(site: str) -> list[Event]:
        return [ev(site, v, at, name, path, event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{site}{v}{at}{name}{path}")),
                   source=src, channel={"": "direct", "Google": "search", "Facebook": "social"}[src], country="SE")
                for v, at, name, path, src in template]

    period = Period(date(2026, 7, 1), date(2026, 7, 2), tz)
    ordered = _site()
    StreamCore(services.client, TIMEOUT).process(events(ordered))

    shuffled = _site()
    scrambled = events(shuffled)
    scrambled += [e.model_copy(update={"timestamp": e.timestamp + timedelta(minutes=rng.choice([1, 20, 40, 300]),
                                                                            milliseconds=rng.randint(1, 999))})
                  for e in rng.sample(scrambled, 12)]
    rng.shuffle(scrambled)
    core = StreamCore(services.client, TIMEOUT)
    for i in range(0, len(scrambled), 7):
        core.process(scrambled[i:i + 7])
    core.process(scrambled[: len(scrambled) // 2])  # a redelivery

    def answers(site: str) -> tuple:
        return (overview(services.client, site, period, compare=True), pages(services.client, site, period, 10),
                referrers(services.client, site, period, 10, True), countries(services.client, site, period, 10))

    assert answers(shuffled) == answers(ordered)
    stored = services.client.query(
        "SELECT count(), uniqExact(event_id) FROM events FINAL WHERE site_id = {s:String}", parameters={"s": shuffled}
    ).result_rows[0]
    assert stored == (len(template), len(template))


def test_a_late_event_joins_two_sessions_into_one(services):
    site, tz = _site(), "Europe/Stockholm"
    t = local(tz, 2026, 8, 3, 10)
    core = StreamCore(services.client, TIMEOUT)
    core.process([ev(site, 1, t, source="Google", channel="search", country="SE")])
    core.process([ev(site, 1, t + timedelta(minutes=50), path="/b", country="SE")])
    period = Period(date(2026, 8, 3), date(2026, 8, 3), tz)
    assert overview(services.client, site, period)["sessions"] == 2
    assert overview(services.client, site, period)["bounce_rate"] == 100
    core.process([ev(site, 1, t + timedelta(minutes=25), name="signup", country="SE")])
    result = overview(services.client, site, period)
    assert (result["sessions"], result["bounce_rate"], result["visitors"]) == (1, 0, 1)
    assert referrers(services.client, site, period, 10, False) == [
        {"source": "Google", "channel": "search", "visitors": 1, "sessions": 1}]
    assert len(set(r[0] for r in services.client.query(
        "SELECT session_id FROM events FINAL WHERE site_id = {s:String}", parameters={"s": site}).result_rows)) == 1


# -- endpoints ------------------------------------------------------------------------------------

async def _create_site(client, **body) -> dict:
    response = await client.post(f"{API}/sites", json={"domain": f"s-{uuid.uuid4().hex[:8]}.example", **body})
    assert response.status_code == 201, response.text
    return response.json()["data"]


async def test_breakdowns_compare_and_limits(client, services):
    site = await _create_site(client, timezone="Asia/Kathmandu")
    sid, tz = site["id"], "Asia/Kathmandu"
    today = datetime.now(ZoneInfo(tz)).date()
    noon = local(tz, today.year, today.month, today.day, 0, 30)
    week_ago = noon - timedelta(days=7)
    core = StreamCore(services.client, TIMEOUT)
    core.process([
        ev(sid, 1, noon, path="/a", source="Google", channel="search", country="NP"),
        ev(sid, 1, noon + timedelta(minutes=1), path="/b", country="NP"),
        ev(sid, 2, noon, path="/a", source="Facebook", channel="social", country="IN"),
        ev(sid, 3, noon, path="/c", country="IN"),
        ev(sid, 4, noon, path="/a", source="prisjakt.nu", channel="referral", country="NP"),
        ev(sid, 5, week_ago, path="/a", source="Google", channel="search", country="NP"),
    ])
    r = await client.get(f"{API}/stats/pages", params={"site_id": sid, "period": "7d"})
    assert r.json() == {"data": [{"page": "/a", "visitors": 3, "pageviews": 3},
                                 {"page": "/b", "visitors": 1, "pageviews": 1},
                                 {"page": "/c", "visitors": 1, "pageviews": 1}]}
    r = await client.get(f"{API}/stats/pages", params={"site_id": sid, "period": "7d", "limit": 1})
    assert [p["page"] for p in r.json()["data"]] == ["/a"]
    r = await client.get(f"{API}/stats/referrers", params={"site_id": sid, "period": "7d"})
    assert r.json()["data"] == [{"source": "Google", "channel": "search", "visitors": 1, "sessions": 1},
                                {"source": "prisjakt.nu", "channel": "referral", "visitors": 1, "sessions": 1}]
    r = await client.get(f"{API}/stats/referrers", params={"site_id": sid, "period": "7d", "include_social": "true"})
    assert [x["source"] for x in r.json()["data"]] == ["Facebook", "Google", "prisjakt.nu"]
    r = await client.get(f"{API}/stats/countries", params={"site_id": sid, "period": "7d"})
    assert r.json()["data"] == [{"country": "IN", "visitors": 2}, {"country": "NP", "visitors": 2}]

    r = await client.get(f"{API}/stats/overview", params={"site_id": sid, "period": "7d", "compare": "true"})
    data = r.json()["data"]
    assert (data["visitors"], data["pageviews"], data["sessions"], data["bounce_rate"]) == (4, 5, 4, 75)
    comparison = data["comparison"]
    assert comparison["period"] == {"from": (today - timedelta(days=13)).isoformat(),
                                    "to": (today - timedelta(days=7)).isoformat()}
    assert (comparison["visitors"], comparison["pageviews"], comparison["sessions"], comparison["bounce_rate"]) == (1, 1, 1, 100)
    assert comparison["change"] == {"visitors": 300, "pageviews": 400, "sessions": 300, "bounce_rate": -25}
    r = await client.get(f"{API}/stats/overview", params={"site_id": sid, "period": "custom", "from": "2020-01-01",
                                                          "to": "2020-01-02", "compare": "true"})
    assert r.json()["data"]["comparison"]["change"] == {"visitors": None, "pageviews": None, "sessions": None,
                                                       "bounce_rate": None}
    r = await client.get(f"{API}/sites", params={"include_stats": "true"})
    mine = next(s for s in r.json()["data"] if s["id"] == sid)
    assert (mine["visitors_7d"], mine["pageviews_7d"]) == (4, 5)


async def test_site_list_stats_are_each_sites_own_overview_in_its_timezone(client, services):
    """`/sites?include_stats=true` reads every site in one statement, each over the last 7 days
    of its own timezone: each site's `visitors_7d` and `pageviews_7d` are still its own, as its
    `stats/overview` gives them — two sites of one timezone, one of another, one without events."""
    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    made = [(await _create_site(client, timezone=tz))["id"]
            for tz in ("America/Vancouver", "America/Vancouver", "Asia/Kolkata", "America/Vancouver")]
    traffic = {made[0]: (3, 2), made[1]: (1, 4), made[2]: (2, 1)}  # visitors, pageviews each
    StreamCore(services.client, TIMEOUT).process(
        [ev(sid, visitor, now - timedelta(minutes=n)) for sid, (visitors, views) in traffic.items()
         for visitor in range(1, visitors + 1) for n in range(views)])
    listed = {s["id"]: s for s in (await client.get(f"{API}/sites", params={"include_stats": "true"})).json()["data"]}
    for sid in made:
        overview = (await client.get(f"{API}/stats/overview", params={"site_id": sid, "period": "7d"})).json()["data"]
        assert (listed[sid]["visitors_7d"], listed[sid]["pageviews_7d"]) == (overview["visitors"], overview["pageviews"])
    assert [(listed[sid]["visitors_7d"], listed[sid]["pageviews_7d"]) for sid in made] == [(3, 6), (1, 4), (2, 2), (0, 0)]


def test_site_list_stats_of_thousands_of_sites_fit_in_one_statement(services):
    """An account with 3,000 sites of long ids: the site list went into the statement's text four
    times and passed ClickHouse's max_query_size (256 KiB) at ~1,500 ids of 20 characters, so
    `/sites?include_stats=true` answered 500. Each site is still its own overview."""
    from query_api.stats import totals, totals_of_sites

    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    period = stats_period(services.client, "7d", "UTC")
    real = f"many-{uuid.uuid4().hex[:12]}"
    StreamCore(services.client, TIMEOUT).process([ev(real, v, now - timedelta(minutes=v)) for v in range(1, 4)])
    others = {f"{'x' * 40}-{n:05d}-{uuid.uuid4().hex[:12]}": period for n in range(3_000)}
    found = totals_of_sites(services.client, {**others, real: period})
    assert found[real] == totals(services.client, real, period) and found[real]["visitors"] == 3
    assert len(found) == 3_001 and not any(found[site]["pageviews"] for site in others)


async def test_compare_rounds_half_away_from_zero_and_lists_break_ties_by_code_point(client, services):
    """Halves round away from zero, negative changes included (Python's round() gives -12 for
    -12.5); a session with a custom event or an affiliate click is no bounce, even without a
    pageview; ties are ordered by code point (capitals before small letters before å), also where
    `limit` cuts them."""
    tz = "Europe/Stockholm"
    sid = (await _create_site(client, timezone=tz))["id"]
    before, day = local(tz, 2026, 3, 9, 12), local(tz, 2026, 3, 10, 12)
    minute = timedelta(minutes=1)
    events = [ev(sid, 100, before, path="/a")]  # the day before: 8 sessions, one bounce
    for v in range(101, 108):
        events += [ev(sid, v, before, path="/a"), ev(sid, v, before + minute, path="/b")]
    events += [ev(sid, 1, day, path="/b", country="SE"), ev(sid, 1, day + minute, name="click", product_id="p", country="SE"),
               ev(sid, 2, day, path="/B", country="NO"), ev(sid, 2, day + minute, name="signup", country="NO"),
               ev(sid, 3, day, name="signup", country="DK"),
               ev(sid, 4, day, path="/å", country="SE"), ev(sid, 5, day, path="/a", country="FI"),
               ev(sid, 6, day, path="/Z", country="AX"), ev(sid, 7, day, path="/a", country="EE")]
    StreamCore(services.client, TIMEOUT).process(events)
    custom = {"site_id": sid, "period": "custom", "from": "2026-03-10", "to": "2026-03-10"}
    data = (await client.get(f"{API}/stats/overview", params={**custom, "compare": "true"})).json()["data"]
    assert (data["visitors"], data["pageviews"], data["sessions"], data["bounce_rate"]) == (7, 6, 7, 57)  # 4 of 7
    comparison = data["comparison"]
    assert (comparison["visitors"], comparison["pageviews"], comparison["sessions"], comparison["bounce_rate"]) == (
        8, 15, 8, 13)  # 12.5 → 13
    assert comparison["change"] == {"visitors": -13, "pageviews": -60, "sessions": -13, "bounce_rate": 44}
    r = await client.get(f"{API}/stats/pages", params={**custom, "limit": 3})
    assert r.json()["data"] == [{"page": "/a", "visitors": 2, "pageviews": 2}, {"page": "/B", "visitors": 1, "pageviews": 1},
                                {"page": "/Z", "visitors": 1, "pageviews": 1}]
    r = await client.get(f"{API}/stats/pages", params=custom)
    assert [p["page"] for p in r.json()["data"]] == ["/a", "/B", "/Z", "/b", "/å"]
    r = await client.get(f"{API}/stats/countries", params={**custom, "limit": 4})
    assert r.json()["data"] == [{"country": "SE", "visitors": 2}, {"country": "AX", "visitors": 1},
                                {"country": "DK", "visitors": 1}, {"country": "EE", "visitors": 1}]


async def test_bounce_rate_change_is_null_only_when_the_previous_rate_is_0(client, services):
    """SPEC §7.1 to the letter: each change is `null` when the previous value is 0, and for
    `bounce_rate` the difference of the rates shown, in points — against a day without sessions
    (shown 0 %) too. (Until 2026-12-05 it was null whenever either period had no sessions, and a
    number when the previous rate was 0 % over sessions: an independent reading of the spec
    disagreed with both.)"""
    tz = "Europe/Stockholm"
    sid = (await _create_site(client, timezone=tz))["id"]
    StreamCore(services.client, TIMEOUT).process([
        ev(sid, 1, local(tz, 2026, 4, 1, 12)),  # a bounce: 100 %
        ev(sid, 2, local(tz, 2026, 4, 3, 12)), ev(sid, 2, local(tz, 2026, 4, 3, 12, 5)),  # none: 0 %
        ev(sid, 3, local(tz, 2026, 4, 4, 12))])  # a bounce: 100 %
    async def change(day: str) -> dict:
        r = await client.get(f"{API}/stats/overview", params={"site_id": sid, "period": "custom", "from": day, "to": day,
                                                              "compare": "true"})
        assert r.status_code == 200, r.text
        return r.json()["data"]["comparison"]["change"]

    assert await change("2026-04-02") == {"visitors": -100, "pageviews": -100, "sessions": -100, "bounce_rate": -100}
    assert await change("2026-04-01") == {"visitors": None, "pageviews": None, "sessions": None, "bounce_rate": None}
    assert await change("2026-04-03") == {"visitors": None, "pageviews": None, "sessions": None, "bounce_rate": None}
    assert await change("2026-04-04") == {"visitors": 0, "pageviews": -50, "sessions": 0, "bounce_rate": None}


async def test_deleting_a_site_stops_serving_it(client, services):
    doomed, kept = await _create_site(client), await _create_site(client)
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    StreamCore(services.client, TIMEOUT).process([ev(doomed["id"], 1, at), ev(kept["id"], 2, at)])
    before = (await client.get(f"{API}/stats/overview", params={"site_id": kept["id"], "period": "7d"})).json()
    assert (await client.delete(f"{API}/sites/{doomed['id']}")).status_code == 204
    for path in ("stats/overview", "stats/pages", "stats/referrers", "stats/countries", "popular/products"):
        r = await client.get(f"{API}/{path}", params={"site_id": doomed["id"]})
        assert r.status_code == 404, (path, r.text)
    assert (await client.get(f"{API}/sites/{doomed['id']}")).status_code == 404
    assert doomed["id"] not in [s["id"] for s in (await client.get(f"{API}/sites")).json()["data"]]
    assert (await client.delete(f"{API}/sites/{doomed['id']}")).status_code == 404
    after = (await client.get(f"{API}/stats/overview", params={"site_id": kept["id"], "period": "7d"})).json()
    assert after == before
    # Its events are refused from now on.
    r = await client.post("/api/event", json={"site_id": doomed["id"], "name": "pageview", "url": "https://x.example/"})
    assert r.status_code == 404


async def test_a_site_created_again_starts_empty_even_for_rows_written_after_the_delete(client, services):
    domain = f"again-{uuid.uuid4().hex[:8]}.example"
    old = await _create_site(client, domain=domain)
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    core = StreamCore(services.client, TIMEOUT)
    core.process([ev(old["id"], 1, at), ev(old["id"], 2, at)])
    r = await client.post(f"{API}/goals", json={"site_id": old["id"], "name": "Start", "event_type": "pageview",
                                                "match_path": "/"})
    assert r.status_code == 201
    # Listed, so this process has the site's goals in memory (for 5 s): the re-created site's
    # list showed the old goal until then.
    assert len((await client.get(f"{API}/goals", params={"site_id": old["id"]})).json()["data"]) == 1
    assert (await client.delete(f"{API}/sites/{old['id']}")).status_code == 204
    # An event accepted just before the delete, written by a worker behind on Kafka.
    core.process([ev(old["id"], 3, at)])
    other = {"Authorization": f"Bearer {services.keys.create('another-account')}"}
    r = await client.post(f"{API}/sites", json={"domain": domain}, headers=other)
    assert r.status_code == 201, r.text
    new = r.json()["data"]
    assert new["id"] == old["id"] and new["has_data"] is False
    overview = (await client.get(f"{API}/stats/overview", params={"site_id": new["id"], "period": "7d"},
                                 headers=other)).json()["data"]
    assert (overview["visitors"], overview["pageviews"]) == (0, 0)
    assert (await client.get(f"{API}/goals", params={"site_id": new["id"]}, headers=other)).json()["data"] == []


def test_a_worker_drops_kafka_records_of_a_deleted_site_and_those_accepted_before_its_id_was_created_again(services):
    """Events of a deleted site can wait in Kafka behind stopped workers until a site with the same
    id is created: they counted for the new site (a chaos run: 2,342 old events on the new one).
    A worker drops the records its producer stamped before the new site's creation (less the margin
    for two hosts' clocks); a new site's records, and unknown sites', go through."""
    from types import SimpleNamespace

    from streams.sites import RECREATED_MARGIN_MS, SiteRegistry
    from streams.worker import of_current_sites

    registry = SiteRegistry(services.client)
    domain = f"kafka-again-{uuid.uuid4().hex[:8]}.example"
    registry.delete(registry.create("acc", domain))
    new = registry.create("acc", domain)
    created_ms = new.created_at.timestamp() * 1000

    def record(site_id: str, ms: float):  # from an ingest release that did not stamp the incarnation
        return SimpleNamespace(key=f"{site_id}:7".encode(), timestamp=int(ms), value=b"{}", headers=())

    before = created_ms - RECREATED_MARGIN_MS
    records = [record(new.site_id, before - 60_000), record(new.site_id, before - 1), record(new.site_id, before + 1),
               record(new.site_id, created_ms + 10), record("no-such-site", 0),
               SimpleNamespace(key=None, timestamp=0, headers=())]
    assert of_current_sites(records, registry) == records[2:]
    # A site deleted (and not created again): none of its records is current, however recent. A
    # worker busy with an import of the site wrote them while it was deleted, and the rows of a
    # batch in flight when the site was created again landed after the create's purge (a chaos
    # run: 3,065 of the old import's events on the new site).
    registry.delete(new)
    assert of_current_sites(records, registry) == records[4:]


def test_a_worker_drops_records_of_another_incarnation_of_their_site_taken_before_it_was_created(services):
    """A site deleted and created again within seconds: ingest processes that had not seen the
    delete yet (up to 5 s) took the old site's events after it, and by their time alone those could
    not be told from the new site's. Each record carries the incarnation ingest took it for; a
    worker keeps those of the site with the id now, as ClickHouse says when it judges the batch
    (a worker's cached site was up to 5 s old), and those an ingest that had not read the new site
    yet took after its creation (a chaos run: they were dropped, 20 of 40 new events lost)."""
    from types import SimpleNamespace

    from streams.sites import SiteRegistry
    from streams.topic import incarnation_headers
    from streams.worker import of_current_sites

    registry, workers = SiteRegistry(services.client), SiteRegistry(services.client)
    domain = f"incarnation-{uuid.uuid4().hex[:8]}.example"
    old = registry.create("acc", domain)
    assert workers.get(old.site_id).incarnation == old.incarnation  # the worker's cache holds the old site
    registry.delete(old)
    new = registry.create("acc", domain)
    assert new.site_id == old.site_id and new.incarnation > old.incarnation
    assert SiteRegistry(services.client).get(new.site_id).incarnation == new.incarnation  # as made, as read back

    def record(incarnation: int | None, ms: int, headers: list | None = None):
        return SimpleNamespace(key=f"{new.site_id}:7".encode(), timestamp=ms, value=b"{}",
                               headers=headers if headers is not None else incarnation_headers(incarnation) or ())

    late_old, early_new = record(old.incarnation, new.incarnation - 1), record(new.incarnation, old.incarnation)
    stale_ingest = record(old.incarnation, new.incarnation)
    records = [late_old, early_new, record(new.incarnation, new.incarnation + 10), stale_ingest]
    assert of_current_sites(records, workers) == records[1:]
    # Without an incarnation (or an unreadable one), by time: after the creation less the margin.
    assert of_current_sites([record(None, new.incarnation + 500)], workers) != []
    assert of_current_sites([record(None, 0, [("bk-site", b"old")])], workers) == []
    registry.delete(new)
    assert of_current_sites(records, workers) == []


def test_an_event_taken_while_a_site_is_created_again_is_judged_alike_whenever_a_worker_reads_it(services, monkeypatch):
    """Creating a site again waits for the purge of the old one's rows (~1 s) before its row is
    written. Its creation was stamped before that wait, so an event an ingest with the old site
    cached took meanwhile was dropped by a worker that judged it before the row came and counted
    by one that judged it after (a churn audit: 6 of 45 counted, 45 with the workers paused). The
    creation is now when the row is written: such an event is the old site's either way."""
    import time as clock
    from types import SimpleNamespace

    from streams.sites import SiteRegistry
    from streams.topic import incarnation_headers
    from streams.worker import of_current_sites

    registry = SiteRegistry(services.client)
    domain = f"purging-{uuid.uuid4().hex[:8]}.example"
    old = registry.create("acc", domain)
    registry.delete(old)
    taken: list = []
    start_empty = registry._start_empty

    def purge_while_ingest_takes_an_event(site_id: str) -> None:
        start_empty(site_id)
        clock.sleep(0.01)
        taken.append(SimpleNamespace(key=f"{site_id}:7".encode(), timestamp=clock.time_ns() // 1_000_000, value=b"{}",
                                     headers=incarnation_headers(old.incarnation)))
        clock.sleep(0.01)

    monkeypatch.setattr(registry, "_start_empty", purge_while_ingest_takes_an_event)
    new = registry.create("acc", domain)
    # Judged before the row came, it was dropped (the id had no site); judged now, it is too.
    assert new.incarnation > taken[0].timestamp and of_current_sites(taken, registry) == []


async def test_a_worker_frozen_mid_batch_across_a_delete_and_re_create_writes_none_of_the_old_sites_events(services):
    """A worker judged its batch (the site existed, never deleted), then froze while it read
    (SIGSTOP, a VM pause) while the site was deleted and created again. Running again, it wrote
    the old site's events for the new one (an audit: 108-373 events in 4 of 4 runs). The batch is
    judged again in front of the writes, and made and processed again when that changed."""
    from types import SimpleNamespace

    from streams.core import process_until_written
    from streams.events import stored_event_ids
    from streams.sites import SiteRegistry
    from streams.topic import incarnation_headers
    from streams.worker import of_current_sites

    registry = SiteRegistry(services.client)
    domain = f"frozen-{uuid.uuid4().hex[:8]}.example"
    old = registry.create("acc", domain)
    taken = old.created_at.replace(tzinfo=timezone.utc) + timedelta(milliseconds=1)
    events = [ev(old.site_id, visitor, taken) for visitor in (1, 2)]
    records = [SimpleNamespace(key=e.kafka_key, timestamp=int(taken.timestamp() * 1000), value=e.to_bytes(),
                               headers=incarnation_headers(old.incarnation)) for e in events]
    core = StreamCore(services.client, TIMEOUT)
    reads = core._history
    frozen = []

    def history_while_frozen(days):
        if not frozen:  # the freeze: the site is deleted and created again in the meantime
            time.sleep(0.01)
            registry.delete(old)
            frozen.append(registry.create("acc", domain))
        return reads(days)

    core._history = history_while_frozen
    kept: list = []

    def batch() -> list[Event]:
        kept[:] = of_current_sites(records, registry)
        return [e for e in Event.decode_each([record.value for record in kept]) if e is not None]

    written = await process_until_written(core, batch, lambda: len(of_current_sites(records, registry)) == len(kept))
    assert frozen[0].site_id == old.site_id and frozen[0].created_at > old.created_at  # the same id, a new site
    assert (written, kept) == (0, [])
    assert not stored_event_ids(services.client, events)
    around = Period(taken.date() - timedelta(days=1), taken.date() + timedelta(days=1), "UTC")
    result = overview(services.client, old.site_id, around)
    assert (result["pageviews"], result["visitors"], result["sessions"]) == (0, 0, 0)


async def test_up_drops_queued_events_of_a_site_deleted_and_created_again_before_they_are_written(services, tmp_path):
    """`up` queues (and journals) events in process. A site deleted and created again while some
    of its events wait there counted them for the new site. Each is queued with the incarnation
    of its site and when it was taken (an import's request, for all its parts), and dropped when
    that is not the site's now and it was taken before the site's creation: from the queue, and
    from the journal a kill -9 leaves behind."""
    import shutil

    from ingest.spool import Spool
    from streams.embedded import EmbeddedRunner
    from streams.sites import SiteRegistry

    registry = SiteRegistry(services.client)
    domain = f"queued-{uuid.uuid4().hex[:8]}.example"
    old = registry.create("acc", domain)
    import_came_ms = time.time_ns() // 1_000_000  # an import of the old site, sent in parts
    core = StreamCore(services.client, TIMEOUT)
    process, busy, go_on = core.process, threading.Event(), threading.Event()

    def held(batch, **kwargs):  # the core busy with an earlier batch while events queue up
        if any(e.site_id == "holds-the-core" for e in batch):
            busy.set()
            go_on.wait(30)
        return process(batch, **kwargs)

    core.process = held
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    runner = EmbeddedRunner(core, Spool(tmp_path / "journal", 1 << 20), sites=registry)
    await runner.start()
    try:
        await runner.submit(ev("holds-the-core", 1, at))
        await asyncio.to_thread(busy.wait, 30)
        await runner.submit_all([ev(old.site_id, visitor, at, path="/old") for visitor in (1, 2)], old.incarnation)
        registry.delete(old)
        new = registry.create("acc", domain)
        assert new.site_id == old.site_id
        await runner.submit_all([ev(new.site_id, visitor, at, path="/new") for visitor in (3, 4)], new.incarnation)
        # The import's last part, handed on after the create (a chaos run: 9,349 of its events counted).
        await runner.submit_all([ev(old.site_id, 5, at, path="/old")], old.incarnation, import_came_ms)
        shutil.copytree(tmp_path / "journal", tmp_path / "after-kill")  # the disk as a kill -9 leaves it
        go_on.set()
        await runner.drain()
    finally:
        go_on.set()
        await runner.stop()

    def stored() -> list:
        return sorted(services.client.query("SELECT pathname, visitor_id FROM events FINAL WHERE site_id = {s:String}",
                                            parameters={"s": new.site_id}).result_rows)

    assert stored() == [("/new", 3), ("/new", 4)]
    again = EmbeddedRunner(StreamCore(services.client, TIMEOUT), Spool(tmp_path / "after-kill", 1 << 20), sites=registry)
    await again.start()  # writes what the journal holds: the old site's two again, and the new one's
    await again.stop()
    assert stored() == [("/new", 3), ("/new", 4)]
    around = Period(at.date() - timedelta(days=1), at.date() + timedelta(days=1), "UTC")
    assert overview(services.client, new.site_id, around)["visitors"] == 2


@pytest.mark.slow
async def test_a_site_created_again_keeps_its_data_through_the_deleted_ones_second_purge(client, services):
    """The delete purges the site's rows again ~10 s later (for events other processes accepted
    meanwhile). A site created again with the same id before that keeps its own events, goals and
    funnels: the second purge deleted them by site id."""
    domain = f"again-{uuid.uuid4().hex[:8]}.example"
    old = await _create_site(client, domain=domain)
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    StreamCore(services.client, TIMEOUT).process([ev(old["id"], 1, at)])
    assert (await client.delete(f"{API}/sites/{old['id']}")).status_code == 204
    second_purge = next(t for t in threading.enumerate() if t.name == f"second purge of site {old['id']}")
    new = await _create_site(client, domain=domain)
    assert new["id"] == old["id"]
    StreamCore(services.client, TIMEOUT).process([ev(new["id"], 2, at)])
    r = await client.post(f"{API}/goals", json={"site_id": new["id"], "name": "Start", "event_type": "pageview",
                                                "match_path": "/"})
    assert r.status_code == 201, r.text
    await asyncio.to_thread(second_purge.join, 60)
    assert not second_purge.is_alive()
    migrations._wait_for_mutations(services.client, list(migrations.SITE_DATA_TABLES), None)
    overview = (await client.get(f"{API}/stats/overview", params={"site_id": new["id"], "period": "7d"})).json()["data"]
    assert (overview["visitors"], overview["pageviews"]) == (1, 1)
    assert [g["name"] for g in (await client.get(f"{API}/goals", params={"site_id": new["id"]})).json()["data"]] == ["Start"]


def test_a_site_created_again_between_the_second_purges_check_and_its_deletes_keeps_its_data(services, monkeypatch):
    """The second purge checks that no site has the id, then sends its deletes: a create landing
    in between (one try in six near 10 s in a loop) lost the goals, funnels and events it was
    given. The deletes are conditional on the id having no site when ClickHouse applies them."""
    from streams.funnels import FunnelRegistry, Step
    from streams.goals import GoalRegistry
    from streams.sites import SiteRegistry

    monkeypatch.setattr(migrations, "run_later", lambda *args: None)  # the pass is run here, below
    registry = SiteRegistry(services.client)
    domain = f"between-{uuid.uuid4().hex[:8]}.example"
    old = registry.create("acc", domain)
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    StreamCore(services.client, TIMEOUT).process([ev(old.site_id, 1, at)])
    registry.delete(old)
    load, created = registry._load, []

    def load_then_a_create(column, key, client=None):
        found = load(column, key, client)
        if found is None and not created:  # the check passed; the create lands before the deletes
            created.append(None)
            new = registry.create("acc", domain)
            assert new.site_id == old.site_id
            StreamCore(services.client, TIMEOUT).process([ev(new.site_id, 2, at)])
            GoalRegistry(services.client).create(new.site_id, "Start", "pageview", match_path="/")
            FunnelRegistry(services.client).create(new.site_id, "Path", [Step("Home", "pageview", "/", "exact")] * 2)
        return found

    monkeypatch.setattr(registry, "_load", load_then_a_create)
    registry._second_purge(old.site_id)
    assert created
    migrations._wait_for_mutations(services.client, list(migrations.SITE_DATA_TABLES), None)
    count = lambda table: services.client.query(  # noqa: E731
        f"SELECT count() FROM {table} FINAL WHERE site_id = {{s:String}}", parameters={"s": old.site_id}).result_rows[0][0]
    assert {table: count(table) for table in ("events", "sessions", "goals", "funnels")} == {
        "events": 1, "sessions": 1, "goals": 1, "funnels": 1}
    around = Period(at.date() - timedelta(days=1), at.date() + timedelta(days=1), "UTC")
    assert overview(services.client, old.site_id, around)["visitors"] == 1


# -- bad input (issue 5) --------------------------------------------------------------------------

@pytest.mark.parametrize("from_, to", [("9999-12-30", "9999-12-31"), ("0001-01-01", "0001-01-02"),
                                       ("1999-12-31", "2000-01-01"), ("2026-01-01", "2100-01-01")])
async def test_custom_dates_out_of_range_are_400(client, from_, to):
    site = await _create_site(client, timezone="Pacific/Kiritimati")
    for path in ("stats/overview", "stats/pages", "stats/referrers", "stats/countries"):
        r = await client.get(f"{API}/{path}", params={"site_id": site["id"], "period": "custom", "from": from_, "to": to,
                                                      "compare": "true"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize("params", [{"from": "2026-01-01", "to": "2026-01-31"}, {"period": "30d", "from": "2026-01-01", "to": "2026-01-31"},
                                    {"period": "7d", "to": "2026-01-31"}])
async def test_dates_beside_a_fixed_period_are_400(client, params):
    """`from`/`to` without period=custom were ignored: a question about January got the last 30
    days, and the lists, which do not echo their period, gave no sign of it."""
    site = await _create_site(client)
    for path in ("stats/overview", "stats/pages", "stats/referrers", "stats/countries"):
        r = await client.get(f"{API}/{path}", params={"site_id": site["id"], **params})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_parameter"
        assert "period=custom" in r.json()["error"]["message"]
    r = await client.get(f"{API}/stats/pages", params={"site_id": site["id"], "period": "30d", "from": "", "to": ""})
    assert r.status_code == 200, r.text  # empty values are absent ones


@pytest.mark.parametrize("tz", ["x" * 300, "right/UTC", "posix/Europe/Stockholm", "localtime", "Mars/Olympus", "../etc",
                                "Europe/Stockholm\x00"])
async def test_timezones_clickhouse_knows_only(client, tz):
    r = await client.post(f"{API}/sites", json={"domain": f"tz-{uuid.uuid4().hex[:8]}.example", "timezone": tz})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_parameter"  # as every bad body field of the query API


@pytest.mark.parametrize("domain", ["\u0000.se", "' OR 1=1 --.se", "se", ".se", "exa mple.se", "a..se", "-a.se",
                                    "x" * 64 + ".se", "127.0.0.1", "https://", "例え.テスト\u0000"])
async def test_domains_must_be_hostnames(client, domain):
    r = await client.post(f"{API}/sites", json={"domain": domain})
    assert r.status_code == 400, r.text


async def test_idn_domains_and_urls_are_normalised(client):
    r = await client.post(f"{API}/sites", json={"domain": f"https://www.räksmörgås-{uuid.uuid4().hex[:6]}.se/path"})
    assert r.status_code == 201, r.text
    domain = r.json()["data"]["domain"]
    assert domain.startswith("xn--") and domain.endswith(".se")
    assert r.json()["data"]["id"] == domain.replace("--", "-").replace(".", "-")


async def test_large_bodies_are_refused_before_authentication(client):
    async def chunks():
        for _ in range(200):
            yield b"x" * 65536  # 13 MB, streamed without a Content-Length

    headers = {"authorization": "Bearer bk_nope", "content-type": "application/json"}
    r = await client.post(f"{API}/sites", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


async def test_declared_large_body_is_refused_without_reading_it(embedded):
    app, _ = embedded
    sent, received = [], 0

    async def receive():
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": f"{API}/sites", "raw_path": f"{API}/sites".encode(),
             "query_string": b"", "headers": [(b"content-length", b"104857600"), (b"content-type", b"application/json")],
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    await app(scope, receive, send)
    assert sent[0]["status"] == 413 and received == 0


def test_an_event_sent_again_under_another_visitor_moves_to_it(services):
    """The same event id under a new visitor id (a retry after the salt changed, a re-import after
    its salt expired) counts once, for the visitor it was last sent under."""
    site, tz = _site(), "Europe/Stockholm"
    t = local(tz, 2026, 9, 14, 9)
    first = [ev(site, 1, t, event_id=str(uuid.uuid4())), ev(site, 1, t + timedelta(minutes=3), path="/b",
                                                                event_id=str(uuid.uuid4()))]
    core = StreamCore(services.client, TIMEOUT)
    core.process(first)
    core.process([e.model_copy(update={"visitor_id": 2}) for e in first])
    result = overview(services.client, site, Period(date(2026, 9, 14), date(2026, 9, 14), tz))
    assert (result["visitors"], result["pageviews"], result["sessions"]) == (1, 2, 1)
    assert pages(services.client, site, Period(date(2026, 9, 14), date(2026, 9, 14), tz), 10) == [
        {"page": "/", "visitors": 1, "pageviews": 1}, {"page": "/b", "visitors": 1, "pageviews": 1}]
    owners = services.client.query("SELECT DISTINCT visitor_id FROM events FINAL WHERE site_id = {s:String}",
                                   parameters={"s": site}).result_rows
    assert owners == [(2,)]
    assert services.client.query("SELECT count() FROM sessions FINAL WHERE site_id = {s:String}",
                                 parameters={"s": site}).result_rows == [(1,)]


def test_one_event_id_on_two_sites_is_two_events(services):
    """Imported lines keep their own event ids, so two sites may hold the same id: each site's
    copy is its own event, in one batch or apart, and neither site can make the other's vanish
    or count twice."""
    a, b, tz = _site(), _site(), "Europe/Stockholm"
    t = local(tz, 2026, 9, 15, 9)
    shared, retried = str(uuid.uuid4()), str(uuid.uuid4())
    core = StreamCore(services.client, TIMEOUT)
    core.process([ev(b, 1, t, event_id=shared), ev(a, 2, t - timedelta(minutes=1), event_id=shared),
                  ev(a, 2, t + timedelta(minutes=1), event_id=retried)])
    # Both sites' copies stored; then a's retry (a later arrival) beside b's copy of the same id.
    core.process([ev(b, 1, t + timedelta(minutes=2), event_id=retried)])
    core.process([ev(a, 2, t + timedelta(minutes=5), event_id=retried), ev(b, 3, t, event_id=str(uuid.uuid4()))])
    day = Period(date(2026, 9, 15), date(2026, 9, 15), tz)
    assert overview(services.client, a, day)["pageviews"] == 2
    assert overview(services.client, b, day)["pageviews"] == 3
