"""Reporting periods. Stats periods are calendar days in the site's timezone (SPEC §7);
affiliate `days` are UTC calendar days, as the reference's `meta.period` shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from query_api.errors import APIError

FIXED_PERIODS = {"7d": 7, "30d": 30, "90d": 90}
MAX_CUSTOM_DAYS = 731


@dataclass(frozen=True, slots=True)
class Period:
    first: date  # inclusive, in the site's timezone
    last: date   # inclusive
    tz: str

    @property
    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]

    @property
    def start_utc(self) -> datetime:
        return datetime.combine(self.first, time.min, ZoneInfo(self.tz)).astimezone(timezone.utc)

    @property
    def end_utc(self) -> datetime:
        """Exclusive: midnight after the last day."""
        return datetime.combine(self.last + timedelta(days=1), time.min, ZoneInfo(self.tz)).astimezone(timezone.utc)


def _parse_day(value: str | None, name: str) -> date:
    if not value:
        raise APIError(400, "missing_parameter", f"{name} is required when period=custom")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise APIError(400, "invalid_parameter", f"{name} must be a date as YYYY-MM-DD") from None


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


def round_half_away(value: float) -> int:
    """Whole-number percentages, half away from zero (Python's round() is half-to-even)."""
    return int(Decimal(str(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
