"""Bulk import (SPEC §5.3): `POST /api/v1/events/import` and `besokskollen import`. Lines are
accepted whole, rejected by line number and field, or dropped as bots; a re-import stores nothing
twice and gives the same visitor ids; a session open at midnight keeps yesterday's id while it
continues, across requests too."""

from __future__ import annotations

import asyncio
import bz2
import dataclasses
import gzip
import ipaddress
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from ingest import import_route
from ingest import clients
from ingest import importer
from ingest.salts import Salts
from ingest.visitors import hash_visitor
from streams import migrations
from streams.events import stored_event_ids
from streams.sites import Site
from tests.conftest import ADMIN_KEY, BROWSER, free_port, process, stable_group_size, up_server, wait_until
from tests.traffic import AGENTS

NDJSON = "application/x-ndjson"
# Historic (the import makes this test's salts), but within the raw-event retention (400 days).
DAY = (datetime.now(timezone.utc) - timedelta(days=60)).replace(hour=0, minute=0, second=0, microsecond=0)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
HEADLESS = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0 Safari/537.36"
CLI = [sys.executable, "-m", "besokskollen"]


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def history(domain: str, n: int, seed: int, people: int = 300, days: int = 3) -> list[dict]:
    """n events of `people` people over `days` UTC days, in no particular order: sessions cross
    midnights."""
    rng = random.Random(seed)
    persons = [(f"81.{rng.randint(1, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}", rng.choice(AGENTS))
               for _ in range(people)]
    lines = []
    for i in range(n):
        ip, agent = rng.choice(persons)
        line = {"name": "pageview", "url": f"https://{domain}/p/{i}", "ip": ip, "user_agent": agent,
                "timestamp": iso(DAY + timedelta(milliseconds=rng.randrange(days * 86_400_000)))}
        if i % 10 == 3:
            line |= {"name": "click", "product": {"id": f"prod-{i % 7}", "brand_slug": "apple"}}
        lines.append(line)
    return lines


def ndjson(lines: list[dict | bytes]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines)


async def post_import(client, site_id: str | None, body: bytes, **headers):
    params = {"site_id": site_id} if site_id else {}
    return await client.post("/api/v1/events/import", params=params, content=body,
                             headers={"content-type": NDJSON, **headers})


def stored(services, site_id: str) -> dict[str, int]:
    """event id → visitor id of the site's stored events (deduplicated)."""
    rows = services.client.query(
        "SELECT toString(event_id), visitor_id FROM events FINAL WHERE site_id = {s:String}",
        parameters={"s": site_id}).result_rows
    return dict(rows)


def counts(services, site_id: str) -> tuple[int, int]:
    return services.client.query(
        "SELECT count(), uniqExact(event_id) FROM events FINAL WHERE site_id = {s:String}",
        parameters={"s": site_id}).result_rows[0]


@pytest.fixture
def site(services):
    return services.sites.create("default", f"import-{uuid.uuid4().hex[:10]}.example")


# -- parsing (pure) -------------------------------------------------------------------------------

def test_event_ids_are_a_hash_of_the_canonical_content():
    now = DAY + timedelta(days=30)
    site = Site("a-example", "default", "a.example", "A", "Europe/Stockholm", DAY)
    base = {"name": "click", "url": "https://a.example/p", "ip": "81.227.0.1", "user_agent": BROWSER,
            "timestamp": "2025-06-02T12:00:00.123Z", "product": {"id": "skal"}, "props": {"a": "1", "b": "2"}}
    same = [base,
            {**base, "timestamp": "2025-06-02T14:00:00.123456+02:00"},  # the same millisecond
            {**base, "timestamp": "2025-06-02T12:00:00.123"},  # naive means UTC
            {**base, "ip": "::ffff:81.227.0.1"},
            {**base, "product": {"id": "skal", "slug": "skal"}},  # the slug defaults to the id
            {**base, "props": {"b": "2", "a": "1"}, "site_id": site.site_id, "unknown": "ignored"}]
    different = [{**base, "timestamp": "2025-06-02T12:00:00.124Z"}, {**base, "ip": "81.227.0.2"},
                 {**base, "url": "https://a.example/q"}, {**base, "user_agent": BROWSER + " x"},
                 {**base, "referrer": "https://www.google.com/"}, {**base, "props": {"a": "1"}}]
    key = bytes(range(16))
    parsed = importer.parse(ndjson(same + different), site, now, key)
    assert not parsed.rejected and [line.number for line in parsed.lines] == list(range(1, 13))
    ids = [line.event_id for line in parsed.lines]
    assert len(set(ids[:6])) == 1 and len(set(ids)) == 7
    assert uuid.UUID(ids[0]).version == 5
    # The same content imported to another site is another event.
    other = importer.parse(ndjson([base]), dataclasses.replace(site, site_id="elsewhere"), now, key)
    assert other.lines[0].event_id != ids[0]
    # The content holds the IP: without the installation's key nobody can recompute the id (and
    # so find the IP by trying every address).
    assert importer.parse(ndjson([base]), site, now, bytes(16)).lines[0].event_id != ids[0]


def test_an_imported_address_with_a_port_is_the_address():
    """As an X-Forwarded-For hop's: a log's `81.2.69.160:5000` was refused as no address."""
    now = DAY + timedelta(days=30)
    site = Site("a-example", "default", "a.example", "A", "Europe/Stockholm", DAY)
    base = {"name": "pageview", "url": "https://a.example/", "user_agent": BROWSER, "timestamp": "2025-06-02T12:00:00Z"}
    lines = [{**base, "ip": ip} for ip in ("81.2.69.160", "81.2.69.160:5000", "2a00:1450:4001::1",
                                           "[2A00:1450:4001:0::1]:443", "81.2.69.160:x")]
    parsed = importer.parse(ndjson(lines), site, now, bytes(range(16)))
    assert [(r["line"], r["field"]) for r in parsed.rejected] == [(5, "ip")]
    assert [line.event.ip for line in parsed.lines] == ["81.2.69.160", "81.2.69.160", "2a00:1450:4001::1",
                                                        "2a00:1450:4001::1"]
    assert len({line.event_id for line in parsed.lines}) == 2


def test_an_ipv6_zone_is_not_part_of_the_address():
    # `fe80::1%eth0` names an interface on the exporting host, not another client: the zone
    # (of any length) must neither make another visitor or event id nor hide the country.
    now = DAY + timedelta(days=30)
    site = Site("a-example", "default", "a.example", "A", "Europe/Stockholm", DAY)
    base = {"name": "pageview", "url": "https://a.example/", "ip": "2a00:1450:4001::1", "user_agent": BROWSER,
            "timestamp": "2025-06-02T12:00:00Z"}
    lines = [base, {**base, "ip": "2a00:1450:4001::1%eth0"}, {**base, "ip": "2a00:1450:4001::1%" + "x" * 5000}]
    parsed = importer.parse(ndjson(lines), site, now, bytes(range(16)))
    assert not parsed.rejected
    assert {line.event.ip for line in parsed.lines} == {"2a00:1450:4001::1"}
    assert len({line.event_id for line in parsed.lines}) == 1
    assert clients.country(parsed.lines[1].event.ip, parsed.lines[1].event.ip, {}, ()) != ""
    assert clients.client_ip("127.0.0.1", {"x-forwarded-for": "[2a00:1450:4001::1%eth0]:443"},
                             (ipaddress.ip_network("127.0.0.1/32"),)) == "2a00:1450:4001::1"


