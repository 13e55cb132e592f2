"""HTTP details of every endpoint in the OpenAPI document, so that endpoints added later are held to
them too: cache headers, ETag and 304 on every GET, `Vary: Authorization`, HEAD as GET without a
body, 405 with `Allow`, and the document's security scheme and error responses."""

from __future__ import annotations

import re
import uuid

import pytest

from query_api.app import create_app
from tests.conftest import BROWSER
from tests.test_query_api import API, CACHE_CONTROL, assert_error, create_site


class _NoStorage:
    """A Context for an app that only renders its OpenAPI document."""

    def __getattr__(self, name: str) -> None:
        return None


SPEC = create_app(_NoStorage()).openapi()
GETS = sorted(path for path, operations in SPEC["paths"].items() if "get" in operations)
METHODS = ("get", "put", "post", "delete", "patch")


async def _funnel(client, site_id: str) -> str:
    body = {"site_id": site_id, "name": "Checkout",
            "steps": [{"name": "Start", "type": "pageview", "match_value": "/"},
                      {"name": "Köp", "type": "event", "match_value": "purchase"}]}
    response = await client.post(f"{API}/funnels", json=body)
    assert response.status_code == 201, response.text
    return response.json()["data"]["id"]


# Values for path and required query parameters, by name; an endpoint with a parameter not here
# fails the tests below until one is added.
FILLERS = {"site_id": lambda client, site: site["id"], "funnel_id": _funnel}


async def _url(client, path: str) -> str:
    site = await create_site(client)
    operation = SPEC["paths"][path]["get"]
    values: dict[str, str] = {}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path" or parameter.get("required"):
            name = parameter["name"]
            if name not in FILLERS:
                pytest.fail(f"tests/test_http.py has no value for parameter {name!r} of GET {path}")
            value = FILLERS[name](client, site) if name == "site_id" else await FILLERS[name](client, site["id"])
            values[name] = value
    query = "&".join(f"{p['name']}={values[p['name']]}" for p in operation.get("parameters", [])
                     if p["in"] == "query" and p["name"] in values)
    url = path.format(**{p["name"]: values[p["name"]] for p in operation.get("parameters", []) if p["in"] == "path"})
    return url + (f"?{query}" if query else "")


def _vary(response) -> set[str]:
    return {v.strip().lower() for v in response.headers.get("vary", "").split(",")}


def _without_count(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != "x-ratelimit-remaining"}


def test_the_document_lists_get_endpoints():
    assert {f"{API}/sites", f"{API}/sites/{{site_id}}", f"{API}/stats/overview", f"{API}/popular/products"} <= set(GETS)


@pytest.mark.parametrize("path", GETS)
async def test_get_has_cache_headers_etag_vary_and_304(client, path):
    url = await _url(client, path)
    # An answer whose window ends at now (trending, to the second) changes when a second passes
    # between the two requests; three pairs in a row cannot all straddle one.
    for _ in range(3):
        response = await client.get(url)
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == CACHE_CONTROL
        etag = response.headers["etag"]
        assert re.fullmatch(r'"[^"]+"', etag), etag  # strong
        assert "authorization" in _vary(response)
        assert response.headers["x-ratelimit-limit"]

        again = await client.get(url, headers={"if-none-match": etag})
        if again.status_code == 304:
            break
        assert again.status_code == 200 and again.headers["etag"] != etag, again.text
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["cache-control"] == CACHE_CONTROL
    assert again.headers["etag"] == etag
    assert "authorization" in _vary(again)
    assert int(again.headers["x-ratelimit-remaining"]) == int(response.headers["x-ratelimit-remaining"]) - 1


async def test_error_answers_are_not_to_be_cached(client):
    """A 404 for a site created a minute later, or a 401, must not be served from a shared cache."""
    for url, headers, status in ((f"{API}/stats/overview?site_id=no-such-site", {}, 404),
                                 (f"{API}/stats/overview?site_id=x&period=5d", {}, 400),
                                 (f"{API}/sites", {"authorization": ""}, 401)):
        response = await client.get(url, headers=headers)
        assert response.status_code == status, response.text
        assert response.headers["cache-control"] == "no-store"
        assert "etag" not in response.headers


