"""Reporting periods. Stats periods are calendar days in the site's timezone (SPEC §7), drawn by
ClickHouse's timezone rules — the ones its SQL groups by (`toDate(bucket, tz)`) — and never by
Python's (README, "Time zones"); affiliate `days` are UTC calendar days, as the reference's
`meta.period` shows."""

from __future__ import annotations

import math
import re
import threading
import time as clock
from array import array
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from cachetools import LRUCache
from clickhouse_connect.driver.client import Client

from query_api.errors import APIError

FIXED_PERIODS = {"7d": 7, "30d": 30, "90d": 90}
MAX_CUSTOM_DAYS = 731
# Custom dates are limited to what the storage types and every timezone handle: UTC offsets have
# been whole quarter hours since 2000, and a comparison period may reach two years further back.
EARLIEST_DAY = date(2002, 1, 1)
LATEST_DAY = date(2099, 12, 31)


@dataclass(frozen=True, slots=True)
class Period:
    first: date  # inclusive, in the site's timezone
    last: date   # inclusive
    tz: str

    @property
    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range(self.length)]

    @property
    def length(self) -> int:
        return (self.last - self.first).days + 1

    def start_utc(self, client: Client) -> datetime:
        return local_midnight(client, self.first, self.tz)

    def end_utc(self, client: Client) -> datetime:
        """Exclusive: midnight after the last day."""
        return local_midnight(client, self.last + timedelta(days=1), self.tz)

    def previous(self) -> Period:
        """The period of equal length just before this one (for compare=true)."""
        return Period(self.first - timedelta(days=self.length), self.first - timedelta(days=1), self.tz)

    def as_json(self) -> dict:
        return {"from": self.first.isoformat(), "to": self.last.isoformat()}


# -- local days ---------------------------------------------------------------------------------
# One set of timezone rules draws every local day: ClickHouse's. Its SQL dates buckets with
# `toDate(bucket, tz)`, so the period edges Python binds into that SQL are asked of the same
# server — Python's zoneinfo (the system's tzdata) can be older or newer than the server's own
# (README, "Time zones"). Asked once per (client, timezone, year) and kept for REFRESH_S, so a
# server upgraded to new rules is followed within that time.

REFRESH_S = 3600.0
_CACHED_YEARS = 4096  # ~3 KB each

# A Date made a DateTime in a zone is the first second of that local day (ClickHouse's own day
# table, the one toDate reads). Not toDateTime('… 00:00:00', tz): where midnight does not exist
# (a DST change at 00:00, as in Santiago or Beirut), that parse lands an hour early, on the day before.
_DAY_STARTS = "SELECT toUInt32(toDateTime(toDate(%(first)s) + number, %(tz)s)) FROM numbers(%(days)s) ORDER BY number"

_years: LRUCache[tuple[Client, str, int], tuple[int, array]] = LRUCache(maxsize=_CACHED_YEARS)  # UTC seconds
_years_lock = threading.Lock()


