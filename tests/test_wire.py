"""The /api/event wire (issue 8): what real user agents become, client event ids that make
retries safe, input that must be refused or ignored with a clear answer, and a fuzz of bodies and
headers that may never get a 5xx or lose an accepted event."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from besokskollen.app import make_handoff, server_app
from tests.conftest import BROWSER
from tests.test_ingest import pageview, post

API = "/api/v1"

# Real crawlers, monitors, link expanders and headless browsers.
BOTS = [
 "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
 "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; +http://www.google.com/bot.html) Chrome/131.0.6778.69 Safari/537.36",
 "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
 "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
 "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
 "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
 "DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
 "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
 "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
 "Mozilla/5.0 (compatible; MJ12bot/v1.4.8; http://mj12bot.com/)",
 "Mozilla/5.0 (compatible; DotBot/1.2; +https://opensiteexplorer.org/dotbot; help@moz.com)",
 "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
 "Twitterbot/1.0",
 "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
 "Mozilla/5.0 (compatible; Applebot/0.1; +http://www.apple.com/go/applebot)",
 "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
 "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; +claudebot@anthropic.com)",
 "CCBot/2.0 (https://commoncrawl.org/faq/)",
 "Mozilla/5.0 (compatible; PetalBot;+https://webmaster.petalsearch.com/site/petalbot)",
 "Mozilla/5.0 (compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
 "Pingdom.com_bot_version_1.4_(http://www.pingdom.com/)",
 "Mozilla/5.0 (compatible; StatusCake)",
 "Site24x7",
 "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.6778.33 Safari/537.36",
 "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Lighthouse",
 "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) PhantomJS/2.1.1 Safari/538.1",
 "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
 "WhatsApp/2.23.20.0",
 "TelegramBot (like TwitterBot)",
 "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
]

# Real browsers: (user agent, device, browser, OS).
BROWSERS = [
 ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", "Desktop", "Chrome", "Windows"),
 ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", "Desktop", "Edge", "Windows"),
 ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0", "Desktop", "Firefox", "Windows"),
 ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15", "Desktop", "Safari", "Mac OS X"),
 ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", "Desktop", "Chrome", "Mac OS X"),
 ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14.7; rv:133.0) Gecko/20100101 Firefox/133.0", "Desktop", "Firefox", "Mac OS X"),
 ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", "Desktop", "Chrome", "Linux"),
 ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0", "Desktop", "Firefox", "Ubuntu"),
 ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 OPR/115.0.0.0", "Desktop", "Opera", "Windows"),
 ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", "Desktop", "Chrome", "Chrome OS"),
 ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", "Mobile", "Mobile Safari", "iOS"),
 ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1", "Mobile", "Chrome Mobile iOS", "iOS"),
 ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) FxiOS/133.0 Mobile/15E148 Safari/605.1.15", "Mobile", "Firefox iOS", "iOS"),
 ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36", "Mobile", "Chrome Mobile", "Android"),
 ("Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36", "Mobile", "Samsung Internet", "Android"),
 ("Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0", "Mobile", "Firefox Mobile", "Android"),
 ("Mozilla/5.0 (Linux; Android 13; M2101K6G) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36", "Mobile", "Chrome Mobile", "Android"),
 ("Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1", "Tablet", "Mobile Safari", "iOS"),
 ("Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", "Tablet", "Chrome", "Android"),
 ("Mozilla/5.0 (Linux; Android 11; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/131.3.1 like Chrome/131.0.6778.108 Safari/537.36", "Tablet", "Amazon Silk", "Android"),
 ("Mozilla/5.0 (Linux; Android 13; Lenovo TB-X606F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", "Tablet", "Chrome", "Android"),
 ("Mozilla/5.0 (Linux; Android 14; Pixel 8 Pro) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36 EdgA/131.0.0.0", "Mobile", "Edge Mobile", "Android"),
 ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/490.0.0.0]", "Mobile", "Facebook", "iOS"),
 ("Mozilla/5.0 (Linux; Android 14; SM-A546B Build/UP1A.231005.007; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/131.0.6778.81 Mobile Safari/537.36 Instagram 357.0.0.0", "Mobile", "Instagram", "Android"),
]


@pytest.fixture
async def site(client):
    response = await client.post(f"{API}/sites", json={"domain": f"wire-{uuid.uuid4().hex[:10]}.example"})
    assert response.status_code == 201, response.text
    return response.json()["data"]["id"]


def stored(services, site: str, columns: str = "count()") -> list[tuple]:
    return services.client.query(f"SELECT {columns} FROM events FINAL WHERE site_id = {{s:String}}",
                                 parameters={"s": site}).result_rows


async def test_bots_are_dropped_with_a_reason_and_counted(client, embedded, services, site):
    before = (await client.get("/metrics")).text
    for agent in BOTS:
        response = await post(client, pageview(site), **{"user-agent": agent})
        assert response.status_code == 202, agent
        assert response.headers.get("x-dropped") == "bot", agent
    await embedded[1].runner.drain()
    assert stored(services, site) == [(0,)]
    after = (await client.get("/metrics")).text
    counted = lambda text: float(next((line.split()[-1] for line in text.splitlines()  # noqa: E731
                                       if line.startswith('bk_events_dropped_total{reason="bot"}')), 0))
    assert counted(after) - counted(before) == len(BOTS) >= 20


async def test_server_beacons_are_counted_whatever_their_http_library_says(client, embedded, services, site):
    """A server beacon sends what its HTTP library says (httpx, this test's own client, says
    `python-httpx/…` unless told otherwise), or no user agent: no bot by SPEC §5.1. Each is a
    visitor of its own (the user agent is part of the visitor id; httpx's is another version)."""
    agents = ["python-httpx/0.27.0", "curl/8.5.0", "python-requests/2.32.3", "Go-http-client/1.1", "node", ""]
    for agent in agents:
        response = await post(client, pageview(site), **{"user-agent": agent})
        assert response.status_code == 202 and "x-dropped" not in response.headers, agent
    response = await client.post("/api/event", json=pageview(site))  # httpx's own user agent
    assert response.status_code == 202 and "x-dropped" not in response.headers
    await embedded[1].runner.drain()
    assert stored(services, site, "count(), uniqExact(visitor_id)") == [(len(agents) + 1, len(agents) + 1)]


async def test_browsers_are_counted_with_device_browser_and_os(client, embedded, services, site):
    for n, (agent, *_) in enumerate(BROWSERS):
        response = await post(client, pageview(site, props={"n": str(n)}), **{"user-agent": agent})
        assert response.status_code == 202 and "x-dropped" not in response.headers, agent
    await embedded[1].runner.drain()
    rows = stored(services, site, "props['n'], device, browser, os")
    got = {int(n): (device, browser, os) for n, device, browser, os in rows}
    assert got == {n: tuple(want) for n, (_, *want) in enumerate(BROWSERS)}
    assert len(BROWSERS) >= 20 and {d for _, d, _, _ in BROWSERS} == {"Desktop", "Mobile", "Tablet"}


async def test_a_retry_from_another_address_keeps_its_first_copys_visitor_id(client, embedded, site, monkeypatch):
    """A retry from another address (a phone that changed networks) hashes to another visitor id:
    in Kafka another partition, where a second worker with both copies in flight at once stored it
    too. Ingest gives it the visitor id of the first copy it took, so it follows that copy."""
    handoff, sent = embedded[1], []
    send = handoff.send

    async def recording(event, incarnation):
        sent.append(event)
        await send(event, incarnation)

    monkeypatch.setattr(handoff, "send", recording)
    client_id = str(uuid.uuid4())
    for ip in ("81.2.69.160", "81.2.69.161"):
        assert (await post(client, pageview(site, event_id=client_id), **{"x-forwarded-for": ip})).status_code == 202
    assert (await post(client, pageview(site), **{"x-forwarded-for": "81.2.69.161"})).status_code == 202
    first, retry, other = sent
    assert retry.visitor_id == first.visitor_id != other.visitor_id


async def test_a_retry_with_the_client_id_counts_once_without_it_twice(client, embedded, services, site, tmp_path):
    client_id = str(uuid.uuid4())
    for _ in range(2):
        assert (await post(client, pageview(site, event_id=client_id, props={"k": "same"}))).status_code == 202
        assert (await post(client, pageview(site, props={"k": "none"}))).status_code == 202
    await embedded[1].runner.drain()
    # And after a restart of the process (a new hand-off and stream core), once more; the first
    # process still holds its journal, so this one gets its own.
    handoff = make_handoff(dataclasses.replace(
        services, settings=services.settings.model_copy(update={"spool_dir": tmp_path / "spool"})))
    await handoff.start()
    try:
        from httpx import ASGITransport, AsyncClient
        async with AsyncClient(transport=ASGITransport(app=server_app(services, handoff), client=("127.0.0.1", 5000)),
                               base_url="http://testserver") as again:
            assert (await post(again, pageview(site, event_id=client_id, props={"k": "same"}))).status_code == 202
    finally:
        await handoff.stop()
    counts = dict(services.client.query("SELECT props['k'], count() FROM events FINAL WHERE site_id = {s:String}"
                                        " GROUP BY 1", parameters={"s": site}).result_rows)
    assert counts == {"same": 1, "none": 2}
    overview = (await client.get(f"{API}/stats/overview", params={"site_id": site, "period": "7d"})).json()["data"]
    assert overview["pageviews"] == 3


@pytest.mark.parametrize("body, field", [
    ({"event_id": "not-a-uuid"}, "event_id"),
    ({"name": "x" * 121}, "name"),
    ({"name": "a\x00b"}, "name"),
    ({"url": "https://a.example/" + "p" * 2000}, "url"),
    ({"url": "http://[::1"}, "url"),
    ({"props": {f"k{i}": "v" for i in range(31)}}, "props"),
    ({"props": {"k" * 121: "v"}}, "props"),
    ({"props": {"k": "v" * 501}}, "props.k"),
    ({"props": {"k": 1}}, "props.k"),
    # A product's fields are stored joined by \x1f: one inside would credit another partner.
    ({"name": "click", "product": {"id": "p\x1fevil"}}, "product.id"),
    ({"name": "click", "product": {"id": "p", "partner_slug": "a\x1fb"}}, "product.partner_slug"),
])
async def test_limits_answer_400_naming_the_field(client, site, body, field):
    response = await post(client, pageview(site, **body))
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("referrer", ["http://[::1", "http://[", "not a url", "://", "https://"])
async def test_an_unusable_referrer_is_ignored_not_the_event(client, embedded, services, site, referrer):
    response = await post(client, pageview(site, referrer=referrer))
    assert response.status_code == 202, response.text
    await embedded[1].runner.drain()
    assert stored(services, site, "referrer, channel") == [("", "direct")]


async def test_what_a_browser_may_send_is_taken(client, embedded, services, site):
    """A same-origin referrer past the limit (the whole previous URL) is cut to its origin, not
    refused with the page view; a UTF-8 BOM before the JSON is skipped; data-hash pages keep their
    fragment; X-Dropped can be read by the page's script."""
    long_referrer = "https://partner.example/search?q=" + "x" * 3000
    response = await post(client, pageview(site, referrer=long_referrer, event_id=str(uuid.uuid4())))
    assert response.status_code == 202, response.text
    assert "x-dropped" in response.headers["access-control-expose-headers"].lower()
    bom = b"\xef\xbb\xbf" + json.dumps(pageview(site, url="https://ingest.example/b")).encode()
    assert (await post(client, bom, **{"content-type": "text/plain"})).status_code == 202
    assert (await post(client, pageview(site, url="https://ingest.example/app#/cart", hash=True))).status_code == 202
    assert (await post(client, pageview(site, url="https://ingest.example/app#/cart"))).status_code == 202
    # `props: null` as `referrer: null`: none (it was a 400, and the event lost).
    assert (await post(client, pageview(site, url="https://ingest.example/c", props=None, referrer=None))).status_code == 202
    await embedded[1].runner.drain()
    assert sorted(stored(services, site, "pathname, referrer")) == [
        ("/a", "https://partner.example/"), ("/app", ""), ("/app#/cart", ""), ("/b", ""), ("/c", "")]


async def test_a_referrer_is_kept_without_query_fragment_or_credentials(client, embedded, services, site):
    """A source needs the referrer's host; its query string and fragment (a search, a token, an
    e-mail address) and a user:password say nothing about the source, and may about the person."""
    referrer = "https://anna:hemligt@Mail.Example:8443/inbox/view?email=anna%40example.se&token=abc#msg-7"
    assert (await post(client, pageview(site, referrer=referrer))).status_code == 202
    await embedded[1].runner.drain()
    assert stored(services, site, "referrer, source, channel") == [
        ("https://Mail.Example:8443/inbox/view", "mail.example", "referral")]
    sessions = services.client.query("SELECT referrer FROM sessions FINAL WHERE site_id = {s:String}",
                                     parameters={"s": site}).result_rows
    assert sessions == [("https://Mail.Example:8443/inbox/view",)]


async def test_control_characters_in_a_source_cannot_forge_a_channel(client, embedded, services, site):
    url = "https://ingest.example/a?utm_source=evil%1Fsocial%1Fx&utm_medium=cpc"
    assert (await post(client, pageview(site, url=url))).status_code == 202
    assert (await post(client, pageview(site, referrer="https://partner\x1fsocial.example/"))).status_code == 202
    await embedded[1].runner.drain()
    listed = (await client.get(f"{API}/stats/referrers", params={"site_id": site, "period": "7d"})).json()["data"]
    assert [(row["source"], row["channel"]) for row in listed] == [("evilsocialx", "paid")]  # one session
    # a control character in a referrer's host drops the referrer (it named partnersocial.example)
    assert sorted(stored(services, site, "source, channel, utm_source")) == [
        ("", "direct", ""), ("evilsocialx", "paid", "evilsocialx")]


async def test_ad_click_ids_and_app_referrers_reach_the_referrers_list(client, embedded, services, site):
    """Google Ads auto-tagging adds only ?gclid=; Chrome on Android sends android-app://<package>/
    for a link an app opened. Four visitors, four sessions."""
    visits = [("https://ingest.example/a?gclid=Cj0KCQ", None),
              ("https://ingest.example/a?msclkid=5f1b", "https://www.bing.com/"),
              ("https://ingest.example/a", "android-app://com.google.android.googlequicksearchbox/"),
              ("https://ingest.example/a", "android-app://com.google.android.gm/")]
    for n, (url, referrer) in enumerate(visits):
        body = pageview(site, url=url, **({"referrer": referrer} if referrer else {}))
        assert (await post(client, body, **{"user-agent": f"{BROWSER} visitor/{n}"})).status_code == 202
    await embedded[1].runner.drain()
    listed = (await client.get(f"{API}/stats/referrers", params={"site_id": site, "period": "7d"})).json()["data"]
    assert [(row["source"], row["channel"], row["visitors"], row["sessions"]) for row in listed] == [
        ("Bing", "paid", 1, 1), ("Gmail", "email", 1, 1), ("Google", "paid", 1, 1), ("Google", "search", 1, 1)]


@pytest.mark.parametrize("header, country", [("SE", "SE"), ("se", "SE"), ("ZZ", ""), ("XX", ""), ("T1", ""),
                                             ("EU", ""), ("S", ""), ("SWE", ""), ("", "")])
async def test_a_country_header_must_be_an_assigned_iso_code(client, embedded, services, site, header, country):
    # 192.0.2.1 is documentation space: no country of its own to fall back on.
    response = await post(client, pageview(site), **{"cf-ipcountry": header, "x-forwarded-for": "192.0.2.1"})
    assert response.status_code == 202
    await embedded[1].runner.drain()
    assert stored(services, site, "country") == [(country,)]


async def test_every_x_forwarded_for_line_counts(client, embedded, services, site):
    """A proxy may add its own X-Forwarded-For line: the client is the right-most untrusted hop
    over all lines, as if they were one."""
    async def visitor(*lines: str) -> int:
        body = json.dumps(pageview(site, event_id=str(uuid.uuid4()))).encode()
        headers = [("user-agent", BROWSER), ("content-type", "application/json"),
                   *(("x-forwarded-for", line) for line in lines)]
        assert (await client.post("/api/event", content=body, headers=headers)).status_code == 202
        await embedded[1].runner.drain()
        return services.client.query(
            "SELECT visitor_id FROM events FINAL WHERE site_id = {s:String} ORDER BY timestamp DESC LIMIT 1",
            parameters={"s": site}).result_rows[0][0]

    client_ip = await visitor("198.51.100.7")
    assert client_ip != await visitor("203.0.113.9")
    assert await visitor("203.0.113.9", "198.51.100.7") == client_ip  # not only the first line
    assert await visitor("198.51.100.7", "127.0.0.1") == client_ip  # nor only the last


# -- fuzz ------------------------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", "\x00", "ä" * 3000, "http://[::1", "https://", "javascript:alert(1)", "https://a.example/" + "x" * 2100])
_VALUE = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _TEXT | st.lists(_TEXT, max_size=3) \
    | st.dictionaries(_TEXT, _TEXT, max_size=40)
_FIELDS = ["site_id", "domain", "name", "url", "referrer", "props", "product", "event_id"]
_HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "text/plain;charset=UTF-8",
                                     "application/x-www-form-urlencoded", "multipart/form-data", "", "ä/ö"]),
    "x-forwarded-for": st.sampled_from(["", "1.2.3.4", "garbage", "1.2.3.4, ::1", ", ,", "999.1.1.1", "::ffff:1.2.3.4",
                                        "2001:db8::1", "1.2.3.4:8080", "[::1]"]),
    "cf-ipcountry": st.sampled_from(["", "SE", "se", "ZZ", "XX", "ÅÄ", "SWE", "1", "T1"]),
    "x-vercel-ip-country": st.sampled_from(["", "NO", "??"]),
    "user-agent": st.sampled_from([BROWSER, "", "x" * 3000, "Mozilla/5.0 (compatible; Googlebot/2.1)", "ö"]),
})


