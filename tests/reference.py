"""Seeded import traffic for the reference test, and an independent pure-Python reference that
computes every stats answer from the generated events.

This module is the *independent* check of the pipeline: it imports nothing from ingest, streams,
query_api or besokskollen, and re-implements the definitions (SPEC §5.2, §6, §7, 7.1) on its own,
the slow obvious way. `iptocc` is used only by the generator, to pick IP addresses whose country is
known; the reference maps IPs to countries by the fixed prefix table below.

    lines = generate(seed=1, sites=default_sites(), now=now, target_events=100_000)
    ref = Reference(lines, default_sites(), now)
    ref.overview("ref-se", *ref.period("ref-se", "30d"), compare=True)

All times inside are integer milliseconds since the Unix epoch (UTC), as imported events are
stored with millisecond precision.
"""

from __future__ import annotations

import json
import random
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from fractions import Fraction
from math import floor
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
SESSION_TIMEOUT_S = 1800

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)

ImportLine = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteSpec:
    site_id: str
    domain: str
    timezone: str = "Europe/Stockholm"
    weight: float = 1.0  # share of the generated traffic, relative to the other sites
    countries: tuple[tuple[str, float], ...] = ()  # (country or "" for unknown, weight)


_GENERIC_MIX = (("SE", 20), ("US", 20), ("IN", 15), ("GB", 12), ("DE", 12), ("NO", 8), ("FI", 5),
                ("DK", 5), ("", 3))


def default_sites(ids: tuple[str, str, str] = ("ref-se", "ref-us", "ref-in"),
                  domains: tuple[str, str, str] = ("ref-se.example", "ref-us.example", "ref-in.example"),
                  ) -> list[SiteSpec]:
    """Three sites in Stockholm (DST 25 Oct), New York (DST 1 Nov) and Kolkata (+5:30)."""
    return [
        SiteSpec(ids[0], domains[0], "Europe/Stockholm", 1.0,
                 (("SE", 60), ("NO", 10), ("FI", 6), ("DK", 6), ("DE", 6), ("GB", 5), ("US", 4), ("IN", 1),
                  ("", 2))),
        SiteSpec(ids[1], domains[1], "America/New_York", 1.0,
                 (("US", 70), ("GB", 9), ("DE", 6), ("IN", 6), ("SE", 4), ("NO", 2), ("", 3))),
        SiteSpec(ids[2], domains[2], "Asia/Kolkata", 0.8,
                 (("IN", 70), ("US", 12), ("GB", 8), ("DE", 4), ("SE", 3), ("", 3))),
    ]


# ---------------------------------------------------------------------------------------------
# Countries: a fixed table of /16 prefixes. The generator only emits addresses inside these
# prefixes that iptocc confirms, so for generated traffic this lookup agrees with iptocc without
# the reference depending on it.
# ---------------------------------------------------------------------------------------------

COUNTRY_PREFIXES: dict[str, tuple[str, ...]] = {
    "SE": ("81.227.", "90.224.", "83.248."),
    "NO": ("84.208.", "84.210.", "88.88."),
    "FI": ("84.248.", "91.152."),
    "DK": ("87.48.", "80.62."),
    "DE": ("5.146.", "79.192.", "91.0."),
    "GB": ("86.128.", "81.96.", "82.0."),
    "US": ("24.0.", "73.0.", "98.0."),
    "IN": ("49.36.", "117.192.", "106.192."),
}
# Documentation ranges (RFC 5737): valid addresses with no country.
UNKNOWN_PREFIXES: tuple[str, ...] = ("192.0.2.", "198.51.100.", "203.0.113.")

_COUNTRY_OF_PREFIX = {prefix: cc for cc, prefixes in COUNTRY_PREFIXES.items() for prefix in prefixes}


def country_of(ip: str) -> str:
    """Country of an address from the prefix table; "" when unknown."""
    parts = ip.split(".")
    return _COUNTRY_OF_PREFIX.get(f"{parts[0]}.{parts[1]}.", "") if len(parts) == 4 else ""


# ---------------------------------------------------------------------------------------------
# Sources and channels (own copy of the rules; see the module docstring of ingest/referrers.py)
# ---------------------------------------------------------------------------------------------

