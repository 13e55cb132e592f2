"""`up --demo`: a demo affiliate site with 90 days of realistic traffic, put through the same
enrichment and stream core as live events (only the clock is the events' own)."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

from rich.progress import Progress

from besokskollen.app import DEFAULT_ACCOUNT, Services
from ingest import useragents
from ingest.enrich import enrich
from ingest.event import Event, IncomingEvent
from streams.core import StreamCore
from streams.events import stored_at
from streams.buckets import BUCKET, bucket_of
from streams.rollups import events_before
from streams.sites import Site

DEMO_DOMAIN = "mobildelar.se"
DAYS = 90
BATCH = 5000

# (product id, category, brand, partner, popularity weight)
_PRODUCTS = [
    ("iphone-15-skal", "mobilskal", "apple", "teknikdelar", 9), ("iphone-16-skal", "mobilskal", "apple", "teknikdelar", 7),
    ("samsung-s24-glas", "skarmskydd", "samsung", "kjell", 8), ("samsung-s24-skal", "mobilskal", "samsung", "kjell", 5),
    ("airpods-pro-2", "horlurar", "apple", "elgiganten", 6), ("pixel-9-glas", "skarmskydd", "google", "teknikdelar", 3),
    ("usb-c-laddare-30w", "laddare", "anker", "kjell", 6), ("magsafe-laddare", "laddare", "apple", "elgiganten", 4),
    ("powerbank-10000", "laddare", "anker", "teknikdelar", 4), ("iphone-15-glas", "skarmskydd", "apple", "kjell", 7),
    ("galaxy-buds-3", "horlurar", "samsung", "elgiganten", 3), ("lightning-kabel-2m", "kablar", "apple", "clas-ohlson", 2),
    ("usb-c-kabel-1m", "kablar", "anker", "clas-ohlson", 3), ("ipad-air-fodral", "surfplattor", "apple", "teknikdelar", 2),
    ("oneplus-12-skal", "mobilskal", "oneplus", "kjell", 1),
]
_PAGES = ["/", "/mobilskal", "/skarmskydd", "/laddare", "/horlurar", "/guider/basta-skalet-2026", "/om-oss"]
_REFERRERS = [("https://www.google.se/", 45), ("", 25), ("https://www.bing.com/", 5), ("https://duckduckgo.com/", 3),
              ("https://l.facebook.com/", 6), ("https://www.instagram.com/", 4), ("https://www.reddit.com/", 2),
              ("https://www.flashback.org/t123", 3), ("https://prisjakt.nu/produkt/123", 7)]
_COUNTRIES = [("SE", 78), ("NO", 6), ("FI", 5), ("DK", 4), ("DE", 3), ("US", 2), ("GB", 2)]
_AGENTS = [
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", 38),
    ("Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36", 22),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", 25),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15", 10),
    ("Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", 5),
]


def _pick(rng: random.Random, weighted: list[tuple]) -> tuple:
    return rng.choices(weighted, weights=[w[-1] for w in weighted])[0]


# Hot right now (so `trending/products` has something to show at its defaults): (product, extra
# visits that click it in the last day), one of them new, without a baseline.
_TRENDING = [(_PRODUCTS[4], 22), (_PRODUCTS[5], 14), (("iphone-17-skal", "mobilskal", "apple", "teknikdelar", 0), 9)]
_IDS = uuid.UUID("6f1e8a0c-0d5b-4c53-9a53-0b1e5c2d7a11")  # namespace of the demo's event ids


def _visit(rng: random.Random, site: Site, start: datetime, hot: tuple | None = None
           ) -> list[tuple[datetime, IncomingEvent]]:
    """One session: a landing page, maybe more pages, maybe an affiliate click (of `hot`, always)."""
    referrer = _pick(rng, _REFERRERS)[0]
    product = hot or _pick(rng, _PRODUCTS)
    landing = rng.choice([f"/produkt/{product[0]}"] * 3 + _PAGES)
    pages = [landing] + [rng.choice(_PAGES + [f"/produkt/{_pick(rng, _PRODUCTS)[0]}"])
                         for _ in range(rng.choices([0, 1, 2, 3, 5], weights=[45, 25, 15, 10, 5])[0])]
    out, at = [], start
    for i, page in enumerate(pages):
        out.append((at, IncomingEvent(site_id=site.site_id, name="pageview", url=f"https://{site.domain}{page}",
                                      referrer=referrer if i == 0 else f"https://{site.domain}{pages[i - 1]}")))
        at += timedelta(seconds=rng.randint(8, 240))
    if hot or rng.random() < 0.22:
        clicked = product if hot or rng.random() < 0.6 else _pick(rng, _PRODUCTS)
        out.append((at, IncomingEvent(
            site_id=site.site_id, name="click", url=f"https://{site.domain}{pages[-1]}",
            product={"id": clicked[0], "category_slug": clicked[1], "brand_slug": clicked[2], "partner_slug": clicked[3]})))
    return out


def _event_id(site: Site, day: int, n: int) -> str:
    return str(uuid.uuid5(_IDS, f"{site.incarnation}:{day}:{n}"))


def seed(services: Services, core: StreamCore, seed_value: int = 42) -> Site:
    """Create the demo site and feed it DAYS days of traffic ending when the site was created,
    unless it has them all. The same site gets the same traffic under the same event ids, so a
    seeding stopped half-way is done again, whole, at the next start, and stores each event once."""
    site = (services.sites.by_domain(DEMO_DOMAIN)
            or services.sites.create(DEFAULT_ACCOUNT, DEMO_DOMAIN, "Mobildelar (demo)"))
    now = site.created_at.replace(tzinfo=timezone.utc)
    rng = random.Random(seed_value)
    people = [(f"81.{rng.randint(1, 250)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
               _pick(rng, _AGENTS)[0], _pick(rng, _COUNTRIES)[0]) for _ in range(6000)]
    first_day = (now - timedelta(days=DAYS - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    days = []
    for day in range(DAYS):
        midnight = first_day + timedelta(days=day)
        growth = 0.7 + 0.6 * day / DAYS
        weekday = 1.15 if midnight.weekday() < 5 else 0.8
        visits = []
        for _ in range(int(rng.gauss(260, 30) * growth * weekday)):
            ip, agent, country = rng.choice(people)
            # Busier in the evening (Swedish time), quiet at night.
            start = midnight + timedelta(hours=min(23.99, max(0.0, rng.gauss(16, 4.5))))
            visits += [(at, incoming, ip, agent, country) for at, incoming in _visit(rng, site, start) if at <= now]
        if day == DAYS - 1:
            for hot, extra in _TRENDING:
                for _ in range(extra):
                    ip, agent, country = rng.choice(people)
                    start = now - timedelta(hours=rng.uniform(0.5, 20))
                    visits += [(at, incoming, ip, agent, country) for at, incoming in _visit(rng, site, start, hot)
                               if at <= now]
        days.append(sorted(visits, key=lambda visit: visit[0]))
    stored = events_before(services.client, site.site_id, bucket_of(now) + BUCKET)
    if stored >= sum(map(len, days)):
        return site
    # Events, but not the first of ours: an earlier release's demo (its ids were random; seeded
    # again it would count twice), or events imported into the site. Left as they are.
    if stored and not stored_at(services.client, site.site_id, _event_id(site, 0, 0), days[0][0][0]):
        return site
    # Historic times, decided oldest first, as an import is: every day's salt read or made up
    # front (one by one, each new salt waited `salts.SETTLE_S`: ~25 s of a 50 s start).
    visitors = services.visitors.for_batch((site.site_id, ip, agent, at)
                                           for visits in days for at, _, ip, agent, _ in visits)
    batch: list[Event] = []
    with Progress() as progress:
        task = progress.add_task(f"Seeding {DAYS} days of demo traffic", total=DAYS)
        for day, visits in enumerate(days):
            batch += [enrich(incoming, site, useragents.parse(agent), country,
                             visitors.visitor_id(site.site_id, ip, agent, at), at,
                             _event_id(site, day, n))
                      for n, (at, incoming, ip, agent, country) in enumerate(visits)]
            # Several days per batch: the core took 13.4 s for 90 one-day batches, 7.4 s for 12 of
            # ~5,000 events. Visitor ids, sessions and rollups are the same: `visitors` remembers
            # the sessions it saw, as it does within an import.
            if len(batch) >= BATCH or day == DAYS - 1:
                core.process(batch)
                batch = []
            progress.advance(task)
    return site
