"""The tracker script (issue 8, SPEC §5.4) in a real browser: Debian's Chromium, headless, driven
by Playwright. A page on one origin loads the script from `besokskollen up` on another
(`data-api`); every check goes through the API's numbers, never logs."""

from __future__ import annotations

import gzip
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ingest import tracker
from tests.conftest import ADMIN_KEY, free_port, up_server, wait_until
from tests.test_crash import API, AUTH

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google, refused here.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

DESKTOP = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0"
           " Safari/537.36")
AWAY = """<!doctype html><title>Kjell</title><script defer data-site="{site}" data-api="{api}" src="{api}/js/script.js"></script>"""
PAGE = """<!doctype html><meta charset="utf-8"><title>Skal</title>
<script>
  window.bk = window.bk || function () { (window.bk.q = window.bk.q || []).push(arguments) };
  bk("newsletter", {props: {when: "before the script"}});
</script>
<script defer data-site="{site}" data-api="{api}" src="{api}/js/script.js"></script>
<a id="buy" href="/away" data-bk-product="iphone-15-skal" data-bk-category="mobilskal"
   data-bk-brand="apple" data-bk-partner="kjell">Köp hos Kjell</a>
<a id="plain" href="#top">not an affiliate link</a>
"""


class _Pages(BaseHTTPRequestHandler):
    site = api = ""

    def do_GET(self) -> None:
        body = (PAGE if self.path == "/" else AWAY).replace("{site}", self.site).replace("{api}", self.api).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_the_script_is_small_cached_and_revalidates():
    assert len(tracker.GZIPPED) < 2000  # "< 2 KB" read strictly
    assert gzip.decompress(tracker.GZIPPED) == tracker.SCRIPT


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracker")
    with up_server(tmp / "data", tmp / "up.log",
                   env={"BK_ADMIN_KEY": ADMIN_KEY, "BK_RATE_LIMIT_PER_MINUTE": "100000"}) as base:
        yield base


def test_script_headers(up):
    r = httpx.get(f"{up}/js/script.js", headers={"accept-encoding": "gzip"})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert int(r.headers["content-length"]) < 2000
    assert r.headers["content-type"].startswith("application/javascript")
    assert "max-age=86400" in r.headers["cache-control"] and r.headers["etag"]
    again = httpx.get(f"{up}/js/script.js", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content


async def test_each_encoding_has_its_own_etag_and_q0_refuses_gzip():
    from starlette.applications import Starlette

    transport = httpx.ASGITransport(app=Starlette(routes=tracker.ROUTES))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        zipped = await c.get("/js/script.js", headers={"accept-encoding": "gzip, br"})
        plain = await c.get("/js/script.js", headers={"accept-encoding": "identity"})
        refused = await c.get("/js/script.js", headers={"accept-encoding": "gzip;q=0, identity"})
        assert zipped.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
        assert "content-encoding" not in refused.headers
        assert zipped.headers["etag"] != plain.headers["etag"] == refused.headers["etag"]
        for tags in ("*", plain.headers["etag"], f'"other", W/{plain.headers["etag"]}'):
            again = await c.get("/js/script.js", headers={"accept-encoding": "identity", "if-none-match": tags})
            assert again.status_code == 304 and again.headers["etag"] == plain.headers["etag"], tags
        stale = await c.get("/js/script.js", headers={"accept-encoding": "gzip", "if-none-match": plain.headers["etag"]})
        assert stale.status_code == 200 and stale.headers["content-encoding"] == "gzip"


@pytest.mark.slow
def test_pageviews_spa_navigation_custom_events_queue_and_affiliate_clicks_in_chromium(up):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Chromium is missing: tests/run.sh installs Debian's chromium package"
    with httpx.Client(base_url=up, headers=AUTH, timeout=30) as api:
        site = api.post(f"{API}/sites", json={"domain": "skal.example", "timezone": "UTC"}).json()["data"]["id"]
        for goal in ({"name": "Nyhetsbrev", "event_type": "event", "match_event": "newsletter"},
                     {"name": "Signup", "event_type": "event", "match_event": "signup"}):
            assert api.post(f"{API}/goals", json={"site_id": site, **goal}).status_code == 201

        want = {"pageviews": 7, "pages": {"/": 1, "/sök": 1, "/x\ufffd": 1, "/produkt/iphone-15-skal": 2, "/jamfor": 1, "/away": 1},
                "goals": {"Nyhetsbrev": 1, "Signup": 1}, "products": {"iphone-15-skal": 1},
                "categories": {"mobilskal": 1}, "partners": {"kjell": 1}}

        _Pages.site, _Pages.api = site, up
        server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Pages)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        page_url = f"http://127.0.0.1:{server.server_address[1]}/"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                # Headless Chromium names itself HeadlessChrome, which ingest drops as a bot.
                page = browser.new_page(user_agent=DESKTOP)
                with page.expect_request(f"{up}/api/event"):
                    page.goto(page_url)  # pageview 1
                page.wait_for_function("window.bk && !window.bk.q")  # the script took over the queue
                page.evaluate("""() => {
                    history.pushState({}, "", "/s%c3%b6k");                   // pageview 2
                    history.replaceState({}, "", "/sök");  // written /s%C3%B6k: the same page for the API, none
                    history.pushState({}, "", "/x%ff");                       // pageview 3
                    history.replaceState({}, "", "/x%fe");  // no UTF-8 either: /x\ufffd as the API keeps both, none
                    history.pushState({}, "", "/produkt/iphone-15-skal");     // pageview 4
                    history.replaceState({}, "", "/produkt/iphone-15-skal");  // the same page: none
                    location.hash = "#recensioner";                           // a hash change: none
                    bk("signup", {props: {plan: "pro"}});
                }""")
                page.click("#plain")  # not an affiliate link: no click event, and a hash change only
                page.evaluate("""() => history.pushState({}, "", "/jamfor")""")  # pageview 5
                with page.expect_request(f"{up}/api/event"):
                    page.evaluate("""() => history.back()""")  # popstate to the product page: pageview 6
                page.click("#buy")    # the affiliate click, by beacon as the page goes away; /away: pageview 7
                page.wait_for_url("**/away")
                # The browser stays open while the numbers are read, as a visitor's would: closing it
                # at once could cut the beacon or /away's pageview off on a loaded machine.
                _wait_for_numbers(api, site, want)
                browser.close()
        finally:
            server.shutdown()

        brands = api.get(f"{API}/popular/products", params={"site_id": site, "days": 1, "brand_slug": "apple"}).json()
        assert [p["product_slug"] for p in brands["data"]] == ["iphone-15-skal"]


