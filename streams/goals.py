"""Goals (SPEC §7): pageview goals match a path exactly or with `*` wildcards (any run of
characters, `/` included), event goals match an event name.

A goal is a dimension of its own: the stream core writes `activity` rows of kind `goal` (value:
the goal id) for every event that matches one of the site's goals, so converted visitors and
conversions come from the rollups, exact, like any other number. Goals apply retroactively: on
creation `backfill` writes the same rows from every stored event and rebuilds their buckets; it
runs again once every process has seen the new goal (their goal lists are cached a few seconds),
so events processed in between are covered too. Only that second pass is recorded (`goal_backfills`):
a process killed before it (or during the first) leaves the goal unrecorded, and every query API
process finishes such goals (`finish_backfills`), at its start and every 30 s."""

from __future__ import annotations

import itertools
import logging
import operator
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from clickhouse_connect.driver.client import Client

from streams import migrations

from streams import rollups
from streams.buckets import BUCKET_S
from streams.read_cache import ReadThroughCache

log = logging.getLogger(__name__)

_COLUMNS = ["site_id", "goal_id", "name", "event_type", "match_path", "match_event", "created_at", "deleted",
            "version"]
_SELECT = ("SELECT site_id, goal_id, name, event_type, match_path, match_event, created_at FROM goals FINAL"
           " WHERE deleted = 0")
# Processes re-read a site's goals this often; a backfill repeats after it.
REFRESH_S = 5.0


@dataclass(frozen=True, slots=True)
class Goal:
    site_id: str
    goal_id: str
    name: str
    event_type: str  # "pageview" or "event"
    match_path: str
    match_event: str
    created_at: datetime

    def matches(self, name: str, pathname: str) -> bool:
        if self.event_type == "event":
            return name == self.match_event
        if name != "pageview":
            return False
        return _wildcard_match(_parts(self.match_path), pathname) if "*" in self.match_path \
            else pathname == self.match_path

    def sql_condition(self) -> tuple[str, dict]:
        """The same match as a ClickHouse condition on `events`, with its parameters."""
        if self.event_type == "event":
            return "name = {match:String}", {"match": self.match_event}
        like = "".join("%" if c == "*" else "\\" + c if c in "%_\\" else c for c in self.match_path)
        return "name = 'pageview' AND pathname LIKE {match:String}", {"match": like}


class SiteGoals(tuple):
    """One site's goals, oldest first, remembering which of them each (event name, path) matches:
    the stream core asks for every event of every visitor a batch touches, and trying every goal
    each time cost ~0.2 µs an event per goal (`activity`: 79 µs an event with 400 goals, 2.5 now).
    A site's paths repeat, and the registry makes a new instance when it re-reads."""

    _REMEMBERED = 10_000  # (name, path)s; forgotten all at once beyond it

    def __init__(self, goals=()) -> None:
        self._matching: dict[tuple[str, str], tuple[str, ...]] = {}

    def matching(self, name: str, pathname: str) -> tuple[str, ...]:
        """The ids of the goals an event of this name and path matches."""
        found = self._matching.get((name, pathname))
        if found is None:
            if len(self._matching) >= self._REMEMBERED:
                self._matching.clear()
            found = self._matching[(name, pathname)] = tuple(
                goal.goal_id for goal in self if goal.matches(name, pathname))
        return found


@lru_cache(maxsize=1024)
def _parts(match_path: str) -> tuple[str, ...]:
    return tuple(match_path.split("*"))


def _wildcard_match(parts: tuple[str, ...], path: str) -> bool:
    """`parts` (the pattern split at `*`, two or more) match `path`. In linear time: a regular
    expression with many `.*` backtracks exponentially on a long path that almost matches, and the
    stream core runs this for every pageview of the site."""
    first, *middle, last = parts
    end = len(path) - len(last)
    if end < len(first) or not path.startswith(first) or not path.endswith(last):
        return False
    at = len(first)
    for part in middle:  # the leftmost place for each part leaves the most room for the rest
        found = path.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


_NONE = SiteGoals()