_KNOWN_HOSTS: dict[str, tuple[str, str]] = {
    "bing.com": ("Bing", "search"),
    "duckduckgo.com": ("DuckDuckGo", "search"),
    "facebook.com": ("Facebook", "social"),
    "l.facebook.com": ("Facebook", "social"),
    "m.facebook.com": ("Facebook", "social"),
    "instagram.com": ("Instagram", "social"),
    "reddit.com": ("Reddit", "social"),
    "t.co": ("X/Twitter", "social"),
    "x.com": ("X/Twitter", "social"),
    "twitter.com": ("X/Twitter", "social"),
    "youtube.com": ("YouTube", "social"),
}
# utm_source is usually a bare label ("google", "facebook"), not a host.
_KNOWN_LABELS: dict[str, tuple[str, str]] = {
    "google": ("Google", "search"),
    "bing": ("Bing", "search"),
    "duckduckgo": ("DuckDuckGo", "search"),
    "facebook": ("Facebook", "social"),
    "instagram": ("Instagram", "social"),
    "reddit": ("Reddit", "social"),
    "twitter": ("X/Twitter", "social"),
    "x": ("X/Twitter", "social"),
    "youtube": ("YouTube", "social"),
}
_PAID = {"cpc", "ppc", "paid", "paidsearch", "paid_search", "paid_social", "display", "cpm", "banner"}
_EMAIL = {"email", "e-mail", "newsletter", "nyhetsbrev"}
_SOCIAL = {"social", "social-network", "social_media", "sm"}


def _known(name: str) -> tuple[str, str] | None:
    """A host (without www.) or a utm_source label → (source, channel) if it is a known one."""
    if name.split(".")[0] == "google":  # google.com, google.se, google.co.in, and the label "google"
        return ("Google", "search")
    return _KNOWN_HOSTS.get(name) or _KNOWN_LABELS.get(name)


def classify(url: str, referrer: str | None, site_domain: str) -> tuple[str, str]:
    """(source, channel) of an event from its referrer and the utm_* tags of its URL."""
    query = parse_qs(urlsplit(url).query)  # blank values count as absent
    utm_source = query.get("utm_source", [""])[0]
    utm_medium = query.get("utm_medium", [""])[0].lower()

    host = (urlsplit(referrer).hostname or "") if referrer else ""
    host = host.removeprefix("www.")
    if host and host == site_domain.lower().removeprefix("www."):
        host = ""  # a self-referral is direct traffic

    source, channel = "", "direct"
    if host:
        source, channel = _known(host) or (host, "referral")
    elif utm_source:
        source, channel = _known(utm_source.lower()) or (utm_source, "referral")
    if utm_medium in _PAID:
        channel = "paid"
    elif utm_medium in _EMAIL:
        channel = "email"
    elif utm_medium in _SOCIAL:
        channel = "social"
    return source, channel


# ---------------------------------------------------------------------------------------------
# Rounding, days and periods
# ---------------------------------------------------------------------------------------------

def round_half_away(x: Fraction | int) -> int:
    """Round to a whole number, halves away from zero. Pass exact Fractions: a float such as
    29/200*100 = 14.4999… would otherwise round the wrong way."""
    x = Fraction(x)
    n = floor(abs(x) + Fraction(1, 2))
    return n if x >= 0 else -n


def percent_change(current: int, previous: int) -> int | None:
    return None if previous == 0 else round_half_away(Fraction(current - previous, previous) * 100)


def rate(part: int, whole: int) -> int:
    """part/whole × 100 as a whole number; 0 when whole is 0."""
    return 0 if whole == 0 else round_half_away(Fraction(100 * part, whole))