class _Site(BaseHTTPRequestHandler):
    """Pages by path (`{site}` and `{api}` filled in); `/log?...` requests are noted in `log`, and
    `/ready` answers "yes" once `ready()` holds."""
    pages: dict[str, str] = {}
    site = api = ""
    log: list[str] = []
    ready = staticmethod(lambda: False)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/log":
            self.log.append(self.path.partition("?")[2])
        body = ("yes" if self.ready() else "no") if path == "/ready" else self.pages.get(path, "<title>x</title>")
        body = body.replace("{site}", self.site).replace("{api}", self.api).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store" if path in ("/log", "/ready") else "max-age=60")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """A site's own proxy for the tracker's events at a path of its choosing, `/stats/event`."""
        assert self.path == "/stats/event", self.path
        body = self.rfile.read(int(self.headers["content-length"]))
        sent = httpx.post(f"{self.api}/api/event", content=body,
                          headers={"user-agent": self.headers["user-agent"], "content-type": self.headers["content-type"]})
        self.send_response(sent.status_code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def _serving(pages: dict[str, str], site: str, api: str) -> Iterator[str]:
    """The test site's pages (`_Site`) on a port of their own while the block runs: their origin."""
    _Site.pages, _Site.site, _Site.api = pages, site, api
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _site_with_goals(api: httpx.Client, domain: str, *events: str) -> str:
    site = api.post(f"{API}/sites", json={"domain": domain, "timezone": "UTC"}).json()["data"]["id"]
    for event in events:
        assert api.post(f"{API}/goals", json={"site_id": site, "name": event, "event_type": "event",
                                               "match_event": event}).status_code == 201
    return site


def _by(rows: list[dict], name: str, count: str) -> dict:
    """{row[name]: row[count]}; a name listed twice is a wrong answer, not one to fold."""
    out = {row[name]: row[count] for row in rows}
    assert len(out) == len(rows), rows
    return out


# What a browser test may wait for, each read through the API (pages and goals over 7 days,
# affiliate clicks over 1).
_READINGS = {
    "pageviews": lambda get: get("stats/overview", period="7d")["data"]["pageviews"],
    "pages": lambda get: _by(get("stats/pages", period="7d")["data"], "page", "pageviews"),
    "goals": lambda get: _by(get("goals", period="7d")["data"], "name", "conversions"),
    "products": lambda get: _by(get("popular/products", days=1)["data"], "product_slug", "clicks"),
    "categories": lambda get: _by(get("popular/categories", days=1)["data"], "category_slug", "clicks"),
    "partners": lambda get: _by(get("popular/partners", days=1)["data"], "partner_slug", "clicks"),
}


