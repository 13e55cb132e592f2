"""Composition: wires storage, ingest, the stream core and the query API into the processes the
CLI starts. The topologies differ only in the hand-off chosen here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from clickhouse_connect.driver.client import Client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request

from besokskollen import health, metrics
from besokskollen.config import Settings
from ingest import app as ingest_app
from ingest import import_route, tracker, useragents
from ingest.handoff import Handoff, InProcessHandoff, KafkaHandoff
from ingest.salts import EXPIRE_EVERY_S, Salts
from ingest.spool import Spool
from ingest.visitors import CarryQuestions, Visitors
from query_api.errors import http_error
from query_api.keys import KeyStore
from query_api.rate_limit import RateLimit, RateLimiter, SharedRateLimiter
from streams import goals, replay, storage
from streams.core import StreamCore
from streams.embedded import EmbeddedRunner
from streams.funnels import FunnelRegistry
from streams.goals import GoalRegistry
from streams.retention import RawEvents
from streams.sessions import latest_ends, open_at
from streams.sites import SiteRegistry

if TYPE_CHECKING:
    # The query API (FastAPI, its models) is loaded by the processes that serve it: an `ingest`
    # or a one-shot command starts ~0.7 s of CPU sooner without it (`_query_app`).
    from fastapi import FastAPI

    from query_api.deps import Context

log = logging.getLogger(__name__)

DEFAULT_ACCOUNT = "default"
# How long a new goal's first backfill waits for `up`'s queued events (the second pass counts
# what is still queued then).
_GOAL_WAITS_FOR_EVENTS_S = 10.0


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    client: Client
    queries: Client  # the query API's reads (`storage.for_queries`)
    sites: SiteRegistry
    keys: KeyStore
    salts: Salts
    visitors: Visitors
    # One per process: the query API's goal changes are what this process's stream core matches
    # (a core with its own cache ignored a new goal for up to its refresh).
    goals: GoalRegistry
    raw_events: RawEvents

    @property
    def query_context(self) -> Context:
        from query_api.deps import Context

        return Context(self.queries, self.sites, self.keys, self.goals, FunnelRegistry(self.queries),
                       self.raw_events)

    def stream_core(self) -> StreamCore:
        """The process's one stream core. On the embedded engine it is the only writer of events: a
        data folder opens in one process only, and every event of the process goes through it."""
        return StreamCore(self.client, self.settings.session_timeout_s, self.goals,
                          sole_writer=self.settings.clickhouse_url.startswith("chdb://"))


def open_services(settings: Settings, wait: bool = False) -> Services:
    """Connect, migrate (every process does, idempotently), and make sure BK_ADMIN_KEY exists.
    `wait`: for a server, which waits for ClickHouse to answer rather than exit."""
    client = storage.connect(settings.clickhouse_url, wait)
    replay.upgrade(client, settings.session_timeout_s, settings.raw_events_ttl_days, settings.clickhouse_cluster)
    lookups = storage.for_lookups(client, settings.clickhouse_url, wait)
    keys = KeyStore(client, lookups)
    # Created once; a revoked BK_ADMIN_KEY stays revoked (it is rotated by revoking it first).
    if settings.admin_key and not keys.ever_stored(settings.admin_key):
        keys.create(DEFAULT_ACCOUNT, key=settings.admin_key)
    elif settings.admin_key and keys.lookup(settings.admin_key) is None:
        log.warning("BK_ADMIN_KEY is revoked: it opens nothing; set a new one or unset it")
    # Lenient: live events get today's id rather than a 503 while ClickHouse cannot be asked.
    # Imports ask with the long timeout: theirs may read months of sessions.
    salts = Salts(lookups, settings.historic_salt_days, settings.raw_events_ttl_days)
    visitors = Visitors(salts, partial(latest_ends, lookups), partial(open_at, lookups), settings.session_timeout_s,
                        lenient=True, batch_lookups=(partial(latest_ends, client), partial(open_at, client)))
    return Services(settings, client, storage.for_queries(client, settings.clickhouse_url, lookups, wait),
                    SiteRegistry(client, lookups), keys, salts, visitors, GoalRegistry(client, lookups),
                    RawEvents(lookups, settings.raw_events_ttl_days))


def make_handoff(services: Services, core: StreamCore | None = None, spool: Spool | None = None) -> Handoff:
    """Embedded (the given or a new stream core in this process) unless Kafka is configured. The
    spool (the embedded journal) is the given one, perhaps already open, or one in BK_SPOOL_DIR."""
    settings = services.settings
    spool = spool or Spool(settings.spool_path, settings.spool_max_bytes)
    if settings.embedded:
        runner = EmbeddedRunner(core or services.stream_core(), spool, sites=services.sites)
        services.goals.before_backfill = partial(runner.wait_written, _GOAL_WAITS_FOR_EVENTS_S)
        return InProcessHandoff(runner)
    return KafkaHandoff(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_partitions,
                        settings.kafka_replication_factor, services.client, spool, settings.spool_after_ms / 1000)


def _lifespan(handoff: Handoff, salts: Salts):
    """The ingest processes' (`up`, `ingest`): the hand-off, and salts expired on time whether
    or not events come (`Salts.expire`)."""
    async def expire_forever() -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            try:
                await asyncio.to_thread(salts.expire)
            except Exception as exc:  # ClickHouse away: the next round tries again
                log.warning("could not expire salts: %s", exc)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await handoff.start()
        task = asyncio.create_task(expire_forever())
        try:
            yield
        finally:
            task.cancel()
            await handoff.stop()  # drains: events answered 202 are written (or stay journaled) before exit

    return lifespan


def _ingest_routes(services: Services, handoff: Handoff) -> list:
    useragents.warm_up()
    services.visitors.warm_up()
    carries = CarryQuestions(services.visitors)
    return [*ingest_app.routes(services.settings, services.sites, services.visitors, carries, handoff),
            *import_route.routes(services.settings, services.sites, services.visitors, handoff, services.keys,
                                 services.raw_events),
            *tracker.ROUTES]


def _operations_routes(services: Services, handoff: Handoff | None = None) -> list:
    """/healthz, /readyz (the store; Kafka too where the process sends to it, the journal's
    replay in `up`) and /metrics."""
    checks = {"clickhouse": health.store_check(services.client)}
    if isinstance(handoff, InProcessHandoff):
        runner = handoff.runner

        async def journal() -> bool:
            # Written what a stopped process left in it: until then, numbers lack those events.
            return runner.recovered

        checks["journal"] = journal
    elif isinstance(handoff, KafkaHandoff):
        broker = health.broker_check(services.settings.kafka_servers)

        async def kafka() -> bool:
            # A broker that answers but refused the topic (a name or replication it will not
            # take) leaves every event in the spool: not ready either.
            return handoff.connected and await broker()

        checks["kafka"] = kafka
    return [*health.routes(checks), *metrics.ROUTES]


class _Dispatch:
    """The tracker's paths skip the stacks around them: in `up`, the query API's middleware (which
    took about half of /api/event's time); everywhere, for the hot `POST /api/event`, routing and
    Starlette's middleware too (its handler answers every error itself). Everything else —
    lifespan included — goes to `rest`, which this object otherwise stands for."""

    def __init__(self, tracking: Starlette, rest) -> None:
        self.tracking, self.rest = tracking, rest
        self._paths = frozenset(route.path for route in tracking.routes)
        self._event = {method: route.endpoint for route in tracking.routes if route.path == "/api/event"
                       for method in route.methods}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in self._paths:
            if scope["path"] == "/api/event":
                # GET's answer, the 405 with CORS, is every method's but POST's and OPTIONS' (TRACE too).
                endpoint = self._event.get(scope["method"]) or self._event["GET"]
                response = await endpoint(Request(scope, receive))
                await response(scope, receive, send)
            else:
                await self.tracking(scope, receive, send)
        else:
            await self.rest(scope, receive, send)

    def __getattr__(self, name: str):
        return getattr(self.rest, name)  # `up`: the query API app (state, routes, openapi)


def server_app(services: Services, handoff: Handoff) -> _Dispatch:
    """`up`: tracking and import endpoints and the query API in one process."""
    api = _query_app(services, lifespan=_lifespan(handoff, services.salts))
    routes = [*_ingest_routes(services, handoff), *_operations_routes(services, handoff)]
    api.router.routes.extend(r for r in routes if r.path.startswith("/api/v1/"))
    return _Dispatch(_plain_app([r for r in routes if not r.path.startswith("/api/v1/")]), api)


def ingest_server_app(services: Services, handoff: Handoff) -> _Dispatch:
    """`ingest`: the tracking and import endpoints, where the hand-off is."""
    # The import is under /api/v1: rate-limited per key (and refused keys per address) as in `up`.
    limit = Middleware(RateLimit, limiter=_rate_limiter(services.settings), keys=services.keys,
                       trusted=services.settings.trusted_networks)
    app = _plain_app([*_ingest_routes(services, handoff), *_operations_routes(services, handoff)],
                     lifespan=_lifespan(handoff, services.salts), middleware=[limit])
    return _Dispatch(app, app)


def _plain_app(routes: list, **options) -> Starlette:
    """The tracking paths' app (and all of `ingest`): routing's 404 and 405 are JSON errors as
    the query API's, and a trailing slash is another path (404), not a redirect."""
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, **options)
    app.router.redirect_slashes = False
    return app