@pytest.mark.parametrize("path", GETS)
async def test_head_is_get_without_the_body(client, path):
    url = await _url(client, path)
    for _ in range(3):
        got = await client.get(url)
        head = await client.head(url)
        not_modified = await client.head(url, headers={"if-none-match": got.headers["etag"]})
        # Trending's windows end at now's second (its meta): requests a second apart are two bodies.
        if "/trending/" not in path or got.headers["etag"] == head.headers["etag"] == not_modified.headers["etag"]:
            break
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert _without_count(head.headers) == _without_count(got.headers)
    assert int(head.headers["content-length"]) == len(got.content)
    assert int(head.headers["x-ratelimit-remaining"]) == int(got.headers["x-ratelimit-remaining"]) - 1
    assert not_modified.status_code == 304
    assert not_modified.headers["etag"] == got.headers["etag"]


async def test_head_of_an_error_is_the_error_without_body(client):
    url = f"{API}/sites/no-such-{uuid.uuid4().hex[:8]}"
    got, head = await client.get(url), await client.head(url)
    assert_error(got, 404)
    assert head.status_code == 404 and head.content == b""
    assert _without_count(head.headers) == _without_count(got.headers)


async def test_error_answers_to_get_vary_on_authorization(client):
    for response in (await client.get(f"{API}/sites/no-such-{uuid.uuid4().hex[:8]}"),
                     await client.get(f"{API}/sites", headers={"authorization": ""}),
                     await client.get(f"{API}/stats/overview?period=7d")):
        assert response.status_code in (400, 401, 404)
        assert "authorization" in _vary(response)


@pytest.mark.parametrize("path", sorted(SPEC["paths"]))
async def test_405_names_the_methods_of_the_path(client, path):
    declared = {m.upper() for m in SPEC["paths"][path] if m in METHODS}
    allowed = declared | ({"HEAD"} if "GET" in declared else set())
    url = re.sub(r"\{[^}]+\}", "x1", path)
    for method in sorted({m.upper() for m in METHODS} - declared):
        response = await client.request(method, url)
        error = assert_error(response, 405)
        assert error["code"] == "method_not_allowed"
        assert {m.strip() for m in response.headers["allow"].split(",")} == allowed, (method, path)


async def test_405_of_the_import_names_post(client):
    response = await client.get(f"{API}/events/import")
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert response.headers["x-ratelimit-limit"]


@pytest.mark.parametrize("path", [*GETS, f"{API}/events/import"])
async def test_no_other_origin_may_call_the_api(client, path):
    """Keys are for servers (README): no CORS under /api/v1, preflight or not."""
    url = await _url(client, path) if path in GETS else path
    origin = {"origin": "https://elsewhere.example"}
    preflight = await client.options(url, headers={**origin, "access-control-request-method": "GET",
                                                   "access-control-request-headers": "authorization"})
    answer = await client.get(url, headers=origin)
    for response in (preflight, answer):
        assert not [h for h in response.headers if h.lower().startswith("access-control-")], (url, response.headers)


async def test_openapi_has_bearer_security_and_every_error_response(client):
    spec = (await client.get(f"{API}/openapi.json")).json()
    # `up` serves the import beside the query API, and its document describes it; `api` does neither.
    assert {path: ops for path, ops in spec["paths"].items() if path != f"{API}/events/import"} == SPEC["paths"]
    assert f"{API}/events/import" not in SPEC["paths"]
    imported = spec["paths"][f"{API}/events/import"]["post"]
    assert set(imported["requestBody"]["content"]) == {"application/x-ndjson"}
    assert {"413", "415", "503"} <= set(imported["responses"])
    assert imported["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["data"]["required"] == [
        "accepted", "rejected", "dropped", "stored"]
    schemes = spec["components"]["securitySchemes"]
    assert len(schemes) == 1
    (name, scheme), = schemes.items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    error_schema = {"$ref": "#/components/schemas/ErrorResponse"}
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]

    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            assert operation["security"] == [{name: []}], label
            responses = operation["responses"]
            assert "422" not in responses, label  # validation errors are 400s
            for status in ("400", "401", "403", "404", "413", "429", "500"):
                assert responses[status]["content"]["application/json"]["schema"] == error_schema, (label, status)
                assert responses[status]["description"], (label, status)
            assert any(s.startswith("2") for s in responses), label
            for status, response in responses.items():
                assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(response["headers"])
            assert "Retry-After" in responses["429"]["headers"], label
            if method == "get":
                assert {"ETag", "Cache-Control", "Vary"} <= set(responses["304"]["headers"]), label
                assert {"ETag", "Cache-Control", "Vary"} <= set(responses["200"]["headers"]), label
    assert "409" in spec["paths"][f"{API}/sites"]["post"]["responses"]
    assert spec["components"]["headers"]["X-RateLimit-Reset"]["schema"]["type"] == "integer"


