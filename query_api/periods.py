"""Reporting periods. Stats periods are calendar days in the site's timezone (SPEC §7);
affiliate `days` are UTC calendar days, as the reference's `meta.period` shows."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from zoneinfo import ZoneInfo

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

    @property
    def start_utc(self) -> datetime:
        return local_midnight(self.first, self.tz)

    @property
    def end_utc(self) -> datetime:
        """Exclusive: midnight after the last day."""
        return local_midnight(self.last + timedelta(days=1), self.tz)

    def previous(self) -> Period:
        """The period of equal length just before this one (for compare=true)."""
        return Period(self.first - timedelta(days=self.length), self.first - timedelta(days=1), self.tz)

    def as_json(self) -> dict:
        return {"from": self.first.isoformat(), "to": self.last.isoformat()}


def local_midnight(day: date, tz: str) -> datetime:
    """The UTC moment a local day begins (zoneinfo resolves DST gaps: fold 0)."""
    return datetime.combine(day, time.min, ZoneInfo(tz)).astimezone(timezone.utc)


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


def stats_period(period: str, tz: str, from_: str | None = None, to: str | None = None,
                 now: datetime | None = None) -> Period:
    if period in FIXED_PERIODS:
        today = (now or datetime.now(timezone.utc)).astimezone(ZoneInfo(tz)).date()
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