@st.composite
def bodies(draw, site: str) -> bytes:
    kind = draw(st.sampled_from(["mutated", "garbage", "json"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_VALUE)).encode()  # stdlib json: huge integers and NaN, as clients send
    body: dict = {"site_id": site, "name": "pageview", "url": "https://fuzz.example/a"}
    for field in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        body[field] = draw(_VALUE)
    return json.dumps(body).encode()


async def test_fuzzed_events_never_get_a_5xx_and_valid_ones_in_between_all_count(client, embedded, services, site):
    valid = 0
    seen: list[tuple[bytes, dict]] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies(site), headers=_HEADERS)
    def run(body: bytes, headers: dict) -> None:
        seen.append((body, headers))

    run()  # hypothesis draws synchronously; the requests go out below, on this event loop
    for n, (body, headers) in enumerate(seen):
        raw = {name: value.encode() for name, value in headers.items()}  # non-ASCII bytes, as on the wire
        response = await client.post("/api/event", content=body, headers=raw)
        assert response.status_code < 500, (body, headers, response.text)
        assert response.status_code in (202, 400, 404, 413), (body, headers, response.status_code)
        if response.status_code >= 400:
            assert response.json()["error"]["code"], response.text
        # A known-good event after every fuzzed one: all of them must be counted.
        good = await post(client, pageview(site, props={"n": str(n)}), **{"x-forwarded-for": f"10.0.{n // 250}.{n % 250}"})
        assert good.status_code == 202, good.text
        valid += 1
    await embedded[1].runner.drain()
    counted = services.client.query(
        "SELECT uniqExact(props['n']) FROM events FINAL WHERE site_id = {s:String} AND pathname = '/a'"
        " AND hostname = 'ingest.example'", parameters={"s": site}).result_rows[0][0]
    assert counted == valid == len(seen)