async def test_if_none_match_lists_weak_tags_star_and_repeated_lines(client):
    """If-None-Match is a list (RFC 9110 §13.1.2, weak comparison), and a list may come as several
    header lines (§5.3): a CDN revalidating with the tags it holds gets 304 whichever line has ours."""
    url = f"{API}/sites/{(await create_site(client))['id']}"
    etag = (await client.get(url)).headers["etag"]
    for sent in ([("if-none-match", f'"other", W/{etag}')], [("if-none-match", "*")],
                 [("if-none-match", '"other"'), ("if-none-match", etag)]):
        response = await client.get(url, headers=[*client.headers.items(), *sent])
        assert response.status_code == 304, sent
        assert response.content == b"" and response.headers["etag"] == etag
    assert (await client.get(url, headers={"if-none-match": '"other", W/"else"'})).status_code == 200


async def test_another_keys_revalidation_gets_its_own_refusal_not_304(client, services):
    """A shared cache holding one key's answer (Cache-Control: public, Vary: Authorization) that
    revalidates it for another key must not get a 304 confirming it: the key is checked first."""
    site, other = await create_site(client), await create_site(client)
    url = f"{API}/stats/overview?site_id={site['id']}&period=7d"
    etag = (await client.get(url)).headers["etag"]
    outsider = services.keys.create("default", other["id"])
    for headers in ({"authorization": f"Bearer {outsider}"}, {"authorization": ""}):
        response = await client.get(url, headers={**headers, "if-none-match": etag})
        assert response.status_code in (401, 403, 404), response.status_code
        assert response.headers["cache-control"] == "no-store" and "etag" not in response.headers


@pytest.fixture(params=["up", "ingest"])
async def tracking_client(request, embedded, services):
    """The tracking paths as `up` serves them, and as `ingest` does (the same hand-off)."""
    import httpx

    from besokskollen.app import ingest_server_app

    app = embedded[0] if request.param == "up" else ingest_server_app(services, embedded[1])
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_routing_errors_of_the_tracking_paths_are_json_in_both_servers(tracking_client):
    """`ingest` answers its paths' routing errors as `up` does (README: a trailing slash is another
    path, 404; errors are JSON with no-store; 405 names the path's methods), and /api/event's 405
    is the same for every method it does not take, with CORS."""
    for method in ("TRACE", "PROPFIND", "GET", "DELETE"):
        response = await tracking_client.request(method, "/api/event")
        assert assert_error(response, 405)["code"] == "method_not_allowed", method
        assert response.headers["allow"] == "POST, OPTIONS" and response.headers["access-control-allow-origin"] == "*"
    for body in (b"{", b'{"site_id": "no-such-site", "name": "pageview", "url": "https://x.example/"}'):
        response = await tracking_client.post("/api/event", content=body, headers={"user-agent": BROWSER})
        assert response.status_code in (400, 404) and response.headers["cache-control"] == "no-store", response.text
    for path in ("/api/event/", f"{API}/events/import/?site_id=x"):
        response = await tracking_client.post(path, content=b"{}")
        assert assert_error(response, 404)["code"] == "not_found", path
    response = await tracking_client.post("/js/script.js")
    assert assert_error(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "GET, HEAD"
    response = await tracking_client.get(f"{API}/events/import")
    assert assert_error(response, 405)["code"] == "method_not_allowed" and response.headers["allow"] == "POST"
