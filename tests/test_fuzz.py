"""Schemathesis over the query API's own OpenAPI document, in-process (ASGI): no 5xx, and every
response conforms to the document (status codes documented, bodies, content types and headers
match). Then hypothesis with the hostile input a schema-driven fuzzer does not write (below).

Bounded: at most MAX_EXAMPLES generated cases per operation, derandomized (the same cases every
run). `DELETE /sites/{site_id}` is left out: `site_id` is always the fuzz site, which it would
delete under the other operations. The fuzz has an API key and a site of its own, and an app
whose rate limit is raised, so it sees no 429s.

The document is read at import, from an app that is never called (operations become test items);
requests go to an app over the session's storage (`fuzz_app`)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import jsonschema
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingest import importer, useragents
from ingest.enrich import enrich
from ingest.event import Event
from query_api.app import create_app
from query_api.deps import CACHE_CONTROL
from query_api.rate_limit import RateLimiter
from streams.sites import Site
from tests.conftest import ADMIN_KEY, BROWSER

MAX_EXAMPLES = 25
FUZZ_KEY = "bk_fuzz_key_0123456789abcdef"
FUZZ_DOMAIN = "fuzz-target.example"
FUZZ_SITE = "fuzz-target-example"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]

class _NoStorage:
    """A Context for an app that only renders its OpenAPI document."""

    def __getattr__(self, name: str) -> None:
        return None


schema = schemathesis.openapi.from_dict(create_app(_NoStorage()).openapi())
schema.config.update(headers={"Authorization": f"Bearer {FUZZ_KEY}"}, parameters={"site_id": FUZZ_SITE})
schema = schema.exclude(method="DELETE", path="/api/v1/sites/{site_id}")  # would delete the fuzz site


@pytest.fixture(scope="module")
def fuzz_app(services):
    if services.keys.lookup(FUZZ_KEY) is None:
        services.keys.create("default", key=FUZZ_KEY)
    if services.sites.get(FUZZ_SITE) is None:
        services.sites.create("default", FUZZ_DOMAIN, "Fuzz", site_id=FUZZ_SITE)
    return create_app(services.query_context, rate_limiter=RateLimiter(limit=10**9, failed_auth_limit=10**9))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@pytest.mark.slow
def test_api_conforms_to_its_openapi(case, fuzz_app):
    case.call_and_validate(app=fuzz_app, checks=CHECKS)


# -- hostile input against every endpoint (hypothesis) ---------------------------------------------
# Requests a schema-driven fuzzer does not write: repeated, empty, huge, unicode, NUL and control
# characters and percent-encoding oddities in query strings and path segments; Authorization and
# If-None-Match variants; bodies of every wrong shape. Drawn synchronously (as in test_wire.py) and
# sent on the test's event loop, to the `up` application with its rate limit raised. Invariants:
# never a 5xx nor a trace, SQL text or Python repr; every error `{"error": {"code", "message"}}`,
# not to be cached; the rate-limit headers on every answer; a 200 GET cacheable with a strong ETag
# that answers 304, and its body as the OpenAPI document describes it.

API = "/api/v1"
_LEAKS = re.compile(r"Traceback|File \"|SELECT |FROM [a-z_]+ |clickhouse|Exception|Error\(|<[a-zA-Z_.]+ object at ")
_STATUSES = {200, 201, 204, 304, 400, 401, 403, 404, 405, 409, 413}

_ODD = st.sampled_from(["", " ", "\x00", "%00", "%", "%zz", "%ff%fe", "%C3%A5", "%ED%A0%80", "+", "%2F", "..", "%2e%2e",
                        "\t\r\n", "nan", "inf", "-inf", "-0", "1e3", "+5", "0x10", "1_0", "9" * 40, "true", "yes",
                        "null", "[]", "{}", "'; DROP TABLE sites; --", "\u202e", "😀", "å" * 300, "x" * 5000])
_VALUES = {
    "site_id": st.sampled_from(["{site}", "{site}", "no-such-site"]) | _ODD,
    "period": st.sampled_from(["7d", "30d", "90d", "custom", "5d", "7D", "30"]) | _ODD,
    "from": st.sampled_from(["2026-01-01", "2002-01-01", "2001-12-31", "2099-12-31", "2026-02-30", "20260101",
                             "2026-W01-1", "2026-1-1"]) | _ODD,
    "to": st.sampled_from(["2026-01-14", "2099-12-31", "2100-01-01", "2025-12-31", "0001-01-01"]) | _ODD,
    "compare": st.sampled_from(["true", "false", "1", "0", "on", "off", "TRUE"]) | _ODD,
    "include_social": st.sampled_from(["true", "false"]) | _ODD,
    "include_stats": st.sampled_from(["true", "false"]) | _ODD,
    "limit": st.integers(-5, 2000).map(str) | _ODD,
    "days": st.integers(-5, 400).map(str) | _ODD,
    "recent_hours": st.integers(-5, 200).map(str) | _ODD,
    "baseline_days": st.integers(-5, 100).map(str) | _ODD,
    "min_growth": st.floats(allow_nan=True).map(str) | _ODD,
    "min_clicks": st.integers(-5, 10**20).map(str) | _ODD,
    "min_recent_clicks": st.integers(-5, 10**20).map(str) | _ODD,
    "category_slug": st.text(max_size=20) | _ODD,
    "brand_slug": st.text(max_size=20) | _ODD,
}
_GETS = ["/sites", "/sites/{site}", "/sites/{segment}", "/stats/overview", "/stats/pages", "/stats/referrers",
         "/stats/countries", "/popular/products", "/popular/categories", "/popular/partners", "/trending/products",
         "/goals", "/funnels", "/funnels/{funnel}/stats", "/funnels/{segment}/stats"]


def _encode(value: str, how: str) -> str:
    if how == "raw":  # percent escapes (valid or not) kept as written; the rest made sendable
        return "".join(c if c.isascii() and c.isprintable() and c not in " #&" else quote(c) for c in value)
    return quote(value, safe="")


@st.composite
def get_requests(draw) -> tuple[str, str, dict[str, bytes]]:
    path = draw(st.sampled_from(_GETS))
    # httpx resolves `.` and `..` segments (out of /api/v1/): sent as %2E, as a client that does not.
    segment = _encode(draw(_ODD | st.text(min_size=1, max_size=30)), "quote").replace(".", "%2E") or "x"
    pairs = draw(st.lists(st.tuples(st.sampled_from(sorted(_VALUES)) | st.text(max_size=8), st.data()), max_size=6))
    query = []
    for name, data in pairs:  # names may repeat: ?period=7d&period=30d
        value = data.draw(_VALUES.get(name, _ODD))
        how = data.draw(st.sampled_from(["quote", "raw"]))
        query.append(f"{_encode(name, how)}={_encode(value, how)}")
    if draw(st.sampled_from([True, True, True, False])):
        query.insert(draw(st.integers(0, len(query))), "site_id={site}")
    headers: dict[str, bytes] = {}
    valid = st.sampled_from(["Bearer {key}", "bearer {key}", "BEARER   {key}  "])
    invalid = st.sampled_from([" Bearer {key}", "Bearer\t{key}", "Bearer", "Bearer ", "", "Basic YTpi", "Token {key}",
                               "Bearer bk_nope", "Bearer {key} extra", "Bearer " + "k" * 9000, "Bearer bk_\xe5\xff"])
    authorization = draw(draw(st.sampled_from([valid] * 4 + [invalid])))
    headers["authorization"] = authorization.encode("latin-1")
    if draw(st.booleans()):
        headers["if-none-match"] = draw(st.sampled_from(['"x"', "*", 'W/"x"', "", '"', "x" * 3000, '"a", "b"',
                                                         "\xff"])).encode("latin-1")
    for name, values in (("accept-encoding", ["gzip", "br, zstd", "*;q=0", "identity;q=0", "\xe5"]),
                         ("content-type", ["text/plain", "application/json", "", "\xe5/\xf6"]),
                         ("x-forwarded-for", ["garbage", "1.2.3.4, , ,", "::ffff:1.2.3.4", "[::1]:80", "999.1.1.1",
                                              "\xe5", ", " * 2000])):
        if draw(st.booleans()):
            headers[name] = draw(st.sampled_from(values)).encode("latin-1")
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD"]))
    return method, API + path.replace("{segment}", segment) + ("?" + "&".join(query) if query else ""), headers


@pytest.fixture
async def fuzz_world(client, embedded, services):
    """A site with a little traffic, a goal and a funnel, and an app whose rate limit is raised."""
    limiter = embedded[0].state.rate_limiter
    limiter.limit = limiter.failed_auth_limit = 10**9
    domain = f"fz-{uuid.uuid4().hex[:10]}.example"
    site = (await client.post(f"{API}/sites", json={"domain": domain})).json()["data"]["id"]
    for n, (name, path) in enumerate([("pageview", "/"), ("pageview", "/checkout"), ("click", "/p"), ("purchase", "/")]):
        body = {"site_id": site, "name": name, "url": f"https://{domain}{path}", "referrer": "https://www.google.com/",
                "product": {"id": "p1", "slug": "p1", "category_slug": "c", "brand_slug": "b", "partner_slug": "k"}}
        response = await client.post("/api/event", json=body,
                                     headers={"user-agent": BROWSER, "x-forwarded-for": f"10.9.0.{n}"})
        assert response.status_code == 202, response.text
    await embedded[1].runner.drain()
    await client.post(f"{API}/goals", json={"site_id": site, "name": "g", "event_type": "event", "match_event": "purchase"})
    funnel = (await client.post(f"{API}/funnels", json={"site_id": site, "name": "f", "steps": [
        {"name": "a", "type": "pageview", "match_value": "/"},
        {"name": "b", "type": "event", "match_value": "purchase"}]})).json()["data"]["id"]
    return {"site": site, "funnel": funnel, "key": ADMIN_KEY, "spec": (await client.get(f"{API}/openapi.json")).json()}


def _fill(text: str, world: dict) -> str:
    return text.replace("{site}", world["site"]).replace("{funnel}", world["funnel"]).replace("{key}", world["key"])


def _response_schema(spec: dict, method: str, url: str, status: int) -> dict | None:
    path = url.split("?")[0]
    for template, operations in spec["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path) and method.lower() in operations:
            content = operations[method.lower()]["responses"].get(str(status), {}).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            return {**schema, "components": spec["components"]} if schema else None
    return None


def assert_sound(response, world: dict, what) -> None:
    """The invariants every answer under /api/v1 keeps (module comment above)."""
    status, headers, method = response.status_code, response.headers, response.request.method
    assert status in _STATUSES, (what, status, response.text[:300])
    assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(headers), (what, status)
    body = response.content
    assert not _LEAKS.search(body.decode("utf-8", "replace")), (what, body[:300])
    if status >= 400:
        assert headers.get("cache-control") == "no-store", (what, status)
        assert "etag" not in headers, what
        if method != "HEAD":
            error = response.json()
            assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}, (what, error)
            assert all(isinstance(v, str) and v for v in error["error"].values()), (what, error)
    elif method in ("GET", "HEAD"):
        assert headers.get("cache-control") == CACHE_CONTROL, (what, status)
        assert re.fullmatch(r'"[0-9a-f]+"', headers.get("etag", "")), (what, headers.get("etag"))
    if status < 300 and method != "HEAD" and body:
        schema = _response_schema(world["spec"], method, str(response.request.url.raw_path, "latin-1"), status)
        assert schema is not None, (what, status)
        jsonschema.validate(response.json(), schema)


def _drawn(strategy, n: int) -> list:
    """n examples of a strategy, the same every run (the async tests send them one by one)."""
    drawn = []

    @settings(max_examples=n, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(example) -> None:
        drawn.append(example)

    draw()
    return drawn


async def test_hostile_query_strings_paths_and_headers_on_every_get(client, fuzz_world):
    for method, url, headers in _drawn(get_requests(), 100):
        url = _fill(url, fuzz_world)
        headers = {k: _fill(v.decode("latin-1"), fuzz_world).encode("latin-1") for k, v in headers.items()}
        what = (method, url[:200], {k: v[:80] for k, v in headers.items()})
        response = await client.request(method, url, headers=headers)
        assert_sound(response, fuzz_world, what)
        if response.status_code == 200:
            again = await client.request(method, url, headers={**headers, "if-none-match": response.headers["etag"].encode()})
            if again.status_code == 200 and "/trending/" in url and method == "GET":
                # Its windows end at now's second (meta): the next second is another body.
                assert again.json()["data"] == response.json()["data"], what
                continue
            assert again.status_code == 304 and again.content == b"", what
            assert again.headers["etag"] == response.headers["etag"], what
            assert_sound(again, fuzz_world, what)


# JSON bodies: valid ones with a part replaced by any JSON value (lone surrogates, NUL, huge numbers
# and strings, nesting), well-formed batches of odd sub-requests, and bodies that are no object.
# Text is any code point, lone surrogates included: JSON carries them ("\\ud800").
_TEXT = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from([
    "", "\x00", "\ud800", "\udfff x", "***", "/***", "/%_\\", "å" * 300, "x" * 3000, "Europe/Stockholm", "Mars/Olympus",
    "UTC", "utc", "/", "stats/overview", "batch", "../sites", "goals?site_id=x"])
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _TEXT,
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                     max_leaves=12)
_STEP = {"name": "a", "type": "pageview", "match_value": "/"}
_TEMPLATES = {
    "/sites": {"domain": "{domain}", "name": "n", "timezone": "Europe/Stockholm"},
    "/goals": {"site_id": "{site}", "name": "g", "event_type": "pageview", "match_path": "/x*"},
    "/funnels": {"site_id": "{site}", "name": "f", "steps": [_STEP, {**_STEP, "match_value": "/b"}]},
    "/batch": {"site_id": "{site}", "requests": [{"endpoint": "stats/overview", "params": {"period": "7d"}},
                                                 {"endpoint": "popular/products", "params": {"limit": 5}}]},
}


def _mutate(draw, value):
    """The value with one part of it (at any depth) replaced by any JSON, or left as it is."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)) | _TEXT)
        return {**value, key: _mutate(draw, value[key]) if key in value else draw(_JSON)}
    if isinstance(value, list) and value and draw(st.booleans()):
        kind = draw(st.sampled_from(["item", "drop", "repeat"]))
        if kind == "drop":
            return value[1:]
        if kind == "repeat":  # duplicates, too many
            return value * draw(st.sampled_from([2, 5, 11]))
        at = draw(st.integers(0, len(value) - 1))
        return [*value[:at], _mutate(draw, value[at]), *value[at + 1:]]
    return draw(_JSON) if draw(st.booleans()) else value