def test_byte_order_marks_and_blank_lines_at_the_end_are_not_events():
    now = DAY + timedelta(days=30)
    site = Site("a-example", "default", "a.example", "A", "Europe/Stockholm", DAY)
    line = ndjson([{"name": "pageview", "url": "https://a.example/", "ip": "81.227.0.1", "user_agent": BROWSER,
                    "timestamp": "2025-06-02T12:00:00Z"}])
    bom = b"\xef\xbb\xbf"
    # Two exports joined with `cat`: the second one's BOM starts line 2, which is the same line.
    parsed = importer.parse(bom + line + bom + line, site, now, bytes(16))
    assert (len(parsed.lines), parsed.rejected) == (2, [])
    for body in (bom, bom + b"\r\n", b"\n \r\n"):  # no events: as an empty body, not 200 with none
        with pytest.raises(importer.BadBody, match="no events"):
            importer.parse(body, site, now, bytes(16))
    # The limit counts lines that may hold events: a blank line after the last one is not the 100,001st.
    parsed = importer.parse(line * importer.MAX_LINES + b"\r\n\n", site, now, bytes(16))
    assert len(parsed.lines) == importer.MAX_LINES
    with pytest.raises(importer.BadBody, match="at most"):
        importer.parse(line * importer.MAX_LINES + b"\n" + line, site, now, bytes(16))


def test_the_content_id_key_is_one_per_installation_and_outlives_every_purge(services):
    key = Salts(services.client).id_key()
    assert len(key) == 16 and Salts(services.client).id_key() == key  # every process agrees
    # The daily purge, run as if the key were centuries old, keeps it. (Of days before 2000 only:
    # the other tests' salts, cached by the processes under test, stay as they are.)
    Salts(services.client, historic_days=1)._purge(datetime(2100, 1, 1, tzinfo=timezone.utc), before=date(2000, 1, 1))
    assert Salts(services.client).id_key() == key


# -- the endpoint ---------------------------------------------------------------------------------

async def test_bad_lines_are_rejected_by_line_number_and_field_the_rest_is_stored(client, services, site):
    lines: list[dict | bytes] = history(site.domain, 10_000, seed=1)
    good = lines[0]
    future = iso(datetime.now(timezone.utc) + timedelta(days=1))
    own_id = str(uuid.uuid4())
    bad = {  # line number → (line, field, code)
        17: ({**good, "timestamp": "10/06/2025 14:00"}, "timestamp", "invalid_field"),
        1000: ({k: v for k, v in good.items() if k != "url"}, "url", "missing_field"),
        2345: ({**good, "ip": "999.0.0.1"}, "ip", "invalid_field"),
        3001: ({**good, "name": "click"}, "product", "invalid_field"),
        4500: ({**good, "site_id": "some-other-site"}, "site_id", "wrong_site"),
        5555: ({**good, "event_id": "not-a-uuid"}, "event_id", "invalid_field"),
        6789: (b'{"name": "pageview", "url": ', "", "invalid_json"),
        8000: ({**good, "timestamp": future}, "timestamp", "invalid_field"),
        9001: ({**good, "timestamp": "1999-12-31T23:59:59Z"}, "timestamp", "invalid_field"),
        10_000: ({**good, "props": {"plan": 3}}, "props.plan", "invalid_field"),
    }
    for number, (line, _, _) in bad.items():
        lines[number - 1] = line
    blank, bots = [50, 7000], {60: GOOGLEBOT, 6000: HEADLESS}
    for number in blank:
        lines[number - 1] = b"   "
    for number, agent in bots.items():
        lines[number - 1] = {**lines[number - 1], "user_agent": agent}
    lines[69] = {**lines[69], "domain": "www." + site.domain}  # naming the site by domain is fine
    lines[79] = {**lines[79], "event_id": own_id, "site_id": site.site_id}

    response = await post_import(client, site.site_id, ndjson(lines))
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [(r["line"], r["field"], r["code"]) for r in data["rejected"]] == [
        (number, field, code) for number, (_, field, code) in sorted(bad.items())]
    assert all(r["field"] in r["message"] for r in data["rejected"])
    assert "future" in data["rejected"][7]["message"] and "2000" in data["rejected"][8]["message"]
    assert data["dropped"] == [{"line": number, "reason": "bot"} for number in sorted(bots)]
    assert data["accepted"] == 10_000 - len(bad) - len(blank) - len(bots)
    assert data["stored"] is True

    # Stored before the reply, each event once; an event's own id is kept.
    assert counts(services, site.site_id) == (data["accepted"], data["accepted"])
    ids = stored(services, site.site_id)
    assert own_id in ids
    (own,) = importer.to_events(importer.parse(ndjson([lines[79]]), site, datetime.now(timezone.utc),
                                               services.visitors.id_key()).lines, site, services.visitors)
    probe = [own, own.model_copy(update={"event_id": str(uuid.uuid4())}),
             own.model_copy(update={"pathname": "/corrected"})]  # the same id and time: not written yet
    assert stored_event_ids(services.client, probe[:2]) == {own_id}
    assert stored_event_ids(services.client, probe[2:]) == set()


async def test_reimport_stores_nothing_twice_and_gives_the_same_visitor_ids(client, services, site):
    lines = history(site.domain, 3000, seed=2, people=60)
    body = ndjson(lines)
    first = await post_import(client, site.site_id, body)
    assert first.status_code == 200, first.text
    assert first.json()["data"]["accepted"] == len(lines)
    before = stored(services, site.site_id)
    assert len(before) == len(lines)

    # Every id is the person's id under the salt of the event's own UTC day, or — for a session
    # open at midnight — of the day before; and such carries happen in this traffic.
    salts = Salts(services.client)
    by_content = {}
    for line in lines:
        at = datetime.fromisoformat(line["timestamp"])
        own, previous = (hash_visitor(salts.for_day(day), site.site_id, line["ip"], line["user_agent"])
                         for day in (at.date(), at.date() - timedelta(days=1)))
        by_content[line["url"]] = (own, previous)
    url_of = dict(services.client.query(
        "SELECT toString(event_id), concat('https://', {d:String}, pathname) FROM events FINAL WHERE site_id = {s:String}",
        parameters={"s": site.site_id, "d": site.domain}).result_rows)
    kinds = [("own" if visitor == by_content[url_of[eid]][0] else
              "carried" if visitor == by_content[url_of[eid]][1] else "wrong") for eid, visitor in before.items()]
    assert "wrong" not in kinds and "carried" in kinds

    # Again, now in unordered chunks as a client might send them: nothing new, the same ids.
    for i in range(0, len(lines), 700):
        again = await post_import(client, site.site_id, ndjson(lines[i:i + 700]))
        assert again.status_code == 200 and again.json()["data"]["accepted"] == len(lines[i:i + 700])
    assert counts(services, site.site_id) == (len(lines), len(lines))
    assert stored(services, site.site_id) == before
    # No event was ever stored under a second visitor id, not even in a row not yet merged away.
    assert services.client.query(
        "SELECT uniqExact(event_id, visitor_id) FROM events WHERE site_id = {s:String}",
        parameters={"s": site.site_id}).result_rows[0][0] == len(lines)