def test_an_event_goes_to_kafka_and_the_journal_as_its_model_dump():
    """`Event.to_bytes` serialises the fields directly (cheaper than `model_dump`): it must give the
    same bytes, and read back the same event, with props, a product and millisecond times."""
    import orjson

    from ingest.event import Event

    event = Event(event_id=str(uuid.uuid4()), site_id="s", timestamp="2026-03-29T01:30:00.123456+02:00",
                  name="click", visitor_id=2**63 + 5, pathname="/p/å", props={"plan": "pro", "ö": "ü"},
                  product_id="p-1", product_slug="skal", category_slug="c", brand_slug="b", partner_slug="kjell")
    assert event.to_bytes() == orjson.dumps(event.model_dump(), option=orjson.OPT_UTC_Z)
    assert Event.from_bytes(event.to_bytes()) == event


def test_records_the_tables_cannot_hold_are_skipped_not_retried_forever():
    """A tombstone, or an event-shaped record with values outside what the events table holds, in
    a batch of good ones: the good ones are processed, the others logged, counted and skipped (they
    failed every batch they were in, on every restart)."""
    import orjson

    from besokskollen import metrics
    from ingest.event import Event

    good = Event(event_id=str(uuid.uuid4()), site_id="s", timestamp="2026-03-29T01:30:00Z", name="pageview",
                 visitor_id=1)
    bad = [None, b"not json", b"{}"] + [orjson.loads(good.to_bytes()) | change for change in (
        {"event_id": "not-a-uuid"}, {"event_id": "{" + good.event_id + "}"}, {"visitor_id": -1},
        {"timestamp": "1969-12-31T23:59:59Z"}, {"timestamp": "2106-02-08T00:00:00Z"})]
    records = [r if r is None or isinstance(r, bytes) else orjson.dumps(r) for r in bad]
    records.append(good.to_bytes().replace(b'"visitor_id":1', b'"visitor_id":18446744073709551616'))  # 2**64
    before = metrics.RECORDS_SKIPPED._value.get()
    assert Event.decode_each([good.to_bytes(), *records, good.to_bytes()]) == [good, *[None] * len(records), good]
    assert metrics.RECORDS_SKIPPED._value.get() - before == len(records)