class GoalRegistry:
    def __init__(self, client: Client, lookups: Client | None = None) -> None:
        """`lookups`: the client requests read goals through (`storage.for_lookups`); changes,
        purges and backfills go through `client`."""
        self._client = client
        self._lookups = lookups or client
        self._by_site: ReadThroughCache[str, SiteGoals] = ReadThroughCache(
            self._load_site, miss_ttl_s=REFRESH_S, hit_ttl_s=REFRESH_S, load_many=self._load_sites)
        # `up` sets it (`make_handoff`): waits until the events accepted so far are written, so
        # that a new goal's first backfill reads them all (a batch already running when the goal
        # came matched without it). Elsewhere they may be in Kafka: the second pass counts them.
        self.before_backfill: Callable[[], None] = lambda: None

    def create(self, site_id: str, name: str, event_type: str, match_path: str = "", match_event: str = "") -> Goal:
        goal = Goal(site_id, "g_" + secrets.token_hex(8), name, event_type, match_path, match_event,
                    datetime.now(timezone.utc))
        self._client.insert("goals", [[goal.site_id, goal.goal_id, goal.name, goal.event_type, goal.match_path,
                                       goal.match_event, goal.created_at, 0, time.time_ns()]], column_names=_COLUMNS)
        self._by_site.forget(site_id)
        return goal

    def delete(self, goal: Goal) -> None:
        """Marks the goal deleted and deletes its rows (again once no process can still write any)."""
        self._client.insert("goals", [[goal.site_id, goal.goal_id, goal.name, goal.event_type, goal.match_path,
                                       goal.match_event, goal.created_at, 1, time.time_ns()]], column_names=_COLUMNS)
        self._by_site.forget(goal.site_id)
        _purge(self._client, goal)
        # A stream core may write the goal's rows until its cached goal list is refreshed, and a
        # backfill that was running may finish after the delete: its rows go once more after that.
        migrations.run_later(2 * REFRESH_S, lambda: _purge(self._client, goal), f"second purge of goal {goal.goal_id}")

    def forget_site(self, site_id: str) -> None:
        """The site was deleted or created: its goals are read again (a deleted site's are gone)."""
        self._by_site.forget(site_id)

    def get(self, goal_id: str) -> Goal | None:
        return _get(self._lookups, goal_id)

    def apply_to_past(self, goal: Goal) -> None:
        """Count the goal's conversions in every stored event (`backfill_twice`): a long write."""
        self.before_backfill()
        backfill_twice(self._client, goal)

    def for_site(self, site_id: str) -> SiteGoals:
        """The site's goals, oldest first (cached for REFRESH_S)."""
        return self._by_site.get(site_id) or _NONE

    def for_sites(self, site_ids: Collection[str]) -> dict[str, SiteGoals]:
        """`for_site` of each, what is not cached read in one query (a stream core's batch)."""
        found = self._by_site.get_many(site_ids)
        return {site_id: found.get(site_id, _NONE) for site_id in site_ids}

    def _load_sites(self, site_ids: list[str]) -> dict[str, SiteGoals]:
        rows = self._lookups.query(
            _SELECT + " AND site_id IN {sites:Array(String)} ORDER BY site_id, created_at, goal_id",
            parameters={"sites": site_ids}).result_rows
        return {site_id: SiteGoals(Goal(*row) for row in group)
                for site_id, group in itertools.groupby(rows, key=operator.itemgetter(0))}

    def _load_site(self, site_id: str) -> SiteGoals | None:
        return self._load_sites([site_id]).get(site_id)