async def test_the_wait_for_stored_ends_for_a_line_the_stream_core_keeps_out(client, services, site):
    """An id its visitor already has at another time, more than the retry window away, is kept
    out by the stream core (the first copy stays). The distributed import waits for its events
    to be stored: it waited for that line until its 120-s limit, then answered "stored": false,
    while the embedded one answered at once."""
    from ingest.handoff import KafkaHandoff
    from streams.events import RETRY_WINDOW

    first = {"name": "pageview", "url": f"https://{site.domain}/a", "ip": "81.2.69.160", "user_agent": BROWSER,
             "timestamp": iso(DAY + timedelta(hours=1)), "event_id": str(uuid.uuid4())}
    again = {**first, "url": f"https://{site.domain}/b", "timestamp": iso(DAY + timedelta(hours=1) + 2 * RETRY_WINDOW)}
    for line in (first, again):
        response = await post_import(client, site.site_id, ndjson([line]))
        assert response.status_code == 200 and response.json()["data"]["stored"] is True, response.text
    assert services.client.query(
        "SELECT pathname FROM events FINAL WHERE site_id = {s:String}", parameters={"s": site.site_id}
    ).result_rows == [("/a",)]

    parsed = importer.parse(ndjson([again]), site, datetime.now(timezone.utc), services.visitors.id_key())
    events = importer.to_events(parsed.lines, site, services.visitors)
    handoff = KafkaHandoff("127.0.0.1:1", "unused", 1, 1, services.client, spool=None, ack_timeout_s=0.25,
                           store_timeout_s=3)
    assert await handoff.flush(events)  # no producer: only the wait for "stored"


async def test_the_wait_for_stored_ends_once_the_imports_site_is_deleted(services):
    """The events of a site deleted during its import are dropped by the workers, never stored:
    the distributed import waited out its 120 s for them, holding up every other import of the
    process (a chaos run). It answers "stored": false once the site is gone."""
    from ingest.handoff import KafkaHandoff
    from streams.sites import SiteRegistry

    registry = SiteRegistry(services.client)
    doomed = registry.create("acc", f"doomed-{uuid.uuid4().hex[:8]}.example")
    line = {"name": "pageview", "url": f"https://{doomed.domain}/a", "ip": "81.2.69.160", "user_agent": BROWSER,
            "timestamp": iso(DAY + timedelta(hours=1))}
    parsed = importer.parse(ndjson([line]), doomed, datetime.now(timezone.utc), services.visitors.id_key())
    events = importer.to_events(parsed.lines, doomed, services.visitors)
    handoff = KafkaHandoff("127.0.0.1:1", "unused", 1, 1, services.client, spool=None, ack_timeout_s=0.25,
                           store_timeout_s=120)
    assert registry.is_current(doomed)
    registry.delete(doomed)
    async with asyncio.timeout(30):
        assert not await handoff.flush(events, lambda: not registry.is_current(doomed))


async def test_one_id_on_two_lines_of_a_request_is_one_event_however_the_request_is_cut(client, services, site):
    """The stream core keeps one copy of an id within a batch, but a request goes to it 5,000
    events at a time: a copy 10 hours later from another address (another visitor id, outside
    the retry window's look-up) fell in another part and was stored as a second event."""
    event_id = str(uuid.uuid4())
    first = {"name": "pageview", "url": f"https://{site.domain}/a", "ip": "81.2.69.160", "user_agent": BROWSER,
             "timestamp": iso(DAY + timedelta(hours=1)), "event_id": event_id}
    later = {**first, "url": f"https://{site.domain}/b", "ip": "81.2.69.161",
             "timestamp": iso(DAY + timedelta(hours=11))}
    between = [{"name": "pageview", "url": f"https://{site.domain}/p/{i}", "ip": f"10.1.{i // 250}.{i % 250}",
                "user_agent": BROWSER, "timestamp": iso(DAY + timedelta(hours=2, seconds=i))} for i in range(5_000)]
    response = await post_import(client, site.site_id, ndjson([later, *between, first]))
    assert response.status_code == 200 and response.json()["data"]["accepted"] == 5_002, response.text
    assert counts(services, site.site_id) == (5_001, 5_001)
    assert services.client.query(
        "SELECT pathname FROM events FINAL WHERE site_id = {s:String} AND event_id = {e:UUID}",
        parameters={"s": site.site_id, "e": event_id}).result_rows == [("/a",)]


async def test_the_wait_for_stored_ends_only_once_a_corrected_line_is_written(client, services, site):
    """A line imported again with its id and time and corrected fields replaces the stored event.
    The distributed import waits until the workers have written its events: an id stored for the
    site counted as written, so it answered "stored": true while the correction was still on its
    way, and the numbers read next were the old ones (the embedded import writes it first)."""
    from ingest.handoff import KafkaHandoff
    from streams.core import StreamCore

    line = {"name": "pageview", "url": f"https://{site.domain}/old", "ip": "81.2.69.161", "user_agent": BROWSER,
            "timestamp": iso(DAY + timedelta(hours=3)), "event_id": str(uuid.uuid4())}
    response = await post_import(client, site.site_id, ndjson([line]))
    assert response.status_code == 200, response.text
    corrected = {**line, "url": f"https://{site.domain}/new"}
    parsed = importer.parse(ndjson([corrected]), site, datetime.now(timezone.utc), services.visitors.id_key())
    events = importer.to_events(parsed.lines, site, services.visitors)
    handoff = KafkaHandoff("127.0.0.1:1", "unused", 1, 1, services.client, spool=None, ack_timeout_s=0.25,
                           store_timeout_s=1)
    assert not await handoff.flush(events)  # not written yet: the stored event is the old one
    StreamCore(services.client, 1800).process(events)  # what a worker does
    assert await handoff.flush(events)
    assert services.client.query(
        "SELECT pathname FROM events FINAL WHERE site_id = {s:String}", parameters={"s": site.site_id}
    ).result_rows == [("/new",)]