def api_server_app(services: Services) -> FastAPI:
    """`api`: the query API alone."""
    app = _query_app(services)
    app.router.routes.extend(_operations_routes(services))
    return app


def _query_app(services: Services, lifespan=None) -> FastAPI:
    from query_api.app import create_app

    return create_app(services.query_context, trusted_proxies=services.settings.trusted_networks,
                      rate_limiter=_rate_limiter(services.settings),
                      lifespan=_finishing_goal_backfills(services.client, lifespan))


def _finishing_goal_backfills(client: Client, inner=None):
    """The query API's processes (`api`, `up`) finish goal backfills that a killed process left
    unfinished (streams/goals.py), at start and every FINISH_EVERY_S, beside `inner`'s lifespan."""
    async def finish_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(goals.finish_backfills, client)
            except Exception as exc:  # ClickHouse away: the next round asks again
                log.warning("could not finish goal backfills: %s", exc)
            await asyncio.sleep(goals.FINISH_EVERY_S)

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        task = asyncio.create_task(finish_forever())
        try:
            if inner is None:
                yield
            else:
                async with inner(app):
                    yield
        finally:
            task.cancel()

    return lifespan


def _rate_limiter(settings: Settings) -> RateLimiter | SharedRateLimiter:
    """Shared by every process through Redis when BK_REDIS_URL is set, else per process."""
    if settings.redis_url:
        return SharedRateLimiter(settings.redis_url, settings.rate_limit_per_minute)
    return RateLimiter(settings.rate_limit_per_minute)