@st.composite
def post_requests(draw) -> tuple[str, bytes, dict[str, bytes]]:
    path = draw(st.sampled_from(sorted(_TEMPLATES)))
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "json", "bytes"]))
    if kind == "bytes":  # not JSON, not UTF-8, nested past the parser's limit
        body = draw(st.binary(max_size=200) | st.sampled_from([b'{"site_id": "\xff"}', b"[" * 5000, b"\xef\xbb\xbf{}",
                                                                "{}".encode("utf-16"), b"{bad", b"1e999999"]))
    elif path == "/batch" and draw(st.booleans()):  # well-formed, with any sub-requests
        endpoint = st.one_of(*[st.sampled_from(["stats/overview", "goals", "funnels/{funnel}/stats", "trending/products",
                                                "/stats/pages/", "funnels/f_0123456789abcdef/stats"])] * 3,
                             st.sampled_from(["batch", "sites", "../sites"]) | _TEXT)
        odd = st.sampled_from(["\ud800", "\x00", "", "x" * 3000, "7d", "site_id", "{site}"])
        params = st.dictionaries(st.sampled_from(sorted(_VALUES)) | odd | _TEXT, odd | st.none() | st.booleans()
                                 | st.integers() | st.floats(allow_nan=True) | _TEXT, min_size=1, max_size=4)
        requests = st.lists(st.fixed_dictionaries({"endpoint": endpoint, "params": params}), min_size=1, max_size=4)
        site = draw(st.sampled_from(["{site}"] * 3 + ["no-such-site"]))
        body = json.dumps({"site_id": site, "requests": draw(requests)}).encode()
    else:
        value = draw(_JSON) if kind == "json" else _mutate(draw, _TEMPLATES[path])
        body = json.dumps(value).encode()  # stdlib json: NaN, huge integers and lone surrogates, as clients send
    content_type = draw(st.sampled_from(["application/json"] * 4 + ["text/plain", "", "application/json; charset=latin-1"]))
    return path, body, ({"content-type": content_type.encode()} if content_type else {})