def to_ms(at: datetime | str) -> int:
    """Milliseconds since the epoch; naive datetimes and strings without offset are UTC."""
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return (at - _EPOCH) // _ONE_MS  # floor: sub-millisecond digits are truncated, as stored


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and Z, the import timestamp format."""
    at = _EPOCH + timedelta(milliseconds=ms)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def local_day_bounds(day: date, tz: str) -> tuple[int, int]:
    """[local midnight, next local midnight) in UTC ms. zoneinfo gives 23/25-hour DST days and
    +5:30 offsets; fold=0 picks the first instant of the day should midnight be skipped or
    repeated in some zone."""
    zone = ZoneInfo(tz)
    start = datetime.combine(day, time.min, zone)
    end = datetime.combine(day + timedelta(days=1), time.min, zone)
    return to_ms(start), to_ms(end)


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


def period_days(kind: str, tz: str, now: datetime, from_: date | str | None = None,
                to: date | str | None = None) -> tuple[date, date]:
    """First and last local date of a period: '7d'/'30d'/'90d' = the last N local days including
    today (today = `now` in the site's timezone); 'custom' = from_..to inclusive."""
    if kind == "custom":
        if from_ is None or to is None:
            raise ValueError("custom period needs from_ and to")
        first, last = _as_date(from_), _as_date(to)
        if first > last:
            raise ValueError("from_ is after to")
        return first, last
    if kind not in ("7d", "30d", "90d"):
        raise ValueError(f"unknown period {kind!r}")
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    today = now.astimezone(ZoneInfo(tz)).date()
    return today - timedelta(days=int(kind[:-1]) - 1), today


def _dates(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------

VisitorId = tuple[str, str, str, date]  # (site_id, ip, user_agent, UTC day of the salt)


class Event:
    __slots__ = ("index", "ts", "name", "path", "url", "referrer", "ip", "visitor")

    def __init__(self, index: int, line: Mapping[str, Any]) -> None:
        self.index = index  # position in the input lines
        self.ts = to_ms(line["timestamp"])
        self.name = line["name"]
        self.url = line["url"]
        self.path = urlsplit(self.url).path or "/"
        self.referrer = line.get("referrer") or ""
        self.ip = line["ip"]
        self.visitor: VisitorId | None = None

    @property
    def is_pageview(self) -> bool:
        return self.name == "pageview"


@dataclass
class Session:
    visitor: VisitorId
    events: list[Event]
    source: str = ""
    channel: str = "direct"
    country: str = ""

    @property
    def start(self) -> int:
        return self.events[0].ts

    @property
    def bounce(self) -> bool:
        """At most one pageview and no other event: exactly one event, a pageview."""
        return len(self.events) == 1 and self.events[0].is_pageview


@dataclass
class _SiteIndex:
    site: SiteSpec
    events: list[Event] = field(default_factory=list)  # by time
    event_ts: list[int] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)  # by start
    session_start: list[int] = field(default_factory=list)


class Reference:
    """Derives visitor ids, sessions and entry sources once; answers stats queries from them."""

    def __init__(self, lines: Iterable[Mapping[str, Any]], sites: Iterable[SiteSpec],
                 now: datetime | None = None, timeout_s: int = SESSION_TIMEOUT_S) -> None:
        self.now = now.replace(tzinfo=timezone.utc) if now is not None and now.tzinfo is None else now
        self.timeout = timeout_s * SECOND
        self._sites = {site.site_id: _SiteIndex(site) for site in sites}
        self._by_line: list[Event] = []
        by_site: dict[str, list[Event]] = defaultdict(list)
        people: dict[tuple[str, str, str], list[Event]] = defaultdict(list)
        for index, line in enumerate(lines):
            if line["site_id"] not in self._sites:
                raise KeyError(f"line {index}: unknown site {line['site_id']!r}")
            event = Event(index, line)
            self._by_line.append(event)
            by_site[line["site_id"]].append(event)
            people[(line["site_id"], line["ip"], line["user_agent"])].append(event)

        by_visitor: dict[VisitorId, list[Event]] = defaultdict(list)
        for person, events in people.items():
            events.sort(key=lambda e: (e.ts, e.index))
            self._assign_visitor_ids(person, events)
            for event in events:  # person order is time order, so each visitor's list is sorted
                by_visitor[event.visitor].append(event)

        for visitor, events in by_visitor.items():
            site_index = self._sites[visitor[0]]
            site_index.sessions.extend(self._split_sessions(site_index.site, visitor, events))
        for site_id, site_events in by_site.items():
            self._sites[site_id].events = sorted(site_events, key=lambda e: (e.ts, e.index))
        for site_index in self._sites.values():
            site_index.event_ts = [e.ts for e in site_index.events]
            site_index.sessions.sort(key=lambda s: (s.start, s.events[0].index))
            site_index.session_start = [s.start for s in site_index.sessions]

    # -- derivation ------------------------------------------------------------------------------

    def _assign_visitor_ids(self, person: tuple[str, str, str], events: list[Event]) -> None:
        """SPEC §5.2 with daily salts: an event on UTC day D keeps the id of D−1 only while the
        chain that had it continues (gap < timeout); otherwise it gets D's id."""
        previous: Event | None = None
        prev_day = None
        for event in events:
            day = event.ts // DAY
            if previous is not None and prev_day == day - 1 and event.ts - previous.ts < self.timeout:
                salt_day = day - 1
            else:
                salt_day = day
            event.visitor = (*person, _EPOCH.date() + timedelta(days=salt_day))
            previous, prev_day = event, salt_day

    def _split_sessions(self, site: SiteSpec, visitor: VisitorId, events: list[Event]) -> list[Session]:
        """Split one visitor's events where the gap is ≥ timeout; entry source and country come
        from each session's first event."""
        sessions: list[Session] = []
        for event in events:
            if sessions and event.ts - sessions[-1].events[-1].ts < self.timeout:
                sessions[-1].events.append(event)
            else:
                sessions.append(Session(visitor, [event]))
        for session in sessions:
            first = session.events[0]
            session.source, session.channel = classify(first.url, first.referrer, site.domain)
            session.country = country_of(first.ip)
        return sessions

    # -- introspection (for tests) -----------------------------------------------------------------

    def visitor_of(self, line_index: int) -> VisitorId:
        return self._by_line[line_index].visitor

    def events(self, site_id: str) -> list[Event]:
        return self._sites[site_id].events

    def sessions(self, site_id: str) -> list[Session]:
        return self._sites[site_id].sessions

    def period(self, site_id: str, kind: str, from_: date | str | None = None,
               to: date | str | None = None) -> tuple[date, date]:
        if self.now is None:
            raise ValueError("Reference needs `now` to resolve relative periods")
        return period_days(kind, self._sites[site_id].site.timezone, self.now, from_, to)

    # -- slicing -------------------------------------------------------------------------------

    def _bounds(self, site_id: str, first: date, last: date) -> tuple[int, int]:
        tz = self._sites[site_id].site.timezone
        return local_day_bounds(first, tz)[0], local_day_bounds(last, tz)[1]

    def _events_in(self, site_id: str, lo: int, hi: int) -> list[Event]:
        index = self._sites[site_id]
        return index.events[bisect_left(index.event_ts, lo):bisect_left(index.event_ts, hi)]

    def _sessions_in(self, site_id: str, lo: int, hi: int) -> list[Session]:
        index = self._sites[site_id]
        return index.sessions[bisect_left(index.session_start, lo):bisect_left(index.session_start, hi)]

    def _totals(self, site_id: str, first: date, last: date) -> dict[str, int]:
        lo, hi = self._bounds(site_id, first, last)
        events = self._events_in(site_id, lo, hi)
        sessions = self._sessions_in(site_id, lo, hi)
        bounces = sum(s.bounce for s in sessions)
        return {"visitors": len({e.visitor for e in events}),
                "pageviews": sum(e.is_pageview for e in events),
                "sessions": len(sessions),
                "bounces": bounces,
                "bounce_rate": rate(bounces, len(sessions))}

    # -- answers -------------------------------------------------------------------------------

    def overview(self, site_id: str, first: date | str, last: date | str, compare: bool = False) -> dict:
        first, last = _as_date(first), _as_date(last)
        totals = self._totals(site_id, first, last)
        tz = self._sites[site_id].site.timezone
        daily = []
        for day in _dates(first, last):
            events = self._events_in(site_id, *local_day_bounds(day, tz))
            daily.append({"date": day.isoformat(), "visitors": len({e.visitor for e in events}),
                          "pageviews": sum(e.is_pageview for e in events)})
        result = {"period": {"from": first.isoformat(), "to": last.isoformat()},
                  "visitors": totals["visitors"], "pageviews": totals["pageviews"],
                  "sessions": totals["sessions"], "bounce_rate": totals["bounce_rate"], "daily": daily}
        if compare:
            result["comparison"] = self._comparison(site_id, first, last, totals)
        return result

    def _comparison(self, site_id: str, first: date, last: date, current: dict[str, int]) -> dict:
        """The same number of days immediately before the period."""
        length = (last - first).days + 1
        prev_first, prev_last = first - timedelta(days=length), first - timedelta(days=1)
        prev = self._totals(site_id, prev_first, prev_last)
        change = {key: percent_change(current[key], prev[key]) for key in ("visitors", "pageviews", "sessions")}
        # Points, as the difference of the two whole-number rates shown; no previous sessions, no rate.
        change["bounce_rate"] = None if prev["sessions"] == 0 else current["bounce_rate"] - prev["bounce_rate"]
        return {"period": {"from": prev_first.isoformat(), "to": prev_last.isoformat()},
                "visitors": prev["visitors"], "pageviews": prev["pageviews"], "sessions": prev["sessions"],
                "bounce_rate": prev["bounce_rate"], "change": change}

    def pages(self, site_id: str, first: date | str, last: date | str, limit: int = 10) -> list[dict]:
        lo, hi = self._bounds(site_id, _as_date(first), _as_date(last))
        visitors: dict[str, set] = defaultdict(set)
        views: dict[str, int] = defaultdict(int)
        for event in self._events_in(site_id, lo, hi):
            if event.is_pageview:
                visitors[event.path].add(event.visitor)
                views[event.path] += 1
        rows = [{"page": page, "visitors": len(ids), "pageviews": views[page]} for page, ids in visitors.items()]
        rows.sort(key=lambda r: (-r["visitors"], r["page"]))
        return rows[:limit]

    def referrers(self, site_id: str, first: date | str, last: date | str, include_social: bool = False,
                  limit: int = 10) -> list[dict]:
        """By entry source of the sessions started in the period; direct (no source) not listed."""
        lo, hi = self._bounds(site_id, _as_date(first), _as_date(last))
        groups: dict[tuple[str, str], list[Session]] = defaultdict(list)
        for session in self._sessions_in(site_id, lo, hi):
            if session.source and (include_social or session.channel != "social"):
                groups[(session.source, session.channel)].append(session)
        rows = [{"source": source, "channel": channel, "visitors": len({s.visitor for s in sessions}),
                 "sessions": len(sessions)} for (source, channel), sessions in groups.items()]
        rows.sort(key=lambda r: (-r["visitors"], r["source"], r["channel"]))
        return rows[:limit]

    def countries(self, site_id: str, first: date | str, last: date | str, limit: int = 10) -> list[dict]:
        lo, hi = self._bounds(site_id, _as_date(first), _as_date(last))
        groups: dict[str, set] = defaultdict(set)
        for session in self._sessions_in(site_id, lo, hi):
            if session.country:
                groups[session.country].add(session.visitor)
        rows = [{"country": country, "visitors": len(ids)} for country, ids in groups.items()]
        rows.sort(key=lambda r: (-r["visitors"], r["country"]))
        return rows[:limit]

    def site_stats(self, site_id: str) -> dict[str, int]:
        """`GET /sites?include_stats=true`: the 7d visitors and pageviews."""
        totals = self._totals(site_id, *self.period(site_id, "7d"))
        return {"visitors_7d": totals["visitors"], "pageviews_7d": totals["pageviews"]}


# One-shot helpers for small hand-made cases (each builds its own Reference).

def _one_site(lines, site_id, tz, site_domain) -> Reference:
    return Reference(lines, [SiteSpec(site_id, site_domain, tz)])


def overview(lines, site_id: str, tz: str, period_first, period_last, compare: bool = False,
             site_domain: str = "") -> dict:
    return _one_site(lines, site_id, tz, site_domain).overview(site_id, period_first, period_last, compare)


def pages(lines, site_id: str, tz: str, period_first, period_last, limit: int = 10,
          site_domain: str = "") -> list[dict]:
    return _one_site(lines, site_id, tz, site_domain).pages(site_id, period_first, period_last, limit)


def referrers(lines, site_id: str, tz: str, period_first, period_last, include_social: bool = False,
              limit: int = 10, site_domain: str = "") -> list[dict]:
    return _one_site(lines, site_id, tz, site_domain).referrers(site_id, period_first, period_last,
                                                                include_social, limit)


def countries(lines, site_id: str, tz: str, period_first, period_last, limit: int = 10,
              site_domain: str = "") -> list[dict]:
    return _one_site(lines, site_id, tz, site_domain).countries(site_id, period_first, period_last, limit)


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------

# Ordinary browsers only (never bots or headless); versions vary so that (ip, agent) pairs are many.
_AGENT_TEMPLATES = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36 Edg/{v}.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:{f}.0) Gecko/20100101 Firefox/{f}.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{s}.1 Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:{f}.0) Gecko/20100101 Firefox/{f}.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS {s}_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{s}.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS {s}_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/{v}.0.6778.73 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS {s}_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{s}.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v}.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-A546B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Android 14; Mobile; rv:{f}.0) Gecko/{f}.0 Firefox/{f}.0",
]
USER_AGENTS: list[str] = sorted({t.format(v=v, f=f, s=s) for t in _AGENT_TEMPLATES
                                 for v, f, s in ((129, 131, 17), (130, 132, 18), (131, 133, 18))})

