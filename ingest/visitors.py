"""Visitor ids: a keyed hash of (daily salt, site, client IP, user agent) as a UInt64.

Around UTC midnight a visitor in mid-session would otherwise become a new visitor; so in the
first session-timeout of a day the id under yesterday's salt is tried first, and when that
visitor still has an open session, it keeps yesterday's id for the rest of the day (SPEC §5.2)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from ingest.salts import Salts

# (site_id, visitor_id, active_since) -> whether that visitor has a session ending after it.
OpenSessionCheck = Callable[[str, int, datetime], bool]


def hash_visitor(salt: bytes, site_id: str, ip: str, user_agent: str) -> int:
    digest = hashlib.blake2b(f"{site_id}\x00{ip}\x00{user_agent}".encode(), key=salt, digest_size=8)
    return int.from_bytes(digest.digest(), "big")


@dataclass
class _Carry:
    """One day's decisions: which visitors were checked, and which carry yesterday's id."""
    checked: set[tuple[str, int]] = field(default_factory=set)
    keep: set[tuple[str, int]] = field(default_factory=set)


class Visitors:
    def __init__(self, salts: Salts, has_open_session: OpenSessionCheck, session_timeout_s: int) -> None:
        self._salts = salts
        self._has_open_session = has_open_session
        self._timeout = timedelta(seconds=session_timeout_s)
        self._carry: dict[date, _Carry] = {}

    def needs_io(self, at: datetime) -> bool:
        """Whether `visitor_id` may touch the database (so async callers use a thread)."""
        day = at.date()
        return self._salts.cached(day) is None or self._near_midnight(at)

    def _near_midnight(self, at: datetime) -> bool:
        return at - datetime.combine(at.date(), time.min, at.tzinfo) < self._timeout

    def visitor_id(self, site_id: str, ip: str, user_agent: str, at: datetime) -> int:
        day = at.date()
        carry = self._carry.get(day)
        near_midnight = self._near_midnight(at)
        if near_midnight or (carry and carry.keep):
            yesterday = hash_visitor(self._salts.for_day(day - timedelta(days=1)), site_id, ip, user_agent)
            key = (site_id, yesterday)
            carry = carry or self._carry_for(day)
            if near_midnight and key not in carry.checked:  # each visitor is checked once a day
                carry.checked.add(key)
                if self._has_open_session(site_id, yesterday, at - self._timeout):
                    carry.keep.add(key)
            if key in carry.keep:
                return yesterday
        return hash_visitor(self._salts.for_day(day), site_id, ip, user_agent)

    def _carry_for(self, day: date) -> _Carry:
        for old in [d for d in self._carry if d < day - timedelta(days=2)]:
            del self._carry[old]
        return self._carry.setdefault(day, _Carry())