async def _state(client, world: dict) -> tuple:
    """What the bodies may change: the account's sites, the site's goals and funnels."""
    sites = (await client.get(f"{API}/sites")).json()["data"]
    goals = (await client.get(f"{API}/goals", params={"site_id": world["site"]})).json()["data"]
    funnels = (await client.get(f"{API}/funnels", params={"site_id": world["site"]})).json()["data"]
    return ({s["id"] for s in sites}, {g["id"] for g in goals}, {f["id"] for f in funnels})


@pytest.mark.slow
async def test_hostile_bodies_are_refused_whole_or_applied_whole(client, fuzz_world):
    drawn = _drawn(post_requests(), 80)
    before = await _state(client, fuzz_world)
    for n, (path, body, headers) in enumerate(drawn):
        body = (body.replace(b"{site}", fuzz_world["site"].encode()).replace(b"{funnel}", fuzz_world["funnel"].encode())
                .replace(b"{domain}", f"fz{n}-{uuid.uuid4().hex[:8]}.example".encode()))
        what = (path, body[:300], headers)
        response = await client.post(API + path, content=body, headers=headers)
        assert_sound(response, fuzz_world, what)
        after = await _state(client, fuzz_world)
        if response.status_code == 201:  # the object is there, as answered
            created = response.json()["data"]["id"]
            index = {"/sites": 0, "/goals": 1, "/funnels": 2}[path]
            assert after[index] - before[index] == {created}, what
            assert all(after[i] == before[i] for i in range(3) if i != index), what
        else:  # nothing changed
            assert after == before, what
        if path == "/batch" and response.status_code == 200:
            for result in response.json()["results"]:
                assert ("error" in result) != ("data" in result), (what, result)
                if "error" in result:
                    assert set(result["error"]) == {"code", "message"}, (what, result)
        before = after


