"""The site registry: which sites exist, their domain, account and timezone. Written by the query
API and the CLI, read by ingest (to accept or 404 an event) and by the query API."""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import TypeVar

import idna

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from besokskollen import metrics
from ingest.event import MAX_SITE_ID
from streams import migrations
from streams.migrations import SITE_DATA_TABLES
from streams.read_cache import ReadThroughCache

log = logging.getLogger(__name__)

DEFAULT_TIMEZONE = "Europe/Stockholm"

_COLUMNS = ["site_id", "account_id", "domain", "name", "timezone", "created_at", "deleted", "version"]
# Processes re-read a site this often.
REFRESH_S = 5.0
# A site deleted and created again keeps its id. Events of the deleted one can still wait in Kafka
# behind stopped or lagging workers: `of_site_now` tells them from the current site's. An event
# without the site's incarnation (from an ingest release before 2026-12-03) is dropped when
# ingest took it more than this before the current site's creation: ingest takes a site's events
# only once it knows the site, so the new site's are taken after its creation; the margin is for
# the clocks of the ingest and api hosts.
RECREATED_MARGIN_MS = 5000
# A claim on a domain whose site was not created this long after (its process died between the
# two) no longer stops another account's create.
CLAIM_TIMEOUT_S = 30
# How long a create waits for the site of its own account's claim made first (another process's
# create of the domain, a few ms from storing it) before taking it as a create that died.
OWN_CLAIM_WAIT_S = 5.0
_SELECT = "SELECT site_id, account_id, domain, name, timezone, created_at FROM sites FINAL WHERE deleted = 0"


class DomainTaken(Exception):
    """The domain has a site of another account."""


@dataclass(frozen=True, slots=True)
class Site:
    site_id: str
    account_id: str
    domain: str
    name: str
    timezone: str
    created_at: datetime  # in ms (what ClickHouse stores), UTC

    def __post_init__(self) -> None:
        # Read back from ClickHouse without a timezone: made aware, so a site read equals the
        # same site as created here (a read ahead replaced one with the other under a caller).
        if self.created_at.tzinfo is None:
            object.__setattr__(self, "created_at", self.created_at.replace(tzinfo=timezone.utc))

    @property
    def incarnation(self) -> int:
        """Which site with this id this is (a domain deleted and created again keeps its id): its
        creation in ms since the epoch, as every process reads it. Ingest stamps it on each event."""
        return _incarnation(self.created_at)

    def named_by(self, domain: str) -> bool:
        """Whether `domain`, as an event or an import line writes it, is this site's."""
        try:
            return normalize_domain(domain) == self.domain
        except ValueError:
            return False


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
T = TypeVar("T")


def _incarnation(created_at: datetime) -> int:
    created = created_at if created_at.tzinfo else created_at.replace(tzinfo=timezone.utc)  # read back naive (rows)
    return (created - _EPOCH) // timedelta(milliseconds=1)


def count_dropped(dropped: int) -> None:
    """Say and count the events a worker or `up` dropped as of deleted sites."""
    if dropped:
        log.warning("dropped %d events of deleted sites (some perhaps created again since)", dropped)
        metrics.EVENTS_OF_DELETED_SITES.inc(dropped)