# Activity rows of one goal from the stored events: per visitor and quarter hour the matching
# events, and the gap to that visitor's previous matching quarter hour (0 for the first).
# Their version is the server's clock in milliseconds when the backfill reads, below any stream
# core's (nanoseconds): a batch writes its goal rows before its raw events (the commit point), so
# a backfill reading meanwhile misses the batch's events, and its rows must not replace the
# batch's (computed from all of that visitor's events). Of two backfills, the later reader's rows
# win, whichever inserts last (a sweep beside a long first pass in another process).
_BACKFILL = """
INSERT INTO activity (site_id, kind, value, bucket, visitor_id, events, pageviews, sessions, bounces, duration_ms,
                      gap, version, is_deleted)
SELECT site_id, 'goal', {goal:String}, bucket, visitor_id, n, 0, 0, 0, 0,
       if(previous = 0, 0, intDiv(toUInt32(bucket) - previous, 900)), toUInt64(toUnixTimestamp64Milli(now64(3))), 0
FROM (
    SELECT site_id, visitor_id, bucket, n,
           lagInFrame(toUInt32(bucket), 1, 0) OVER (PARTITION BY visitor_id ORDER BY bucket
                                                    ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS previous
    FROM (SELECT site_id, visitor_id, toStartOfFifteenMinutes(timestamp) AS bucket, count() AS n
          FROM events FINAL WHERE site_id = {site:String} AND %s
          GROUP BY site_id, visitor_id, bucket)
)
"""


def backfill(client: Client, goal: Goal) -> int:
    """Write the goal's activity from every stored event and rebuild its buckets; returns how
    many buckets it has."""
    condition, params = goal.sql_condition()
    client.command(_BACKFILL % condition, parameters={**params, "site": goal.site_id, "goal": goal.goal_id})
    quarters = [row[0] for row in client.query(
        f"SELECT DISTINCT intDiv(toUInt32(bucket), {BUCKET_S}) FROM activity"
        " WHERE site_id = {site:String} AND kind = 'goal' AND value = {goal:String}",
        parameters={"site": goal.site_id, "goal": goal.goal_id}).result_rows]
    for i in range(0, len(quarters), 500):
        rollups.rebuild(client, {(goal.site_id, "goal", goal.goal_id, q) for q in quarters[i:i + 500]})
    return len(quarters)


def backfill_twice(client: Client, goal: Goal) -> None:
    """Backfill now, and again in the background once every process's goal list has it (`_last_pass`)."""
    # Scheduled first: it also makes up for a first backfill that fails.
    migrations.run_later(2 * REFRESH_S, lambda: _last_pass(client, goal), f"second backfill of goal {goal.goal_id}")
    backfill(client, goal)


def _last_pass(client: Client, goal: Goal) -> None:
    """Backfill once every stream core has the goal, and record it; unless the goal was deleted
    meanwhile: then its rows go (a pass that was running may have written some)."""
    if _get(client, goal.goal_id) is None:
        _purge(client, goal)
        return
    backfill(client, goal)
    client.insert("goal_backfills", [[goal.site_id, goal.goal_id, datetime.now(timezone.utc)]],
                  column_names=["site_id", "goal_id", "finished_at"])


# A goal this old without a recorded backfill lost its second pass (its process was killed) or
# is in a long one: passes may run side by side (the later reader's rows win, see _BACKFILL).
UNFINISHED_AFTER_S = 30
FINISH_EVERY_S = 30.0


def finish_backfills(client: Client) -> int:
    """Backfill and record every goal whose backfill no process finished; returns how many."""
    rows = client.query(
        _SELECT + " AND created_at < now64(3) - toIntervalSecond({after:UInt32})"
        " AND (site_id, goal_id) NOT IN (SELECT site_id, goal_id FROM goal_backfills)",
        parameters={"after": UNFINISHED_AFTER_S}).result_rows
    for goal in (Goal(*row) for row in rows):
        log.warning("goal %s of site %s has no finished backfill (its process stopped before); backfilling it",
                    goal.goal_id, goal.site_id)
        _last_pass(client, goal)
    return len(rows)


def _purge(client: Client, goal: Goal) -> None:
    migrations.mutations(client, [f"ALTER TABLE {table} DELETE WHERE site_id = {{site:String}}"
                                  " AND kind = 'goal' AND value = {goal:String}"
                                  for table in ("activity", "rollup_15m", "rollup_1d")],
                         {"site": goal.site_id, "goal": goal.goal_id})


def _get(client: Client, goal_id: str) -> Goal | None:
    rows = client.query(_SELECT + " AND goal_id = {id:String}", parameters={"id": goal_id}).result_rows
    return Goal(*rows[0]) if rows else None
