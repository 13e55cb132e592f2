"""Visitor ids (SPEC §5.2): a keyed hash of (daily salt, site, client IP, user agent) as a UInt64.

An event at time t on UTC day D gets today's id, hash(salt of D) — unless the person's id under
yesterday's salt, y = hash(salt of D−1), has an open session at t (its latest event is less than
the session timeout before t). Then the session that started before midnight goes on under y; once
it lapses, the person is today's visitor. Live events and imported ones follow the same rule.

Whether y's session is open is decided, cheapest first, by
1. the latest event this instance gave y (a session this process is seeing continue);
2. in the first minute of the day (a margin for events of before midnight still on their way to
   storage), the database: another process may have seen the session;
3. after that, the database again, but only for the ids whose sessions were open at midnight
   (loaded then, and again once a minute: an import may store such sessions at any time): no
   other y can have an open session after midnight, since y gets an event after midnight only
   while its session goes on, so that session was open at midnight.
An id the database found lapsed stays lapsed (time only moves on), so it is asked about once.
An import's events are remembered as if given here (`remember`): a live event that continues an
imported session goes on under its id at once, not only after the next load.

Live requests ask the database through `CarryQuestions`, which puts the questions of concurrent
requests in one query: in the first minute of a day every visitor new to this process needs
one. (Until 2026-12 that held for the day's whole first timeout: `/api/event` then ran at a
third of its daytime rate.) When ClickHouse cannot be asked, a live event gets today's id rather
than a 503: a session across midnight may then count its visitor twice, but no event is lost
(`lenient`; imports fail instead, and are sent again)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from time import monotonic as _monotonic

from clickhouse_connect.driver.exceptions import Error as ClickHouseError

from ingest.salts import Salts
from streams.buckets import utc_midnight

# ((site_id, visitor_id) pairs, since) -> the latest session end of each that has a session
# ending after `since` (so whether a visitor has a session with an event after `since`).
LatestEnds = Callable[[Iterable[tuple[str, int]], datetime], dict[tuple[str, int], datetime]]
# (midnights, session timeout, site ids or None for all) -> for each midnight, (site_id, visitor_id)
# of every session open then.
OpenAtMidnight = Callable[[Iterable[datetime], timedelta, Iterable[str] | None], dict[datetime, set[tuple[str, int]]]]

log = logging.getLogger(__name__)

# Events reach storage within seconds; this much past midnight, the sessions open at midnight are
# all stored and can be loaded. Before that, every new visitor's carry is asked about.
_SETTLE = timedelta(seconds=60)
# How long a load of them is trusted: live events cannot add any, but an import (through any
# process) can, and another process learns of them only from the database. One query a minute;
# it reads only the granules of sessions near midnight (`sessions` is sorted by start, with a
# minmax index on end).
_RELOAD = timedelta(seconds=60)
_SAY_EVERY_S = 30.0

Key = tuple[str, int]  # (site_id, visitor_id)


def hash_visitor(salt: bytes, site_id: str, ip: str, user_agent: str) -> int:
    digest = hashlib.blake2b(f"{site_id}\x00{ip}\x00{user_agent}".encode(), key=salt, digest_size=8)
    return int.from_bytes(digest.digest(), "big")


@dataclass
class _Day:
    """What the database said about one day's carry-overs."""
    lapsed: set[Key] = field(default_factory=set)
    open_at_midnight: set[Key] | None = None  # None until loaded
    loaded_for: datetime | None = None  # the event time it was loaded for

    def knows_open(self, at: datetime, reload: timedelta | None) -> bool:
        """Whether `open_at_midnight` may answer for an event at `at` (None: once loaded, always)."""
        return self.loaded_for is not None and (reload is None or at - self.loaded_for < reload)