def _wait_for_numbers(api: httpx.Client, site: str, want: dict, timeout: float = 30) -> None:
    """Wait until the readings named in `want` equal it; print the last ones read either way."""
    got: dict = {}

    def exact() -> bool:
        nonlocal got
        get = lambda path, **params: api.get(f"{API}/{path}", params={"site_id": site, **params}).json()  # noqa: E731
        got = {name: _READINGS[name](get) for name in want}
        return got == want

    try:
        wait_until(exact, timeout, "the browser's events in the API")
    finally:
        print(got)


STUB = """<script>window.bk = window.bk || function () { (bk.q = bk.q || []).push(arguments) }</script>"""
TAG = """<script defer data-site="{site}" data-api="{api}" src="{api}/js/script.js"></script>"""
LINK = """<p><a id="{0}" href="/away" target="_blank" data-bk-product="{0}" data-bk-partner="kjell">{1}</a></p>"""
# The script twice (a theme and a plugin both add it), a prop past the API's 500 characters, a
# product card with the attributes on the wrapper around the link and an image in the link, a
# widget with its link in a shadow root.
SHOP = (STUB + """<script>bk("long", {props: {text: "å".repeat(600), none: null, n: 3}})</script>""" + TAG + TAG
        + """<div data-bk-product="card" data-bk-partner="kjell"><a href="/away" target="_blank">
             <img id="card-img" width="40" height="40" src="data:image/gif;base64,R0lGODlhAQABAAAAACw="></a></div>
             <a id="same-tab" href="/away">away, same tab</a>"""
        + "".join(LINK.format(name, name) for name in ("double", "middle", "ctrl", "enter"))
        + LINK.format("nested", """<span><b id="nested-b">nested</b> in a span</span>""")
        + """<price-box></price-box><script>customElements.define("price-box", class extends HTMLElement {
             connectedCallback() { this.attachShadow({mode: "open"}).innerHTML = `""" + LINK.format("shadow", "shadow")
        + """`; } })</script>""")


@pytest.mark.slow
def test_affiliate_clicks_by_every_hand_script_twice_props_and_back_forward_cache_in_chromium(up):
    """A click on an image in a link whose product is on its wrapper, a double click (one click),
    a middle click, Ctrl+click, Enter, a click on a <b> in a <span> in the link, a link in a
    widget's shadow root: one click each. The script included twice sends each event once. A prop
    past the API's 500 characters is cut, not the event lost. Back to a page from the
    back-forward cache is a page view, as a reload is."""
    from playwright.sync_api import sync_playwright

    with httpx.Client(base_url=up, headers=AUTH, timeout=30) as api:
        site = _site_with_goals(api, "klick.example", "long")
        with _serving({"/": SHOP}, site, up) as origin:  # /away: no script
            with sync_playwright() as p:
                # Playwright turns the back-forward cache off by default.
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                            ignore_default_args=["--disable-back-forward-cache"])
                page = browser.new_page(user_agent=DESKTOP)
                page.goto(f"{origin}/")  # pageview 1 of /
                page.wait_for_function("window.bk && !window.bk.q")
                page.evaluate("""() => history.pushState({}, "", "/produkt")""")  # /produkt
                page.click("#card-img")
                page.dblclick("#double")
                page.click("#middle", button="middle")
                page.click("#ctrl", modifiers=["Control"])
                page.focus("#enter")
                page.keyboard.press("Enter")
                page.click("#nested-b")
                page.click("#shadow")  # Playwright's CSS selectors pierce open shadow roots
                page.bring_to_front()
                page.evaluate("window.kept = 1")
                page.click("#same-tab")
                page.wait_for_url("**/away")
                page.go_back(wait_until="commit")  # /produkt again, from the back-forward cache
                page.wait_for_function("location.pathname == '/produkt'")
                assert page.evaluate("window.kept") == 1, "not restored from the back-forward cache"
                with page.expect_request(f"{up}/api/event"):
                    page.evaluate("""() => history.pushState({}, "", "/jamfor")""")
                browser.close()
        _wait_for_numbers(api, site, {
            "pages": {"/": 1, "/produkt": 2, "/jamfor": 1}, "goals": {"long": 1},
            "products": {"card": 1, "double": 1, "middle": 1, "ctrl": 1, "enter": 1, "nested": 1, "shadow": 1}})