async def test_a_session_open_at_midnight_carries_across_requests(client, services):
    salts = Salts(services.client)
    midnight = DAY + timedelta(days=10)
    person, quiet = ("81.227.40.1", BROWSER), ("81.227.40.2", BROWSER)

    def line(who, minutes: int) -> dict:
        return {"name": "pageview", "url": f"https://x.example/{minutes}", "ip": who[0], "user_agent": who[1],
                "timestamp": iso(midnight + timedelta(minutes=minutes))}

    requests = [[line(person, -10), line(quiet, -40)],
                [line(person, 10), line(person, 35), line(person, 80), line(quiet, 5)]]
    for split in (True, False):  # the same events in two requests, or in one
        site = services.sites.create("default", f"carry-{uuid.uuid4().hex[:10]}.example")
        for body in (requests if split else [requests[0] + requests[1]]):
            assert (await post_import(client, site.site_id, ndjson(body))).status_code == 200

        def ids(who) -> tuple[int, int]:
            return tuple(hash_visitor(salts.for_day(day), site.site_id, *who)
                         for day in ((midnight - timedelta(days=1)).date(), midnight.date()))

        visitors = dict(services.client.query(
            "SELECT pathname, visitor_id FROM events FINAL WHERE site_id = {s:String}",
            parameters={"s": site.site_id}).result_rows)
        (yesterday, today), (quiet_yesterday, quiet_today) = ids(person), ids(quiet)
        # Carried while the session goes on (gaps of 20 and 25 minutes), today's after 45 quiet minutes.
        assert [visitors[f"/{m}"] for m in (-10, 10, 35, 80)] == [yesterday, yesterday, yesterday, today]
        # A session that had ended before midnight carries nothing.
        assert [visitors["/-40"], visitors["/5"]] == [quiet_yesterday, quiet_today]