class Visitors:
    def __init__(self, salts: Salts, latest_ends: LatestEnds, open_at_midnight: OpenAtMidnight,
                 session_timeout_s: int, lenient: bool = False, reload: timedelta | None = _RELOAD,
                 batch_lookups: tuple[LatestEnds, OpenAtMidnight] | None = None) -> None:
        self._salts = salts
        # What `for_batch` (an import) asks through: live lookups have a short timeout
        # (`storage.for_lookups`), an import's may read months of sessions.
        self._batch_latest_ends, self._batch_open_at = batch_lookups or (latest_ends, open_at_midnight)
        # How often the sessions open at midnight are read again (an import through another
        # process may add to them); None for an instance whose database does not change meanwhile.
        self._reload = reload
        self.latest_ends = latest_ends
        self.lenient = lenient
        self._open_at_midnight = open_at_midnight
        self._timeout_s = session_timeout_s
        self._timeout = timedelta(seconds=session_timeout_s)
        # Latest event time per id given out, oldest first (re-inserted on update), so entries a
        # timeout older than the newest event are dropped from the front. An OrderedDict: a plain
        # dict finds its first entry by stepping over the slots its deletions left at the front,
        # so once a process had run a timeout and dropped ids on every request, an id cost more
        # the longer it ran: 147, 499, then 651 µs in 10-minute steps at 200 new visitors a
        # second, against 11-13 µs now (tests/bench/bench_visitor_ids.py).
        self._latest: OrderedDict[Key, datetime] = OrderedDict()
        self._newest: datetime | None = None
        self._days: dict[date, _Day] = {}
        self._lock = threading.Lock()  # callers may hop to threads (visitor_id, when it asks)
        self._load_lock = threading.Lock()  # one load of a day's open sessions, not under _lock
        self._said_at, self._unsaid = float("-inf"), 0  # say_unavailable

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    def warm_up(self) -> None:
        """The salts live events need, loaded before the first one arrives (`Salts.warm_up`)."""
        try:
            self._salts.warm_up()
        except ClickHouseError as exc:
            log.warning("could not load the day's salts ahead (%s); the first events load them", exc)

    def id_key(self) -> bytes:
        """The installation's key for imported lines' content ids (`Salts.id_key`)."""
        return self._salts.id_key()

    def for_batch(self, people: Iterable[tuple[str, str, str, datetime]]) -> Visitors:
        """A fresh instance for these (site, IP, user agent, time)s, decided all at once (an
        import). The database does not change meanwhile, so what their events may ask it is asked
        up front: the sessions open at each midnight, in one query, then every carry those and the
        days' first minutes raise, in one more (one query per day and per question took ~2.6 ms
        each; 10,000 new visitors in the first half hour of their days took 26 s)."""
        people = list(people)
        self._salts.load({day for *_, at in people for day in (at.date(), at.date() - timedelta(days=1))})
        # What this instance gave out live, perhaps not stored yet: the latest event of each id.
        with self._lock:
            seen = dict(self._latest)

        settled = {_midnight(at) for *_, at in people if _settled(at)}
        sites = {site_id for site_id, *_ in people}
        opened = self._batch_open_at(settled, self._timeout, sites) if settled else {}

        def open_at_midnight(midnights: Iterable[datetime], timeout: timedelta, _sites=None) -> dict[datetime, set[Key]]:
            midnights = set(midnights)
            found = {m: opened[m] for m in midnights if m in opened and timeout == self._timeout}
            found |= self._batch_open_at(midnights - found.keys(), timeout, sites) if midnights - found.keys() else {}
            # Ids seen live since the timeout before midnight: a superset is safe, `latest_ends` decides.
            return {m: keys | {key for key, at in seen.items() if at > m - timeout} for m, keys in found.items()}

        may_carry = open_at_midnight(settled, self._timeout)
        asked: dict[date, set[Key]] = defaultdict(set)
        for site_id, ip, user_agent, at in people:
            key = (site_id, hash_visitor(self._salts.for_day(at.date() - timedelta(days=1)), site_id, ip, user_agent))
            if not _settled(at) or key in may_carry[_midnight(at)]:
                asked[at.date()].add(key)
        # Each id's latest session end from the day's first possible question on answers every
        # later question of that day. Asked for every day at once, from the earliest day's first
        # question: all events of one id fall within two UTC days (streams/buckets.py), so its
        # latest end from an earlier moment on is its latest end from its own day's first question
        # on, whenever it is after that.
        known: dict[tuple[date, Key], datetime] = {}
        if asked:
            ends = self._batch_latest_ends(set().union(*asked.values()), utc_midnight(min(asked)) - self._timeout)
            known = {(day, key): ends[key] for day, keys in asked.items() for key in keys
                     if key in ends and ends[key] > utc_midnight(day) - self._timeout}

        def latest_ends(keys: Iterable[Key], since: datetime) -> dict[Key, datetime]:
            day, keys = (since + self._timeout).date(), set(keys)
            ahead = keys & asked.get(day, set())
            found = {key: known[(day, key)] for key in ahead if (day, key) in known and known[(day, key)] > since}
            found |= self._batch_latest_ends(keys - ahead, since) if keys - ahead else {}
            live = {key: max(seen[key], found.get(key, seen[key])) for key in keys if seen.get(key, since) > since}
            return found | live

        # Loaded once per day: reloading each event-time minute of a historic day asked the
        # database for nearly every event of an import (a 100k-event import took 5 minutes, not 40 s).
        return Visitors(self._salts, latest_ends, open_at_midnight, self._timeout_s, reload=None)

    def known_id(self, site_id: str, ip: str, user_agent: str, at: datetime) -> int | None:
        """`visitor_id` when memory decides it, without I/O; None when that needs the database (or
        a salt not loaded). A live request asks this first: one pass, two hashes at most."""
        yesterday = self._yesterday_if_cached(site_id, ip, user_agent, at)
        if yesterday is None or (carry := self._known_carry(yesterday, at)) is None:
            return None
        return self._given(yesterday, carry, ip, user_agent, at)

    def visitor_id(self, site_id: str, ip: str, user_agent: str, at: datetime) -> int:
        key = (site_id, hash_visitor(self._salts.for_day(at.date() - timedelta(days=1)), site_id, ip, user_agent))
        carry = self._known_carry(key, at)
        if carry is None:
            carry = self._ask_database(key, at)
        return self._given(key, carry, ip, user_agent, at)

    def _given(self, yesterday: Key, carry: bool, ip: str, user_agent: str, at: datetime) -> int:
        """The id given for an event at `at`: yesterday's while its session carries on, else
        today's; noted as given."""
        site_id = yesterday[0]
        today = hash_visitor(self._salts.for_day(at.date()), site_id, ip, user_agent)
        if carry:
            # An import of earlier events can open yesterday's session again after this person's
            # live events began one under today's id: those go on under today's.
            last = self._latest.get((site_id, today))
            carry = last is None or at - last >= self._timeout
        visitor = yesterday[1] if carry else today
        self._remember((site_id, visitor), at)
        return visitor

    def question(self, site_id: str, ip: str, user_agent: str, at: datetime) -> Key | None:
        """Yesterday's id of this visitor when whether it carries on at `at` is for the database
        to say and `learn` can take the answer; None when memory knows, or when the salts or the
        day's open sessions are not loaded or are due again (`visitor_id` loads them)."""
        key = self._yesterday_if_cached(site_id, ip, user_agent, at)
        if key is None or self._known_carry(key, at) is not None:
            return None
        loaded = self._days.get(at.date())
        if _settled(at) and (loaded is None or not loaded.knows_open(at, self._reload)):
            return None
        return key

    def learn(self, yesterday: Key, at: datetime, end: datetime | None) -> None:
        """The database's latest session end (None: none ends after `at` − timeout, or the
        database could not be asked) of yesterday's id, asked for an event at `at`."""
        if end is not None and at - end < self._timeout:
            self._remember(yesterday, end)
        else:
            self._day(at.date()).lapsed.add(yesterday)

    def remember(self, events: Iterable[tuple[str, int, datetime]]) -> None:
        """(site, visitor id, time) of events given ids by another instance (an import's,
        `for_batch`), oldest first: those less than a timeout before the newest event seen here
        are remembered as if given here."""
        for site_id, visitor, at in events:
            self._remember((site_id, visitor), at, only_recent=True)

    def _yesterday_if_cached(self, site_id: str, ip: str, user_agent: str, at: datetime) -> Key | None:
        """Yesterday's id of this visitor, if both salts it may need are in memory."""
        day = at.date()
        yesterday = self._salts.cached(day - timedelta(days=1))
        if yesterday is None or self._salts.cached(day) is None:
            return None
        return (site_id, hash_visitor(yesterday, site_id, ip, user_agent))

    def _known_carry(self, yesterday: Key, at: datetime) -> bool | None:
        """Whether yesterday's id carries at `at`, if memory can tell; None: ask the database."""
        last = self._latest.get(yesterday)
        if last is not None and at - last < self._timeout:
            return True
        day = self._days.get(at.date())
        if day is not None and yesterday in day.lapsed:
            return False
        if not _settled(at) or day is None or not day.knows_open(at, self._reload):
            return None
        return None if yesterday in day.open_at_midnight else False

    def _ask_database(self, yesterday: Key, at: datetime) -> bool:
        midnight = _midnight(at)
        day = self._day(at.date())
        try:
            if _settled(at):
                with self._load_lock:
                    if not day.knows_open(at, self._reload):
                        day.open_at_midnight = self._open_at_midnight([midnight], self._timeout, None)[midnight]
                        day.loaded_for = at
                if yesterday not in day.open_at_midnight:
                    return False
            end = self.latest_ends([yesterday], at - self._timeout).get(yesterday)
        except ClickHouseError as exc:
            if not self.lenient:
                raise
            self.say_unavailable(exc, 1)
            end = None
        self.learn(yesterday, at, end)
        return end is not None

    def say_unavailable(self, exc: Exception, visitors: int) -> None:
        """A WARNING at most once per `_SAY_EVERY_S`, with how many visitors got today's id since:
        once a ClickHouse outage outlasts the trust in the day's open sessions, every new visitor
        asks, and each said so (50 lines a second at 150 events/s)."""
        with self._lock:
            self._unsaid += visitors
            now = _monotonic()
            if now - self._said_at < _SAY_EVERY_S:
                return
            unsaid, self._unsaid, self._said_at = self._unsaid, 0, now
        log.warning("ClickHouse is unavailable (%s): %d visitor%s got today's id%s", exc, unsaid,
                    "" if unsaid == 1 else "s", " since this was last said" if unsaid > visitors else "")

    def _day(self, day: date) -> _Day:
        with self._lock:
            for old in [d for d in self._days if d < day - timedelta(days=1)]:
                del self._days[old]
            return self._days.setdefault(day, _Day())

    def _remember(self, key: Key, at: datetime, only_recent: bool = False) -> None:
        """Note an id given out at `at`; with `only_recent`, only if less than a timeout before
        the newest event noted."""
        with self._lock:
            if only_recent and self._newest is not None and self._newest - at >= self._timeout:
                return
            last = self._latest.pop(key, at)
            self._latest[key] = max(last, at)
            self._newest = at if self._newest is None else max(self._newest, at)
            horizon = self._newest - self._timeout
            while self._latest:
                oldest = next(iter(self._latest))
                if self._latest[oldest] > horizon:
                    break
                del self._latest[oldest]