def test_a_prerendered_page_counts_once_shown_and_never_if_not(up, tmp_path):
    """Chrome prerenders pages a site's speculation rules name; what a prerendered page sends
    carries `Sec-Purpose: prefetch;prerender` and is dropped by ingest. The tracker waits for the
    page to be shown: the one shown counts (its pageview and its queued event), the one never shown
    does not. Chromium runs without Playwright here: DevTools turns prerendering off."""
    import os
    import signal
    import subprocess

    with httpx.Client(base_url=up, headers=AUTH, timeout=30) as api:
        site = _site_with_goals(api, "prerender.example", "signup")
        report = """<script>fetch("/log?" + location.pathname + "=" + document.prerendering);
          document.addEventListener("prerenderingchange", () => fetch("/log?shown=" + location.pathname))</script>"""
        prerendered = STUB + """<script>bk("signup")</script>""" + TAG + report
        # Once its tracker has run (its pageview is then on the way: a keepalive fetch outlives the
        # page) and both pages report they were prerendered, the start page goes to one of them.
        # Its poll waits for the tracker: under load the prerendering can finish before the
        # deferred script has run, and a page left before then is rightly never counted.
        start = TAG + """<script type="speculationrules">
          {"prerender": [{"source": "list", "urls": ["/shown", "/never"]}]}</script>
          <script>(function poll() { if (!window.bk) return setTimeout(poll, 100); fetch("/ready").then(r => r.text())
            .then(t => t == "yes" ? location.href = "/shown" : setTimeout(poll, 100)) })()</script>"""
        log: list[str] = []
        _Site.log, _Site.ready = log, staticmethod(lambda: {"/shown=true", "/never=true"} <= set(log))
        with _serving({"/start": start, "/shown": prerendered, "/never": prerendered}, site, up) as origin:
            browser = subprocess.Popen([CHROMIUM, "--headless", *CHROMIUM_ARGS, f"--user-agent={DESKTOP}",
                                        f"--user-data-dir={tmp_path / 'profile'}",
                                        f"{origin}/start"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_until(lambda: "shown=/shown" in log, 60, f"Chromium to prerender /shown and show it (log: {log})")
                _wait_for_numbers(api, site, {"pages": {"/start": 1, "/shown": 1}, "goals": {"signup": 1}, "products": {}})
            finally:
                os.killpg(browser.pid, signal.SIGTERM)
                try:
                    browser.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(browser.pid, signal.SIGKILL)
                    browser.wait()


# A landing URL past the API's 2,000 characters (a filter state in the query, a long fragment),
# data-api given as the endpoint's whole URL, a router on the Navigation API, product attributes
# and props the API would refuse as they are, a product card around a widget whose link is in its
# shadow root, and a burst of large events past Chromium's 64 KB budget for keepalive requests.
LONG_URL = "/lang?utm_source=nyhetsbrev&filters=" + "c" * 2100 + "#state=" + "z" * 300
WHOLE_API_TAG = """<script defer data-site="{site}" data-api="{api}/api/event" src="{api}/js/script.js"></script>"""
REFUSED = (STUB + """<script>
  bk("many", {props: Object.fromEntries(Array.from({length: 31}, (_, i) => ["k" + i, "v"]))});
  bk("keys", {props: {["k".repeat(121)]: "long key", "": "no key", obj: {a: 1}}});
  bk("surrogate", {props: {q: "\\u{1F600}abc".slice(1)}});
  bk("large", {props: Object.fromEntries(Array.from({length: 20}, (_, i) => ["k" + i, "å".repeat(500)]))});
  // Props JSON cannot write: the call threw in the script's start, and every call queued after it
  // was lost.
  var cyclic = {}; cyclic.self = cyclic;
  bk("queued-bad", {props: {o: cyclic, big: {n: 10n}, s: Symbol("s"), kept: "yes"}});
  bk("after-bad");
  navigation.addEventListener("navigate", e => {
    if (e.canIntercept && e.destination.url.includes("/nav/")) e.intercept({handler: async () => {}}) });
</script>""" + WHOLE_API_TAG + """
<a id="nav" href="/nav/one">a router's link</a>
<a id="newline" href="#a" data-bk-product="newline" data-bk-brand="multi
line">brand on two lines</a>
<script>  // a C1 control (NEL) too; in markup, &#x85; would be read as "…" (windows-1252)
  document.getElementById("newline").dataset.bkBrand = "multi\\u0085\\nline" </script>
<a id="long" href="#b" data-bk-product=\"""" + "p" * 250 + """\">a long product id</a>
<a id="empty" href="#c" data-bk-product="">no product</a>
<div data-bk-product="card" data-bk-partner="kjell"><buy-button></buy-button></div>
<script>customElements.define("buy-button", class extends HTMLElement {
  connectedCallback() { this.attachShadow({mode: "open"}).innerHTML = '<a id="inner" href="#d">Köp</a>' } })</script>""")


def test_data_api_takes_a_host_or_a_proxys_own_path_in_chromium(up):
    """`data-api` with a path is the endpoint itself: a site proxying at /stats/event had its
    events sent to /stats/event/api/event."""
    from playwright.sync_api import sync_playwright

    with httpx.Client(base_url=up, headers=AUTH, timeout=30) as api:
        site = _site_with_goals(api, "proxy.example", "via-proxy")
        proxied = (STUB + """<script>bk("via-proxy")</script>"""
                   """<script defer data-site="{site}" data-api="/stats/event" src="{api}/js/script.js"></script>""")
        with _serving({"/p": proxied}, site, up) as origin:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(user_agent=DESKTOP)
                page.goto(f"{origin}/p")
                _wait_for_numbers(api, site, {"pages": {"/p": 1}, "goals": {"via-proxy": 1}})
                browser.close()


def test_what_the_api_would_refuse_is_cut_or_cleaned_not_lost_in_chromium(up):
    """Each of these lost its event whole (a 400 or 413 no one sees), or counted a page twice."""
    from playwright.sync_api import sync_playwright

    with httpx.Client(base_url=up, headers=AUTH, timeout=30) as api:
        site = _site_with_goals(api, "lang.example", "many", "keys", "surrogate", "large", "burst", "a button s text",
                                "queued-bad", "after-bad", "late-bad")
        with _serving({"/lang": REFUSED}, site, up) as origin:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(user_agent=DESKTOP)
                answers, warnings = [], []
                page.on("response", lambda r: answers.append(r.status) if r.url == f"{up}/api/event" else None)
                page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
                page.goto(f"{origin}{LONG_URL}")  # pageview of /lang
                page.wait_for_function("window.bk && !window.bk.q")
                page.evaluate("""() => {
                    history.replaceState(null, "", location.pathname);  // drops the utm tags: no new page
                    history.pushState(null, "", "/lang?page=2");        // a new query only: no new page
                    // A URL past 2,000 characters whose cut falls inside a character's escapes
                    // (%C3%A5): the page ended in U+FFFD.
                    history.pushState(null, "", "/å/" + "å".repeat(400));
                    bk("\\n  a button\\u0085s text\\t");  // control characters in a name: a 400
                    bk(""); bk("  \\n ");                 // nothing to name: not sent
                    // bk() threw into the page's code for these; a click without a product was a 400.
                    const c = {}; c.c = c;
                    bk("late-bad", {props: {c, kept: "yes"}});
                    bk("click", {props: {a: "1"}});
                    for (let i = 0; i < 12; i++)                        // ~15 KB each
                        bk("burst", {props: Object.fromEntries(Array.from({length: 30}, (_, k) => ["k" + k, "x".repeat(500)]))});
                }""")
                for link in ("#newline", "#long", "#empty", "#inner"):
                    page.click(link)
                page.click("#nav")  # no history method called: pageview of /nav/one
                page.wait_for_url("**/nav/one")
                # /å/ and as many whole å (6 characters each) as fit in 2,000 with the origin.
                long_page = "/å/" + "å" * ((2000 - len(f"{origin}/%C3%A5/")) // 6)
                _wait_for_numbers(api, site, {
                    "pages": {"/lang": 1, long_page: 1, "/nav/one": 1},
                    "goals": {"many": 1, "keys": 1, "surrogate": 1, "large": 1, "burst": 12, "a button s text": 1,
                              "queued-bad": 1, "after-bad": 1, "late-bad": 1},
                    "products": {"newline": 1, "p" * 200: 1, "card": 1}})
                assert answers and set(answers) == {202}, answers
                assert "bk: clicks come from links with data-bk-product" in warnings, warnings
                browser.close()
        get = lambda path, **params: api.get(f"{API}/{path}", params={"site_id": site, **params}).json()["data"]  # noqa: E731
        assert [r["source"] for r in get("stats/referrers", period="7d")] == ["nyhetsbrev"]
        assert [p["product_slug"] for p in get("popular/products", days=1, brand_slug="multi line")] == ["newline"]
