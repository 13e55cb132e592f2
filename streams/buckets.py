"""Time buckets of the rollups: UTC quarter hours (SPEC §6).

Every UTC offset in use since 2000 is a multiple of 15 minutes (+5:30 Kolkata, +5:45 Kathmandu,
+12:45 Chatham, DST shifts of 30 and 60 minutes), so every local day of every IANA timezone is a
whole number of quarter hours: the query API forms a site's local days from these buckets exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone
from typing import TypeVar

T = TypeVar("T")

BUCKET = timedelta(minutes=15)
BUCKET_S = 900

# A visitor id is minted from one UTC day's salt and, carried by a session open at midnight, used
# on the next day too (ingest/visitors.py): all events of one id fall within two UTC days. The
# stream core reads a visitor's history, and the query API looks for visitors seen before a
# period, within this window; one day of margin on top.
VISITOR_LIFETIME = timedelta(days=3)


def bucket_of(at: datetime) -> datetime:
    """The UTC quarter hour holding `at` (aware, UTC)."""
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


def utc_midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def history_window(first: date, last: date) -> tuple[datetime, datetime]:
    """[from, to) holding every event of every visitor seen on the UTC days `first`..`last`."""
    return utc_midnight(first) - timedelta(days=1), utc_midnight(last) + timedelta(days=2)


def history_windows(members: Iterable[tuple[T, date, date]]) -> list[tuple[datetime, datetime, list[T]]]:
    """The history windows of (member, first day, last day)s, merged where they overlap: one
    query per stretch of days, so live events and an old import together do not read the months
    between."""
    windows: list[list] = []  # [start, end, members]
    for member, first, last in sorted(members, key=lambda item: item[1]):
        start, end = history_window(first, last)
        if windows and start <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], end)
            windows[-1][2].append(member)
        else:
            windows.append([start, end, [member]])
    return [(start, end, found) for start, end, found in windows]