PRODUCTS = [  # (id, category_slug, brand_slug, partner_slug)
    ("iphone-15-skal", "mobilskal", "apple", "teknikdelar"),
    ("iphone-16-skal", "mobilskal", "apple", "kjell"),
    ("samsung-s24-glas", "skarmskydd", "samsung", "teknikdelar"),
    ("pixel-8-glas", "skarmskydd", "google", "webhallen"),
    ("airpods-pro-2", "horlurar", "apple", "elgiganten"),
    ("sony-wh-1000xm5", "horlurar", "sony", "kjell"),
    ("usb-c-laddare", "laddare", "anker", "kjell"),
    ("magsafe-laddare", "laddare", "apple", "elgiganten"),
    ("powerbank-20k", "laddare", "anker", "webhallen"),
    ("galaxy-watch-band", "klockarmband", "samsung", "teknikdelar"),
]
GUIDES = ["basta-mobilskalet", "byta-skarm", "ladda-snabbt", "valj-horlurar", "batteritips", "jamfor-laddare"]
CATEGORIES = ["mobilskal", "skarmskydd", "horlurar", "laddare"]
OTHER_PAGES = ["/", "/om-oss", "/kontakt", "/checkout"]

# Landing referrer (None = field left out, "{domain}" = the site's own) and utm query, by weight.
_ENTRY_SOURCES: list[tuple[float, str | None, str]] = [
    (18, None, ""),  # direct
    (5, "", ""),  # direct, empty referrer
    (14, "https://www.google.com/", ""),
    (6, "https://www.google.se/", ""),
    (2, "https://www.google.co.in/", ""),
    (4, "https://www.bing.com/", ""),
    (3, "https://duckduckgo.com/", ""),
    (5, "https://l.facebook.com/", ""),
    (1, "https://m.facebook.com/", ""),
    (3, "https://www.instagram.com/", ""),
    (2, "https://www.reddit.com/r/sweden/comments/abc123/", ""),
    (2, "https://t.co/Xy12AbC9", ""),
    (2, "https://www.youtube.com/", ""),
    (4, "https://prisjakt.nu/produkt.php?p=4711", ""),
    (1, "https://www.prisjakt.nu/", ""),
    (3, "https://blog.example.org/post", ""),
    (3, "https://{domain}/", ""),  # self-referral → direct
    (2, "https://www.{domain}/guide/byta-skarm", ""),  # self-referral with www. → direct
    (5, None, "utm_source=newsletter&utm_medium=email&utm_campaign=nov"),
    (1, None, "utm_source=newsletter&utm_medium=Email&utm_campaign=dec"),
    (1, "https://{domain}/", "utm_source=newsletter&utm_medium=email&utm_campaign=nov"),  # self ignored, utm used
    (3, "https://www.google.com/", "utm_source=google&utm_medium=cpc&utm_campaign=brand"),  # Google/paid
    (1, "https://l.facebook.com/", "utm_source=facebook&utm_medium=paid_social&utm_campaign=nov"),  # Facebook/paid
    (1, None, "utm_source=partnerblog"),  # unknown utm_source → partnerblog/referral
    (1, "https://blog.example.org/post", "utm_source=newsletter&utm_medium=email"),  # referrer wins, medium sets channel
]
# Only with edge_cases: a medium without a source is ("", "email"), i.e. unlisted like direct.
_EDGE_ENTRY_SOURCES: list[tuple[float, str | None, str]] = [(0.5, None, "utm_medium=email")]