# -- import bodies (pure: importer.parse) ----------------------------------------------------------

_IMPORT_NOW = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
_IMPORT_SITE = Site("imp-site", "default", "imp.example", "I", "UTC", datetime(2024, 1, 1, tzinfo=timezone.utc))
_IMPORT_LINE = {"name": "pageview", "url": "https://imp.example/a?b=1#c", "ip": "81.227.0.1", "user_agent": BROWSER,
                "timestamp": "2026-02-20T10:00:00Z", "referrer": "https://www.google.com/", "props": {"k": "v"},
                "product": {"id": "p1", "brand_slug": "b"}, "event_id": str(uuid.UUID(int=7))}
_IMPORT_ODD = {
    "timestamp": st.sampled_from(["2025-06-30T23:59:60Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                  "2026-02-20T10:00:00.123456789012345Z", "2026-02-20T10:00:00,5+05", "2026-02-20t10:00z",
                                  "2026-02-20 10:00:00+0530", "2026-02-20T10:00:00+24:00", "2099-01-01T00:00:00Z",
                                  "2001-01-01T00:00:00Z", "2026-02-20", "2026-W08-1T10:00", "20260220T100000Z"]),
    "ip": st.sampled_from(["fe80::1%eth0", "::ffff:81.227.0.1", "[::1]", "[2001:db8::1]:443", " 81.227.0.1 ",
                           "81.227.0.1:80", "01.2.3.4", "2001:DB8::1", "fe80::1%" + "z" * 3000, "::", "0.0.0.0"]),
    "user_agent": st.sampled_from(["", "x" * 2000, "x" * 2001, "\x00", "Googlebot/2.1", BROWSER + "\u202e"]),
    "url": st.sampled_from(["https://u:p@imp.example:8080/x", "https://xn--bcher-kva.example/", "https://bücher.example/%zz",
                            "http://[::1", "http://[fe80::1%25eth0]/", "https://imp.example:99999/", "https://exa mple/",
                            "ftp://imp.example/", "//imp.example/", "https://imp.example/" + "p" * 2100]),
    "referrer": st.sampled_from(["http://[::1", "https://imp.example:99999/", "//x", "javascript:x", "https://" + "a" * 3000,
                                 "https://a:b@google.com/", "https://IMP.EXAMPLE./", None]),
    "event_id": st.sampled_from([str(uuid.UUID(int=7)).upper(), "{" + str(uuid.UUID(int=7)) + "}",
                                 "urn:uuid:" + str(uuid.UUID(int=7)), uuid.UUID(int=7).hex, "not-a-uuid", "", None, 5]),
    "props": st.sampled_from([{"a": {"b": "c"}}, {"a": 1}, {"": "x"}, {"\x00": "\x00"}, [], None,
                              {f"k{i}": "v" for i in range(31)}, {"k" * 121: "v"}, {"k": "v" * 501}]),
    "product": st.sampled_from([{"slug": "x"}, {"id": " "}, {"id": "a", "slug": None}, "a", {"id": "a\x1fb"}, None]),
    "site_id": st.sampled_from(["imp-site", "other", "", None]),
    "domain": st.sampled_from(["www.IMP.example", "imp.example.", "other.example", "", None]),
}


