"""Enrichment (SPEC §5.2): referrer classification, client IP and country, user agents, and
salted daily visitor ids — including the midnight hand-over of an open session."""

from __future__ import annotations

import ipaddress
import uuid
from datetime import datetime, timedelta, timezone
from functools import partial

import pytest

from ingest import clients, referrers, useragents
from ingest.event import Event
from ingest.salts import Salts
from ingest.visitors import Visitors, hash_visitor
from streams.core import StreamCore
from streams.sessions import has_open_session
from tests.conftest import BROWSER

IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
TIMEOUT = 1800

LOCAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
PROXIES = (*LOCAL, ipaddress.ip_network("10.0.0.0/8"))


# -- referrers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("referrer, source, channel", [
    ("https://www.google.com/", "Google", "search"),
    ("https://www.google.se/search?q=skal", "Google", "search"),
    ("https://www.bing.com/search?q=x", "Bing", "search"),
    ("https://duckduckgo.com/", "DuckDuckGo", "search"),
    ("https://l.facebook.com/l.php?u=x", "Facebook", "social"),
    ("https://www.instagram.com/", "Instagram", "social"),
    ("https://www.reddit.com/r/sweden", "Reddit", "social"),
    ("https://t.co/abc", "X/Twitter", "social"),
    ("https://www.youtube.com/watch?v=1", "YouTube", "social"),
    ("https://mail.google.com/mail/u/0/", "Gmail", "email"),
    ("https://blog.example.org/post/1", "blog.example.org", "referral"),
    ("https://www.someblog.se/", "someblog.se", "referral"),
    ("", "", "direct"),
    (None, "", "direct"),
])
def test_referrer_host_maps_to_source_and_channel(referrer, source, channel):
    result = referrers.classify("https://shop.example/p/1", referrer, "shop.example")
    assert (result.source, result.channel) == (source, channel)


@pytest.mark.parametrize("referrer", ["https://shop.example/other", "https://www.shop.example/", "http://SHOP.example/x"])
def test_self_referral_is_direct(referrer):
    result = referrers.classify("https://shop.example/p/1", referrer, "shop.example")
    assert (result.source, result.channel) == ("", "direct")


def test_utm_tags_are_kept_and_medium_sets_the_channel():
    url = "https://shop.example/p?utm_source=nyhetsbrev&utm_medium=email&utm_campaign=jul-2025"
    result = referrers.classify(url, None, "shop.example")
    assert (result.utm_source, result.utm_medium, result.utm_campaign) == ("nyhetsbrev", "email", "jul-2025")
    assert result.channel == "email"
    assert result.source == "nyhetsbrev"  # no referrer: the utm_source names the source


@pytest.mark.parametrize("medium", ["cpc", "ppc", "paid"])
def test_paid_medium_is_paid_even_from_a_search_engine(medium):
    url = f"https://shop.example/?utm_source=google&utm_medium={medium}&utm_campaign=brand"
    result = referrers.classify(url, "https://www.google.com/", "shop.example")
    assert result.source == "Google"
    assert result.channel == "paid"
    assert (result.utm_source, result.utm_medium, result.utm_campaign) == ("google", medium, "brand")


def test_utm_source_of_a_known_network_names_it_without_referrer():
    result = referrers.classify("https://shop.example/?utm_source=facebook.com", None, "shop.example")
    assert (result.source, result.channel) == ("Facebook", "social")


# -- client IP and country -----------------------------------------------------------------------

@pytest.mark.parametrize("peer, xff, trusted, expected", [
    # An untrusted peer's X-Forwarded-For is ignored: anyone can send the header.
    ("203.0.113.9", "81.227.0.1", LOCAL, "203.0.113.9"),
    # A trusted peer: the right-most entry it did not add itself.
    ("127.0.0.1", "81.227.0.1", LOCAL, "81.227.0.1"),
    ("127.0.0.1", "1.1.1.1, 81.227.0.1", LOCAL, "81.227.0.1"),
    # Hops through further trusted proxies are skipped; a spoofed left-most entry is not taken.
    ("127.0.0.1", "1.1.1.1, 81.227.0.1, 10.0.0.7, 10.1.2.3", PROXIES, "81.227.0.1"),
    ("10.0.0.5", "81.227.0.1,10.0.0.6", PROXIES, "81.227.0.1"),
    # Trusted peer without the header: the peer itself.
    ("127.0.0.1", "", LOCAL, "127.0.0.1"),
    ("::1", "2001:db8::1", LOCAL, "2001:db8::1"),
])
def test_client_ip(peer, xff, trusted, expected):
    headers = {"x-forwarded-for": xff} if xff else {}
    assert clients.client_ip(peer, headers, trusted) == expected


def test_trusted_edge_country_header_wins():
    assert clients.country("81.227.0.1", "127.0.0.1", {"cf-ipcountry": "de"}, LOCAL) == "DE"
    assert clients.country("81.227.0.1", "127.0.0.1", {"x-vercel-ip-country": "NO"}, LOCAL) == "NO"
    assert clients.country("81.227.0.1", "127.0.0.1", {"cloudfront-viewer-country": "FI"}, LOCAL) == "FI"


def test_country_from_the_offline_database_otherwise():
    assert clients.country("81.227.0.1", "127.0.0.1", {}, LOCAL) == "SE"
    # An untrusted peer's country header is not believed.
    assert clients.country("81.227.0.1", "81.227.0.1", {"cf-ipcountry": "DE"}, LOCAL) == "SE"
    # Cloudflare's "unknown" marker falls back to the database.
    assert clients.country("81.227.0.1", "127.0.0.1", {"cf-ipcountry": "XX"}, LOCAL) == "SE"
    assert clients.country("not-an-ip", "not-an-ip", {}, LOCAL) == ""