def day_starts(client: Client, tz: str, first: date, last: date) -> list[datetime]:
    """The UTC moment each local day `first`..`last` (inclusive) begins, in ClickHouse's rules:
    the first second `toDate(·, tz)` gives that day. A day a zone skipped (Samoa's 2011-12-30) begins
    where the next one does."""
    generation = int(clock.monotonic() // REFRESH_S)
    years = range(first.year, last.year + 1)
    found: dict[int, array] = {}
    with _years_lock:
        for year in years:
            hit = _years.get((client, tz, year))
            if hit is not None and hit[0] == generation:
                found[year] = hit[1]
    missing = [year for year in years if year not in found]
    if missing:
        fetched = _fetch_years(client, tz, missing[0], missing[-1])
        found.update(fetched)
        with _years_lock:
            for year, starts in fetched.items():
                _years[(client, tz, year)] = (generation, starts)
    out: list[datetime] = []
    for year in years:
        jan1 = date(year, 1, 1)
        seconds = found[year][(max(first, jan1) - jan1).days:(min(last, date(year, 12, 31)) - jan1).days + 1]
        out.extend(datetime.fromtimestamp(s, timezone.utc) for s in seconds)
    return out


def _fetch_years(client: Client, tz: str, first_year: int, last_year: int) -> dict[int, array]:
    first = date(first_year, 1, 1)
    rows = client.query(_DAY_STARTS, parameters={"first": first, "tz": tz,
                                                 "days": (date(last_year + 1, 1, 1) - first).days}).result_rows
    out, at = {}, 0
    for year in range(first_year, last_year + 1):
        n = (date(year + 1, 1, 1) - date(year, 1, 1)).days
        out[year], at = array("q", (row[0] for row in rows[at:at + n])), at + n
    return out


def local_midnight(client: Client, day: date, tz: str) -> datetime:
    """The UTC moment a local day begins (ClickHouse's rules)."""
    return day_starts(client, tz, day, day)[0]


def local_today(client: Client, tz: str, now: datetime | None = None) -> date:
    """The local day `now` falls on (ClickHouse's rules): the latest one begun by then. Local dates
    are within a day of the UTC date (offsets run from -12:00 to +14:00)."""
    now = now or datetime.now(timezone.utc)
    utc_day = now.astimezone(timezone.utc).date()
    candidates = [utc_day - timedelta(days=1), utc_day, utc_day + timedelta(days=1)]
    starts = day_starts(client, tz, candidates[0], candidates[-1])
    return max(day for day, start in zip(candidates, starts) if start <= now)


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _parse_day(value: str | None, name: str) -> date:
    if not value:
        raise APIError(400, "missing_parameter", f"{name} is required when period=custom")
    try:
        # fromisoformat alone also takes 20260101 and week dates such as 2026-W01-1.
        if not _DAY.fullmatch(value):
            raise ValueError
        day = date.fromisoformat(value)
    except ValueError:
        raise APIError(400, "invalid_parameter", f"{name} must be a date as YYYY-MM-DD") from None
    if not EARLIEST_DAY <= day <= LATEST_DAY:
        raise APIError(400, "invalid_parameter",
                       f"{name} must be between {EARLIEST_DAY.isoformat()} and {LATEST_DAY.isoformat()}")
    return day


def stats_period(client: Client, period: str, tz: str, from_: str | None = None, to: str | None = None,
                 now: datetime | None = None) -> Period:
    if period in FIXED_PERIODS:
        # Not ignored: the answer would be about other days than asked, and lists do not echo
        # their period. (Empty values count as absent.)
        if from_ or to:
            raise APIError(400, "invalid_parameter", "from and to are used only with period=custom")
        today = local_today(client, tz, now)
        return Period(today - timedelta(days=FIXED_PERIODS[period] - 1), today, tz)
    if period == "custom":
        first, last = _parse_day(from_, "from"), _parse_day(to, "to")
        if last < first:
            raise APIError(400, "invalid_parameter", "to must not be before from")
        if (last - first).days >= MAX_CUSTOM_DAYS:
            raise APIError(400, "invalid_parameter", f"a custom period spans at most {MAX_CUSTOM_DAYS} days")
        return Period(first, last, tz)
    raise APIError(400, "invalid_parameter", "period must be one of 7d, 30d, 90d, custom")


def utc_days(days: int, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last `days` UTC calendar days including today: [first 00:00:00Z, today 23:59:59Z]."""
    today = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).date()
    first = datetime.combine(today - timedelta(days=days - 1), time.min, timezone.utc)
    last = datetime.combine(today, time(23, 59, 59), timezone.utc)
    return first, last


def iso_z(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def round_half_away(value: float | Decimal | Fraction, places: int = 0):
    """Half away from zero (Python's round() is half-to-even): an int for whole numbers, else a
    float with `places` decimals. Fractions are rounded exactly."""
    if isinstance(value, Fraction):
        scaled = abs(value) * 10 ** places
        whole = math.floor(scaled + Fraction(1, 2)) * (1 if value >= 0 else -1)
        return whole if places == 0 else whole / 10 ** places
    rounded = Decimal(str(value)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return int(rounded) if places == 0 else float(rounded)


def percent(part: int, whole: int) -> int:
    """part / whole × 100, exact before rounding (0 when whole is 0)."""
    return round_half_away(Decimal(part) * 100 / Decimal(whole)) if whole else 0


def change(current: int, previous: int) -> int | None:
    """Percent change from previous to current; None when there was nothing before."""
    return round_half_away(Decimal(current - previous) * 100 / Decimal(previous)) if previous else None
