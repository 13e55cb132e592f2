"""Enrichment (SPEC §5.2): a validated client event plus request facts → an `Event` ready for the
stream core. Pure: the visitor id comes decided (ingest/visitors.py)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ingest import referrers
from ingest.event import Event, IncomingEvent, decoded, without_control_characters
from ingest.useragents import Agent
from streams.sites import Site


def enrich(incoming: IncomingEvent, site: Site, agent: Agent, country: str, visitor_id: int, at: datetime,
           event_id: str | None = None) -> Event:
    """`country` is the client's (ingest/clients.py). `event_id` is given by imports
    (their own or a content hash). A live event with a client id gets uuid5(client id, site id) —
    the same on every retry, and no client can reach another site's events — else a new UUIDv7."""
    url = urlsplit(incoming.url)
    referrer = referrers.usable(incoming.referrer)
    source = referrers.classify(incoming.url, referrer, site.domain)
    product = incoming.product
    return Event(
        event_id=event_id or (str(uuid.uuid5(incoming.event_id, site.site_id)) if incoming.event_id else uuid7()),
        site_id=site.site_id,
        timestamp=at,
        name=incoming.name,
        visitor_id=visitor_id,
        hostname=(url.hostname or "").removeprefix("www."),
        pathname=page_path(url, incoming.hash),
        referrer=stored_referrer(referrer),
        source=source.source,
        channel=source.channel,
        utm_source=source.utm_source,
        utm_medium=source.utm_medium,
        utm_campaign=source.utm_campaign,
        country=country,
        device=agent.device,
        browser=agent.browser,
        os=agent.os,
        props=incoming.props,
        product_id=product.id if product else "",
        product_slug=product.slug if product else "",
        category_slug=product.category_slug if product else "",
        brand_slug=product.brand_slug if product else "",
        partner_slug=product.partner_slug if product else "",
    )


def stored_referrer(referrer: str | None) -> str:
    """What is kept of a referrer: scheme, host (and port) and path. A source needs only the host;
    the query string and fragment (a search, a token, an e-mail address) and a user:password@ may
    say much about the person. (Not in the validator: an import's content event id hashes the
    referrer as sent, and must stay the same.)"""
    if not referrer:
        return ""
    parts = urlsplit(referrer)  # parsed by the validator before: does not raise here
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], without_control_characters(parts.path), "", ""))


def page_path(url: SplitResult, hash_routes: bool = False) -> str:
    """The page of a URL: its path `decoded`; with the tracker's data-hash, the fragment too
    (`/app#/cart`)."""
    path = decoded(url.path) or "/"
    if hash_routes and url.fragment:
        path += "#" + decoded(url.fragment)
    return path


_random = bytearray()
_last = 0
_lock = threading.Lock()  # enrich also runs on worker threads (ingest/app.py)


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits, monotonic within this
    process: events of one millisecond keep their arrival order (the stream core breaks equal
    timestamps by event id). Random bytes come from os.urandom in blocks; uuid6.uuid7 drew them
    per id from SystemRandom, 5 % of a request's time."""
    global _random, _last
    with _lock:
        if len(_random) < 10:
            _random = bytearray(os.urandom(4096))
        tail = int.from_bytes(_random[:10], "big")
        del _random[:10]
        value = (time.time_ns() // 1_000_000) << 80 | 0x7 << 76 | (tail >> 4 & 0xFFF) << 64 | 0b10 << 62 | tail & (1 << 62) - 1
        if value >> 80 == _last >> 80 and value <= _last:
            value = _last + 1  # same millisecond: count up (62 random bits leave room)
        _last = value
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