# -- user agents ---------------------------------------------------------------------------------

def test_crawlers_are_bots():
    assert useragents.parse(GOOGLEBOT).is_bot
    assert useragents.parse("").is_bot


def test_iphone_safari_is_mobile_ios():
    agent = useragents.parse(IPHONE)
    assert not agent.is_bot
    assert (agent.device, agent.os) == ("Mobile", "iOS")
    assert "Safari" in agent.browser


def test_windows_chrome_is_desktop():
    agent = useragents.parse(BROWSER)
    assert (agent.device, agent.os, agent.browser, agent.is_bot) == ("Desktop", "Windows", "Chrome", False)


# -- visitor ids ---------------------------------------------------------------------------------

def _site() -> str:
    return f"enrich-{uuid.uuid4().hex[:12]}"


class OpenSessions:
    """A stub for the open-session lookup that records what it was asked."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls: list[tuple[str, int, datetime]] = []

    def __call__(self, site_id: str, visitor_id: int, since: datetime) -> bool:
        self.calls.append((site_id, visitor_id, since))
        return self.answer


DAY = datetime(2025, 3, 10, tzinfo=timezone.utc)  # a historic UTC day: its salt is this test's own


def test_same_visitor_same_day_same_id(services):
    visitors = Visitors(Salts(services.client), OpenSessions(False), TIMEOUT)
    site = _site()
    morning = visitors.visitor_id(site, "81.227.0.1", BROWSER, DAY + timedelta(hours=8))
    evening = visitors.visitor_id(site, "81.227.0.1", BROWSER, DAY + timedelta(hours=22))
    assert morning == evening
    assert 0 <= morning < 2**64


def test_ids_differ_by_day_site_ip_and_agent(services):
    visitors = Visitors(Salts(services.client), OpenSessions(False), TIMEOUT)
    site, noon = _site(), DAY + timedelta(hours=12)
    base = visitors.visitor_id(site, "81.227.0.1", BROWSER, noon)
    others = {
        "next day": visitors.visitor_id(site, "81.227.0.1", BROWSER, noon + timedelta(days=1)),
        "other site": visitors.visitor_id(_site(), "81.227.0.1", BROWSER, noon),
        "other ip": visitors.visitor_id(site, "81.227.0.2", BROWSER, noon),
        "other agent": visitors.visitor_id(site, "81.227.0.1", IPHONE, noon),
    }
    for what, other in others.items():
        assert other != base, what


def test_salts_are_shared_through_storage(services):
    """Two ingest processes (two Salts instances) agree on a day's salt, so on visitor ids."""
    day = (DAY + timedelta(days=3)).date()
    assert Salts(services.client).for_day(day) == Salts(services.client).for_day(day)
    assert len(Salts(services.client).for_day(day)) == 16


def test_open_session_from_yesterday_keeps_yesterdays_id(services):
    salts = Salts(services.client)
    site, ip = _site(), "81.227.3.4"
    midnight = DAY + timedelta(days=1)
    yesterday_id = hash_visitor(salts.for_day(DAY.date()), site, ip, BROWSER)
    today_id = hash_visitor(salts.for_day(midnight.date()), site, ip, BROWSER)
    assert yesterday_id != today_id

    at = midnight + timedelta(minutes=10)
    open_ = OpenSessions(True)
    assert Visitors(salts, open_, TIMEOUT).visitor_id(site, ip, BROWSER, at) == yesterday_id
    # Asked about yesterday's id, for a session still active within the timeout.
    assert open_.calls == [(site, yesterday_id, at - timedelta(seconds=TIMEOUT))]

    closed = OpenSessions(False)
    assert Visitors(salts, closed, TIMEOUT).visitor_id(site, ip, BROWSER, at) == today_id
    assert len(closed.calls) == 1

    # Past the first session-timeout of the day nobody asks: yesterday's sessions are over.
    late = OpenSessions(True)
    later = midnight + timedelta(seconds=TIMEOUT)
    assert Visitors(salts, late, TIMEOUT).visitor_id(site, ip, BROWSER, later) == today_id
    assert late.calls == []


def test_real_open_session_lookup_after_the_stream_core_wrote_it(services):
    client = services.client
    visitors = Visitors(Salts(client), partial(has_open_session, client), TIMEOUT)
    site, ip, quiet_ip = _site(), "81.227.5.6", "81.227.5.7"
    midnight = DAY + timedelta(days=2)
    before = midnight - timedelta(minutes=10)

    yesterday_id = visitors.visitor_id(site, ip, BROWSER, before)
    StreamCore(client, TIMEOUT).process([Event(
        event_id=str(uuid.uuid4()), site_id=site, timestamp=before, name="pageview",
        visitor_id=yesterday_id, pathname="/a")])

    # 10 minutes after midnight the session (last event 20 minutes ago) is open: same visitor.
    assert visitors.visitor_id(site, ip, BROWSER, midnight + timedelta(minutes=10)) == yesterday_id
    # Someone without an open session gets today's id.
    quiet_yesterday = visitors.visitor_id(site, quiet_ip, BROWSER, before)
    quiet_today = visitors.visitor_id(site, quiet_ip, BROWSER, midnight + timedelta(minutes=10))
    assert quiet_today != quiet_yesterday
    # Had the visitor come back only 25 minutes after midnight, the last event would be 35 minutes
    # old: that session is over, and the visitor is today's (asked of another ingest process).
    other_process = Visitors(Salts(client), partial(has_open_session, client), TIMEOUT)
    fresh = other_process.visitor_id(site, ip, BROWSER, midnight + timedelta(minutes=25))
    assert fresh != yesterday_id
    assert fresh == other_process.visitor_id(site, ip, BROWSER, midnight + timedelta(hours=5))