_VISIT_LENGTHS = ([1, 2, 3, 4, 5, 6, 7, 8], [30, 20, 15, 10, 8, 7, 5, 5])
_VISITS_PER_PERSON = ([1, 2, 3, 4, 5, 6, 8], [50, 20, 12, 8, 5, 3, 2])


@dataclass
class _Person:
    site: SiteSpec
    ip: str
    user_agent: str


class _Generator:
    def __init__(self, seed: int, sites: list[SiteSpec], now: datetime, days: int, edge_cases: bool) -> None:
        import iptocc  # the generator only: picks addresses whose country is known

        self._iptocc = iptocc
        self.rng = random.Random(seed)
        self.sites = sites
        self.now = to_ms(now)
        self.start = self.now - days * DAY
        self.edge_cases = edge_cases
        self.entry_sources = _ENTRY_SOURCES + (_EDGE_ENTRY_SOURCES if edge_cases else [])
        self.rows: list[tuple[int, int, ImportLine]] = []  # (ms, sequence, line)
        self.counts: dict[str, int] = defaultdict(int)
        self._people: set[tuple[str, str, str]] = set()

    # -- people --------------------------------------------------------------------------------

    def _ip(self, country: str) -> str:
        rng = self.rng
        for _ in range(100):
            if country:
                ip = f"{rng.choice(COUNTRY_PREFIXES[country])}{rng.randrange(256)}.{rng.randrange(1, 255)}"
                if self._iptocc.country_code(ip) == country:
                    return ip
            else:
                ip = f"{rng.choice(UNKNOWN_PREFIXES)}{rng.randrange(1, 255)}"
                if not self._iptocc.country_code(ip):
                    return ip
        raise RuntimeError(f"no address for country {country!r} in the prefix table")

    def person(self, site: SiteSpec) -> _Person:
        """A new (ip, user agent) pair for this site, distinct from every earlier one."""
        mix = site.countries or _GENERIC_MIX
        while True:
            country = self.rng.choices([c for c, _ in mix], [w for _, w in mix])[0]
            key = (site.site_id, self._ip(country), self.rng.choice(USER_AGENTS))
            if key not in self._people:
                self._people.add(key)
                return _Person(site, key[1], key[2])

    # -- events --------------------------------------------------------------------------------

    def _emit(self, person: _Person, ms: int, name: str, url: str, referrer: str | None,
              props: dict[str, str] | None = None, product: tuple[str, str, str, str] | None = None) -> bool:
        """Append one event unless it falls outside [now − days, now)."""
        if not self.start <= ms < self.now:
            return False
        line: ImportLine = {"site_id": person.site.site_id, "name": name, "url": url}
        if referrer is not None:
            line["referrer"] = referrer
        if props:
            line["props"] = props
        if product:
            line["product"] = dict(zip(("id", "category_slug", "brand_slug", "partner_slug"), product))
        line.update(timestamp=iso_ms(ms), ip=person.ip, user_agent=person.user_agent)
        self.rows.append((ms, len(self.rows), line))
        self.counts[person.site.site_id] += 1
        return True

    def _page(self) -> tuple[str, tuple[str, str, str, str] | None]:
        """A path (plus query sometimes) and the product shown there, if any."""
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            return rng.choice(OTHER_PAGES), None
        if r < 0.65:
            product = rng.choice(PRODUCTS)
            return f"/produkt/{product[0]}", product
        if r < 0.88:
            return f"/guide/{rng.choice(GUIDES)}", None
        path = f"/kategori/{rng.choice(CATEGORIES)}"
        return (path + "?page=2" if rng.random() < 0.3 else path), None

    def _url(self, site: SiteSpec, path: str) -> str:
        host = f"www.{site.domain}" if self.rng.random() < 0.1 else site.domain
        return f"https://{host}{path}"

    def _gap(self, max_ms: int = 25 * MINUTE) -> int:
        """Time to the next event within a session: 5 s – 25 min, mostly short."""
        r = self.rng.random()
        if r < 0.6:
            lo, hi = 5 * SECOND, 2 * MINUTE
        elif r < 0.9:
            lo, hi = 2 * MINUTE, 10 * MINUTE
        else:
            lo, hi = 10 * MINUTE, 25 * MINUTE
        return self.rng.randint(lo, min(hi, max_ms))

    def visit(self, person: _Person, start: int, *, length: int | None = None,
              until: int | None = None, max_gap: int = 25 * MINUTE) -> int:
        """One session from `start`: `length` events, or events until past `until`. Returns the
        time of its last event (even if clipped at the window's edges)."""
        rng, site = self.rng, person.site
        weight, referrer, utm = rng.choices(self.entry_sources, [w for w, _, _ in self.entry_sources])[0]
        referrer = None if referrer is None else referrer.format(domain=site.domain)
        path, product = self._page()
        if utm:
            path += ("&" if "?" in path else "?") + utm
        url = self._url(site, path)

        first = rng.random()
        if length is None and until is None:
            if first < 0.07:  # a session whose only event is a custom event
                self._emit(person, start, rng.choice(["signup", "newsletter_signup"]), url, referrer,
                           props={"plan": rng.choice(["free", "pro"])})
                return start
            if first < 0.10:  # or only an affiliate click (sendBeacon after a cached page)
                self._emit(person, start, "click", url, referrer, product=product or rng.choice(PRODUCTS))
                return start
            length = rng.choices(*_VISIT_LENGTHS)[0]

        t = start
        self._emit(person, t, "pageview", url, referrer)
        page_referrer, count = referrer, 1
        while (until is not None and t <= until) or (length is not None and count < length):
            t += self._gap(max_gap)
            count += 1
            r = rng.random()
            if r < 0.7:  # next page; the browser sends the previous page as referrer
                previous_url = url
                path, product = self._page()
                url, page_referrer = self._url(site, path), previous_url
                self._emit(person, t, "pageview", url, page_referrer)
            elif r < 0.85:
                name = rng.choice(["signup", "purchase", "add_to_cart"])
                props = {"value": str(rng.randint(99, 2999)), "currency": "SEK"} if name == "purchase" else None
                self._emit(person, t, name, url, page_referrer, props=props)
            else:
                self._emit(person, t, "click", url, page_referrer, product=product or rng.choice(PRODUCTS))
        return t

    # -- traffic -------------------------------------------------------------------------------

    def ordinary(self, site: SiteSpec, budget: int) -> None:
        """People with 1–8 visits: later the same day (after > 30 min) or on later days."""
        rng = self.rng
        while self.counts[site.site_id] < budget:
            person = self.person(site)
            t = rng.randrange(self.start, self.now)
            for _ in range(rng.choices(*_VISITS_PER_PERSON)[0]):
                last = self.visit(person, t)
                if rng.random() < 0.35:
                    t = last + rng.randint(31 * MINUTE, 5 * HOUR)
                else:
                    t = last + rng.randint(1, 20) * DAY + rng.randint(-12 * HOUR, 12 * HOUR)
                    t = max(t, last + 31 * MINUTE)
                if t >= self.now:
                    break

    def across(self, site: SiteSpec, instant: int) -> None:
        """A session running across `instant` (a UTC or local midnight, a DST change); then maybe
        a return the same UTC day after it lapsed (a new visitor id) or the next day."""
        rng = self.rng
        person = self.person(site)
        start = instant - rng.randint(30 * SECOND, 15 * MINUTE)
        last = self.visit(person, start, until=instant + rng.randint(1 * MINUTE, 15 * MINUTE), max_gap=10 * MINUTE)
        r = rng.random()
        if r < 0.5:
            self.visit(person, last + rng.randint(35 * MINUTE, 3 * HOUR))
        elif r < 0.8:
            self.visit(person, instant + DAY + rng.randint(8 * HOUR, 14 * HOUR))

    def boundaries(self, site: SiteSpec, midnight: int) -> None:
        """Gaps of exactly the timeout (a new session; across UTC midnight a new id) and 1 ms less
        (same session; the id carries)."""
        for gap in (SESSION_TIMEOUT_S * SECOND, SESSION_TIMEOUT_S * SECOND - 1):
            for first in (midnight - 15 * MINUTE, midnight + 5 * HOUR):
                person = self.person(site)
                url = self._url(site, "/")
                self._emit(person, first, "pageview", url, None)
                self._emit(person, first + gap, "pageview", url, url)
                self._emit(person, first + gap + 20 * SECOND, "signup", url, url)

    def marathon(self, site: SiteSpec, midnight: int) -> None:
        """One chain from 2 h before a UTC midnight to 1 h after the next one, gaps < timeout: keeps
        D−1's id through day D, then switches to D+1's id at the second midnight."""
        person = self.person(site)
        t, url = midnight - 2 * HOUR, self._url(site, "/")
        while t < midnight + DAY + HOUR:
            path, _ = self._page()
            url, referrer = self._url(site, path), url
            self._emit(person, t, "pageview", url, referrer)
            t += self.rng.randint(20 * MINUTE, 29 * MINUTE)

    def lines(self) -> list[ImportLine]:
        return [line for _, _, line in sorted(self.rows, key=lambda row: row[:2])]