@st.composite
def import_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "odd", "odd", "mutated", "drop", "bytes", "blank"]))
    line = dict(_IMPORT_LINE)
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b" \r", b"\xef\xbb\xbf"]))
    if kind == "bytes":
        return draw(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from([
            b"\xef\xbb\xbf" + orjson.dumps(line), orjson.dumps(line)[:-2] + b"\xff\"}", b"\x00", b"[" * 3000, b"null", b"[]",
            b'{"name": "\\ud800"}', orjson.dumps(line).replace(b'"v"', b'"\\udc00"'), b"1e999999", b"{bad"]))
    if kind == "odd":
        for name in draw(st.lists(st.sampled_from(sorted(_IMPORT_ODD)), min_size=1, max_size=3, unique=True)):
            line[name] = draw(_IMPORT_ODD[name])
    elif kind == "mutated":
        line = _mutate(draw, line)
    elif kind == "drop":
        line.pop(draw(st.sampled_from(sorted(line))))
    text = json.dumps(line)  # stdlib json: lone surrogates and NaN, as clients send
    return text.encode("utf-8", "surrogatepass")


def _verdicts(parsed) -> dict[int, tuple]:
    out = {line.number: ("accepted", line.event_id) for line in parsed.lines}
    out |= {r["line"]: ("rejected", r["field"], r["code"]) for r in parsed.rejected}
    out |= {d["line"]: ("dropped", d["reason"]) for d in parsed.dropped}
    return out


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(import_lines(), min_size=1, max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_import_lines_are_judged_alone_and_every_one_is_answered(lines, newline, last_newline):
    body = newline.join(lines) + (newline if last_newline else b"")
    key = bytes(range(16))
    try:
        parsed = importer.parse(body, _IMPORT_SITE, _IMPORT_NOW, key, _IMPORT_NOW - timedelta(days=400))
    except importer.BadBody as exc:
        assert exc.code == "empty_body" and not any(line.removeprefix(b"\xef\xbb\xbf").strip() for line in lines), body
        return
    numbered = {n: raw for n, raw in enumerate(lines, start=1) if raw.removeprefix(b"\xef\xbb\xbf").strip()}
    verdicts = _verdicts(parsed)
    # Every non-blank line has exactly one verdict, under its own number.
    assert len(parsed.lines) + len(parsed.rejected) + len(parsed.dropped) == len(numbered) == len(verdicts), body
    assert set(verdicts) == set(numbered), body
    for rejection in parsed.rejected:
        assert set(rejection) == {"line", "field", "code", "message"} and rejection["message"], rejection
        assert rejection["code"] in {"invalid_json", "missing_field", "invalid_field", "wrong_site"}, rejection
        assert rejection["field"] or rejection["code"] == "invalid_json", rejection
    # A line's verdict does not depend on the others, and a second parse gives the same ids.
    for n, raw in numbered.items():
        alone = _verdicts(importer.parse(raw.rstrip(b"\r") + b"\n", _IMPORT_SITE, _IMPORT_NOW, key,
                                               _IMPORT_NOW - timedelta(days=400)))
        assert alone == {1: verdicts[n]}, (raw, alone, verdicts[n])
    assert _verdicts(importer.parse(body, _IMPORT_SITE, _IMPORT_NOW, key, _IMPORT_NOW - timedelta(days=400))) == verdicts
    # What is accepted can be enriched and serialised as an event.
    for line in parsed.lines:
        Event.from_bytes(enrich(line.event, _IMPORT_SITE, useragents.parse(line.event.user_agent), "", 42,
                                line.event.timestamp, event_id=line.event_id).to_bytes())