async def test_a_client_id_in_any_spelling_of_one_uuid_is_one_event(client, embedded, services, site):
    """Upper case, braces, urn:uuid: and the bare hex are the same UUID: retries that respell it
    (another library, a text/plain beacon with a charset, another network with a scoped or mapped
    address) are counted once, with the first copy's visitor id."""
    client_id = uuid.uuid4()
    spellings = [str(client_id), str(client_id).upper(), "{" + str(client_id) + "}", client_id.urn, client_id.hex]
    headers = [{}, {"content-type": "text/plain;charset=UTF-8"}, {"content-type": "text/plain; charset=\"utf-8\""},
               {"x-forwarded-for": "2001:db8::7%eth0"}, {"x-forwarded-for": "::ffff:81.2.69.160, 127.0.0.1"}]
    for spelling, extra in zip(spellings, headers):
        body = json.dumps(pageview(site, event_id=spelling, props={"k": "same"}, hash=True,
                                   url="https://ingest.example/app#/c%C3%A5rt%ff")).encode()
        response = await post(client, b"\xef\xbb\xbf" + body if extra else body, **extra)
        assert response.status_code == 202, (spelling, extra, response.text)
    await embedded[1].runner.drain()
    rows = stored(services, site, "toString(event_id), visitor_id, pathname")
    assert len(rows) == 1 and rows[0][0] == str(uuid.uuid5(client_id, site)), rows
    assert rows[0][2] == "/app#/c\u00e5rt\ufffd"


@pytest.mark.parametrize("placeholder", ["00000000-0000-0000-0000-000000000000", "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"])
async def test_a_placeholder_client_id_is_refused_not_made_one_event_of_everything(client, site, placeholder):
    response = await post(client, pageview(site, event_id=placeholder))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_field" and error["message"].startswith("event_id") and "placeholder" in error["message"]
