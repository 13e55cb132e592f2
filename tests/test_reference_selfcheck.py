"""Self-check of tests/reference.py on small hand-computed cases (no server, no project code)."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import iptocc
import pytest

from tests import reference as R
from tests.reference import DAY, Reference, SiteSpec

SITE = "s1"
DOMAIN = "shop.example"
SE_IP, SE_IP2, NO_IP, DE_IP, UNKNOWN_IP = "81.227.1.10", "81.227.1.11", "84.208.3.4", "5.146.7.8", "192.0.2.7"
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
SAFARI = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1"


def ev(ts: str, name: str = "pageview", path: str = "/", ip: str = SE_IP, ua: str = CHROME,
       referrer: str | None = None, site: str = SITE) -> dict:
    line = {"site_id": site, "name": name, "url": f"https://{DOMAIN}{path}", "timestamp": ts, "ip": ip,
            "user_agent": ua}
    if referrer is not None:
        line["referrer"] = referrer
    if name == "click":
        line["product"] = {"id": "p1", "category_slug": "c", "brand_slug": "b", "partner_slug": "x"}
    return line


def ref(lines: list[dict], tz: str = "UTC", now: datetime | None = None) -> Reference:
    return Reference(lines, [SiteSpec(SITE, DOMAIN, tz)], now)


def vid_day(r: Reference, i: int) -> date:
    return r.visitor_of(i)[3]


# -- sources ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "referrer", "expected"), [
    ("/", None, ("", "direct")),
    ("/", "", ("", "direct")),
    ("/", "https://www.google.com/", ("Google", "search")),
    ("/", "https://www.google.se/search?q=x", ("Google", "search")),
    ("/", "https://google.co.in/", ("Google", "search")),
    ("/", "https://www.bing.com/", ("Bing", "search")),
    ("/", "https://duckduckgo.com/", ("DuckDuckGo", "search")),
    ("/", "https://l.facebook.com/l.php?u=x", ("Facebook", "social")),
    ("/", "https://m.facebook.com/", ("Facebook", "social")),
    ("/", "https://www.facebook.com/", ("Facebook", "social")),
    ("/", "https://www.instagram.com/", ("Instagram", "social")),
    ("/", "https://www.reddit.com/r/sweden/", ("Reddit", "social")),
    ("/", "https://t.co/AbC", ("X/Twitter", "social")),
    ("/", "https://x.com/someone", ("X/Twitter", "social")),
    ("/", "https://www.youtube.com/", ("YouTube", "social")),
    ("/", "https://prisjakt.nu/produkt.php?p=1", ("prisjakt.nu", "referral")),
    ("/", "https://www.prisjakt.nu/", ("prisjakt.nu", "referral")),
    ("/", "https://blog.example.org/post", ("blog.example.org", "referral")),
    ("/", f"https://{DOMAIN}/guide", ("", "direct")),  # self-referral
    ("/", f"https://www.{DOMAIN}/", ("", "direct")),  # self-referral with www.
    ("/?utm_source=newsletter&utm_medium=email&utm_campaign=nov", None, ("newsletter", "email")),
    ("/?utm_source=newsletter&utm_medium=EMAIL", None, ("newsletter", "email")),  # medium lower-cased
    ("/?utm_source=newsletter&utm_medium=email", f"https://{DOMAIN}/", ("newsletter", "email")),  # self ignored
    ("/?utm_source=google&utm_medium=cpc", "https://www.google.com/", ("Google", "paid")),
    ("/?utm_source=google&utm_medium=cpc", None, ("Google", "paid")),
    ("/?utm_source=facebook", None, ("Facebook", "social")),  # known label
    ("/?utm_source=Partner", None, ("Partner", "referral")),  # unknown: as given
    ("/?utm_source=newsletter", "https://blog.example.org/", ("blog.example.org", "referral")),  # referrer wins
    ("/?utm_source=x&utm_medium=social", "https://prisjakt.nu/", ("prisjakt.nu", "social")),
    ("/?utm_medium=email", None, ("", "email")),  # a medium alone names no source
    ("/?page=2", None, ("", "direct")),
])
def test_classify(url, referrer, expected):
    assert R.classify(f"https://{DOMAIN}{url}", referrer, DOMAIN) == expected


def test_classify_site_domain_given_with_www():
    assert R.classify("https://shop.example/", "https://shop.example/x", "www.shop.example") == ("", "direct")


# -- rounding ----------------------------------------------------------------------------------

def test_round_half_away_and_changes():
    assert [R.round_half_away(R.Fraction(n, 2)) for n in (-5, -3, -1, 1, 3, 5)] == [-3, -2, -1, 1, 2, 3]
    assert R.percent_change(3, 8) == -63  # −62.5
    assert R.percent_change(229, 200) == 15  # exactly 14.5; 29/200*100 in floats is 14.4999…
    assert R.percent_change(5, 0) is None
    assert R.percent_change(0, 5) == -100
    assert R.rate(1, 8) == 13 and R.rate(2, 3) == 67 and R.rate(1, 3) == 33 and R.rate(0, 0) == 0


def test_timestamps():
    assert R.to_ms("2026-11-10T23:50:00.123Z") == R.to_ms("2026-11-11T00:50:00.123+01:00")
    assert R.iso_ms(R.to_ms("2026-11-10T23:50:00.007Z")) == "2026-11-10T23:50:00.007Z"
    assert R.to_ms("2026-11-10T23:50:00.1239Z") == R.to_ms("2026-11-10T23:50:00.123Z")  # truncated


# -- visitor ids and sessions around UTC midnight -----------------------------------------------

def test_session_across_utc_midnight_keeps_yesterdays_id():
    r = ref([ev("2026-11-10T23:50:00.000Z"), ev("2026-11-11T00:10:00.000Z", path="/b")])
    assert r.visitor_of(0) == r.visitor_of(1) == (SITE, SE_IP, CHROME, date(2026, 11, 10))
    out = r.overview(SITE, "2026-11-10", "2026-11-11")
    assert out == {"period": {"from": "2026-11-10", "to": "2026-11-11"}, "visitors": 1, "pageviews": 2,
                   "sessions": 1, "bounce_rate": 0,
                   "daily": [{"date": "2026-11-10", "visitors": 1, "pageviews": 1},
                             {"date": "2026-11-11", "visitors": 1, "pageviews": 1}]}
    # The session belongs to the day it started.
    assert r.overview(SITE, "2026-11-11", "2026-11-11")["sessions"] == 0


def test_carried_id_lapses_then_todays_id():
    r = ref([ev("2026-11-10T23:50:00.000Z"), ev("2026-11-11T00:10:00.000Z"),
             ev("2026-11-11T00:45:00.000Z"),  # 35 min later: the chain lapsed
             ev("2026-11-11T09:00:00.000Z")])
    assert [vid_day(r, i) for i in range(4)] == [date(2026, 11, 10)] * 2 + [date(2026, 11, 11)] * 2
    day = r.overview(SITE, "2026-11-11", "2026-11-11")
    # Two ids on the 11th (the carried one and today's); today's id has two bounced sessions.
    assert (day["visitors"], day["pageviews"], day["sessions"], day["bounce_rate"]) == (2, 3, 2, 100)
    assert r.overview(SITE, "2026-11-10", "2026-11-11")["visitors"] == 2


def test_carry_boundary_is_strict():
    exact = ref([ev("2026-11-10T23:45:00.000Z"), ev("2026-11-11T00:15:00.000Z")])  # gap = timeout
    assert vid_day(exact, 1) == date(2026, 11, 11)
    assert len(exact.sessions(SITE)) == 2
    less = ref([ev("2026-11-10T23:45:00.000Z"), ev("2026-11-11T00:14:59.999Z")])
    assert vid_day(less, 1) == date(2026, 11, 10)
    assert len(less.sessions(SITE)) == 1


def test_session_gap_boundary_within_a_day():
    r = ref([ev("2026-11-10T10:00:00.000Z"), ev("2026-11-10T10:30:00.000Z"),  # exactly 1800 s: new session
             ev("2026-11-10T10:59:59.999Z")])  # 1799.999 s: same session
    assert [len(s.events) for s in r.sessions(SITE)] == [1, 2]
    assert r.overview(SITE, "2026-11-10", "2026-11-10")["bounce_rate"] == 50


def test_chain_past_the_second_midnight_switches_to_that_days_id():
    start = R.to_ms("2026-11-09T23:40:00.000Z")
    lines = [ev(R.iso_ms(start + k * 25 * R.MINUTE)) for k in range(60)]
    assert lines[-1]["timestamp"] == "2026-11-11T00:15:00.000Z" and lines[-2]["timestamp"] == "2026-11-10T23:50:00.000Z"
    r = ref(lines)
    assert {vid_day(r, i) for i in range(59)} == {date(2026, 11, 9)}
    assert vid_day(r, 59) == date(2026, 11, 11)  # (p, 10 Nov) is never used
    assert [len(s.events) for s in r.sessions(SITE)] == [59, 1]
    assert r.overview(SITE, "2026-11-11", "2026-11-11")["visitors"] == 1
    assert r.overview(SITE, "2026-11-09", "2026-11-11")["visitors"] == 2


def test_people_are_site_ip_and_agent():
    lines = [ev("2026-11-10T10:00:00.000Z"), ev("2026-11-10T10:01:00.000Z", ua=SAFARI),
             ev("2026-11-10T10:02:00.000Z", ip=SE_IP2), ev("2026-11-10T10:03:00.000Z", site="s2")]
    r = Reference(lines, [SiteSpec(SITE, DOMAIN, "UTC"), SiteSpec("s2", "other.example", "UTC")])
    assert r.overview(SITE, "2026-11-10", "2026-11-10")["visitors"] == 3
    assert r.overview("s2", "2026-11-10", "2026-11-10")["visitors"] == 1
    assert len({r.visitor_of(i) for i in range(4)}) == 4


def test_same_person_next_day_is_a_new_visitor():
    r = ref([ev("2026-11-10T12:00:00.000Z"), ev("2026-11-11T12:00:00.000Z")])
    assert r.overview(SITE, "2026-11-10", "2026-11-11")["visitors"] == 2


# -- local days: DST and +5:30 ------------------------------------------------------------------

def test_local_day_bounds():
    ms = R.to_ms
    assert R.local_day_bounds(date(2026, 10, 25), "Europe/Stockholm") == (ms("2026-10-24T22:00:00Z"), ms("2026-10-25T23:00:00Z"))
    assert R.local_day_bounds(date(2026, 3, 29), "Europe/Stockholm") == (ms("2026-03-28T23:00:00Z"), ms("2026-03-29T22:00:00Z"))
    assert R.local_day_bounds(date(2026, 11, 1), "America/New_York") == (ms("2026-11-01T04:00:00Z"), ms("2026-11-02T05:00:00Z"))
    assert R.local_day_bounds(date(2026, 11, 10), "Asia/Kolkata") == (ms("2026-11-09T18:30:00Z"), ms("2026-11-10T18:30:00Z"))


def test_stockholm_25_hour_day():
    lines = [ev("2026-10-24T21:59:59.999Z", ip="81.227.0.1"),  # 23:59:59.999 CEST on the 24th
             ev("2026-10-24T22:00:00.000Z", ip="81.227.0.2"),  # 00:00 on the 25th
             ev("2026-10-25T01:30:00.000Z", ip="81.227.0.3"),  # 02:30 CET, the repeated hour's end
             ev("2026-10-25T22:59:59.999Z", ip="81.227.0.4"),  # 23:59:59.999 CET on the 25th
             ev("2026-10-25T23:00:00.000Z", ip="81.227.0.5")]  # 00:00 on the 26th
    out = R.overview(lines, SITE, "Europe/Stockholm", "2026-10-24", "2026-10-26", site_domain=DOMAIN)
    assert [(d["date"], d["visitors"], d["pageviews"]) for d in out["daily"]] == [
        ("2026-10-24", 1, 1), ("2026-10-25", 3, 3), ("2026-10-26", 1, 1)]
    assert out["sessions"] == 5 and out["bounce_rate"] == 100


def test_stockholm_23_hour_day():
    lines = [ev("2026-03-29T22:00:00.000Z", ip="81.227.0.1"),  # 00:00 CEST on the 30th
             ev("2026-03-29T21:59:59.999Z", ip="81.227.0.2"),  # 23:59:59.999 on the 29th
             ev("2026-03-28T23:00:00.000Z", ip="81.227.0.3")]  # 00:00 CET on the 29th
    out = R.overview(lines, SITE, "Europe/Stockholm", "2026-03-29", "2026-03-29")
    assert (out["visitors"], out["pageviews"]) == (2, 2)


def test_new_york_25_hour_day():
    lines = [ev("2026-11-01T03:59:59.999Z", ip="24.0.0.1"),  # 23:59 EDT on 31 Oct
             ev("2026-11-01T04:00:00.000Z", ip="24.0.0.2"),
             ev("2026-11-02T04:30:00.000Z", ip="24.0.0.3"),  # 23:30 EST on 1 Nov
             ev("2026-11-02T05:00:00.000Z", ip="24.0.0.4")]  # 00:00 on 2 Nov
    out = R.overview(lines, SITE, "America/New_York", "2026-10-31", "2026-11-02")
    assert [d["pageviews"] for d in out["daily"]] == [1, 2, 1]


def test_kolkata_half_hour_offset_and_session_start_day():
    lines = [ev("2026-11-09T18:20:00.000Z"), ev("2026-11-09T18:40:00.000Z"),  # 23:50 → 00:10 IST
             ev("2026-11-10T18:29:59.999Z", ip=NO_IP), ev("2026-11-10T18:30:00.000Z", ip=DE_IP)]
    r = ref(lines, "Asia/Kolkata")
    day9, day10 = r.overview(SITE, "2026-11-09", "2026-11-09"), r.overview(SITE, "2026-11-10", "2026-11-10")
    assert (day9["visitors"], day9["pageviews"], day9["sessions"], day9["bounce_rate"]) == (1, 1, 1, 0)
    # The crossing session counts on the 9th only; the 10th has the NO bounce.
    assert (day10["visitors"], day10["pageviews"], day10["sessions"], day10["bounce_rate"]) == (2, 2, 1, 100)
    assert r.overview(SITE, "2026-11-11", "2026-11-11")["pageviews"] == 1


# -- bounce ------------------------------------------------------------------------------------

def test_bounce_is_exactly_one_pageview():
    lines = [ev("2026-11-10T08:00:00.000Z", ip="81.227.0.1"),  # single pageview: bounce
             ev("2026-11-10T08:00:00.000Z", "signup", ip="81.227.0.2"),  # single custom event
             ev("2026-11-10T08:00:00.000Z", "click", ip="81.227.0.3"),  # single click
             ev("2026-11-10T08:00:00.000Z", ip="81.227.0.4"), ev("2026-11-10T08:01:00.000Z", "click", ip="81.227.0.4"),
             ev("2026-11-10T08:00:00.000Z", ip="81.227.0.5"), ev("2026-11-10T08:01:00.000Z", ip="81.227.0.5")]
    r = ref(lines)
    assert [s.bounce for s in sorted(r.sessions(SITE), key=lambda s: s.visitor[1])] == [True, False, False, False, False]
    out = r.overview(SITE, "2026-11-10", "2026-11-10")
    assert (out["visitors"], out["pageviews"], out["sessions"], out["bounce_rate"]) == (5, 4, 5, 20)


def test_bounce_rate_rounds_half_up():
    lines = [ev("2026-11-10T08:00:00.000Z", ip=f"81.227.0.{i}") for i in range(1, 9)]
    lines += [ev("2026-11-10T08:01:00.000Z", "signup", ip=f"81.227.0.{i}") for i in range(2, 9)]
    assert R.overview(lines, SITE, "UTC", "2026-11-10", "2026-11-10")["bounce_rate"] == 13  # 1/8 = 12.5 %


# -- compare -----------------------------------------------------------------------------------

def test_compare_previous_period_and_changes():
    prev = [ev(f"2026-11-0{5 + i % 3}T10:00:00.000Z", ip=f"81.227.0.{i}") for i in range(8)]  # 8 bounces
    cur = [ev("2026-11-08T10:00:00.000Z", ip="84.208.0.1"), ev("2026-11-09T10:00:00.000Z", ip="84.208.0.2"),
           ev("2026-11-10T10:00:00.000Z", ip="84.208.0.3"), ev("2026-11-10T10:05:00.000Z", ip="84.208.0.3")]
    out = R.overview(prev + cur, SITE, "UTC", "2026-11-08", "2026-11-10", compare=True)
    assert (out["visitors"], out["pageviews"], out["sessions"], out["bounce_rate"]) == (3, 4, 3, 67)
    assert out["comparison"] == {"period": {"from": "2026-11-05", "to": "2026-11-07"}, "visitors": 8,
                                 "pageviews": 8, "sessions": 8, "bounce_rate": 100,
                                 "change": {"visitors": -63, "pageviews": -50, "sessions": -63, "bounce_rate": -33}}


def test_compare_with_empty_previous_period():
    out = R.overview([ev("2026-11-10T10:00:00.000Z")], SITE, "UTC", "2026-11-10", "2026-11-10", compare=True)
    assert out["comparison"] == {"period": {"from": "2026-11-09", "to": "2026-11-09"}, "visitors": 0,
                                 "pageviews": 0, "sessions": 0, "bounce_rate": 0,
                                 "change": {"visitors": None, "pageviews": None, "sessions": None, "bounce_rate": None}}


def test_compare_with_empty_current_period():
    out = R.overview([ev("2026-11-09T10:00:00.000Z")], SITE, "UTC", "2026-11-10", "2026-11-10", compare=True)
    # The previous day's one session bounced (100 %); the current day shows 0.
    assert out["comparison"]["change"] == {"visitors": -100, "pageviews": -100, "sessions": -100, "bounce_rate": -100}


def test_compare_rounding_is_exact():
    prev = [ev("2026-11-09T10:00:00.000Z", ip=f"81.227.{i // 250}.{i % 250 + 1}") for i in range(200)]
    cur = [ev("2026-11-10T10:00:00.000Z", ip=f"84.208.{i // 250}.{i % 250 + 1}") for i in range(229)]
    out = R.overview(prev + cur, SITE, "UTC", "2026-11-10", "2026-11-10", compare=True)
    assert out["comparison"]["change"]["visitors"] == 15  # 14.5 → 15


# -- daily series and periods ------------------------------------------------------------------

def test_daily_series_is_zero_filled_oldest_first():
    now = datetime(2026, 11, 29, 15, 0, tzinfo=timezone.utc)
    r = ref([ev("2026-11-24T10:00:00.000Z"), ev("2026-11-24T10:01:00.000Z"),
             ev("2026-11-28T23:30:00.000Z", ip=NO_IP)], "Europe/Stockholm", now)
    out = r.overview(SITE, *r.period(SITE, "7d"))
    assert out["period"] == {"from": "2026-11-23", "to": "2026-11-29"}
    assert [(d["date"], d["visitors"], d["pageviews"]) for d in out["daily"]] == [
        ("2026-11-23", 0, 0), ("2026-11-24", 1, 2), ("2026-11-25", 0, 0), ("2026-11-26", 0, 0),
        ("2026-11-27", 0, 0), ("2026-11-28", 0, 0), ("2026-11-29", 1, 1)]  # 23:30Z = 00:30 CET on the 29th


def test_period_days():
    late = datetime(2026, 11, 29, 23, 30, tzinfo=timezone.utc)
    assert R.period_days("7d", "Europe/Stockholm", late) == (date(2026, 11, 24), date(2026, 11, 30))
    assert R.period_days("7d", "America/New_York", late) == (date(2026, 11, 23), date(2026, 11, 29))
    assert R.period_days("30d", "Asia/Kolkata", datetime(2026, 11, 29, 18, 29, 59, tzinfo=timezone.utc)) == (
        date(2026, 10, 31), date(2026, 11, 29))
    assert R.period_days("30d", "Asia/Kolkata", datetime(2026, 11, 29, 18, 30, tzinfo=timezone.utc)) == (
        date(2026, 11, 1), date(2026, 11, 30))
    assert R.period_days("90d", "Europe/Stockholm", late) == (date(2026, 9, 2), date(2026, 11, 30))
    assert R.period_days("custom", "UTC", late, "2026-01-01", "2026-01-14") == (date(2026, 1, 1), date(2026, 1, 14))
    with pytest.raises(ValueError):
        R.period_days("custom", "UTC", late, "2026-01-14", "2026-01-01")
    with pytest.raises(ValueError):
        R.period_days("14d", "UTC", late)


def test_site_stats_are_the_7d_numbers():
    now = datetime(2026, 11, 29, 15, 0, tzinfo=timezone.utc)
    r = ref([ev("2026-11-22T22:59:59.999Z"),  # 23:59 CET on the 22nd: outside 7d
             ev("2026-11-22T23:00:00.000Z", ip=NO_IP), ev("2026-11-29T14:00:00.000Z", "signup", ip=DE_IP)],
            "Europe/Stockholm", now)
    assert r.site_stats(SITE) == {"visitors_7d": 2, "pageviews_7d": 1}


# -- pages, referrers, countries ---------------------------------------------------------------

def test_pages():
    lines = [ev("2026-11-10T10:00:00.000Z", path="/kategori/a?page=2"), ev("2026-11-10T10:01:00.000Z", path="/kategori/a"),
             ev("2026-11-10T10:02:00.000Z", path="/b"), ev("2026-11-10T10:03:00.000Z", "signup", path="/c"),
             ev("2026-11-10T11:00:00.000Z", path="/b", ip=NO_IP), ev("2026-11-10T11:01:00.000Z", path="/", ip=NO_IP),
             ev("2026-11-10T12:00:00.000Z", path="/", ip=DE_IP), ev("2026-11-10T12:01:00.000Z", path="/a?x=1", ip=DE_IP)]
    out = R.pages(lines, SITE, "UTC", "2026-11-10", "2026-11-10")
    assert out == [{"page": "/", "visitors": 2, "pageviews": 2}, {"page": "/b", "visitors": 2, "pageviews": 2},
                   {"page": "/a", "visitors": 1, "pageviews": 1}, {"page": "/kategori/a", "visitors": 1, "pageviews": 2}]
    assert R.pages(lines, SITE, "UTC", "2026-11-10", "2026-11-10", limit=1) == out[:1]


def test_referrers_by_entry_source():
    google, fb = "https://www.google.com/", "https://l.facebook.com/"
    lines = [
        # SE: two Google sessions (the second page's referrer does not matter), one visitor.
        ev("2026-11-10T08:00:00.000Z", referrer=google), ev("2026-11-10T08:01:00.000Z", path="/b", referrer=fb),
        ev("2026-11-10T12:00:00.000Z", referrer=google),
        ev("2026-11-10T08:00:00.000Z", ip=SE_IP2, referrer="https://www.google.se/"),
        ev("2026-11-10T08:00:00.000Z", ip=NO_IP, referrer=fb),
        ev("2026-11-10T08:00:00.000Z", ip=DE_IP, referrer=f"https://www.{DOMAIN}/x"),  # self: direct
        ev("2026-11-10T08:00:00.000Z", ip="81.227.9.1", path="/?utm_source=newsletter&utm_medium=email"),
        # A second newsletter visitor with three sessions: more sessions than Google, as many visitors.
        *(ev(f"2026-11-10T{h}:00:00.000Z", ip="81.227.9.6", path="/?utm_source=newsletter&utm_medium=email")
          for h in ("08", "10", "14")),
        ev("2026-11-10T08:00:00.000Z", ip="81.227.9.2", path="/?utm_source=google&utm_medium=cpc", referrer=google),
        ev("2026-11-10T08:00:00.000Z", "signup", ip="81.227.9.3", referrer="https://www.bing.com/"),
        ev("2026-11-10T08:00:00.000Z", ip="81.227.9.4", path="/?utm_medium=email"),  # no source: not listed
        ev("2026-11-09T23:50:00.000Z", ip="81.227.9.5", referrer="https://prisjakt.nu/"),  # started the day before
        ev("2026-11-10T00:05:00.000Z", ip="81.227.9.5", path="/b"),
    ]
    no_social = R.referrers(lines, SITE, "UTC", "2026-11-10", "2026-11-10", site_domain=DOMAIN)
    assert no_social == [{"source": "Google", "channel": "search", "visitors": 2, "sessions": 3},
                         {"source": "newsletter", "channel": "email", "visitors": 2, "sessions": 4},
                         {"source": "Bing", "channel": "search", "visitors": 1, "sessions": 1},
                         {"source": "Google", "channel": "paid", "visitors": 1, "sessions": 1}]
    social = R.referrers(lines, SITE, "UTC", "2026-11-10", "2026-11-10", include_social=True, site_domain=DOMAIN)
    assert [(r["source"], r["channel"]) for r in social] == [
        ("Google", "search"), ("newsletter", "email"), ("Bing", "search"), ("Facebook", "social"), ("Google", "paid")]
    assert R.referrers(lines, SITE, "UTC", "2026-11-10", "2026-11-10", limit=2, site_domain=DOMAIN) == no_social[:2]
    assert R.referrers(lines, SITE, "UTC", "2026-11-09", "2026-11-09", site_domain=DOMAIN) == [
        {"source": "prisjakt.nu", "channel": "referral", "visitors": 1, "sessions": 1}]


def test_countries_by_the_periods_events():
    lines = [ev("2026-11-10T08:00:00.000Z"), ev("2026-11-10T12:00:00.000Z"),  # one SE visitor, two sessions
             ev("2026-11-10T08:00:00.000Z", ip=SE_IP2), ev("2026-11-10T08:00:00.000Z", ip=NO_IP),
             ev("2026-11-10T08:00:00.000Z", ip=DE_IP), ev("2026-11-10T08:00:00.000Z", ip=UNKNOWN_IP),
             ev("2026-11-09T23:55:00.000Z", ip="24.0.0.1"), ev("2026-11-10T00:05:00.000Z", ip="24.0.0.1")]
    # The US visitor's session began the day before: its 00:05 event counts it on the 10th.
    assert R.countries(lines, SITE, "UTC", "2026-11-10", "2026-11-10") == [
        {"country": "SE", "visitors": 2}, {"country": "DE", "visitors": 1}, {"country": "NO", "visitors": 1},
        {"country": "US", "visitors": 1}]
    assert R.countries(lines, SITE, "UTC", "2026-11-10", "2026-11-10", limit=1) == [{"country": "SE", "visitors": 2}]


def test_country_table_agrees_with_iptocc():
    for ip in (SE_IP, SE_IP2, NO_IP, DE_IP, "24.0.0.1"):
        assert R.country_of(ip) == iptocc.country_code(ip)
    assert R.country_of(UNKNOWN_IP) == "" and not iptocc.country_code(UNKNOWN_IP)


# -- generator ---------------------------------------------------------------------------------

NOW = datetime(2026, 11, 29, 15, 51, 50, 123000, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def sample():
    sites = R.default_sites()
    lines = R.generate(7, sites, NOW, days=90, target_events=6000)
    return sites, lines, Reference(lines, sites, NOW)


def test_generator_is_deterministic_and_sorted(sample):
    sites, lines, _ = sample
    assert len(lines) >= 6000
    assert R.generate(7, sites, NOW, days=90, target_events=6000) == lines
    assert R.generate(8, sites, NOW, days=90, target_events=6000) != lines
    stamps = [line["timestamp"] for line in lines]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s) for s in stamps)
    times = [R.to_ms(s) for s in stamps]
    assert times == sorted(times)
    assert R.to_ms(NOW) - 90 * DAY <= times[0] and times[-1] < R.to_ms(NOW)
    assert len({(l["site_id"], l["ip"], l["user_agent"], l["timestamp"]) for l in lines}) == len(lines)


def test_generator_lines_have_the_import_shape(sample):
    sites, lines, _ = sample
    domains = {s.site_id: s.domain for s in sites}
    for line in lines:
        assert set(line) <= {"site_id", "name", "url", "referrer", "props", "product", "timestamp", "ip", "user_agent"}
        assert urlsplit(line["url"]).hostname.removeprefix("www.") == domains[line["site_id"]]
        assert ("product" in line) == (line["name"] == "click")
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in line.get("props", {}).items())
        assert not re.search(r"bot|crawl|spider|headless|lighthouse", line["user_agent"], re.I)
    assert [json.loads(raw) for raw in R.to_ndjson(lines).splitlines()] == lines


def test_generator_countries_devices_and_sources(sample):
    sites, lines, r = sample
    countries = Counter(R.country_of(l["ip"]) for l in lines)
    assert {"SE", "NO", "US", "IN", "DE", "GB", ""} <= set(countries)
    assert all((iptocc.country_code(ip) or "") == R.country_of(ip) for ip in {l["ip"] for l in lines})
    agents = {l["user_agent"] for l in lines}
    assert any("iPhone" in a for a in agents) and any("Android" in a for a in agents)
    assert any("Windows" in a for a in agents) and any("Macintosh" in a for a in agents)
    referrers = {l.get("referrer") for l in lines}
    for expected in ("https://www.google.com/", "https://www.google.se/", "https://www.bing.com/",
                     "https://duckduckgo.com/", "https://l.facebook.com/", "https://www.instagram.com/",
                     "https://www.youtube.com/", "https://blog.example.org/post", "", None):
        assert expected in referrers
    assert any(r_ and r_.startswith("https://t.co/") for r_ in referrers)
    assert any(r_ and "reddit.com" in r_ for r_ in referrers)
    assert any(r_ and "prisjakt.nu" in r_ for r_ in referrers)
    assert any(r_ and r_.startswith("https://www.ref-") for r_ in referrers)  # self-referral with www.
    urls = [l["url"] for l in lines]
    assert any("utm_source=newsletter&utm_medium=email" in u for u in urls)
    assert any("?page=2" in u for u in urls)
    assert any("utm_source=google&utm_medium=cpc" in u and l.get("referrer", "").startswith("https://www.google.")
               for u, l in zip(urls, lines))
    for site in sites:
        entries = {(s.source, s.channel) for s in r.sessions(site.site_id)}
        assert {("Google", "search"), ("Google", "paid"), ("newsletter", "email"), ("Facebook", "social"),
                ("prisjakt.nu", "referral"), ("", "direct")} <= entries


def test_generator_session_shapes(sample):
    sites, lines, r = sample
    for site in sites:
        zone = ZoneInfo(site.timezone)
        sessions = r.sessions(site.site_id)

        def local(ms):
            return datetime.fromtimestamp(ms / 1000, zone).date()

        assert any(s.bounce for s in sessions)
        assert any(len(s.events) == 1 and s.events[0].name not in ("pageview", "click") for s in sessions)
        assert any(s.events[0].ts // DAY != s.events[-1].ts // DAY for s in sessions)  # across UTC midnight
        assert any(local(s.events[0].ts) != local(s.events[-1].ts) for s in sessions)  # across local midnight
        assert any(e.visitor[3] != datetime.fromtimestamp(e.ts / 1000, timezone.utc).date()
                   for e in r.events(site.site_id))  # carried visitor ids
        assert {e.name for e in r.events(site.site_id)} >= {"pageview", "click", "signup", "purchase"}
        # Some people come back the same day (a new session) and on later days.
        by_visitor = Counter(s.visitor for s in sessions)
        assert any(n > 1 for n in by_visitor.values())
        people = {}
        for s in sessions:
            people.setdefault(s.visitor[:3], set()).add(s.visitor[3])
        assert any(len(days) > 1 for days in people.values())


def test_generator_covers_dst_days(sample):
    _, _, r = sample
    se = r.overview("ref-se", "2026-10-25", "2026-10-25")
    us = r.overview("ref-us", "2026-11-01", "2026-11-01")
    assert se["pageviews"] > 0 and us["pageviews"] > 0


# -- goals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("/checkout", "/checkout", True), ("/checkout", "/checkout/", False), ("/checkout", "/Checkout", False),
    ("/produkt/*", "/produkt/a", True), ("/produkt/*", "/produkt/a/b", True),  # * crosses /
    ("/produkt/*", "/produkt/", True),  # * may be empty
    ("/produkt/*", "/produkt", False), ("/produkt/*", "/produkter", False),
    ("*", "/", True), ("*", "/a/b", True), ("/**", "/", True), ("/a*", "/a", True),
    ("/*/skal", "/a/b/skal", True), ("/*/skal", "//skal", True), ("/*/skal", "/skal", False),
    ("/a*b*c", "/abc", True), ("/a*b*c", "/aXcYb", False), ("/a*b*c", "/abcbc", True),
    ("/*a*a", "/a", False), ("/*a*a", "/aa", True), ("*x*", "/x", True), ("*x*", "/y", False),
    ("/a?c", "/abc", False), ("/a?c", "/a?c", True),  # ? is literal
    ("/[ab]", "/a", False), ("/[ab]", "/[ab]", True),  # [ is literal
    ("/x.y", "/xzy", False), ("/x.y*", "/x.y/z", True),
])
def test_glob_match(pattern, path, expected):
    assert R.glob_match(pattern, path) is expected


def test_glob_match_agrees_with_a_regex_translation():
    import random
    rng = random.Random(5)
    for _ in range(3000):
        pattern = "".join(rng.choice("ab/*?[") for _ in range(rng.randint(0, 6)))
        path = "".join(rng.choice("ab/?[") for _ in range(rng.randint(0, 7)))
        regex = ".*".join(re.escape(part) for part in pattern.split("*"))
        assert R.glob_match(pattern, path) == bool(re.fullmatch(regex, path, re.S)), (pattern, path)


GOALS = [
    {"id": "g1", "name": "Checkout", "event_type": "pageview", "match_path": "/checkout"},
    {"id": "g2", "name": "Produkt", "event_type": "pageview", "match_path": "/produkt/*"},
    {"id": "g3", "name": "Köp", "event_type": "event", "match_event": "purchase"},
    {"id": "g4", "name": "Alla sidvisningar", "event_type": "event", "match_event": "pageview"},
    {"id": "g5", "name": "Allt", "event_type": "pageview", "match_path": "*"},
    {"id": "g6", "name": "Klick", "event_type": "event", "match_event": "click"},
    {"id": "g7", "name": "Båda nycklarna", "event_type": "pageview", "match_path": "/tack", "match_event": "x"},
]


def test_goals():
    lines = [
        # A: two checkout pageviews (one with a query string), two purchases.
        ev("2026-11-10T10:00:00.000Z", path="/checkout?steg=2"), ev("2026-11-10T10:05:00.000Z", path="/checkout"),
        ev("2026-11-10T10:06:00.000Z", "purchase", path="/checkout"), ev("2026-11-10T10:07:00.000Z", "purchase"),
        # B: a product page; a click and a signup on /checkout are not pageviews.
        ev("2026-11-10T10:00:00.000Z", path="/produkt/x", ip=NO_IP), ev("2026-11-10T10:01:00.000Z", "click", path="/checkout", ip=NO_IP),
        ev("2026-11-10T10:02:00.000Z", "signup", path="/checkout", ip=NO_IP),
        # C: near misses.
        ev("2026-11-10T10:00:00.000Z", path="/checkout/", ip=DE_IP), ev("2026-11-10T10:01:00.000Z", "purchase_refund", ip=DE_IP),
        ev("2026-11-10T10:02:00.000Z", "Purchase", ip=DE_IP), ev("2026-11-10T10:03:00.000Z", path="/produkt", ip=DE_IP),
        # D–H: pageviews of / only (8 visitors in all).
        *(ev("2026-11-10T12:00:00.000Z", ip=f"81.227.5.{i}") for i in range(1, 6)),
        # Outside the period.
        ev("2026-11-09T23:59:59.999Z", "purchase", ip=SE_IP2), ev("2026-11-11T00:00:00.000Z", path="/checkout", ip=SE_IP2),
    ]
    out = ref(lines).goals(SITE, "2026-11-10", "2026-11-10", GOALS)
    by_id = {g["id"]: g for g in out}
    assert by_id["g1"] == {"id": "g1", "name": "Checkout", "event_type": "pageview", "match_path": "/checkout",
                      "visitors": 1, "conversions": 2, "conversion_rate": 13}  # 1/8 = 12.5 %
    assert by_id["g3"] == {"id": "g3", "name": "Köp", "event_type": "event", "match_event": "purchase",
                      "visitors": 1, "conversions": 2, "conversion_rate": 13}
    assert by_id["g7"] == {"id": "g7", "name": "Båda nycklarna", "event_type": "pageview", "match_path": "/tack",
                      "visitors": 0, "conversions": 0, "conversion_rate": 0}
    # Most visitors first, ties by name by code point ("Klick" < "Köp"), whatever the order given;
    # an empty period has no visitors and rates of 0.
    assert [(g["id"], g["visitors"], g["conversions"], g["conversion_rate"]) for g in out] == [
        ("g4", 8, 10, 100), ("g5", 8, 10, 100), ("g1", 1, 2, 13), ("g6", 1, 1, 13), ("g3", 1, 2, 13),
        ("g2", 1, 1, 13), ("g7", 0, 0, 0)]
    assert ref(lines).goals(SITE, "2026-11-10", "2026-11-10", GOALS[::-1]) == out
    empty = ref(lines).goals(SITE, "2026-11-01", "2026-11-01", GOALS[:1])
    assert (empty[0]["visitors"], empty[0]["conversions"], empty[0]["conversion_rate"]) == (0, 0, 0)
    # Retroactive and by local days: in Stockholm 23:59:59.999Z on the 9th is 00:59 on the 10th.
    stockholm = ref(lines, "Europe/Stockholm").goals(SITE, "2026-11-10", "2026-11-10", GOALS[2:3])
    assert (stockholm[0]["visitors"], stockholm[0]["conversions"]) == (2, 3)


# -- funnels -------------------------------------------------------------------------------------

FUNNEL = {"id": "f1", "name": "Checkout-flöde", "steps": [
    {"name": "Startsida", "type": "pageview", "match_value": "/"},
    {"name": "Produktsida", "type": "pageview", "match_value": "/produkt", "match_type": "startswith"},
    {"name": "Checkout", "type": "pageview", "match_value": "/checkout"},
    {"name": "Köp", "type": "event", "match_value": "purchase"},
]}


def test_funnel_result_matches_the_reference_example():
    out = R.funnel_result(FUNNEL, [1000, 600, 200, 50])
    assert out == {"funnel": {"id": "f1", "name": "Checkout-flöde"}, "steps": [
        {"name": "Startsida", "sessions": 1000, "dropoff_rate": 0, "conversion_from_start": 100},
        {"name": "Produktsida", "sessions": 600, "dropoff_rate": 40, "conversion_from_start": 60},
        {"name": "Checkout", "sessions": 200, "dropoff_rate": 67, "conversion_from_start": 20},
        {"name": "Köp", "sessions": 50, "dropoff_rate": 75, "conversion_from_start": 5}], "overall_conversion": 5}


@pytest.mark.parametrize(("counts", "dropoff", "conversion", "overall"), [
    ([0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], 0),  # nobody at the first step
    ([5, 0, 0, 0], [0, 100, 0, 0], [100, 0, 0, 0], 0),  # a previous step with 0 sessions: dropoff 0
    ([8, 8, 7, 1], [0, 0, 13, 86], [100, 100, 88, 13], 13),  # 12.5 → 13, 85.71 → 86, 87.5 → 88
    ([3, 2, 1, 1], [0, 33, 50, 0], [100, 67, 33, 33], 33),
])
def test_funnel_result_rates(counts, dropoff, conversion, overall):
    out = R.funnel_result(FUNNEL, counts)
    assert [s["sessions"] for s in out["steps"]] == counts
    assert [s["dropoff_rate"] for s in out["steps"]] == dropoff
    assert [s["conversion_from_start"] for s in out["steps"]] == conversion
    assert out["overall_conversion"] == overall


def _session(ip: str, start: str, *steps: str, gap_s: int = 60) -> list[dict]:
    """One person's events from `start`, `gap_s` apart: "/path" is a pageview, "=name" an event,
    "!path" a click on that path."""
    t0 = R.to_ms(start)
    lines = []
    for k, step in enumerate(steps):
        ts = R.iso_ms(t0 + k * gap_s * R.SECOND)
        if step.startswith("="):
            lines.append(ev(ts, step[1:], ip=ip))
        elif step.startswith("!"):
            lines.append(ev(ts, "click", path=step[1:], ip=ip))
        else:
            lines.append(ev(ts, path=step, ip=ip))
    return lines


def test_funnel_steps_order_repeats_and_matching():
    day = "2026-11-10T10:00:00.000Z"
    sessions = {
        "81.227.7.1": (4, ["/", "/produkt/a", "/checkout", "=purchase"]),
        "81.227.7.2": (2, ["/checkout", "/", "/produkt/a", "=purchase"]),  # checkout before the product page
        "81.227.7.3": (2, ["/", "/checkout", "/produkt/a", "=purchase"]),
        "81.227.7.4": (4, ["/", "/", "/produkt/a", "/produkt/b", "/", "/checkout", "/checkout", "=purchase", "=purchase"]),
        "81.227.7.5": (1, ["/produkt/a", "/", "/checkout"]),  # the product page came first
        "81.227.7.6": (3, ["/", "=purchase", "/produkt/a", "/checkout"]),  # purchase before checkout
        "81.227.7.7": (3, ["/?utm_source=x", "/produkter", "/checkout?steg=2"]),  # paths without query; startswith
        "81.227.7.8": (1, ["/", "!/produkt/a", "!/checkout", "=signup"]),  # clicks are not pageviews
        "81.227.7.9": (0, ["=purchase"]),
        "81.227.7.10": (0, ["/checkout/", "/Produkt/a"]),
    }
    lines = [line for ip, (_, steps) in sessions.items() for line in _session(ip, day, *steps)]
    # A 30-minute gap splits a journey: two steps, then a session that never saw /.
    lines += _session("81.227.7.11", day, "/", "/produkt/a") + _session("81.227.7.11", "2026-11-10T10:31:00.000Z",
                                                                        "/checkout", "=purchase")
    r = ref(lines)
    reached = {s.visitor[1]: [] for s in r.sessions(SITE)}
    for s in r.sessions(SITE):
        reached[s.visitor[1]].append(R.steps_reached(s.events, FUNNEL["steps"]))
    assert reached == {**{ip: [n] for ip, (n, _) in sessions.items()}, "81.227.7.11": [2, 0]}
    out = r.funnel_stats(SITE, "2026-11-10", "2026-11-10", FUNNEL)
    # Reaching: / 9, /produkt… 7, /checkout 4, purchase 2.
    assert out == {"funnel": {"id": "f1", "name": "Checkout-flöde"}, "steps": [
        {"name": "Startsida", "sessions": 9, "dropoff_rate": 0, "conversion_from_start": 100},
        {"name": "Produktsida", "sessions": 7, "dropoff_rate": 22, "conversion_from_start": 78},
        {"name": "Checkout", "sessions": 4, "dropoff_rate": 43, "conversion_from_start": 44},
        {"name": "Köp", "sessions": 2, "dropoff_rate": 50, "conversion_from_start": 22}], "overall_conversion": 22}


def test_funnel_match_types():
    def steps(*specs):
        return [dict(zip(("type", "match_value", "match_type"), spec), name=str(k)) for k, spec in enumerate(specs)]

    r = ref(_session(SE_IP, "2026-11-10T10:00:00.000Z", "/produkt/a", "=signup_pro", "/tack"))
    events = r.sessions(SITE)[0].events
    assert R.steps_reached(events, steps(("pageview", "/produkt"))) == 0  # exact is the default
    assert R.steps_reached(events, steps(("pageview", "/produkt", "exact"))) == 0
    assert R.steps_reached(events, steps(("pageview", "/produkt", "startswith"))) == 1
    assert R.steps_reached(events, steps(("pageview", "/produkt/a"), ("event", "signup"))) == 1
    assert R.steps_reached(events, steps(("pageview", "/produkt/a"), ("event", "signup", "startswith"),
                                         ("pageview", "/t", "startswith"))) == 3
    assert R.steps_reached(events, steps(("event", "signup_pro"), ("pageview", "/produkt/a"))) == 1  # order
    # An event step matches names literally: "pageview" is a name too.
    assert R.steps_reached(events, steps(("event", "pageview"), ("event", "pageview"))) == 2
    # One event advances one step: the same page twice needs two pageviews.
    assert R.steps_reached(events, steps(("pageview", "/produkt/a"), ("pageview", "/produkt/a"))) == 1


def test_funnel_ties_are_broken_by_line_index():
    same = "2026-11-10T10:00:00.000Z"
    home_first = ref([ev(same, path="/"), ev(same, path="/produkt/a")])
    product_first = ref([ev(same, path="/produkt/a"), ev(same, path="/")])
    two = FUNNEL["steps"][:2]
    assert R.steps_reached(home_first.sessions(SITE)[0].events, two) == 2
    assert R.steps_reached(product_first.sessions(SITE)[0].events, two) == 1


def test_funnel_sessions_by_start_with_all_their_events():
    lines = (_session("81.227.8.1", "2026-11-10T23:57:00.000Z", "/", "/produkt/a", "/checkout", "=purchase",
                      gap_s=120)  # started on the 10th, finished on the 11th
             + _session("81.227.8.2", "2026-11-09T23:58:00.000Z", "/", "/produkt/a", "/checkout", "=purchase",
                        gap_s=120))  # started on the 9th
    r = ref(lines)
    assert [s["sessions"] for s in r.funnel_stats(SITE, "2026-11-10", "2026-11-10", FUNNEL)["steps"]] == [1, 1, 1, 1]
    assert [s["sessions"] for s in r.funnel_stats(SITE, "2026-11-11", "2026-11-11", FUNNEL)["steps"]] == [0, 0, 0, 0]
    assert [s["sessions"] for s in r.funnel_stats(SITE, "2026-11-09", "2026-11-11", FUNNEL)["steps"]] == [2, 2, 2, 2]
    # Local days: in Kolkata (+5:30) the first started on the 11th (05:27), the second on the 10th.
    kolkata = ref(lines, "Asia/Kolkata")
    assert [s["sessions"] for s in kolkata.funnel_stats(SITE, "2026-11-10", "2026-11-10", FUNNEL)["steps"]] == [1, 1, 1, 1]
    assert [s["sessions"] for s in kolkata.funnel_stats(SITE, "2026-11-11", "2026-11-11", FUNNEL)["steps"]] == [1, 1, 1, 1]
    assert [s["sessions"] for s in kolkata.funnel_stats(SITE, "2026-11-09", "2026-11-09", FUNNEL)["steps"]] == [0, 0, 0, 0]
    zero = r.funnel_stats(SITE, "2026-11-10", "2026-11-10", {"id": "f2", "name": "Tom", "steps": [
        {"name": "Ingenstans", "type": "pageview", "match_value": "/ingenstans"}, *FUNNEL["steps"][1:]]})
    assert zero == {"funnel": {"id": "f2", "name": "Tom"}, "steps": [
        {"name": s["name"], "sessions": 0, "dropoff_rate": 0, "conversion_from_start": 0}
        for s in [{"name": "Ingenstans"}, *FUNNEL["steps"][1:]]], "overall_conversion": 0}


# -- affiliate: popular --------------------------------------------------------------------------

def click(ts: str | int, pid: str, slug: str | None = None, category: str | None = None, brand: str | None = None,
          partner: str | None = None, ip: str = SE_IP) -> dict:
    """A click; a dimension given as None is left out of the product object."""
    line = ev(ts if isinstance(ts, str) else R.iso_ms(ts), path=f"/produkt/{slug or pid}", ip=ip)
    line["name"] = "click"
    line["product"] = {k: v for k, v in (("id", pid), ("slug", slug), ("category_slug", category),
                                        ("brand_slug", brand), ("partner_slug", partner)) if v is not None}
    return line


def clicks(n: int, start: str | int, pid: str, step: int = R.MINUTE, **product) -> list[dict]:
    """n clicks `step` ms apart from `start`, each by a person of its own."""
    t0 = start if isinstance(start, int) else R.to_ms(start)
    tag = sum(map(ord, pid)) % 200
    return [click(t0 + k * step, pid, ip=f"90.224.{tag}.{k % 250 + 1}" if k < 250 else f"83.248.{tag}.{k % 250 + 1}",
                  **product) for k in range(n)]


POP_NOW = datetime(2026, 11, 29, 15, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def popular_ref():
    lines = [
        *clicks(1, "2026-11-23T00:00:00.000Z", "p1", category="mobilskal", brand="apple", partner="teknikdelar"),
        *clicks(1, "2026-11-25T10:00:00.000Z", "p1", slug="", category="mobilskal", brand="apple", partner="teknikdelar"),
        *clicks(1, "2026-11-29T23:59:59.999Z", "p1", category="mobilskal", brand="apple", partner="teknikdelar"),
        *clicks(1, "2026-11-22T23:59:59.999Z", "p1", category="mobilskal", brand="apple", partner="teknikdelar"),  # before
        *clicks(1, "2026-11-30T00:00:00.000Z", "p1", category="mobilskal", brand="apple", partner="teknikdelar"),  # after
        *clicks(3, "2026-11-24T10:00:00.000Z", "sku-2", slug="skal-2", category="mobilskal", brand="samsung", partner="kjell"),
        *clicks(2, "2026-11-26T10:00:00.000Z", "z-id", slug="b-slug", category="skarmskydd", brand="apple", partner="teknikdelar"),
        *clicks(2, "2026-11-27T10:00:00.000Z", "a-id", slug="c-slug", category="skarmskydd", brand="samsung", partner=""),
        *clicks(1, "2026-11-28T10:00:00.000Z", "id-2", slug="same", category="horlurar", brand="sony", partner="webhallen"),
        *clicks(1, "2026-11-28T11:00:00.000Z", "id-1", slug="same", partner="teknikdelar"),
        *clicks(1, "2026-11-29T01:00:00.000Z", "nocat", category="", brand="", partner=""),
        # Not clicks: a pageview that carries a product, a custom event.
        {**ev("2026-11-28T12:00:00.000Z", path="/produkt/p1"), "product": {"id": "p1"}},
        ev("2026-11-28T12:01:00.000Z", "click_out", path="/produkt/p1"),
    ]
    return Reference(lines, [SiteSpec(SITE, DOMAIN, "Pacific/Kiritimati")], POP_NOW)  # site timezone plays no part


def test_popular_products(popular_ref):
    out = popular_ref.popular_products(SITE, 7, POP_NOW)
    assert out == {"data": [
        {"product_id": "p1", "product_slug": "p1", "clicks": 3},  # the slug defaults to the id
        {"product_id": "sku-2", "product_slug": "skal-2", "clicks": 3},
        {"product_id": "z-id", "product_slug": "b-slug", "clicks": 2},  # ties by slug, then id
        {"product_id": "a-id", "product_slug": "c-slug", "clicks": 2},
        {"product_id": "nocat", "product_slug": "nocat", "clicks": 1},
        {"product_id": "id-1", "product_slug": "same", "clicks": 1},
        {"product_id": "id-2", "product_slug": "same", "clicks": 1}],
        "meta": {"period": {"from": "2026-11-23T00:00:00Z", "to": "2026-11-29T23:59:59Z"}, "total_clicks": 13,
                 "confidence": "medium"}}
    assert popular_ref.popular_products(SITE, 7, POP_NOW, limit=2) == {"data": out["data"][:2], "meta": out["meta"]}
    assert popular_ref.popular_products(SITE, 7, POP_NOW, min_clicks=2) == {"data": out["data"][:4], "meta": out["meta"]}
    assert popular_ref.popular_products(SITE, 7, POP_NOW, min_clicks=4)["data"] == []
    by_category = popular_ref.popular_products(SITE, 7, POP_NOW, category_slug="mobilskal")
    assert [(r["product_id"], r["clicks"]) for r in by_category["data"]] == [("p1", 3), ("sku-2", 3)]
    assert (by_category["meta"]["total_clicks"], by_category["meta"]["confidence"]) == (6, "low")
    by_brand = popular_ref.popular_products(SITE, 7, POP_NOW, brand_slug="apple", min_clicks=3, limit=1)
    assert [r["product_id"] for r in by_brand["data"]] == ["p1"] and by_brand["meta"]["total_clicks"] == 5
    both = popular_ref.popular_products(SITE, 7, POP_NOW, category_slug="skarmskydd", brand_slug="samsung")
    assert [r["product_id"] for r in both["data"]] == ["a-id"] and both["meta"]["total_clicks"] == 2
    today = popular_ref.popular_products(SITE, 1, POP_NOW)
    assert today["meta"]["period"] == {"from": "2026-11-29T00:00:00Z", "to": "2026-11-29T23:59:59Z"}
    assert [(r["product_id"], r["clicks"]) for r in today["data"]] == [("nocat", 1), ("p1", 1)]
    # The reference's `now` is the default clock.
    assert popular_ref.popular_products(SITE, 7) == out


def test_popular_categories_and_partners(popular_ref):
    meta = {"period": {"from": "2026-11-23T00:00:00Z", "to": "2026-11-29T23:59:59Z"}, "total_clicks": 13,
            "confidence": "medium"}
    assert popular_ref.popular_categories(SITE, 7, POP_NOW) == {"data": [
        {"category_slug": "mobilskal", "clicks": 6}, {"category_slug": "skarmskydd", "clicks": 4},
        {"category_slug": "horlurar", "clicks": 1}], "meta": meta}  # 2 clicks without a category: counted only
    assert popular_ref.popular_categories(SITE, 7, POP_NOW, limit=1)["data"] == [{"category_slug": "mobilskal", "clicks": 6}]
    assert popular_ref.popular_partners(SITE, 7, POP_NOW) == {"data": [
        {"partner_slug": "teknikdelar", "clicks": 6, "share": 0.46}, {"partner_slug": "kjell", "clicks": 3, "share": 0.23},
        {"partner_slug": "webhallen", "clicks": 1, "share": 0.08}], "meta": meta}


def test_partner_share_rounds_half_away_from_zero():
    lines = (clicks(5, "2026-11-29T01:00:00.000Z", "a", partner="x") + clicks(3, "2026-11-29T02:00:00.000Z", "b", partner="y"))
    r = Reference(lines, [SiteSpec(SITE, DOMAIN, "UTC")], POP_NOW)
    data = r.popular_partners(SITE, 1, POP_NOW)["data"]
    assert data == [{"partner_slug": "x", "clicks": 5, "share": 0.63}, {"partner_slug": "y", "clicks": 3, "share": 0.38}]
    assert round(0.625, 2) == 0.62  # why the reference does not use round()
    assert [R.round_places(R.Fraction(n, d), 2) for n, d in ((1, 8), (1, 40), (1, 3), (2, 3), (1, 1), (0, 5))] == [
        0.13, 0.03, 0.33, 0.67, 1.0, 0.0]
    assert R.round_places(R.Fraction(1, 4), 1) == 0.3 and R.round_places(R.Fraction(22, 7), 1) == 3.1


def test_confidence_thresholds():
    assert [R.confidence(n) for n in (0, 9, 10, 49, 50, 523)] == ["low", "low", "medium", "medium", "high", "high"]


def test_utc_days_window():
    lo, hi = R.utc_days_window(30, datetime(2026, 11, 29, 23, 59, 59, tzinfo=timezone.utc))
    assert (R.iso_z(lo), R.iso_z(hi - R.SECOND)) == ("2026-10-31T00:00:00Z", "2026-11-29T23:59:59Z")
    lo, hi = R.utc_days_window(7, datetime(2026, 11, 30, 0, 30, tzinfo=ZoneInfo("Europe/Stockholm")))  # 23:30Z on the 29th
    assert (R.iso_z(lo), R.iso_z(hi)) == ("2026-11-23T00:00:00Z", "2026-11-30T00:00:00Z")
    with pytest.raises(ValueError):
        R.utc_days_window(0, POP_NOW)


# -- affiliate: trending -------------------------------------------------------------------------

def test_trending_windows_count_back_from_now_to_the_second():
    def windows(now: str, hours: int = 24, days: int = 7) -> list[str]:
        return [R.iso_z(ms) for ms in R.trending_windows(datetime.fromisoformat(now), hours, days)]

    assert windows("2026-11-29T10:07:30.500+00:00") == ["2026-11-21T10:07:31Z", "2026-11-28T10:07:31Z", "2026-11-29T10:07:31Z"]
    assert windows("2026-11-29T10:00:00+00:00") == ["2026-11-21T10:00:01Z", "2026-11-28T10:00:01Z", "2026-11-29T10:00:01Z"]
    assert windows("2026-11-29T10:14:59.999+00:00")[2] == "2026-11-29T10:15:00Z"
    assert windows("2026-11-29T10:07:00+00:00", 6, 1) == ["2026-11-28T04:07:01Z", "2026-11-29T04:07:01Z", "2026-11-29T10:07:01Z"]
    assert windows("2026-11-29T15:40:00+05:30")[2] == "2026-11-29T10:10:01Z"


TREND_NOW = datetime(2026, 11, 29, 10, 7, 30, tzinfo=timezone.utc)
B0, R0, E0 = R.trending_windows(TREND_NOW)  # 21 Nov 10:07:31, 28 Nov 10:07:31, 29 Nov 10:07:31
DIM = {"category": "horlurar", "brand": "apple", "partner": "kjell"}


@pytest.fixture(scope="module")
def trending_ref():
    def baseline(n, pid, **kw):
        return clicks(n, B0 + R.HOUR, pid, step=R.MINUTE, **kw)

    def recent(n, pid, **kw):
        return clicks(n, R0 + R.HOUR, pid, step=R.MINUTE, **kw)

    lines = [
        *recent(5, "new-a", **DIM), *recent(5, "new-b", slug="a-new", **DIM),  # no baseline; ties by slug
        *recent(2, "new-c", **DIM),  # below min_recent_clicks, in total_clicks
        *baseline(14, "edge", **DIM), *recent(4, "edge", **DIM),  # avg 2.0, growth exactly 100
        *baseline(200, "almost", **DIM), *recent(57, "almost", **DIM),  # avg 28.57…, growth 99.5: 100 shown
        *baseline(7, "big", **DIM), *recent(10, "big", **DIM),  # 900
        *baseline(14, "big2", **DIM), *recent(20, "big2", **DIM),  # 900 too, more recent clicks
        *baseline(7, "dropped", **DIM),  # no recent clicks
        *clicks(9, B0 - 20 * R.DAY, "old", **DIM),  # only before the baseline: a new product now
        *recent(3, "old", **DIM),
        # At the windows' edges: B0 − 1 ms out, B0 and R0 − 1 ms baseline, R0 and E0 − 1 ms recent, E0 out.
        *(click(ms, "boundary", ip=f"81.227.9.{k}", **DIM) for k, ms in enumerate(
            (B0 - 1, B0, R0 - 1, R0, R0 + R.HOUR, E0 - 1, E0), start=1)),  # baseline 2 (avg 0.29), recent 3: 950
        # Filters: another category / brand.
        *baseline(7, "laddare-x", category="laddare", brand="anker"), *recent(30, "laddare-x", category="laddare", brand="anker"),
        *recent(4, "apple-laddare", category="laddare", brand="apple"),
    ]
    return Reference(lines, [SiteSpec(SITE, DOMAIN, "Asia/Kolkata")], TREND_NOW)


def _rows(out: dict) -> list[tuple]:
    return [(r["product_id"], r["product_slug"], r["clicks_recent"], r["clicks_baseline_avg"], r["growth_percent"])
            for r in out["data"]]


TRENDING_ROWS = [
    # By recent clicks (SPEC §7.1: the first metric), whatever the growth; ties by slug, then id.
    ("laddare-x", "laddare-x", 30, 1.0, 2900), ("big2", "big2", 20, 2.0, 900), ("big", "big", 10, 1.0, 900),
    ("new-b", "a-new", 5, 0.0, None), ("new-a", "new-a", 5, 0.0, None),  # no baseline; "a-new" < "new-a"
    ("apple-laddare", "apple-laddare", 4, 0.0, None),
    ("edge", "edge", 4, 2.0, 100),  # growth == min_growth trends
    ("boundary", "boundary", 3, 0.3, 950),
    ("old", "old", 3, 0.0, None),  # clicks before the baseline period do not count
]


def test_trending(trending_ref):
    out = trending_ref.trending(SITE, TREND_NOW)
    assert out["meta"] == {
        "recent_period": {"hours": 24, "from": "2026-11-28T10:07:31Z", "to": "2026-11-29T10:07:31Z"},
        "baseline_period": {"days": 7, "from": "2026-11-21T10:07:31Z", "to": "2026-11-28T10:07:31Z"},
        "total_trending": 9, "total_clicks": 143, "confidence": "high"}  # new-c and almost count in total_clicks
    assert _rows(out) == TRENDING_ROWS
    assert list(out["data"][0]) == ["product_id", "product_slug", "clicks_recent", "clicks_baseline_avg", "growth_percent"]
    assert all(isinstance(r["clicks_baseline_avg"], float) for r in out["data"])
    assert trending_ref.trending(SITE) == out  # the reference's own `now` by default
    # A query later in the same second has the same windows. A second later, B0 has left the
    # baseline, R0 moved into it and E0 joined the recent window: still 2 and 3.
    assert trending_ref.trending(SITE, datetime(2026, 11, 29, 10, 7, 30, 999000, tzinfo=timezone.utc)) == out
    later = trending_ref.trending(SITE, TREND_NOW + timedelta(seconds=1))
    assert later["meta"]["recent_period"]["to"] == "2026-11-29T10:07:32Z" and _rows(later) == TRENDING_ROWS
    limited = trending_ref.trending(SITE, TREND_NOW, limit=2)
    assert _rows(limited) == TRENDING_ROWS[:2] and limited["meta"] == out["meta"]


def test_trending_min_growth_is_compared_unrounded(trending_ref):
    # "almost": 57 recent against 200/7 per day is +99.5 %: shown as 100, but below min_growth=100.
    almost = ("almost", "almost", 57, 28.6, 100)
    assert _rows(trending_ref.trending(SITE, TREND_NOW, min_growth=99.5, limit=20)) == [almost] + TRENDING_ROWS
    assert _rows(trending_ref.trending(SITE, TREND_NOW, min_growth=99.6, limit=20)) == TRENDING_ROWS
    assert _rows(trending_ref.trending(SITE, TREND_NOW, min_growth=R.Fraction(199, 2), limit=20))[0] == almost
    high = trending_ref.trending(SITE, TREND_NOW, min_growth=950)
    assert _rows(high) == [r for r in TRENDING_ROWS if r[4] is None or r[4] >= 950]
    assert [r[0] for r in _rows(high)] == ["laddare-x", "new-b", "new-a", "apple-laddare", "boundary", "old"]
    assert high["meta"]["total_trending"] == 6
    # Negative growth thresholds still need recent clicks ("dropped" has none).
    assert "dropped" not in {r[0] for r in _rows(trending_ref.trending(SITE, TREND_NOW, min_growth=-100, limit=50))}


def test_trending_min_recent_clicks(trending_ref):
    two = _rows(trending_ref.trending(SITE, TREND_NOW, min_recent_clicks=2, limit=20))
    assert two == TRENDING_ROWS + [("new-c", "new-c", 2, 0.0, None)]
    zero = _rows(trending_ref.trending(SITE, TREND_NOW, min_recent_clicks=0, limit=20))
    assert zero == two  # recent clicks > 0 is required whatever the minimum
    assert _rows(trending_ref.trending(SITE, TREND_NOW, min_recent_clicks=21, limit=20)) == [TRENDING_ROWS[0]]


def test_trending_filters(trending_ref):
    laddare = trending_ref.trending(SITE, TREND_NOW, category_slug="laddare")
    assert [r[0] for r in _rows(laddare)] == ["laddare-x", "apple-laddare"]
    assert (laddare["meta"]["total_trending"], laddare["meta"]["total_clicks"], laddare["meta"]["confidence"]) == (
        2, 34, "medium")
    apple = trending_ref.trending(SITE, TREND_NOW, brand_slug="apple")
    assert [r[0] for r in _rows(apple)] == [r[0] for r in TRENDING_ROWS if r[0] != "laddare-x"]
    assert apple["meta"]["total_clicks"] == 143 - 30
    both = trending_ref.trending(SITE, TREND_NOW, category_slug="laddare", brand_slug="apple")
    assert _rows(both) == [("apple-laddare", "apple-laddare", 4, 0.0, None)]
    assert (both["meta"]["total_clicks"], both["meta"]["confidence"]) == (4, "low")
    assert trending_ref.trending(SITE, TREND_NOW, category_slug="saknas")["meta"]["total_clicks"] == 0


def test_trending_rounding_with_short_windows():
    base, recent_start, end = R.trending_windows(TREND_NOW, 6, 7)  # 28 six-hour windows in the baseline
    lines = [*clicks(7, base + R.HOUR, "q"), *clicks(3, recent_start + R.HOUR, "q"),  # avg 0.25 → 0.3, +1100 %
             *clicks(224, base + R.HOUR, "h"), *clicks(9, recent_start + R.HOUR, "h")]  # avg 8, +12.5 % → 13
    r = Reference(lines, [SiteSpec(SITE, DOMAIN, "UTC")], TREND_NOW)
    out = r.trending(SITE, TREND_NOW, recent_hours=6, min_growth=12.5)
    assert _rows(out) == [("h", "h", 9, 8.0, 13), ("q", "q", 3, 0.3, 1100)]
    assert out["meta"]["recent_period"] == {"hours": 6, "from": "2026-11-29T04:07:31Z", "to": "2026-11-29T10:07:31Z"}
    assert out["meta"]["baseline_period"] == {"days": 7, "from": "2026-11-22T04:07:31Z", "to": "2026-11-29T04:07:31Z"}
    assert _rows(r.trending(SITE, TREND_NOW, recent_hours=6, min_growth=12.6)) == [("q", "q", 3, 0.3, 1100)]
    # Another window length: 1 day of baseline is one 24-hour window.
    one_day = r.trending(SITE, TREND_NOW, recent_hours=24, baseline_days=1, min_growth=-100)
    assert one_day["meta"]["baseline_period"]["from"] == "2026-11-27T10:07:31Z"


# -- generator: clicks and journeys ---------------------------------------------------------------

# sha256 of to_ndjson(generate(7, default_sites(), NOW, days=90, target_events=6000)) before the
# clicks flag existed: the default output must not change.
DEFAULT_SAMPLE_SHA256 = "2a5df8f0b6ae570ac30ade2925fcd7957168e3bff3511ad2cd5c48bf6f1c3057"


def test_generator_default_output_is_unchanged(sample):
    import hashlib

    sites, lines, _ = sample
    assert hashlib.sha256(R.to_ndjson(lines)).hexdigest() == DEFAULT_SAMPLE_SHA256
    assert R.generate(7, sites, NOW, days=90, target_events=6000, clicks=False) == lines


@pytest.fixture(scope="module")
def click_sample(sample):
    sites, base, _ = sample
    lines = R.generate(7, sites, NOW, days=90, target_events=6000, clicks=True)
    return sites, base, lines, Reference(lines, sites, NOW)


def test_click_traffic_only_adds_lines(click_sample):
    sites, base, lines, _ = click_sample
    assert R.generate(7, sites, NOW, days=90, target_events=6000, clicks=True) == lines
    added, b = [], 0
    for line in lines:  # the default lines are a subsequence, in their order
        if b < len(base) and line == base[b]:
            b += 1
        else:
            added.append(line)
    assert b == len(base) and len(added) == len(lines) - len(base) > 1000
    assert {line["name"] for line in added} == {"pageview", "click", "purchase", "signup"}
    times = [R.to_ms(line["timestamp"]) for line in lines]
    assert times == sorted(times) and R.to_ms(NOW) - 90 * DAY <= times[0] and times[-1] < R.to_ms(NOW)
    assert len({(l["site_id"], l["ip"], l["user_agent"], l["timestamp"]) for l in lines}) == len(lines)
    for line in added:
        assert set(line) <= {"site_id", "name", "url", "referrer", "props", "product", "timestamp", "ip", "user_agent"}
        assert ("product" in line) == (line["name"] == "click")
        if "product" in line:
            assert set(line["product"]) <= {"id", "slug", "category_slug", "brand_slug", "partner_slug"}
            assert all(isinstance(v, str) for v in line["product"].values())


def test_click_traffic_catalogue_and_sessions(click_sample):
    sites, _, lines, r = click_sample
    products = [l["product"] for l in lines if l["name"] == "click"]
    assert any("slug" not in p for p in products) and any(p.get("slug", p["id"]) != p["id"] for p in products)
    assert any(p.get("category_slug") == "" for p in products) and any("category_slug" not in p for p in products)
    assert any(not p.get("partner_slug") for p in products)
    for site in sites:
        clicked = {(c.product.id, c.product.slug) for c in r.clicks(site.site_id)}
        assert len(clicked) == len(R.CLICK_PRODUCTS) == 30
        assert len({c.product.category_slug for c in r.clicks(site.site_id)} - {""}) == 6
        assert len({c.product.brand_slug for c in r.clicks(site.site_id)} - {""}) == 5
        assert len(r.popular_partners(site.site_id, 90, NOW)["data"]) == 4
        cats = r.popular_categories(site.site_id, 90, NOW)
        assert sum(c["clicks"] for c in cats["data"]) < cats["meta"]["total_clicks"]  # some without a category
        sessions = r.sessions(site.site_id)
        assert any(len(s.events) == 1 and s.events[0].is_click for s in sessions)  # a click alone
        assert any(len(s.events) > 1 and s.events[-1].is_click and s.events[-2].is_pageview
                   and s.events[-2].path == f"/produkt/{s.events[-1].product.slug}" for s in sessions)


def test_click_traffic_trends(click_sample):
    sites, _, lines, r = click_sample
    for site in sites:
        for later in (0, 20):  # a query up to an hour after `now` sees the same shape
            now = NOW + timedelta(minutes=later)
            out = r.trending(site.site_id, now, limit=100)
            fresh = [row for row in out["data"] if row["growth_percent"] is None]
            grown = [row for row in out["data"] if row["growth_percent"] is not None]
            assert len(fresh) >= 3 and len(grown) >= 3, (site.site_id, out)
            assert all(row["growth_percent"] >= 100 for row in grown)
            base, recent_start, end = R.trending_windows(now)
            recent = {c.product.id for c in r.clicks(site.site_id) if recent_start <= c.ts < end}
            assert recent - {row["product_id"] for row in out["data"]}  # some recent clicks do not trend
        # Products that were clicked only long ago (dormant), and products new within the last day.
        first_click = {}
        for c in r.clicks(site.site_id):
            first_click.setdefault(c.product.id, c.ts)
        last_click = {c.product.id: c.ts for c in r.clicks(site.site_id)}
        assert any(t < R.to_ms(NOW) - 10 * DAY for t in last_click.values())
        assert sum(t >= R.to_ms(NOW) - 23 * R.HOUR for t in first_click.values()) == 5
        assert r.popular_products(site.site_id, 7, NOW)["meta"]["confidence"] == "high"
        assert r.popular_products(site.site_id, 1, NOW)["meta"]["confidence"] != "low"


def test_journeys_for_goals_and_funnels(click_sample):
    sites, _, lines, r = click_sample
    goals = [{"id": "g1", "name": "Tack", "event_type": "pageview", "match_path": "/tack"},
             {"id": "g2", "name": "Produkt", "event_type": "pageview", "match_path": "/produkt/*"},
             {"id": "g3", "name": "Köp", "event_type": "event", "match_event": "purchase"},
             {"id": "g4", "name": "Signup", "event_type": "event", "match_event": "signup"}]
    steps = FUNNEL["steps"]
    for site in sites:
        sid = site.site_id
        assert all(g["conversions"] > 0 for g in r.goals(sid, *r.period(sid, "90d"), goals))
        counts = [s["sessions"] for s in r.funnel_stats(sid, *r.period(sid, "90d"), FUNNEL)["steps"]]
        assert counts[0] > counts[1] > counts[2] > counts[3] > 0
        reached = {n: 0 for n in range(5)}
        out_of_order = repeated = 0
        zone = ZoneInfo(site.timezone)
        across_midnight = 0
        for s in r.sessions(sid):
            n = R.steps_reached(s.events, steps)
            reached[n] += 1
            has_all = all(any(R.step_matches(step, e) for e in s.events) for step in steps)
            out_of_order += has_all and n < 4
            repeated += n == 4 and sum(e.is_pageview and e.path == "/checkout" for e in s.events) > 1
            across_midnight += n == 4 and (datetime.fromtimestamp(s.events[0].ts / 1000, zone).date()
                                           != datetime.fromtimestamp(s.events[-1].ts / 1000, zone).date())
        assert all(reached[n] > 0 for n in range(5)), reached
        assert out_of_order > 0 and repeated > 0 and across_midnight > 0
