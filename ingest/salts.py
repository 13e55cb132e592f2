"""Daily salts for visitor ids (SPEC §5.2, §5.3): 16 random bytes per UTC day, shared by every
ingest process through ClickHouse.

Live salts are deleted once they are older than yesterday's: past visitor ids can then never be
recomputed. A salt made for a day that had already ended (created_at later than the day after
it: made by an import of historic events) is kept as long as imports for that day may arrive
(SPEC §5.3): until the day is older than the oldest importable time (the raw-event TTL less a
visitor's lifetime, `ingest/importer.py`), so lines added to a day later get the visitor ids its
first import gave. `historic_days` (BK_HISTORIC_SALT_DAYS), when set, deletes it that many days
after it was made instead, if that comes first.

A process that reads today's salt also reads (or makes) tomorrow's: if ClickHouse is unavailable
at midnight, ingest goes on taking events with it instead of answering 503 until ClickHouse is
back. When ClickHouse answers at midnight, the salt is read again, as ever."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import Error as ClickHouseError

from streams.buckets import VISITOR_LIFETIME

log = logging.getLogger(__name__)

# How long after a day's earliest salt proposal it is taken (`_read_all`): inserts take milliseconds.
SETTLE_S = 0.25

# A process that takes no events still deletes expired salts (SPEC §5.2: kept 48 h): `expire`,
# this often (the ingest processes' lifespan).
EXPIRE_EVERY_S = 60
# Live salts older than yesterday's (made before their day ended), and historic ones (made for a
# day that had ended: by an import) past their time; never the key row.
_EXPIRED = ("day < {before:Date} AND day != {key_day:Date}"
            " AND (toDate(created_at) <= day + 1 OR day < {import_floor:Date}"
            " OR created_at < {expired:DateTime64(6, 'UTC')})")
_NEVER = datetime(2000, 1, 1, tzinfo=timezone.utc)  # no salt was made before it

# Not a day: the row holding the installation's secret key for imported lines' content ids
# (`importer.content_event_id`). Never purged; `besokskollen copy` carries it with the data.
ID_KEY_DAY = date(1970, 1, 1)


class Salts:
    def __init__(self, client: Client, historic_days: int | None = None, raw_events_ttl_days: int = 400) -> None:
        self._client = client
        self._historic_days = historic_days
        self._raw_events_ttl_days = raw_events_ttl_days
        self._cache: dict[date, bytes] = {}
        self._ahead: dict[date, bytes] = {}  # tomorrow's, read today
        self._day: date | None = None  # the UTC day the cache was last trimmed on
        self._lock = threading.Lock()

    def for_day(self, day: date) -> bytes:
        if (salt := self._cache.get(day)) is not None:
            return salt
        with self._lock:
            if day not in self._cache:
                today = self._today()
                self._cache[day] = self._fetch(day)
                if day == today:
                    self._read_ahead(day + timedelta(days=1))
            return self._cache[day]

    def warm_up(self) -> None:
        """Yesterday's and today's salts (and tomorrow's, read ahead) in memory before the first
        event. On a fresh installation each is made, and taken SETTLE_S later: the first beacons
        otherwise waited ~1 s for that."""
        today = datetime.now(timezone.utc).date()
        self.load([today - timedelta(days=1), today])

    def load(self, days: Iterable[date]) -> None:
        """Have the salts of these days in memory, past days read or made in one query each way:
        an import of 90 historic days otherwise asked for them one by one (~270 statements)."""
        days = set(days)
        for day in sorted(days):
            if day >= datetime.now(timezone.utc).date():  # first: making today's forgets past days
                self.for_day(day)
        with self._lock:
            today = self._today()
            past = sorted(day for day in days if day not in self._cache and day < today)
            if past:
                found = self._read_all(past)
                if missing := [day for day in past if day not in found]:
                    self._propose(missing)
                    found = self._read_all(past)
                self._cache.update(found)

    def _today(self) -> date:
        """Today's UTC date; on a new day, salts older than yesterday's go from memory as the purge
        deletes them from the database, whichever process purged (a process that never made a salt
        kept every day's). A past day's is read again, or made anew, if needed."""
        today = datetime.now(timezone.utc).date()
        if today != self._day:
            self._forget(before=today - timedelta(days=1))
            self._day = today
        return today

    def id_key(self) -> bytes:
        """The installation's 16-byte key for content event ids, made the first time it is asked."""
        return self.for_day(ID_KEY_DAY)

    def _fetch(self, day: date) -> bytes:
        try:
            return self._read(day) or self._create(day)
        except ClickHouseError:
            if (ahead := self._ahead.get(day)) is None:
                raise
            log.warning("ClickHouse is unavailable: using the salt of %s read the day before", day)
            return ahead

    def _read_ahead(self, day: date) -> None:
        try:
            self._ahead = {day: self._read(day) or self._create(day)}
        except ClickHouseError as exc:
            log.warning("could not read the salt of %s ahead (%s); it is read at midnight", day, exc)

    def cached(self, day: date) -> bytes | None:
        return self._cache.get(day)

    def _read(self, day: date) -> bytes | None:
        return self._read_all([day]).get(day)

    def _read_all(self, days: list[date]) -> dict[date, bytes]:
        # Every process proposes a salt the first time it needs one; all agree on the earliest
        # (by the server's clock as it inserted it). A proposal made at the same moment as the
        # earliest seen may be inserted just after this read and still be earlier: a day's salt is
        # taken once its earliest proposal is SETTLE_S old: read again after that if it is younger.
        rows = self._earliest(days)
        if (wait := min(SETTLE_S, max((SETTLE_S - age / 1e6 for *_, age in rows), default=0))) > 0:
            time.sleep(wait)
            rows = self._earliest(days)
        return {day: bytes.fromhex(salt) for day, salt, _ in rows}

    def _earliest(self, days: list[date]) -> list[tuple]:
        """(day, earliest proposal's salt, its age in µs) of each day that has one."""
        return self._client.query(
            "SELECT day, argMin(salt, (created_at, salt)), dateDiff('microsecond', min(created_at), now64(6))"
            " FROM salts WHERE day IN {days:Array(Date)} GROUP BY day", parameters={"days": days}).result_rows

    def _propose(self, days: list[date]) -> datetime:
        """Insert a new salt for each of these days, made at the server's time (the hosts of two
        processes may disagree on it); returns about when."""
        self._client.command(
            "INSERT INTO salts (day, salt, created_at) SELECT p.1, p.2, now64(6)"
            " FROM (SELECT arrayJoin(arrayZip({days:Array(Date)}, {salts:Array(String)})) AS p)",
            parameters={"days": days, "salts": [secrets.token_hex(16) for _ in days]})
        return datetime.now(timezone.utc)

    def _create(self, day: date) -> bytes:
        created = self._propose([day])
        if day >= created.date():  # a live salt (today's, or tomorrow's read ahead): about once a day
            self._purge(created)
        salt = self._read(day)
        if salt is None:
            raise RuntimeError(f"the salt inserted for {day} is not visible")
        return salt

    def expire(self) -> None:
        """What a day's first event does, for a process that takes none: today's salt read (and
        tomorrow's ahead, which purges when it is made), older days forgotten; then any expired
        salt still stored (a purge that failed, a historic salt past its time) deleted. One small
        query when there is none."""
        self.for_day(datetime.now(timezone.utc).date())
        now = datetime.now(timezone.utc)
        left = self._client.query(f"SELECT count() FROM salts WHERE {_EXPIRED}",
                                  parameters=self._expiry(now)).result_rows[0][0]
        if left:
            self._purge(now)

    def _purge(self, now: datetime, before: date | None = None) -> None:
        """Forget live salts older than `before` (yesterday's), and historic ones past their time."""
        parameters = self._expiry(now, before)
        self._client.command(f"ALTER TABLE salts DELETE WHERE {_EXPIRED}", parameters=parameters)
        self._forget(parameters["before"])

    def _expiry(self, now: datetime, before: date | None = None) -> dict:
        oldest_importable = now - timedelta(days=self._raw_events_ttl_days) + VISITOR_LIFETIME
        return {"before": before or now.date() - timedelta(days=1), "key_day": ID_KEY_DAY,
                "import_floor": oldest_importable.date(),
                "expired": now - timedelta(days=self._historic_days) if self._historic_days else _NEVER}

    def _forget(self, before: date) -> None:
        for day in [d for d in self._cache if d < before]:
            del self._cache[day]