def of_site_now(now: float | None, stamped: int | None, accepted_ms: int | None) -> bool:
    """Whether an event is of the site with its id now, whose incarnation is `now`
    (`SiteRegistry.incarnations`: infinity while it is deleted; None for an id no site ever had,
    which is not judged). By the incarnation ingest `stamped` on it: its own (or a newer one: a
    replica behind), or an older one taken (`accepted_ms`, ingest's clock) once the current site
    existed, by an ingest that had not read it again yet (its cache is up to REFRESH_S old): that
    beacon came for the site as it is now. Without a stamp (an ingest release before 2026-12-03),
    by when ingest took it alone, with RECREATED_MARGIN_MS for the clocks; unknown: kept."""
    if now is None:
        return True
    if stamped is not None and stamped >= now:
        return True
    if accepted_ms is None:
        return stamped is None
    return accepted_ms >= (now if stamped is not None else now - RECREATED_MARGIN_MS)


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_domain(domain: str) -> str:
    """A site's hostname in ASCII (IDNA) form without scheme, path, port or `www.`; raises
    ValueError when it is not a hostname with at least two labels."""
    host = re.sub(r"^[a-z][a-z0-9+.-]*://", "", domain.strip().lower()).split("/")[0]
    host = host.split(":")[0].rstrip(".")
    try:
        ascii_host = idna.encode(host, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise ValueError(f"{domain!r} is not a valid hostname") from None
    # Every `www.` (after UTS #46 mapping: a full-width ｗｗｗ is one too), so that the result is
    # its own normal form: `www.www.se` became `www.se`, which the site id's normalising refused.
    while ascii_host.startswith("www."):
        ascii_host = ascii_host[4:]
    labels = ascii_host.split(".")
    if (len(labels) < 2 or len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError(f"{domain!r} is not a valid hostname such as example.com")
    return ascii_host


def site_id_for(domain: str) -> str:
    """`mobildelar.se` → `mobildelar-se`: a readable id (`SiteRegistry.create` makes it unique)."""
    return re.sub(r"[^a-z0-9]+", "-", normalize_domain(domain)).strip("-")


@lru_cache(maxsize=1)
def _zones(client: Client) -> frozenset[str]:
    return frozenset(row[0] for row in client.query("SELECT time_zone FROM system.time_zones").result_rows)


@lru_cache(maxsize=1024)
def _loads(client: Client, tz: str) -> bool:
    try:
        client.query("SELECT toDateTime(0, %(tz)s)", parameters={"tz": tz})
    except OperationalError:
        raise  # ClickHouse unreachable: not an answer about the zone
    except DatabaseError:
        return False
    return True


class SiteRegistry:
    def __init__(self, client: Client, lookups: Client | None = None) -> None:
        """`lookups`: the client the reads behind the cache use, which requests wait on
        (`storage.for_lookups`); changes and purges go through `client`."""
        self._client = client
        self._lookups = lookups or client
        self._by_id: ReadThroughCache[str, Site] = ReadThroughCache(
            lambda key: self._load("site_id", key), hit_ttl_s=REFRESH_S, known=self._site_ids,
            load_many=lambda keys: {site.site_id: site for site in self._load_many("site_id", keys)},
            read_ahead=True)
        self._by_domain: ReadThroughCache[str, Site] = ReadThroughCache(
            lambda key: self._load("domain", key), hit_ttl_s=REFRESH_S,
            load_many=lambda keys: {site.domain: site for site in self._load_many("domain", keys)},
            read_ahead=True)

    def create(self, account_id: str, domain: str, name: str = "", tz: str = DEFAULT_TIMEZONE,
               site_id: str | None = None) -> Site:
        """A new site for `domain`; if the domain has one now (made by another process since the
        caller checked: one account's create sent to two `api` processes, both past the claim),
        that one, or DomainTaken if another account's."""
        domain = normalize_domain(domain)
        if site_id is None:
            site_id, existing = self._free_id(domain)
            if existing is not None:
                if existing.account_id != account_id:
                    raise DomainTaken(domain)
                return self._remember(existing)
        self._start_empty(site_id)
        # Its creation is when its row is written, after the purge it may wait for (~1 s): a worker
        # keeps an event that an ingest with the deleted site cached took after the creation
        # (`of_site_now`), but only once the row is there. Stamped before the purge, events taken
        # meanwhile were counted or dropped by when a worker judged them (a churn audit: 6 of 45).
        now = datetime.now(timezone.utc)
        # In ms, as stored: the process that made it and those that read it agree on its incarnation.
        site = Site(site_id, account_id, domain, name or domain, tz,
                    now.replace(microsecond=now.microsecond // 1000 * 1000))
        self._client.insert(
            "sites",
            [[site.site_id, site.account_id, site.domain, site.name, site.timezone, site.created_at, 0,
              time.time_ns()]],
            column_names=_COLUMNS)
        return self._remember(site)

    def claim(self, domain: str, account_id: str) -> bool | Site:
        """Whether this create may make the site for `domain`, which has none now: of creates
        racing for it in several processes (several `api`), the first claim stored decides. True:
        this one; False: another account's; a Site: another create of this account, whose site
        is the answer (two 201s with two bodies, of which one was stored, before). The token names
        the domain's incarnation (its last deletion), so a domain deleted can be taken again. A
        claim whose site does not come (its process died between the two) stops this account's
        retry OWN_CLAIM_WAIT_S, another account's CLAIM_TIMEOUT_S at most. Migration 11 says why
        a token."""
        deleted = self._client.query("SELECT max(version) FROM sites WHERE domain = {d:String} AND deleted = 1",
                                     parameters={"d": domain}).result_rows[0][0]
        token, shard_key, mine = f"{domain}:{deleted}", site_id_for(domain), uuid.uuid4().hex
        while True:
            self._client.insert("site_claims", [[shard_key, domain, token, account_id, mine]],
                                column_names=["site_id", "domain", "token", "account_id", "claimant"],
                                settings={"insert_deduplicate": 1, "insert_deduplication_token": token})
            # One row per token; of copies a lost deduplication log let in, the first stored.
            winner, claimant, age_s = self._client.query(
                "SELECT account_id, claimant, dateDiff('second', claimed_at, now64(3)) FROM site_claims"
                " WHERE site_id = {s:String} AND domain = {d:String} AND token = {t:String}"
                " ORDER BY claimed_at, account_id, claimant LIMIT 1",
                parameters={"s": shard_key, "d": domain, "t": token}).result_rows[0]
            if claimant == mine:
                return True
            if winner == account_id:
                deadline = time.monotonic() + OWN_CLAIM_WAIT_S
                while time.monotonic() < deadline:
                    if (made := self.fresh_by_domain(domain)) is not None:
                        return made
                    time.sleep(0.05)
                return True  # a retry of a create that died after its claim
            if age_s < CLAIM_TIMEOUT_S:
                return False
            token = f"{token}>{winner}"  # that create never finished: every process claims this one next

    def change(self, site: Site, name: str | None = None, tz: str | None = None) -> Site | None:
        """The site with another name or time zone (every number is drawn in a site's zone when it
        is asked for, past days too: the rollups are UTC quarter hours); None once it is deleted or
        created again. The row is written under the version of the one read plus one, so a delete
        sent since, which writes the time as its version, is never undone by it."""
        rows = self._client.query(
            "SELECT name, timezone, created_at, deleted, version FROM sites WHERE site_id = {s:String}"
            " ORDER BY version DESC LIMIT 1", parameters={"s": site.site_id}).result_rows
        if not rows or rows[0][3] or _incarnation(rows[0][2]) != site.incarnation:
            return None
        old_name, old_tz, created_at, _, version = rows[0]
        self._client.insert(
            "sites",
            [[site.site_id, site.account_id, site.domain, old_name if name is None else name or site.domain,
              old_tz if tz is None else tz, created_at, 0, version + 1]],
            column_names=_COLUMNS)
        self._by_domain.forget(site.domain)
        return self.fresh(site.site_id)

    def fresh(self, site_id: str) -> Site | None:
        """The site with this id as ClickHouse has it now, not as cached: for a change, and for a
        key's access to a site another process may have deleted (and another account created again)."""
        return self._fresh("site_id", site_id, self._by_id)

    def fresh_by_domain(self, domain: str) -> Site | None:
        return self._fresh("domain", domain, self._by_domain)

    def _fresh(self, column: str, key: str, cache: ReadThroughCache[str, Site]) -> Site | None:
        site = self._load(column, key, self._client)
        if site is None:
            cache.forget(key)
            return None
        return self._remember(site)

    def _free_id(self, domain: str) -> tuple[str, Site | None]:
        """The domain's readable id, or when a site of another domain has it (`my-shop.se` and
        `my.shop.se` read the same), the first of it + `-2`, `-3`, … that no site has; with the
        domain's own site if one of those ids is it (it was made meanwhile)."""
        readable = site_id_for(domain)
        for n in itertools.count(1):
            suffix = f"-{n}" if n > 1 else ""
            candidate = readable[:MAX_SITE_ID - len(suffix)] + suffix
            holder = self._load("site_id", candidate)
            if holder is None or holder.domain == domain:
                return candidate, holder
        raise AssertionError("unreachable")

    def delete(self, site: Site) -> None:
        """Stop serving the site at once, and drop its data (asynchronously: ClickHouse mutations
        touch only parts that exist now, so a site created again later starts empty)."""
        self._client.insert(
            "sites",
            [[site.site_id, site.account_id, site.domain, site.name, site.timezone, site.created_at, 1,
              time.time_ns()]],
            column_names=_COLUMNS)
        self._by_id.forget(site.site_id)
        self._by_domain.forget(site.domain)
        self._purge(site.site_id, while_deleted=True)
        # Other processes take up to REFRESH_S to notice, and events they accepted before may still
        # be on their way through Kafka: their rows are deleted again later, and when a site with this
        # id is created again (a worker far behind can still write some in between).
        migrations.run_later(2 * REFRESH_S, lambda: self._second_purge(site.site_id),
                             f"second purge of site {site.site_id}")

    def _second_purge(self, site_id: str) -> None:
        """Unless a site with this id was created again meanwhile: its create emptied what the
        deleted one had left (`_start_empty`), and the rows there now are the new site's."""
        if self._load("site_id", site_id, self._client) is None:  # in the background: no hurry
            self._purge(site_id, while_deleted=True)

    def _purge(self, site_id: str, wait: bool = False, while_deleted: bool = False) -> None:
        """Delete the site id's rows from every table. `while_deleted`: only where the id has no
        site when ClickHouse applies the delete (not when it is sent): a site created again between
        a purge's check and its mutations (~10 s after the delete, one try in six in a loop) lost
        the goals and funnels it had just been given. Its rows there are newer than its `sites` row,
        so a mutation that sees no site was sent before them and cannot reach them."""
        where = "site_id = {site:String}"
        if while_deleted:
            where += " AND (SELECT argMax(deleted, version) FROM sites WHERE site_id = {site:String}) = 1"
        # The condition reads another table, which ClickHouse calls nondeterministic: a replicated
        # table refuses it unless allowed.
        migrations.mutations(self._client, [f"ALTER TABLE {table} DELETE WHERE {where}" for table in SITE_DATA_TABLES],
                             {"site": site_id}, wait, settings={"allow_nondeterministic_mutations": 1})

    def _start_empty(self, site_id: str) -> None:
        """A site created with the id of a deleted one must not show that one's numbers, goals or
        funnels: rows its delete has not removed yet (or that arrived after it) go first."""
        # One statement for all the tables: each is a round trip, paid by every site created.
        anywhere = " UNION ALL ".join(f"(SELECT 1 FROM {table} WHERE site_id = {{site:String}} LIMIT 1)"
                                      for table in SITE_DATA_TABLES)
        if self._client.query(anywhere, parameters={"site": site_id}).result_rows:
            self._purge(site_id, wait=True)

    def valid_timezone(self, tz: str) -> bool:
        """Known to ClickHouse, whose rules draw every local day (query_api/periods.py): listed in
        its `system.time_zones` (`right/UTC`, which Python's zoneinfo loads, is not) and loadable
        by it. Python's own tz database plays no part."""
        return tz in _zones(self._client) and _loads(self._client, tz)

    def get(self, site_id: str) -> Site | None:
        return self._by_id.get(site_id)

    def incarnations(self, site_ids: Collection[str]) -> dict[str, float]:
        """The incarnation (`Site.incarnation`) of the site with each of these ids now, read anew
        (not from the cache: a worker judges by it whether an event is of a site deleted, and
        perhaps created again, seconds ago); infinity while it is deleted. Ids no site ever had
        are left out."""
        if not site_ids:
            return {}
        rows = self._client.query(
            "SELECT site_id, argMax(deleted, version), argMax(created_at, version) FROM sites"
            " WHERE site_id IN {ids:Array(String)} GROUP BY site_id", parameters={"ids": sorted(site_ids)}).result_rows
        return {site_id: math.inf if deleted else _incarnation(created_at) for site_id, deleted, created_at in rows}

    def of_current_sites(self, items: list[T], judged_by: Callable[[T], tuple[str, int | None, int | None]]
                         ) -> list[T]:
        """The items (events, Kafka records, queue entries) of the sites with their ids now, as
        ClickHouse says at this call: `judged_by` gives each one's site id, the incarnation ingest
        stamped on it and when ingest took it (`of_site_now`). One read for all their sites."""
        judged = [judged_by(item) for item in items]
        now = self.incarnations({site_id for site_id, _, _ in judged})
        return [item for item, (site_id, stamped, accepted_ms) in zip(items, judged)
                if of_site_now(now.get(site_id), stamped, accepted_ms)]

    def is_current(self, site: Site) -> bool:
        """Whether this site is still the one with its id (not deleted, nor created again), read anew."""
        return self.incarnations({site.site_id}).get(site.site_id) == site.incarnation

    def by_domain(self, domain: str) -> Site | None:
        try:
            return self._by_domain.get(normalize_domain(domain))
        except ValueError:
            return None

    def answers_without_io(self, site_id: str | None = None, domain: str | None = None) -> bool:
        if site_id is not None:
            return self._by_id.answers_without_io(site_id)
        try:
            return self._by_domain.answers_without_io(normalize_domain(domain or ""))
        except ValueError:
            return True  # not a hostname: answered without asking anyone

    def list(self, account_id: str) -> list[Site]:
        rows = self._client.query(
            _SELECT + " AND account_id = {account:String} ORDER BY site_id",
            parameters={"account": account_id},
        ).result_rows
        return [self._remember(Site(*row)) for row in rows]

    def _load(self, column: str, key: str, client: Client | None = None) -> Site | None:
        found = self._load_many(column, [key], client)
        return found[0] if found else None

    def _load_many(self, column: str, keys: list[str], client: Client | None = None) -> list[Site]:
        rows = (client or self._lookups).query(_SELECT + f" AND {column} IN {{keys:Array(String)}}",
                                               parameters={"keys": keys}).result_rows
        return [Site(*row) for row in rows]

    def _site_ids(self) -> list[str]:
        return [row[0] for row in self._lookups.query("SELECT site_id FROM sites FINAL WHERE deleted = 0").result_rows]

    def _remember(self, site: Site) -> Site:
        self._by_id.put(site.site_id, site)
        self._by_domain.put(site.domain, site)
        return site