async def test_a_live_event_continuing_an_imported_session_from_before_midnight_carries_its_id(
        client, embedded, services, site):
    """From the first minute of a day on, a process decides carries from the
    sessions open at midnight it has loaded. An import may store one after that: the person's next
    live event continues it under yesterday's id (it got today's: one visitor and session more)."""
    now = datetime.now(timezone.utc)
    midnight = datetime.combine(now.date(), datetime.min.time(), timezone.utc)
    person = ("81.227.41.1", BROWSER)

    async def live(ip: str, path: str) -> None:
        r = await client.post("/api/event", json={"site_id": site.site_id, "name": "pageview",
                                                   "url": f"https://{site.domain}{path}"},
                              headers={"user-agent": BROWSER, "x-forwarded-for": ip})
        assert r.status_code == 202, r.text
        await embedded[1].runner.drain()

    await live("81.227.41.2", "/other")  # someone else: the process has the day's open sessions now
    # The person every 5 minutes from 23:59 until a minute ago (at 00:05 UTC, just the first).
    times = [midnight - timedelta(minutes=1) + timedelta(minutes=5 * n)
             for n in range(int((now - midnight).total_seconds() // 300) + 1)]
    times = [at for at in times if at < now - timedelta(minutes=1)] or [midnight - timedelta(minutes=1)]
    body = ndjson([{"name": "pageview", "url": f"https://{site.domain}/{n}", "ip": person[0],
                    "user_agent": person[1], "timestamp": iso(at)} for n, at in enumerate(times)])
    assert (await post_import(client, site.site_id, body)).status_code == 200
    await live(person[0], "/live")

    yesterday = hash_visitor(Salts(services.client).for_day(midnight.date() - timedelta(days=1)), site.site_id, *person)
    ids = dict(services.client.query(
        "SELECT pathname, visitor_id FROM events FINAL WHERE site_id = {s:String} AND pathname != '/other'",
        parameters={"s": site.site_id}).result_rows)
    # Every imported event and the live one: yesterday's id.
    assert len(ids) == len(times) + 1 and set(ids.values()) == {yesterday}, ids


@pytest.mark.parametrize("headers, site_id, status, code", [
    ({"authorization": ""}, "own", 401, "unauthorized"),
    ({"authorization": "Bearer bk_not_a_key"}, "own", 401, "unauthorized"),
    ({}, "no-such-site", 404, "site_not_found"),
    ({}, None, 400, "missing_parameter"),
    ({"content-type": "multipart/form-data; boundary=x"}, "own", 415, "unsupported_media_type"),
    ({"content-encoding": "gzip"}, "own", 415, "unsupported_media_type"),
])
async def test_request_errors(client, site, headers, site_id, status, code):
    response = await post_import(client, site.site_id if site_id == "own" else site_id,
                                 ndjson(history(site.domain, 3, seed=3)), **headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.headers["cache-control"] == "no-store"


async def test_a_body_is_read_as_ndjson_whatever_its_label(client, services, site):
    """HTTP clients label a body as they like (`application/json`, or not at all): the events are
    read all the same, and stored once (their content ids)."""
    lines = history(site.domain, 40, seed=11)
    url = "/api/v1/events/import"
    answers = [
        await client.post(url, params={"site_id": site.site_id}, content=ndjson(lines)),  # no Content-Type
        await client.post(url, params={"site_id": site.site_id}, content=ndjson(lines),
                          headers={"content-type": "application/json"}),
        await client.post(url, params={"site_id": site.site_id}, content=ndjson(lines),
                          headers={"content-type": "text/plain; charset=utf-8"}),
    ]
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert [r.json()["data"]["accepted"] for r in answers] == [40, 40, 40]
    assert counts(services, site.site_id) == (40, 40)


@pytest.mark.parametrize("timestamp, ok", [
    ("2026-11-20T10:00:00Z", True), ("2026-11-20t10:00:00z", True), ("2026-11-20 10:00", True),
    ("2026-11-20T10:00:00.5+05:30", True),
    ("2026-11-20", False), ("2026-W47-5T10:00", False), ("20261120T100000Z", False), ("2026-11-20T10Z", False),
])
def test_timestamps_are_iso_8601_date_times(timestamp, ok):
    from ingest.event import ImportedEvent

    line = {"site_id": "s", "name": "pageview", "url": "https://a.example/", "ip": "81.2.69.160",
            "user_agent": BROWSER, "timestamp": timestamp}
    context = {"now": datetime(2026, 11, 21, tzinfo=timezone.utc)}
    if ok:
        ImportedEvent.model_validate(line, context=context)
    else:
        with pytest.raises(ValueError, match="ISO 8601 date-time"):
            ImportedEvent.model_validate(line, context=context)


async def test_an_import_line_takes_a_user_agent_as_long_as_a_live_request_does(client, services, site):
    agent = BROWSER + " " + "x" * 2200  # over the 2,000 characters import lines were limited to
    at = datetime.now(timezone.utc) - timedelta(hours=1)
    line = {"name": "pageview", "url": f"https://{site.domain}/long-agent", "ip": "81.227.42.1", "user_agent": agent,
            "timestamp": iso(at)}
    response = await post_import(client, site.site_id, ndjson([line]))
    assert response.json()["data"]["accepted"] == 1, response.text
    assert services.client.query("SELECT visitor_id FROM events FINAL WHERE site_id = {s:String}",
                                 parameters={"s": site.site_id}).result_rows == [(hash_visitor(
        Salts(services.client).for_day(at.date()), site.site_id,
        "81.227.42.1", agent),)]


async def test_a_byte_order_mark_before_the_first_line_is_skipped(client, site):
    response = await post_import(client, site.site_id, b"\xef\xbb\xbf" + ndjson(history(site.domain, 2, seed=8)))
    assert response.status_code == 200, response.text
    assert (response.json()["data"]["accepted"], response.json()["data"]["rejected"]) == (2, [])


def test_the_cli_sends_no_chunk_without_events(tmp_path, monkeypatch):
    """A chunk of blank lines and BOMs (joined exports) would be 400 empty_body, ending the import."""
    from besokskollen import importing

    monkeypatch.setattr(importing, "CHUNK_LINES", 2)
    line = orjson.dumps({"n": 1}) + b"\n"
    path = tmp_path / "events.ndjson"
    path.write_bytes(line * 2 + b"\xef\xbb\xbf\r\n\n" + line)
    bodies = []

    def post(url, *, content, **kwargs):
        bodies.append(content)
        return httpx.Response(200, json={"data": {"accepted": content.count(b"{"), "rejected": [], "dropped": [],
                                                  "stored": True}})

    monkeypatch.setattr(importing.httpx, "post", post)
    totals = importing.run(path, importing.remote("http://x", "bk_k", "s"))
    assert (totals.accepted, len(bodies)) == (3, 2)


def test_a_server_gone_mid_import_is_said_with_where_the_import_stopped(tmp_path, monkeypatch):
    """The CLI said only "could not reach …: Server disconnected", not how far it had come."""
    from besokskollen import importing

    monkeypatch.setattr(importing, "CHUNK_LINES", 2)
    path = tmp_path / "events.ndjson"
    path.write_bytes((orjson.dumps({"n": 1}) + b"\n") * 5)
    answers = [{"accepted": 2, "rejected": [], "dropped": [], "stored": True}]

    def send(body: bytes) -> dict:
        if not answers:
            raise importing.ImportFailed("could not reach http://x/api/v1/events/import: Server disconnected")
        return answers.pop()

    with pytest.raises(importing.ImportFailed) as failed:
        importing.run(path, send)
    assert str(failed.value) == ("could not reach http://x/api/v1/events/import: Server disconnected; stopped at line 3:"
                                 " the lines before it are stored (2 events), lines 3–4 may be; importing the whole"
                                 " file again is safe")
    answers[:] = []  # the first chunk fails: nothing was stored, nothing more to say
    with pytest.raises(importing.ImportFailed) as failed:
        importing.run(path, send)
    assert str(failed.value) == "could not reach http://x/api/v1/events/import: Server disconnected"


def test_a_damaged_gzip_file_sends_nothing(tmp_path, monkeypatch):
    """gzip's checksum comes at the end of the file: a file damaged in its middle unpacked to
    damaged lines (found by an audit: 38 mangled events stored, under ids a clean import would
    not replace) before the check failed. The file is now read through before any line is sent."""
    from besokskollen import importing

    monkeypatch.setattr(importing, "CHUNK_LINES", 2)
    lines = b"".join(orjson.dumps({"n": n, "ua": "Mozilla/5.0 " * 5}) + b"\n" for n in range(4000))
    packed = gzip.compress(lines)
    sent = []

    def send(body: bytes) -> dict:
        sent.append(body)
        return {"accepted": body.count(b"\n"), "rejected": [], "dropped": [], "stored": True}

    middle = len(packed) * 6 // 10
    damaged = {"cut.gz": packed[:-100], "crc.gz": packed[:middle] + bytes(len(packed) - middle - 8) + packed[-8:],
               "deflate.gz": packed[:10] + b"\xff" * 40, "tail.gz": packed + b"garbage"}
    for name, body in damaged.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(importing.ImportFailed) as failed:
            importing.run(tmp_path / name, send)
        assert str(failed.value).startswith(f"{name} is not a whole gzip file ("), str(failed.value)
        assert str(failed.value).endswith("); nothing was imported")
    assert sent == []
    (tmp_path / "whole.gz").write_bytes(packed)
    assert importing.run(tmp_path / "whole.gz", send).accepted == 4000 and b"".join(sent) == lines
    # Another compression is said, not sent as lines of garbage.
    (tmp_path / "events.ndjson.bz2").write_bytes(bz2.compress(lines))
    with pytest.raises(importing.ImportFailed, match=r"events.ndjson.bz2 is bzip2-compressed; the import reads plain"):
        importing.run(tmp_path / "events.ndjson.bz2", send)


def test_standard_input_is_told_gzip_however_its_bytes_arrive(monkeypatch):
    """A pipe may hand over its first byte alone: gzip was told by the first two bytes one read
    returned, and a slow pipe's gzip was read as lines of garbage."""
    from besokskollen import importing

    lines = b"".join(orjson.dumps({"n": n}) + b"\n" for n in range(3000))
    packed = gzip.compress(lines)
    read, write = os.pipe()

    def trickle() -> None:
        with os.fdopen(write, "wb", buffering=0) as pipe:
            pipe.write(packed[:1])
            time.sleep(0.3)
            pipe.write(packed[1:])

    writer = threading.Thread(target=trickle)
    writer.start()
    bodies = []
    with os.fdopen(read, "r") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        totals = importing.run("-", lambda body: bodies.append(body) or {"accepted": body.count(b"\n"), "rejected": [],
                                                                        "dropped": [], "stored": True})
    writer.join()
    assert totals.accepted == 3000 and b"".join(bodies) == lines
    monkeypatch.setattr(sys, "stdin", None)  # started with standard input closed (`<&-`)
    with pytest.raises(importing.ImportFailed, match="there is no standard input"):
        importing.run("-", bodies.append)


def test_the_cli_waits_out_the_rate_limit_and_halves_what_the_server_finds_too_large(tmp_path, monkeypatch):
    """Against answers as a server gives them: 429 with Retry-After, then 413 for any body of more
    than two lines; one line alone too large is rejected and the import goes on. Halves are cut
    at newlines only."""
    from besokskollen import importing

    lines = [orjson.dumps({"n": i}) + b"\n" for i in range(5)]
    lines[3] = orjson.dumps({"n": 3, "pad": "x" * 100}) + b"\n"
    lines[1] = b'{"n": 1,\r"m": 1}\n'  # a CR is JSON whitespace: one line, as the server counts them
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
    answers, waited, bodies = [httpx.Response(429, headers={"retry-after": "7"}, json={})], [], []

    def post(url, *, content, **kwargs):
        if answers:
            return answers.pop(0)
        if content.count(b"\n") > 2 or b"pad" in content:
            return httpx.Response(413, json={"error": {"code": "body_too_large", "message": "too large"}})
        bodies.append(content)
        return httpx.Response(200, json={"data": {"accepted": content.count(b"\n"), "rejected": [], "dropped": [],
                                                  "stored": True}})

    monkeypatch.setattr(importing.httpx, "post", post)
    totals = importing.run(path, importing.remote("http://x", "bk_k", "s", sleep=waited.append))
    assert waited == [7.0]
    assert b"".join(bodies) == b"".join(lines[:3] + lines[4:])  # in order, the BOM gone
    assert totals.accepted == 4
    assert [(r["line"], r["code"]) for r in totals.rejected] == [(4, "line_too_large")]


async def test_a_line_naming_another_or_no_hostname_is_rejected(client, site):
    lines = history(site.domain, 3, seed=6)
    lines[1] = {**lines[1], "domain": "' OR 1=1 --.se"}
    lines[2] = {**lines[2], "domain": "other.example"}
    response = await post_import(client, site.site_id, ndjson(lines))
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["accepted"] == 1
    assert [(r["line"], r["field"], r["code"]) for r in data["rejected"]] == [(2, "domain", "wrong_site"),
                                                                              (3, "domain", "wrong_site")]


async def test_keys_reach_only_their_sites(client, services, site):
    other = services.sites.create("default", f"other-{uuid.uuid4().hex[:10]}.example")
    foreign = services.sites.create("another-account", f"foreign-{uuid.uuid4().hex[:10]}.example")
    site_key = services.keys.create("default", other.site_id)
    body = ndjson(history(site.domain, 3, seed=4))
    as_site_key = {"authorization": f"Bearer {site_key}"}
    assert (await post_import(client, site.site_id, body, **as_site_key)).status_code == 403
    assert (await post_import(client, other.site_id, body, **as_site_key)).status_code == 200
    assert (await post_import(client, foreign.site_id, body)).status_code == 403  # the admin key's account is "default"


async def test_body_limits(client, services, embedded, site):
    assert (await post_import(client, site.site_id, b"")).json()["error"]["code"] == "empty_body"
    too_many = await post_import(client, site.site_id, b"{}\n" * 100_001)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_lines"

    # A small cap, to show a large body is refused as declared, and as streamed without reading it all.
    settings = services.settings.model_copy(update={"max_import_bytes": 10_000})
    small = Starlette(routes=import_route.routes(settings, services.sites, services.visitors, embedded[1],
                                                 services.keys, services.raw_events))
    transport = httpx.ASGITransport(app=small, client=("127.0.0.1", 5000))
    headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": NDJSON}
    url = f"/api/v1/events/import?site_id={site.site_id}"
    body = ndjson(history(site.domain, 200, seed=5))
    sent = 0

    async def stream():
        nonlocal sent
        for i in range(0, len(body), 1000):
            sent += 1
            yield body[i:i + 1000]

    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as c:
        declared = await c.post(url, content=body)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
        streamed = await c.post(url, content=stream())
        assert streamed.status_code == 413
        assert sent < len(body) // 1000
        assert (await c.post(url, content=body[:5000].rsplit(b"\n", 1)[0])).status_code == 200


# -- the command line -----------------------------------------------------------------------------

def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "import", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_an_import_into_clickhouse_itself_stops_when_its_site_is_deleted(clickhouse_http):
    """An import that opens ClickHouse itself (no server between) read its site once: deleted
    through an `api` and created again by another account, the new site got the rest of the file
    (~3,300 pageviews in an audit). Each part is now judged in front of its writes, as `up` and
    the workers judge theirs."""
    from besokskollen.config import Settings
    from besokskollen.importing import ImportFailed, local
    from streams import storage
    from streams.sites import SiteRegistry

    client = storage.connect(clickhouse_http)
    migrations.migrate(client)
    domain = f"gone-{uuid.uuid4().hex[:8]}.example"
    site = SiteRegistry(client).create("old-owner", domain)
    send = local(Settings(clickhouse_url=clickhouse_http, kafka_bootstrap=None), site.site_id)
    lines = sorted(history(domain, 40, seed=12), key=lambda line: line["timestamp"])
    assert send(ndjson(lines[:20]))["accepted"] == 20

    other = SiteRegistry(client)  # another process: an `api`
    other.delete(other.get(site.site_id))
    again = other.create("new-owner", domain)
    with pytest.raises(ImportFailed, match="was deleted during the import"):
        send(ndjson(lines[20:]))
    assert client.query("SELECT count() FROM events WHERE site_id = {s:String}",
                        parameters={"s": again.site_id}).result_rows[0][0] == 0


_COUNT_IN_FOLDER = """
import sys, clickhouse_connect
client = clickhouse_connect.get_client(interface="chdb", path=sys.argv[1])
site = {"s": sys.argv[2]}
final = client.query("SELECT count(), uniqExact(event_id) FROM events FINAL WHERE site_id = {s:String}", parameters=site)
every = client.query("SELECT uniqExact(event_id, visitor_id) FROM events WHERE site_id = {s:String}", parameters=site)
print([*final.result_rows[0], every.result_rows[0][0]])
"""


def stored_in_folder(data: Path, site_id: str) -> list:
    """[events, unique ids, unique (id, visitor id) among all rows, merged or not] of a site in a
    data folder no server holds (one data path per process: this one has its own)."""
    script = _COUNT_IN_FOLDER
    done = subprocess.run([sys.executable, "-c", script, str(data), site_id], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


@pytest.mark.slow
def test_cli_imports_through_a_server_and_into_a_folder(tmp_path):
    data = tmp_path / "data"
    # In time order, as exports are: chunk after chunk, each stored before the next, gives the
    # visitor ids one request would (an unordered file could not carry sessions across chunks).
    lines = sorted(history("cli.example", 12_000, seed=6), key=lambda line: line["timestamp"])
    lines[11_001] = {**lines[11_001], "ip": "not-an-ip"}  # line 11,002: in the third chunk of 5,000
    clean, broken = tmp_path / "clean.ndjson", tmp_path / "broken.ndjson"
    clean.write_bytes(ndjson(lines[:11_000]))
    broken.write_bytes(ndjson(lines))

    with up_server(data, tmp_path / "up.log", env={"BK_ADMIN_KEY": ADMIN_KEY}) as base:
        created = httpx.post(f"{base}/api/v1/sites", json={"domain": "cli.example"},
                             headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert created.status_code == 201, created.text
        site_id = created.json()["data"]["id"]

        ok = cli(str(clean), "--site", site_id, "--url", base, "--key", ADMIN_KEY)
        assert ok.returncode == 0, ok.stderr
        assert "accepted 11000, rejected 0, dropped 0" in ok.stdout

        # The key may come from BK_ADMIN_KEY; the rejected line is numbered across the whole file.
        rejected = cli(str(broken), "--site", site_id, "--url", base, BK_ADMIN_KEY=ADMIN_KEY)
        assert rejected.returncode == 1, rejected.stderr
        assert "accepted 11999, rejected 1, dropped 0" in rejected.stdout
        assert "line 11002: ip: must be an IPv4 or IPv6 address (invalid_field)" in rejected.stdout

        # Usage and connection errors.
        assert cli(str(clean), "--site", site_id, "--url", base, "--key", "bk_wrong").returncode == 2
        assert cli(str(clean), "--site", "no-such-site", "--url", base, "--key", ADMIN_KEY).returncode == 2
        assert cli(str(clean), "--site", site_id, "--url", f"http://127.0.0.1:{free_port()}",
                   "--key", ADMIN_KEY).returncode == 2
        assert cli(str(clean), "--site", site_id, "--url", base, BK_ADMIN_KEY="").returncode == 2
        held = cli(str(clean), "--site", site_id, "--data", str(data))
        assert held.returncode == 2 and "--url" in held.stderr  # the server holds the folder
        # Three copies of one line are three accepted lines (one event), here as without a server.
        copies = tmp_path / "copies.ndjson"
        copies.write_bytes(ndjson([lines[0]] * 3))
        assert "accepted 3, rejected 0, dropped 0" in cli(str(copies), "--site", site_id, "--url", base,
                                                           "--key", ADMIN_KEY).stdout

    assert stored_in_folder(data, site_id) == [12_000 - 1] * 3

    # Without a server: straight into the folder. The same file again adds nothing and changes
    # no visitor id; new lines are added.
    extra = tmp_path / "extra.ndjson"
    extra.write_bytes(ndjson(sorted(history("cli.example", 500, seed=7), key=lambda line: line["timestamp"])))
    again = cli(str(broken), "--site", site_id, "--data", str(data))
    assert again.returncode == 1 and "line 11002: ip" in again.stdout, again.stderr
    assert "accepted 3, rejected 0, dropped 0" in cli(str(copies), "--site", site_id, "--data", str(data)).stdout
    assert cli(str(extra), "--site", site_id, "--data", str(data)).returncode == 0
    assert stored_in_folder(data, site_id) == [12_000 - 1 + 500] * 3
    assert cli(str(tmp_path / "missing.ndjson"), "--site", site_id, "--data", str(data)).returncode == 2

    # Exports come gzipped (told by their first bytes, not the name) and through pipes: `-` is
    # standard input. A gzip file cut short is refused before any line is sent: one line, exit 2.
    more = [sorted(history("cli.example", 200, seed=seed), key=lambda line: line["timestamp"]) for seed in (8, 9)]
    packed = tmp_path / "more.ndjson.gz"
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbf" + ndjson(more[0])))
    done = cli(str(packed), "--site", site_id, "--data", str(data))
    assert done.returncode == 0 and "accepted 200, rejected 0, dropped 0" in done.stdout, done.stderr
    piped = subprocess.run([*CLI, "import", "-", "--site", site_id, "--data", str(data)], input=gzip.compress(ndjson(more[1])),
                           capture_output=True, timeout=600)
    assert piped.returncode == 0 and b"accepted 200, rejected 0, dropped 0" in piped.stdout, piped.stderr
    assert stored_in_folder(data, site_id) == [12_000 - 1 + 500 + 400] * 3
    cut = tmp_path / "cut.ndjson.gz"
    cut.write_bytes(gzip.compress(ndjson(more[0]))[:-100])
    broken_gzip = cli(str(cut), "--site", site_id, "--data", str(data))
    assert broken_gzip.returncode == 2 and ("cut.ndjson.gz is not a whole gzip file (Compressed file ended before the"
                                            " end-of-stream marker was reached); nothing was imported") in \
        broken_gzip.stderr, broken_gzip.stderr


@pytest.mark.slow
def test_cli_imports_through_kafka_and_waits_until_stored(kafka, clickhouse_http, tmp_path):
    """Distributed: the `ingest` process serves the import, hands the events to Kafka and answers
    once the workers have stored them, so the next chunk's visitor ids see them."""
    import clickhouse_connect

    env = {"BK_KAFKA_BOOTSTRAP": kafka, "BK_CLICKHOUSE_URL": clickhouse_http, "BK_ADMIN_KEY": ADMIN_KEY,
           "BK_KAFKA_TOPIC": f"events-{tmp_path.name}", "BK_SPOOL_DIR": str(tmp_path / "spool")}
    ingest_port, api_port = free_port(), free_port()
    ingest, api = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{api_port}"
    lines = sorted(history("kafka-import.example", 12_000, seed=8, people=200), key=lambda line: line["timestamp"])
    file = tmp_path / "events.ndjson"
    file.write_bytes(ndjson(lines))
    with (
        process([*CLI, "api", "--port", str(api_port)], tmp_path / "api.log", env,
                ready_url=f"{api}/api/v1/openapi.json"),
        process([*CLI, "ingest", "--port", str(ingest_port)], tmp_path / "ingest.log", env,
                ready_url=f"{ingest}/api/event"),
        process([*CLI, "worker", "--port", str(free_port())], tmp_path / "worker.log", env),
    ):
        wait_until(lambda: stable_group_size(kafka, "besokskollen") == 1, 90, "the worker in its consumer group",
                   interval=0.5)
        created = httpx.post(f"{api}/api/v1/sites", json={"domain": "kafka-import.example"},
                             headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert created.status_code == 201, created.text
        site_id = created.json()["data"]["id"]

        client = clickhouse_connect.get_client(dsn=clickhouse_http, autogenerate_session_id=False)
        query = ("SELECT count(), uniqExact(event_id), (SELECT uniqExact(event_id, visitor_id) FROM events"
                 " WHERE site_id = {s:String}) FROM events FINAL WHERE site_id = {s:String}")
        for _ in range(2):  # the second time changes nothing
            done = cli(str(file), "--site", site_id, "--url", ingest, **env)
            assert done.returncode == 0, done.stderr
            assert "accepted 12000, rejected 0" in done.stdout and "not yet stored" not in done.stderr
            # Stored when the command returned, each event once, under one visitor id.
            assert list(client.query(query, parameters={"s": site_id}).result_rows[0]) == [12_000] * 3


async def test_events_the_raw_event_ttl_would_drop_are_refused(client, services, site):
    """Raw events are kept BK_RAW_EVENTS_TTL_DAYS (a TTL on `events`); an import older than that
    (less a visitor's three days) is refused line by line, newer lines are taken."""
    engine = services.client.query("SELECT engine_full FROM system.tables WHERE name = 'events'"
                                   " AND database = currentDatabase()").result_rows[0][0]
    assert f"TTL toDateTime(least(toUInt32(toDateTime(timestamp)) + {services.settings.raw_events_ttl_days * 86400}," in engine
    lines = history(site.domain, 2, seed=9)
    lines[0] = {**lines[0], "timestamp": iso(datetime.now(timezone.utc) - timedelta(days=398))}
    data = (await post_import(client, site.site_id, ndjson(lines))).json()["data"]
    assert data["accepted"] == 1
    assert [(r["line"], r["field"]) for r in data["rejected"]] == [(1, "timestamp")]
    assert "BK_RAW_EVENTS_TTL_DAYS" in data["rejected"][0]["message"]
    # The cut-off is a moment, and said as one (an audit read a date as the whole day's).
    assert re.search(r"before \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", data["rejected"][0]["message"]), data["rejected"]


def test_raw_events_are_complete_since_the_latest_edge_any_ttl_had():
    """A TTL of 7 days deletes raw events; raised to 400 again, it brings none back."""
    from streams.retention import complete_since

    day = timedelta(days=1)
    now = datetime(2026, 12, 4, 12, tzinfo=timezone.utc)
    ever = datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert complete_since([(ever, 400)], now, 400) == now - 400 * day
    lowered_then_raised = [(ever, 400), (now - 30 * day, 7), (now - 10 * day, 400)]
    assert complete_since(lowered_then_raised, now, 400) == now - 17 * day  # 7 days before it was raised
    assert complete_since(lowered_then_raised, now, 7) == now - 7 * day  # this process's own is later
    assert complete_since([(ever, 400), (now - day, 7)], now, 400) == now - 7 * day  # lowered: today's edge


_TTL_LOWERED_THEN_RAISED = """
import sys
from datetime import datetime, timedelta, timezone
from ingest import importer
from streams import migrations, replay, storage
from streams.retention import RawEvents
from streams.sites import Site

client = storage.connect(sys.argv[1])
replay.upgrade(client, 1800, 400)
migrations.apply_retention(client, 7)  # a deployment tried a week's retention, and ClickHouse deleted
migrations.apply_retention(client, 400)
migrations.apply_retention(client, 400)  # unchanged: not recorded again
now = datetime.now(timezone.utc)
since = RawEvents(client, 400).complete_since(now)
site = Site("ttl-example", "default", "ttl.example", "ttl.example", "UTC", datetime(2026, 1, 1))
lines = b"".join(b'{"name": "pageview", "url": "https://ttl.example/", "ip": "81.227.0.1", "user_agent": "Mozilla/5.0'
                 b' (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",'
                 b' "timestamp": "' + (now - timedelta(days=d)).isoformat().encode() + b'"}\\n' for d in (5, 3))
parsed = importer.parse(lines, site, now, bytes(16), since)
print((now - since).total_seconds() / 86400, len(migrations.retention_history(client)),
      [r["line"] for r in parsed.rejected], [line.number for line in parsed.lines])
"""


def test_an_import_into_days_a_shorter_ttl_may_have_deleted_is_refused(tmp_path):
    """An audit lowered the TTL to 7 days, let ClickHouse delete, raised it to 400 and imported
    into the deleted days: accepted, and each such day's pageviews went down while visitors,
    sessions and bounce rate went up (the stream core placed the events against a visitor
    history that was gone). The import now refuses what it refused under the shorter TTL."""
    done = subprocess.run([sys.executable, "-c", _TTL_LOWERED_THEN_RAISED, f"chdb://{tmp_path / 'ch'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    days, changes, rejected, accepted = done.stdout.split(" ", 3)
    assert 7.0 <= float(days) < 7.01 and int(changes) == 3  # (since ever, 400), (now, 7), (now, 400)
    assert (rejected, accepted.strip()) == ("[1]", "[2]")  # 5 days old: inside the three days the core reads


def test_a_long_raw_event_ttl_keeps_events_instead_of_wrapping_past_2106(services):
    """A TTL is a DateTime, which ends in February 2106: an expiry past it (a retention of 100
    years, meant as "for ever") wrapped around to a moment long past, and every raw event newer
    than about 2006 was dropped at the next merge, funnels and goal backfills with them. The
    expiry stops at DateTime's last second instead."""
    client = services.client
    try:
        migrations.apply_retention(client, 36_500)
        engine = client.query("SELECT engine_full FROM system.tables WHERE name = 'events'"
                              " AND database = currentDatabase()").result_rows[0][0]
        ttl = engine.split(" TTL ", 1)[1].split(" SETTINGS ", 1)[0]
        expiries = client.query(
            f"SELECT toUInt32({ttl}) FROM (SELECT toDateTime64(t, 3, 'UTC') AS timestamp"
            " FROM (SELECT arrayJoin(['2002-01-01 00:00:00', '2026-11-30 12:00:00', '2105-12-31 23:59:59']) AS t))"
        ).result_rows
        assert [row[0] for row in expiries] == [int(datetime(2101, 12, 8, tzinfo=timezone.utc).timestamp()),
                                                2**32 - 1, 2**32 - 1]
    finally:
        migrations.apply_retention(client, services.settings.raw_events_ttl_days)


async def test_a_hostile_body_is_answered_line_by_line_and_stored_once(client, services, site):
    """Odd lines beside good ones: every non-blank line is answered once, what is accepted is
    stored, and the same body again stores nothing new."""
    at = iso(DAY + timedelta(hours=10))
    good = {"name": "pageview", "url": f"https://{site.domain}/", "ip": "81.227.0.1", "user_agent": BROWSER, "timestamp": at}
    client_id = uuid.uuid4()
    lines = [
        orjson.dumps(good),
        orjson.dumps({**good, "event_id": str(client_id).upper()}),
        orjson.dumps({**good, "event_id": client_id.urn, "url": f"https://{site.domain}/x"}),  # the same event id
        orjson.dumps({**good, "event_id": "{" + str(uuid.uuid4()) + "}"}),
        b"\xef\xbb\xbf" + orjson.dumps({**good, "ip": "fe80::1%eth0", "url": f"https://u:p@{site.domain}:8443/%zz"}),
        b"",
        orjson.dumps({**good, "ip": "[::1]:port"}),
        orjson.dumps({**good, "timestamp": "2025-06-30T23:59:60Z"}),
        orjson.dumps({**good, "timestamp": iso(DAY + timedelta(hours=11)).replace("Z", "123456789+00:00")}),
        orjson.dumps(good)[:-2] + b"\xff\"}",
        b"\x00",
        orjson.dumps({**good, "user_agent": GOOGLEBOT}),
        orjson.dumps({**good, "user_agent": ""}),
        orjson.dumps({**good, "props": {"a": {"b": "c"}}}),
        orjson.dumps({**good, "name": "click", "product": {"slug": "s"}}),
        orjson.dumps({**good, "referrer": "http://[::1", "props": {"\x00": "\u202e"}}),
        b"   ",
        orjson.dumps({**good, "domain": "other.example", "site_id": None}),
    ]
    body = b"\r\n".join(lines)  # CRLF, no newline after the last line
    non_blank = sum(1 for line in lines if line.strip())
    answers = []
    for _ in range(2):
        response = await post_import(client, site.site_id, body)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["accepted"] + len(data["rejected"]) + len(data["dropped"]) == non_blank, data
        answers.append(data)
        stored_count, unique = counts(services, site.site_id)
        assert stored_count == unique == data["accepted"] - 1, data  # two lines carry one event id
    assert answers[0] == answers[1]
    assert {r["line"]: r["field"] for r in answers[0]["rejected"]} == {
        7: "ip", 8: "timestamp", 10: "", 11: "", 14: "props.a", 15: "product.id", 18: "domain"}
    assert [d["line"] for d in answers[0]["dropped"]] == [12]  # Googlebot; line 13's blank user agent is no bot
