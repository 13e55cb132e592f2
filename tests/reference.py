"""Seeded import traffic for the reference test, and an independent pure-Python reference that
computes every stats answer from the generated events.

This module is the *independent* check of the pipeline: it imports nothing from ingest, streams,
query_api or besokskollen, and re-implements the definitions (SPEC §5.2, §6, §7, 7.1) on its own,
the slow obvious way. `iptocc` is used only by the generator, to pick IP addresses whose country is
known; the reference maps IPs to countries by the fixed prefix table below.

    lines = generate(seed=1, sites=default_sites(), now=now, target_events=100_000)
    ref = Reference(lines, default_sites(), now)
    ref.overview("ref-se", *ref.period("ref-se", "30d"), compare=True)

With `generate(..., clicks=True)` the traffic also carries affiliate click bursts and shopping
journeys, for the goals, funnels and affiliate answers:

    ref.goals("ref-se", first, last, [{"id": "g1", "name": "Köp", "event_type": "event", "match_event": "purchase"}])
    ref.funnel_stats("ref-se", first, last, {"id": "f1", "name": "Checkout", "steps": [...]})
    ref.popular_products("ref-se", 7, now), ref.popular_categories(...), ref.popular_partners(...)
    ref.trending("ref-se", now, min_growth=50)

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
from typing import Any, NamedTuple
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


class Product(NamedTuple):
    """The product of a click; the slug defaults to the id, absent dimensions are ""."""
    id: str
    slug: str
    category_slug: str
    brand_slug: str
    partner_slug: str

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Product:
        return cls(raw["id"], raw.get("slug") or raw["id"], raw.get("category_slug") or "",
                   raw.get("brand_slug") or "", raw.get("partner_slug") or "")


class Event:
    __slots__ = ("index", "ts", "name", "path", "url", "referrer", "ip", "visitor", "product")

    def __init__(self, index: int, line: Mapping[str, Any]) -> None:
        self.index = index  # position in the input lines
        self.ts = to_ms(line["timestamp"])
        self.name = line["name"]
        self.url = line["url"]
        self.path = urlsplit(self.url).path or "/"
        self.referrer = line.get("referrer") or ""
        self.ip = line["ip"]
        self.visitor: VisitorId | None = None
        self.product = Product.of(line["product"]) if line.get("product") else None

    @property
    def is_pageview(self) -> bool:
        return self.name == "pageview"

    @property
    def is_click(self) -> bool:
        """An affiliate click: an event named "click" (ingest requires its product)."""
        return self.name == "click" and self.product is not None


# ---------------------------------------------------------------------------------------------
# Goals, funnels, affiliate windows (SPEC §7: Goals, Funnels, Affiliate)
# ---------------------------------------------------------------------------------------------

def round_places(x: Fraction | int, places: int) -> float:
    """x to `places` decimals, halves away from zero, as a float: 1/8 → 0.13, 1/4 → 0.3 (1 place)."""
    scale = 10 ** places
    return round_half_away(Fraction(x) * scale) / scale  # int / int: the float nearest the decimal


def confidence(total_clicks: int) -> str:
    return "high" if total_clicks >= 50 else "medium" if total_clicks >= 10 else "low"


def _exact(x: int | float | Fraction | str) -> Fraction:
    """A threshold as given on a query string: 99.5 is 199/2, not the binary float's value."""
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def glob_match(pattern: str, path: str) -> bool:
    """`*` stands for any run of characters, `/` included, none included; everything else
    (`?`, `[`, `.`, …) is literal. Without `*` this is equality."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return path == pattern
    if not (path.startswith(parts[0]) and path[len(parts[0]):].endswith(parts[-1])
            and len(path) >= len(parts[0]) + len(parts[-1])):
        return False
    position, end = len(parts[0]), len(path) - len(parts[-1])
    for middle in parts[1:-1]:  # leftmost occurrence of each middle part is optimal
        found = path.find(middle, position, end)
        if found < 0:
            return False
        position = found + len(middle)
    return True


def goal_matches(goal: Mapping[str, Any], event: Event) -> bool:
    if goal["event_type"] == "pageview":
        return event.is_pageview and glob_match(goal["match_path"], event.path)
    if goal["event_type"] == "event":
        return event.name == goal["match_event"]  # literal: "pageview" would match pageviews
    raise ValueError(f"unknown goal event_type {goal['event_type']!r}")


def step_matches(step: Mapping[str, Any], event: Event) -> bool:
    """pageview step: a pageview whose path (no query) equals / starts with match_value; event
    step: any event whose name equals / starts with match_value (literal, as goals)."""
    match_type = step.get("match_type") or "exact"
    if step["type"] == "pageview":
        if not event.is_pageview:
            return False
        value = event.path
    elif step["type"] == "event":
        value = event.name
    else:
        raise ValueError(f"unknown step type {step['type']!r}")
    if match_type == "exact":
        return value == step["match_value"]
    if match_type == "startswith":
        return value.startswith(step["match_value"])
    raise ValueError(f"unknown match_type {match_type!r}")


def steps_reached(events: Iterable[Event], steps: list[Mapping[str, Any]]) -> int:
    """How many steps a session reaches: events in time order (ties by line index), each step
    matched by an event strictly after the previous step's; greedy earliest match (which is
    optimal for an ordered subsequence). One event advances at most one step."""
    reached = 0
    for event in events:
        if reached < len(steps) and step_matches(steps[reached], event):
            reached += 1
    return reached


def funnel_result(funnel: Mapping[str, Any], counts: list[int]) -> dict:
    """The funnel stats body from the sessions reaching each step."""
    first = counts[0] if counts else 0
    steps = []
    for k, (step, sessions) in enumerate(zip(funnel["steps"], counts)):
        dropoff = 0 if k == 0 else rate(counts[k - 1] - sessions, counts[k - 1])
        steps.append({"name": step["name"], "sessions": sessions, "dropoff_rate": dropoff,
                      "conversion_from_start": rate(sessions, first)})
    return {"funnel": {"id": funnel["id"], "name": funnel["name"]}, "steps": steps,
            "overall_conversion": rate(counts[-1], first) if counts else 0}


def iso_z(ms: int) -> str:
    """UTC to the second with Z, the affiliate meta format (milliseconds truncated)."""
    return f"{_EPOCH + timedelta(milliseconds=ms):%Y-%m-%dT%H:%M:%S}Z"


def utc_days_window(days: int, now: datetime) -> tuple[int, int]:
    """The last `days` UTC calendar days including now's UTC date: [first 00:00:00Z, the next
    midnight after today) in ms (meta shows the end as today 23:59:59Z)."""
    if days < 1:
        raise ValueError("days must be at least 1")
    today = to_ms(now) // DAY
    return (today - days + 1) * DAY, (today + 1) * DAY


QUARTER_HOUR = 15 * MINUTE


def trending_windows(now: datetime, recent_hours: int = 24, baseline_days: int = 7) -> tuple[int, int, int]:
    """(baseline start, recent start, recent end) in ms: the recent window is the `recent_hours`
    back from now, to the second (it ends at the second after now's, so a click at now is in it);
    the baseline is the `baseline_days` right before it."""
    end = to_ms(now) // SECOND * SECOND + SECOND
    recent_start = end - recent_hours * HOUR
    return recent_start - baseline_days * DAY, recent_start, end


def _latest_slugs(clicks: Iterable[Event], granularity: int) -> dict[str, str]:
    """Product id → the slug it was last clicked under: a product is its id, renamed or not.
    "Last" by UTC day (popular) or quarter hour (trending); ties by the greater slug."""
    latest: dict[str, tuple[int, str]] = {}
    for click in clicks:
        seen = (click.ts // granularity, click.product.slug)
        latest[click.product.id] = max(latest.get(click.product.id, seen), seen)
    return {pid: slug for pid, (_, slug) in latest.items()}


def _filtered(clicks: Iterable[Event], category_slug: str = "", brand_slug: str = "") -> list[Event]:
    return [c for c in clicks if (not category_slug or c.product.category_slug == category_slug)
            and (not brand_slug or c.product.brand_slug == brand_slug)]


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
    clicks: list[Event] = field(default_factory=list)  # affiliate clicks, by time
    click_ts: list[int] = field(default_factory=list)


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
            site_index.clicks = [e for e in site_index.events if e.is_click]
            site_index.click_ts = [e.ts for e in site_index.clicks]
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
        # SPEC §7.1 to the letter: null when the previous value (the rate shown) is 0, else the
        # difference of the two whole-number rates shown, in points.
        change["bounce_rate"] = (None if prev["bounce_rate"] == 0
                                 else current["bounce_rate"] - prev["bounce_rate"])
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
        """Visitors among the period's events, by each event's country (SPEC §7's visitors)."""
        groups: dict[str, set] = defaultdict(set)
        for event in self._events_in(site_id, lo, hi):
            if country := country_of(event.ip):
                groups[country].add(event.visitor)
        rows = [{"country": country, "visitors": len(ids)} for country, ids in groups.items()]
        rows.sort(key=lambda r: (-r["visitors"], r["country"]))
        return rows[:limit]

    def site_stats(self, site_id: str, now: datetime | None = None) -> dict[str, int]:
        """`GET /sites?include_stats=true`: the 7d visitors and pageviews (as of `now`, or the
        Reference's)."""
        totals = self._totals(site_id, *period_days("7d", self._sites[site_id].site.timezone, self._clock(now)))
        return {"visitors_7d": totals["visitors"], "pageviews_7d": totals["pageviews"]}

    # -- goals and funnels -----------------------------------------------------------------------

    def goals(self, site_id: str, first: date | str, last: date | str,
              goals: Iterable[Mapping[str, Any]]) -> list[dict]:
        """Per goal: converted visitors (distinct visitor ids with a matching event in the period),
        conversions (matching events) and converted / all visitors × 100; most visitors first,
        ties by name (by code point), then id (SPEC §7.1)."""
        lo, hi = self._bounds(site_id, _as_date(first), _as_date(last))
        events = self._events_in(site_id, lo, hi)
        all_visitors = len({e.visitor for e in events})
        rows = []
        for goal in goals:
            matching = [e for e in events if goal_matches(goal, e)]
            visitors = len({e.visitor for e in matching})
            key = "match_path" if goal["event_type"] == "pageview" else "match_event"
            rows.append({"id": goal["id"], "name": goal["name"], "event_type": goal["event_type"], key: goal[key],
                         "visitors": visitors, "conversions": len(matching),
                         "conversion_rate": rate(visitors, all_visitors)})
        rows.sort(key=lambda row: (-row["visitors"], row["name"], row["id"]))
        return rows

    def funnel_counts(self, site_id: str, first: date | str, last: date | str,
                      steps: list[Mapping[str, Any]]) -> list[int]:
        """Sessions reaching each step, of the sessions started in the period (all their events
        count, also those after the period's end)."""
        lo, hi = self._bounds(site_id, _as_date(first), _as_date(last))
        counts = [0] * len(steps)
        for session in self._sessions_in(site_id, lo, hi):
            for k in range(steps_reached(session.events, steps)):
                counts[k] += 1
        return counts

    def funnel_stats(self, site_id: str, first: date | str, last: date | str, funnel: Mapping[str, Any]) -> dict:
        return funnel_result(funnel, self.funnel_counts(site_id, first, last, funnel["steps"]))

    # -- affiliate -------------------------------------------------------------------------------

    def clicks(self, site_id: str) -> list[Event]:
        return self._sites[site_id].clicks

    def _clicks_in(self, site_id: str, lo: int, hi: int) -> list[Event]:
        index = self._sites[site_id]
        return index.clicks[bisect_left(index.click_ts, lo):bisect_left(index.click_ts, hi)]

    def _clock(self, now: datetime | None) -> datetime:
        now = now or self.now
        if now is None:
            raise ValueError("pass `now` (or give the Reference one)")
        return now

    def _popular(self, site_id: str, days: int, now: datetime | None, category_slug: str = "",
                 brand_slug: str = "") -> tuple[list[Event], dict]:
        lo, hi = utc_days_window(days, self._clock(now))
        clicks = _filtered(self._clicks_in(site_id, lo, hi), category_slug, brand_slug)
        meta = {"period": {"from": iso_z(lo), "to": iso_z(hi - SECOND)}, "total_clicks": len(clicks),
                "confidence": confidence(len(clicks))}
        return clicks, meta

    def popular_products(self, site_id: str, days: int = 30, now: datetime | None = None, limit: int = 20,
                         category_slug: str = "", brand_slug: str = "", min_clicks: int = 0) -> dict:
        """Clicks per product id (under its latest slug), most first, ties by slug then id;
        total_clicks is the filtered set's, whatever limit and min_clicks leave out."""
        clicks, meta = self._popular(site_id, days, now, category_slug, brand_slug)
        slugs = _latest_slugs(clicks, DAY)
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for click in clicks:
            counts[(click.product.id, slugs[click.product.id])] += 1
        rows = sorted(((-n, slug, pid) for (pid, slug), n in counts.items() if n >= min_clicks))[:limit]
        return {"data": [{"product_id": pid, "product_slug": slug, "clicks": -n} for n, slug, pid in rows],
                "meta": meta}

    def popular_categories(self, site_id: str, days: int = 30, now: datetime | None = None,
                           limit: int = 10) -> dict:
        """Clicks per category; clicks without one are in total_clicks but not listed."""
        clicks, meta = self._popular(site_id, days, now)
        counts: dict[str, int] = defaultdict(int)
        for click in clicks:
            if click.product.category_slug:
                counts[click.product.category_slug] += 1
        rows = sorted((-n, slug) for slug, n in counts.items())[:limit]
        return {"data": [{"category_slug": slug, "clicks": -n} for n, slug in rows], "meta": meta}

    def popular_partners(self, site_id: str, days: int = 30, now: datetime | None = None,
                         limit: int = 10) -> dict:
        """Clicks per partner and their share of total_clicks (two decimals); clicks without a
        partner are in total_clicks but not listed."""
        clicks, meta = self._popular(site_id, days, now)
        counts: dict[str, int] = defaultdict(int)
        for click in clicks:
            if click.product.partner_slug:
                counts[click.product.partner_slug] += 1
        total = meta["total_clicks"]
        rows = sorted((-n, slug) for slug, n in counts.items())[:limit]
        return {"data": [{"partner_slug": slug, "clicks": -n, "share": round_places(Fraction(-n, total), 2)}
                         for n, slug in rows], "meta": meta}

    def trending(self, site_id: str, now: datetime | None = None, recent_hours: int = 24, baseline_days: int = 7,
                 min_growth: int | float | Fraction = 100, min_recent_clicks: int = 3, category_slug: str = "",
                 brand_slug: str = "", limit: int = 10) -> dict:
        """`GET /trending/products`. A product (its id, under its latest slug) trends with
        ≥ min_recent_clicks (and > 0) recent clicks and either no baseline clicks (growth null) or
        growth ≥ min_growth (unrounded, exact); listed by recent clicks, ties by slug then id
        (SPEC §7.1)."""
        baseline_start, recent_start, recent_end = trending_windows(self._clock(now), recent_hours, baseline_days)
        clicks = _filtered(self._clicks_in(site_id, baseline_start, recent_end), category_slug, brand_slug)
        recent: dict[tuple[str, str], int] = defaultdict(int)
        baseline: dict[tuple[str, str], int] = defaultdict(int)
        slugs = _latest_slugs(clicks, QUARTER_HOUR)
        for click in clicks:
            (recent if click.ts >= recent_start else baseline)[(click.product.id, slugs[click.product.id])] += 1
        windows = Fraction(baseline_days * 24, recent_hours)  # recent-sized windows in the baseline
        threshold = _exact(min_growth)
        trending = []
        for pid, slug in sorted(recent):
            r, b = recent[(pid, slug)], baseline[(pid, slug)]
            if r <= 0 or r < min_recent_clicks:
                continue
            if b == 0:
                trending.append(((-r, slug, pid), {"product_id": pid, "product_slug": slug, "clicks_recent": r,
                                                    "clicks_baseline_avg": 0.0, "growth_percent": None}))
                continue
            average = b / windows
            growth = (r - average) / average * 100
            if growth >= threshold:
                trending.append(((-r, slug, pid), {
                    "product_id": pid, "product_slug": slug, "clicks_recent": r,
                    "clicks_baseline_avg": round_places(average, 1), "growth_percent": round_half_away(growth)}))
        rows = [row for _, row in sorted(trending, key=lambda t: t[0])]
        total = sum(recent.values())
        return {"data": rows[:limit],
                "meta": {"recent_period": {"hours": recent_hours, "from": iso_z(recent_start), "to": iso_z(recent_end)},
                         "baseline_period": {"days": baseline_days, "from": iso_z(baseline_start),
                                             "to": iso_z(recent_start)},
                         "total_trending": len(rows), "total_clicks": total, "confidence": confidence(total)}}


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

# generate(clicks=True) only. The affiliate catalogue: (id, slug, category_slug, brand_slug,
# partner_slug), "" = none. The first ten are PRODUCTS (slug = id), which ordinary traffic already
# clicks; the other twenty get a role per site (trending, new, dormant, …, see _Generator.affiliate).
# 6 categories, 5 brands, 4 partners. Where the slug equals the id it is sent only sometimes;
# where it differs (a SKU id) it is always sent, so one product is one (id, slug) pair.
CLICK_PRODUCTS: list[tuple[str, str, str, str, str]] = [(p[0], p[0], *p[1:]) for p in PRODUCTS] + [
    ("galaxy-s24-skal", "galaxy-s24-skal", "mobilskal", "samsung", "teknikdelar"),
    ("sku-10442", "pixel-9-skal", "mobilskal", "google", "webhallen"),
    ("iphone-16-glas", "iphone-16-glas", "skarmskydd", "apple", "kjell"),
    ("sku-20871", "galaxy-a55-glas", "skarmskydd", "samsung", ""),
    ("iphone-15-glas", "iphone-15-glas", "skarmskydd", "apple", "teknikdelar"),
    ("beats-studio-buds", "beats-studio-buds", "horlurar", "apple", "webhallen"),
    ("galaxy-buds-3", "galaxy-buds-3", "horlurar", "samsung", "elgiganten"),
    ("sony-wf-1000xm5", "sony-wf-1000xm5", "horlurar", "sony", "teknikdelar"),
    ("pixel-buds-pro", "pixel-buds-pro", "horlurar", "google", "kjell"),
    ("anker-nano-65w", "anker-nano-65w", "laddare", "anker", "kjell"),
    ("sku-30115", "tradlos-laddplatta", "laddare", "", "elgiganten"),
    ("galaxy-watch-laddare", "galaxy-watch-laddare", "laddare", "samsung", "elgiganten"),
    ("apple-watch-band", "apple-watch-band", "klockarmband", "apple", "webhallen"),
    ("usb-c-kabel-2m", "usb-c-kabel-2m", "kablar", "anker", "kjell"),
    ("lightning-kabel", "lightning-kabel", "kablar", "apple", ""),
    ("hdmi-adapter", "hdmi-adapter", "kablar", "", "webhallen"),
    ("presentkort-500", "presentkort-500", "", "", "teknikdelar"),
    ("mobilhallare-bil", "mobilhallare-bil", "", "anker", "kjell"),
    ("okand-pryl", "okand-pryl", "", "", ""),
    ("sony-xb100", "sony-xb100", "", "sony", "elgiganten"),
]
_NEW_CLICK_PRODUCTS = CLICK_PRODUCTS[len(PRODUCTS):]

# Shopping journeys for goals and funnels (generate(clicks=True)): one session each unless "gap"
# (≥ 31 min, a new session). For the funnel / → /produkt… (startswith) → /checkout → purchase the
# comment gives the steps reached by each session.
_JOURNEYS: list[tuple[float, tuple[str, ...]]] = [
    (16, ("home",)),  # 1
    (8, ("home", "listing")),  # 2 (/produkter starts with /produkt)
    (14, ("home", "prod", "click")),  # 2
    (10, ("home", "prod", "prod", "checkout")),  # 3
    (10, ("home", "prod", "checkout", "purchase", "tack")),  # 4
    (4, ("home", "home", "prod", "prod", "home", "checkout", "checkout", "purchase", "purchase", "tack")),  # 4
    (5, ("checkout", "home", "prod", "purchase")),  # 2: checkout came before the product page
    (5, ("home", "checkout", "prod", "purchase")),  # 2
    (4, ("home", "purchase", "prod", "checkout")),  # 3: the purchase came before checkout
    (4, ("prod", "home", "prod", "click", "checkout", "purchase", "tack")),  # 4: the first product page is too early
    (4, ("prod", "checkout", "purchase")),  # 0: never on /
    (3, ("purchase",)),  # 0: an event-only session
    (3, ("home", "prod", "gap", "checkout", "purchase")),  # 2, then 0
    (5, ("home", "signup")),  # 1
    (3, ("home", "prod", "signup", "checkout", "purchase", "tack")),  # 4
]
_FULL_JOURNEY = ("home", "prod", "checkout", "purchase", "tack")


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
        self.steady_products: dict[str, list[tuple[str, str, str, str, str]]] = {}  # clicks=True

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
              props: dict[str, str] | None = None,
              product: tuple[str, str, str, str] | dict[str, str] | None = None) -> bool:
        """Append one event unless it falls outside [now − days, now)."""
        if not self.start <= ms < self.now:
            return False
        line: ImportLine = {"site_id": person.site.site_id, "name": name, "url": url}
        if referrer is not None:
            line["referrer"] = referrer
        if props:
            line["props"] = props
        if product:
            line["product"] = (dict(product) if isinstance(product, dict)
                               else dict(zip(("id", "category_slug", "brand_slug", "partner_slug"), product)))
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

    # -- affiliate clicks and shopping journeys (generate(clicks=True); own RNG stream) ------------

    def _product_fields(self, product: tuple[str, str, str, str, str]) -> dict[str, str]:
        """The click's product object: the slug left out half the time where it equals the id,
        an empty dimension sent as "" or left out."""
        pid, slug, category, brand, partner = product
        fields = {"id": pid}
        if slug != pid or self.rng.random() < 0.5:
            fields["slug"] = slug
        for key, value in (("category_slug", category), ("brand_slug", brand), ("partner_slug", partner)):
            if value or self.rng.random() < 0.5:
                fields[key] = value
        return fields

    def click_session(self, site: SiteSpec, at: int, product: tuple[str, str, str, str, str],
                      person: _Person | None = None, also: list | None = None) -> _Person:
        """A session with a click on `product` at `at`: the click alone (a cached page), or after
        1–3 pageviews ending on the product's page. With `also`, sometimes a second click on one
        of those products shortly after."""
        rng = self.rng
        person = person or self.person(site)
        entry = rng.choice([None, None, "https://www.google.com/", "https://prisjakt.nu/", "https://l.facebook.com/"])
        product_path = f"/produkt/{product[1]}"
        if rng.random() < 0.4:
            url = self._url(site, product_path)
            self._emit(person, at, "click", url, entry, product=self._product_fields(product))
        else:
            paths = [rng.choice(["/", f"/kategori/{product[2] or 'ovrigt'}", f"/guide/{rng.choice(GUIDES)}"])
                     for _ in range(rng.choice([0, 0, 1, 2]))] + [product_path]
            times, t = [], at
            for _ in paths:
                t -= rng.randint(5 * SECOND, 4 * MINUTE)
                times.append(t)
            referrer, url = entry, ""
            for t, path in zip(reversed(times), paths):
                url = self._url(site, path)
                self._emit(person, t, "pageview", url, referrer)
                referrer = url
            self._emit(person, at, "click", url, referrer, product=self._product_fields(product))
        if also and rng.random() < 0.1:
            other = rng.choice(also)
            self._emit(person, at + rng.randint(20 * SECOND, 3 * MINUTE), "click",
                       self._url(site, f"/produkt/{other[1]}"), None, product=self._product_fields(other))
        return person

    def affiliate(self, site: SiteSpec, budget: int) -> dict[str, list[str]]:
        """`budget` baseline click sessions over the whole window, plus (per site, roles drawn from
        the 20 new products): 5 with a burst in the last 6–24 h (trending), 1 with a mild rise
        (~+60 %), 3 with 3–12 clicks only in the last 23 h (new: trending without a baseline), 2
        with 1–2 clicks only there (new, below min_recent_clicks), 2 with clicks only > 10 days ago
        (dormant), the rest steady. Returns the product ids by role."""
        rng = self.rng
        new = rng.sample(_NEW_CLICK_PRODUCTS, len(_NEW_CLICK_PRODUCTS))
        trending, mild, hot, cold, dormant, steady = new[:5], new[5:6], new[6:9], new[9:11], new[11:13], new[13:]
        steady = steady + CLICK_PRODUCTS[:len(PRODUCTS)]
        self.steady_products[site.site_id] = steady
        baseline = steady + trending + mild
        weights = [rng.choice((1, 2, 3, 5, 8)) for _ in steady + trending] + [8] * len(mild)
        days = (self.now - self.start) / DAY
        daily = {p: budget * w / sum(weights) / days for p, w in zip(baseline, weights)}
        people: list[_Person] = []
        for _ in range(budget):
            product = rng.choices(baseline, weights)[0]
            again = rng.choice(people) if people and rng.random() < 0.15 else None
            people.append(self.click_session(site, rng.randrange(self.start, self.now), product, again, steady))
        # Windows that hold for any trending query within an hour of `now`: the last 23 h are
        # recent, [8 d − 1 h, 25 h) ago baseline.
        recent_start = self.now - 23 * HOUR
        for product in trending + mild:  # a baseline of their own, so they trend by growth
            for _ in range(rng.randint(2, 7)):
                self.click_session(site, rng.randrange(self.now - 8 * DAY + HOUR, self.now - 25 * HOUR), product)
        for product in trending:
            hours = rng.randint(6, 24)
            n = max(4, round(daily[product] * hours / 24 * rng.uniform(3, 8))) + rng.randint(0, 4)
            for _ in range(n):
                self.click_session(site, rng.randrange(self.now - hours * HOUR, self.now - SECOND), product,
                                   also=steady)
        for product in mild:
            for _ in range(round(daily[product] * 0.6) + 1):
                self.click_session(site, rng.randrange(recent_start, self.now - SECOND), product)
        for products, low, high in ((hot, 3, 12), (cold, 1, 2)):
            for product in products:
                for _ in range(rng.randint(low, high)):
                    self.click_session(site, rng.randrange(recent_start, self.now - SECOND), product)
        for product in dormant:
            for _ in range(rng.randint(3, 15)):
                self.click_session(site, rng.randrange(self.start + HOUR, self.now - 10 * DAY), product)
        return {role: [p[0] for p in products] for role, products in (
            ("trending", trending), ("mild", mild), ("new", hot), ("new_few", cold), ("dormant", dormant),
            ("steady", steady))}

    def journey(self, site: SiteSpec, start: int, tokens: tuple[str, ...],
                gaps: tuple[int, int] = (10 * SECOND, 8 * MINUTE)) -> None:
        """One new person's shopping journey (see _JOURNEYS) from `start`; its product pages and
        clicks are the site's steady products (so new and dormant products keep their shape)."""
        rng = self.rng
        products = self.steady_products.get(site.site_id) or CLICK_PRODUCTS
        person = self.person(site)
        entry = rng.choice([None, "https://www.google.com/", "https://l.facebook.com/", ""])
        t, url, referrer, product = start, None, entry, rng.choice(products)
        for token in tokens:
            if token == "gap":
                t += rng.randint(31 * MINUTE, 3 * HOUR)
                url, referrer = None, entry
                continue
            if token in ("home", "prod", "listing", "checkout", "tack"):
                if token == "prod":
                    product = rng.choice(products)
                path = {"home": "/?utm_source=newsletter&utm_medium=email" if rng.random() < 0.1 else "/",
                        "prod": f"/produkt/{product[1]}", "listing": "/produkter",
                        "checkout": "/checkout?steg=2" if rng.random() < 0.2 else "/checkout",
                        "tack": "/tack"}[token]
                url = self._url(site, path)
                self._emit(person, t, "pageview", url, referrer)
                referrer = url
            elif token == "click":
                self._emit(person, t, "click", url or self._url(site, f"/produkt/{product[1]}"), referrer,
                           product=self._product_fields(product))
            else:  # purchase, signup
                props = ({"value": str(rng.randint(99, 2999)), "currency": "SEK"} if token == "purchase"
                         else {"plan": rng.choice(["free", "pro"])})
                self._emit(person, t, token, url or self._url(site, "/"), referrer, props=props)
            t += rng.randint(*gaps)

    def journeys(self, site: SiteSpec, count: int) -> None:
        """`count` journeys at random times, plus six complete ones running across local midnights
        (a funnel session started on one day with its later steps on the next)."""
        rng = self.rng
        for _ in range(count):
            tokens = rng.choices([t for _, t in _JOURNEYS], [w for w, _ in _JOURNEYS])[0]
            self.journey(site, rng.randrange(self.start, self.now - 2 * HOUR), tokens)
        midnights = _local_midnights(site, self.start + HOUR, self.now - HOUR)
        for midnight in rng.sample(midnights, min(6, len(midnights))):
            self.journey(site, midnight - rng.randint(2 * MINUTE, 8 * MINUTE), _FULL_JOURNEY,
                         gaps=(1 * MINUTE, 4 * MINUTE))

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
             edge_cases: bool = True, clicks: bool = False) -> list[ImportLine]:
    """At least `target_events` import lines over the last `days` days before `now`, sorted by time.

    Besides ordinary traffic, every site gets sessions across UTC midnights, across its local
    midnights (the DST days' included) and across its DST changes. `edge_cases` adds gaps of exactly
    the timeout and 1 ms less, a chain across two UTC midnights, and utm_medium without utm_source.

    `clicks` adds, from an RNG stream of its own after everything else (so the lines without it
    are exactly the lines of clicks=False, in the same order), per site: affiliate click sessions
    over a 30-product catalogue (CLICK_PRODUCTS; ~5 % of the site's share of target_events) with
    bursts, new and dormant products for trending, and shopping journeys (_JOURNEYS; ~2 %) for
    goals and funnels.
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
    if clicks:
        gen.rng = random.Random(f"clicks:{seed}")
        for site in sites:
            share = target_events * site.weight / total_weight
            gen.affiliate(site, max(60, int(share * 0.05)))
            gen.journeys(site, max(40, int(share * 0.02)))
    return gen.lines()


def to_ndjson(lines: Iterable[ImportLine]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                    for line in lines)