def _local_midnights(site: SiteSpec, start: int, end: int) -> list[int]:
    first = (_EPOCH + timedelta(milliseconds=start)).astimezone(ZoneInfo(site.timezone)).date()
    last = (_EPOCH + timedelta(milliseconds=end)).astimezone(ZoneInfo(site.timezone)).date()
    return [m for m in (local_day_bounds(d, site.timezone)[0] for d in _dates(first, last)) if start < m < end]


def _offset_changes(site: SiteSpec, start: int, end: int) -> list[int]:
    """Instants where the site's UTC offset changes (DST), found hour by hour."""
    zone, changes = ZoneInfo(site.timezone), []
    previous = None
    for hour in range(start // HOUR + 1, end // HOUR + 1):
        offset = (_EPOCH + timedelta(hours=hour)).astimezone(zone).utcoffset()
        if previous is not None and offset != previous:
            changes.append(hour * HOUR)
        previous = offset
    return changes


def generate(seed: int, sites: list[SiteSpec], now: datetime, days: int = 90, target_events: int = 100_000,
             edge_cases: bool = True) -> list[ImportLine]:
    """At least `target_events` import lines over the last `days` days before `now`, sorted by time.

    Besides ordinary traffic, every site gets sessions across UTC midnights, across its local
    midnights (the DST days' included) and across its DST changes. `edge_cases` adds gaps of exactly
    the timeout and 1 ms less, a chain across two UTC midnights, and utm_medium without utm_source.
    """
    gen = _Generator(seed, sites, now, days, edge_cases)
    total_weight = sum(site.weight for site in sites)
    for site in sites:
        gen.ordinary(site, int(target_events * site.weight / total_weight) + 1)

    margin = 4 * HOUR  # room for the session (and its return) on both sides
    utc_midnights = [d * DAY for d in range(gen.start // DAY + 1, gen.now // DAY + 1)
                     if gen.start + margin < d * DAY < gen.now - margin]
    for site in sites:
        changes = _offset_changes(site, gen.start + margin, gen.now - margin)
        local = _local_midnights(site, gen.start + margin, gen.now - margin)
        dst_midnights = [m for m in local if any(abs(m - c) < 2 * DAY for c in changes)]
        instants = (gen.rng.sample(utc_midnights, min(12, len(utc_midnights)))
                    + gen.rng.sample(local, min(12, len(local))) + dst_midnights + changes
                    + [c - 30 * MINUTE for c in changes])
        for instant in instants:
            gen.across(site, instant)
        if edge_cases and len(utc_midnights) > 2:
            for midnight in gen.rng.sample(utc_midnights[:-1], 2):
                gen.boundaries(site, midnight)
            gen.marathon(site, gen.rng.choice(utc_midnights[:-2]))
    return gen.lines()


def to_ndjson(lines: Iterable[ImportLine]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                    for line in lines)
