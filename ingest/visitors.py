"""Visitor ids: a keyed hash of (daily salt, site, client IP, user agent) as a UInt64.

Around UTC midnight a visitor in mid-session would otherwise become a new visitor; so for the
first session-timeout of a day the id under yesterday's salt is tried first, and kept when that
visitor still has an open session (SPEC §5.2)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta

from ingest.salts import Salts

# (site_id, visitor_id, active_since) -> whether that visitor has a session ending after it.
OpenSessionCheck = Callable[[str, int, datetime], bool]


def hash_visitor(salt: bytes, site_id: str, ip: str, user_agent: str) -> int:
    digest = hashlib.blake2b(f"{site_id}\x00{ip}\x00{user_agent}".encode(), key=salt, digest_size=8)
    return int.from_bytes(digest.digest(), "big")


class Visitors:
    def __init__(self, salts: Salts, has_open_session: OpenSessionCheck, session_timeout_s: int) -> None:
        self._salts = salts
        self._has_open_session = has_open_session
        self._timeout = timedelta(seconds=session_timeout_s)

    def needs_io(self, at: datetime) -> bool:
        """Whether `visitor_id` may touch the database (so async callers use a thread)."""
        day = at.date()
        return self._salts.cached(day) is None or self._near_midnight(at)

    def _near_midnight(self, at: datetime) -> bool:
        return at - datetime.combine(at.date(), datetime.min.time(), at.tzinfo) < self._timeout

    def visitor_id(self, site_id: str, ip: str, user_agent: str, at: datetime) -> int:
        today = hash_visitor(self._salts.for_day(at.date()), site_id, ip, user_agent)
        if self._near_midnight(at):
            yesterday = hash_visitor(self._salts.for_day(at.date() - timedelta(days=1)), site_id, ip, user_agent)
            if self._has_open_session(site_id, yesterday, at - self._timeout):
                return yesterday
        return today
