"""Who may do what (SPEC §7 keys): every operation of the API against six callers — a user-level
key, a site-level key on its site, a site-level key on another site, another account's key, a
revoked key and no key. Site operations answer 2xx/2xx/403/403/401/401; managing sites needs a
user-level key of the account."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest

API = "/api/v1"
FUNNEL_STEPS = [{"name": "a", "type": "pageview", "match_value": "/"},
                {"name": "b", "type": "event", "match_value": "purchase"}]


def _domain() -> str:
    return f"auth-{uuid.uuid4().hex[:10]}.example"


@pytest.fixture
def world(services):
    """Sites A and C of account `default`, B of account `other`, and the six callers."""
    sites = services.sites
    a, c = sites.create("default", _domain()), sites.create("default", _domain())
    sites.create("other", _domain())
    revoked = services.keys.create("default")
    assert services.keys.revoke(revoked)
    callers = {"user": services.keys.create("default"), "site key": services.keys.create("default", a.site_id),
               "other site's key": services.keys.create("default", c.site_id),
               "other account": services.keys.create("other"), "revoked": revoked, "none": None}
    return services, a, callers


def operations(services, a) -> list[tuple]:
    """(name, method, path factory, body factory, content type, scope, success status). Factories
    make a fresh resource each time, so every caller that may delete one has one to delete."""
    from streams.funnels import FunnelRegistry, Step
    from streams.goals import GoalRegistry

    goals, funnels = GoalRegistry(services.client), FunnelRegistry(services.client)
    new_goal = lambda: goals.create(a.site_id, "g", "event", "", "purchase").goal_id  # noqa: E731
    new_funnel = lambda: funnels.create(a.site_id, "f", [Step("a", "pageview", "/", "exact"),  # noqa: E731
                                                         Step("b", "event", "purchase", "exact")]).funnel_id
    funnel = new_funnel()
    line = {"name": "pageview", "url": f"https://{a.domain}/", "timestamp": (datetime.now(timezone.utc)
            - timedelta(hours=1)).isoformat(), "ip": "81.227.1.2",
            "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"}
    sid = a.site_id
    return [
        ("list sites", "GET", lambda: "/sites", None, None, "account", 200),
        ("create site", "POST", lambda: "/sites", lambda: {"domain": _domain()}, None, "account", 201),
        ("get site", "GET", lambda: f"/sites/{sid}", None, None, "account site", 200),
        ("change site", "PATCH", lambda: f"/sites/{sid}", lambda: {"name": "renamed"}, None, "account site", 200),
        ("delete site", "DELETE", lambda: f"/sites/{a.site_id}", None, None, "account site", 204),
        *[(f"stats/{s}", "GET", lambda s=s: f"/stats/{s}?site_id={sid}", None, None, "site", 200)
          for s in ("overview", "pages", "referrers", "countries")],
        *[(f"popular/{p}", "GET", lambda p=p: f"/popular/{p}?site_id={sid}", None, None, "site", 200)
          for p in ("products", "categories", "partners")],
        ("trending", "GET", lambda: f"/trending/products?site_id={sid}", None, None, "site", 200),
        ("list goals", "GET", lambda: f"/goals?site_id={sid}", None, None, "site", 200),
        ("create goal", "POST", lambda: "/goals",
         lambda: {"site_id": sid, "name": "g", "event_type": "event", "match_event": "purchase"}, None, "site", 201),
        ("delete goal", "DELETE", lambda: f"/goals/{new_goal()}", None, None, "site", 204),
        ("list funnels", "GET", lambda: f"/funnels?site_id={sid}", None, None, "site", 200),
        ("create funnel", "POST", lambda: "/funnels", lambda: {"site_id": sid, "name": "f", "steps": FUNNEL_STEPS},
         None, "site", 201),
        ("funnel stats", "GET", lambda: f"/funnels/{funnel}/stats", None, None, "site", 200),
        ("delete funnel", "DELETE", lambda: f"/funnels/{new_funnel()}", None, None, "site", 204),
        ("batch", "POST", lambda: "/batch", lambda: {"site_id": sid, "requests": [{"endpoint": "goals"}]}, None,
         "site", 200),
        ("import", "POST", lambda: f"/events/import?site_id={sid}", lambda: orjson.dumps(line) + b"\n",
         "application/x-ndjson", "site", 200),
    ]


def expected(caller: str, scope: str, success: int) -> set[int]:
    if caller in ("revoked", "none"):
        return {401}
    if scope == "site":
        return {success} if caller in ("user", "site key") else {403}
    if caller == "user":
        return {success}
    if caller == "other account" and scope == "account":  # its own account's sites
        return {success}
    return {403}


async def test_every_operation_answers_each_caller_as_it_may(client, embedded, world):
    services, a, callers = world
    embedded[0].state.rate_limiter.failed_auth_limit = 1000  # 44 refused keys from one address here
    # Deleting site A must come last: it would turn every later answer into 404.
    ops = sorted(operations(services, a), key=lambda op: op[0] == "delete site")
    seen = []
    for name, method, path, body, content_type, scope, success in ops:
        for caller in ("none", "revoked", "other account", "other site's key", "site key", "user"):
            key = callers[caller]
            headers = {"authorization": f"Bearer {key}" if key else ""}
            payload = body() if body else None
            if isinstance(payload, bytes):
                headers["content-type"] = content_type
                response = await client.request(method, API + path(), content=payload, headers=headers)
            else:
                response = await client.request(method, API + path(), json=payload, headers=headers)
            want = expected(caller, scope, success)
            assert response.status_code in want, (name, caller, response.status_code, response.text)
            if response.status_code >= 400:
                assert set(response.json()) == {"error"}
            seen.append(name)
    # Every operation of the OpenAPI document (the import, served beside it, included) is in the
    # matrix: a new operation fails this until it is added above.
    documented = [(m, p) for p, item in embedded[0].openapi()["paths"].items() for m in item if m != "head"]
    assert len(set(seen)) == len(documented) == 22


@pytest.mark.parametrize("body", [b"{bad", b'{"domain": "\xff.example"}', b"[" * 100_000],
                         ids=["not json", "not utf-8", "nested too deep"])
@pytest.mark.parametrize("path", ["/sites", "/goals", "/funnels", "/batch"])
async def test_the_key_is_judged_before_a_body_that_is_not_json(client, embedded, world, path, body):
    """FastAPI decodes a JSON body before any dependency runs; the key still comes first, and the
    body's fault is an invalid_parameter whatever made it unreadable."""
    services, a, callers = world
    embedded[0].state.rate_limiter.failed_auth_limit = 1000
    status = {}
    for caller in ("none", "revoked", "site key", "user"):
        key = callers[caller]
        response = await client.post(API + path, content=body, headers={
            "authorization": f"Bearer {key}" if key else "", "content-type": "application/json"})
        assert set(response.json()) == {"error"}
        status[caller] = response.status_code
        if response.status_code == 400:
            assert response.json()["error"]["code"] == "invalid_parameter", response.text
            assert response.json()["error"]["message"].startswith("body: not "), response.text
    assert status == {"none": 401, "revoked": 401, "site key": 403 if path == "/sites" else 400, "user": 400}


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
async def test_a_json_body_not_labelled_json_is_told_so(client, world, content_type):
    """`curl -d '{…}'` labels its body a form, which FastAPI does not read as JSON: the 400 says
    what to send, rather than that the body is not an object. The key is still judged first."""
    services, a, callers = world
    headers = {"content-type": content_type} if content_type else {}
    body = orjson.dumps({"domain": _domain()})
    response = await client.post(f"{API}/sites", content=body, headers={**headers, "authorization": ""})
    assert response.status_code == 401
    response = await client.post(f"{API}/sites", content=body,
                                 headers={**headers, "authorization": f"Bearer {callers['user']}"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameter"
    assert response.json()["error"]["message"].startswith("body: send JSON with Content-Type: application/json")


async def test_site_keys_cannot_manage_sites(client, world):
    services, a, callers = world
    site_key = {"authorization": f"Bearer {callers['site key']}"}
    assert (await client.get(f"{API}/sites", headers=site_key)).status_code == 403
    assert (await client.post(f"{API}/sites", json={"domain": _domain()}, headers=site_key)).status_code == 403
    assert (await client.delete(f"{API}/sites/{a.site_id}", headers=site_key)).status_code == 403
    assert services.sites.get(a.site_id) is not None


@pytest.mark.slow
def test_revoked_key_stops_working_for_the_cli_too(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    data = str(tmp_path / "data")
    created = subprocess.run([sys.executable, "-m", "besokskollen", "keys", "create", "--account", "x", "--data", data],
                             capture_output=True, text=True, cwd=ROOT)
    key = created.stdout.strip().splitlines()[-1]
    revoke = lambda: subprocess.run([sys.executable, "-m", "besokskollen", "keys", "revoke", key, "--data", data],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT)
    first = revoke()
    assert first.returncode == 0 and "revoked" in first.stdout, first.stderr
    second = revoke()
    assert second.returncode == 2 and "no such API key" in second.stderr


@pytest.mark.slow
def test_a_revoked_admin_key_is_not_created_again_at_the_next_start(tmp_path):
    """Rotation revokes BK_ADMIN_KEY first and changes the variable afterwards: a start in between
    (every command opens the services) must not bring the key back."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    admin = "bk_rotated_admin_key_0123456789"
    env = {**os.environ, "BK_ADMIN_KEY": admin}
    cli = lambda *args: subprocess.run([sys.executable, "-m", "besokskollen", *args, "--data", str(tmp_path / "d")],  # noqa: E731
                                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert cli("migrate").returncode == 0  # the first start creates it (`keys revoke` refuses a folder not there)
    assert cli("keys", "revoke", admin).returncode == 0
    again = cli("keys", "create", "--account", "x")
    assert again.returncode == 0 and "BK_ADMIN_KEY is revoked" in again.stderr
    assert cli("keys", "revoke", admin).returncode == 2  # still revoked: nothing to revoke


async def test_a_site_key_cannot_tell_which_other_sites_exist(client, world):
    """403 for an unknown site id as for another existing one: a 404 would let a site-level key
    probe which domains use the service (SPEC §7: any other site → 403)."""
    services, a, callers = world
    site_key = {"authorization": f"Bearer {callers['site key']}"}
    other = services.sites.create("other", _domain()).site_id
    for site_id in (other, "no-such-site.example"):
        stats = await client.get(f"{API}/stats/overview?site_id={site_id}", headers=site_key)
        imported = await client.post(f"{API}/events/import?site_id={site_id}", content=b"",
                                     headers={**site_key, "content-type": "application/x-ndjson"})
        batch = await client.post(f"{API}/batch", headers=site_key,
                                  json={"site_id": site_id, "requests": [{"endpoint": "stats/overview"}]})
        assert (stats.status_code, imported.status_code) == (403, 403), (stats.text, imported.text)
        assert stats.json()["error"]["code"] == imported.json()["error"]["code"] == "forbidden"
        assert batch.status_code == 403 and batch.json()["error"]["code"] == "forbidden", batch.text
    user_key = {"authorization": f"Bearer {callers['user']}"}
    missing = await client.get(f"{API}/stats/overview?site_id=no-such-site.example", headers=user_key)
    assert missing.status_code == 404  # a user-level key is told plainly


async def test_a_deleted_sites_keys_do_not_open_the_site_created_again(client, services):
    """Deleting a site revokes its site-level keys: the account may create a site for the domain
    again (the same id), and a key handed out for the old one must not open it."""
    domain = _domain()
    site_id = (await client.post(f"{API}/sites", json={"domain": domain})).json()["data"]["id"]
    site_key = {"authorization": f"Bearer {services.keys.create('default', site_id)}"}
    overview = f"{API}/stats/overview?site_id={site_id}"
    assert (await client.get(overview, headers=site_key)).status_code == 200
    assert (await client.delete(f"{API}/sites/{site_id}")).status_code == 204
    assert (await client.post(f"{API}/sites", json={"domain": domain})).status_code == 201
    refused = await client.get(overview, headers=site_key)
    assert refused.status_code == 401, refused.text
    assert (await client.get(overview)).status_code == 200  # the account's user-level key still reaches it


async def test_a_foreign_goal_or_funnel_id_is_refused_without_naming_its_site(client, world):
    """A key that asked for a goal or funnel by id was told the site it belongs to
    ("no access to site 'shop.example'"), which the id alone did not say."""
    from streams.funnels import FunnelRegistry, Step
    from streams.goals import GoalRegistry

    services, a, callers = world
    goal = GoalRegistry(services.client).create(a.site_id, "g", "event", "", "purchase").goal_id
    funnel = FunnelRegistry(services.client).create(a.site_id, "f", [Step("a", "pageview", "/", "exact"),
                                                                     Step("b", "event", "purchase", "exact")]).funnel_id
    for caller in ("other site's key", "other account"):
        headers = {"authorization": f"Bearer {callers[caller]}"}
        for method, path, asked in (("GET", f"/funnels/{funnel}/stats", f"funnel {funnel!r}"),
                                    ("DELETE", f"/funnels/{funnel}", f"funnel {funnel!r}"),
                                    ("DELETE", f"/goals/{goal}", f"goal {goal!r}")):
            refused = await client.request(method, API + path, headers=headers)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["message"] == f"this API key has no access to {asked}"
            assert a.site_id not in refused.text
