"""Self-check of tests/reference.py on small hand-computed cases (no server, no project code)."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import date, datetime, timezone
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


def test_countries_by_session_start():
    lines = [ev("2026-11-10T08:00:00.000Z"), ev("2026-11-10T12:00:00.000Z"),  # one SE visitor, two sessions
             ev("2026-11-10T08:00:00.000Z", ip=SE_IP2), ev("2026-11-10T08:00:00.000Z", ip=NO_IP),
             ev("2026-11-10T08:00:00.000Z", ip=DE_IP), ev("2026-11-10T08:00:00.000Z", ip=UNKNOWN_IP),
             ev("2026-11-09T23:55:00.000Z", ip="24.0.0.1"), ev("2026-11-10T00:05:00.000Z", ip="24.0.0.1")]
    assert R.countries(lines, SITE, "UTC", "2026-11-10", "2026-11-10") == [
        {"country": "SE", "visitors": 2}, {"country": "DE", "visitors": 1}, {"country": "NO", "visitors": 1}]
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