def _midnight(at: datetime) -> datetime:
    return datetime.combine(at.date(), time.min, at.tzinfo)


def _settled(at: datetime) -> bool:
    """Whether the sessions open at the midnight before `at` are all stored by then."""
    return at - _midnight(at) >= _SETTLE


class CarryQuestions:
    """`Visitors.question`s of concurrent requests, asked in one query: a request whose visitor
    id needs the database awaits `settle` first, after which `visitor_id` needs no I/O."""

    def __init__(self, visitors: Visitors) -> None:
        self._visitors = visitors
        self._asked: dict[Key, tuple[datetime, asyncio.Future[None]]] = {}
        self._answering: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def settle(self, site_id: str, ip: str, user_agent: str, at: datetime) -> None:
        key = self._visitors.question(site_id, ip, user_agent, at)
        if key is None:
            return
        if not self._asked:
            asyncio.get_running_loop().call_soon(self._ask)  # after this turn's requests joined
        asked = self._asked.get(key)
        if asked is None:
            asked = self._asked[key] = (at, asyncio.get_running_loop().create_future())
        await asyncio.shield(asked[1])

    def _ask(self) -> None:
        asked, self._asked = self._asked, {}
        task = asyncio.get_running_loop().create_task(self._answer(asked))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, asked: dict[Key, tuple[datetime, asyncio.Future[None]]]) -> None:
        # The earliest time asked about: an end after it may still be too early for a later
        # event, which `learn` judges per key.
        since = min(at for at, _ in asked.values()) - self._visitors.timeout
        try:
            ends = await asyncio.to_thread(self._visitors.latest_ends, list(asked), since)
        except Exception as exc:
            if not (self._visitors.lenient and isinstance(exc, ClickHouseError)):
                for _, done in asked.values():
                    if not done.done():  # each waiting request answers 503
                        done.set_exception(exc)
                        done.exception()  # seen: with every asker cancelled, asyncio logged it as never retrieved
                return
            self._visitors.say_unavailable(exc, len(asked))
            ends = {}
        for key, (at, done) in asked.items():
            self._visitors.learn(key, at, ends.get(key))
            done.done() or done.set_result(None)
