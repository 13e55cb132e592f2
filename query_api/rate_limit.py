"""Rate limits under /api/v1: 100 requests a minute per API key, and failed authentication throttled
per client address. Pure ASGI. Counted in Redis when BK_REDIS_URL is set (`SharedRateLimiter`:
the limit holds for the whole deployment, however many api processes), else in this process's
memory (`RateLimiter`: N processes behind a balancer allow up to N times the limit).

Windows are fixed, 60 s long, and start at a bucket's first request (not at the minute): a
bucket counts the requests since its window started and refuses once it holds `limit`; the window
then ends at its start + 60 s and the next request opens a new one. Refused requests are not
counted.

Buckets:
- `key:<sha256 of the bearer token>` — every request that sends a bearer token, valid or not
  (tokens are never kept, only their hash).
- `addr:<client address>` — requests whose key is missing or unknown, with a lower limit, so
  guessing keys from one address is slow while a valid key from the same address is unaffected.
  The address is the peer's, or X-Forwarded-For's right-most untrusted hop when the peer is a
  trusted proxy (ingest/clients.py `client_ip`).

Every counted response carries X-RateLimit-Limit, X-RateLimit-Remaining and X-RateLimit-Reset
(epoch seconds, rounded up, when the window that decided ends); a refusal is a 429 with
Retry-After and the API's error body. The OpenAPI document and the docs page are not counted,
nor are the sub-requests the batch endpoint makes in-process (`scope["state"]["batch_internal"]`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from besokskollen import metrics
from ingest.clients import Trusted, client_ip
from query_api.errors import NO_STORE, error_response
from query_api.keys import KeyStore, bearer_token, hash_key

log = logging.getLogger(__name__)

PREFIX = "/api/v1/"
WINDOW_S = 60.0
DEFAULT_LIMIT = 100  # requests per window and API key
DEFAULT_FAILED_AUTH_LIMIT = 30  # requests with a missing or unknown key per window and address


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: float  # epoch seconds when the window ends
    now: float
    bucket: str = ""

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"x-ratelimit-limit", str(self.limit).encode()),
               (b"x-ratelimit-remaining", str(self.remaining).encode()),
               (b"x-ratelimit-reset", str(math.ceil(self.reset)).encode())]
        if not self.allowed:
            out.append((b"retry-after", str(self.retry_after).encode()))
        return out

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset - self.now))


def _decision(states: list[tuple[str, float, int, int]], allowed: bool, window_s: float, now: float) -> Decision:
    """From each bucket's (name, window start, count after this request if allowed, limit): the
    refusing bucket whose window ends last (retry when every refusing window has ended), else
    the bucket with the fewest requests left."""
    if not allowed:
        name, start, _count, limit = max((s for s in states if s[2] >= s[3]), key=lambda s: s[1])
        return Decision(False, limit, 0, start + window_s, now, name)
    name, start, count, limit = min(states, key=lambda s: (s[3] - s[2], s[3]))
    return Decision(True, limit, limit - count, start + window_s, now, name)


class RateLimiter:
    """Fixed-window counters by bucket name. Not thread-safe: used from the event loop only."""

    def __init__(self, limit: int = DEFAULT_LIMIT, failed_auth_limit: int = DEFAULT_FAILED_AUTH_LIMIT,
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.failed_auth_limit = failed_auth_limit
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, list[float]] = {}  # bucket -> [window start, count]
        self._sweep_at = 4096
        self._swept = clock()

    def hit(self, buckets: Iterable[tuple[str, int]]) -> Decision:
        """Count one request against every (bucket, limit) unless one of them is full. The decision
        reported is the refusing bucket's, else the one with the fewest requests left."""
        now = self.clock()
        self._sweep(now)
        states = []
        for name, limit in buckets:
            window = self._windows.get(name)
            if window is None or now >= window[0] + self.window_s or now < window[0]:
                window = [now, 0]  # stored only if counted: a refused request opens no window (as in Redis)
            states.append((name, window, limit))
        allowed = all(window[1] < limit for _, window, limit in states)
        if allowed:
            for name, window, _ in states:
                window[1] += 1
                self._windows[name] = window
        return _decision([(name, start, count, limit) for name, (start, count), limit in states],
                         allowed, self.window_s, now)

    async def decide(self, buckets: Iterable[tuple[str, int]]) -> Decision:
        return self.hit(buckets)

    def _sweep(self, now: float) -> None:
        # Keys and addresses are the client's choice: drop ended windows once a window, and
        # whenever their number doubles.
        if len(self._windows) < self._sweep_at and self._swept <= now < self._swept + self.window_s:
            return
        self._windows = {k: w for k, w in self._windows.items() if w[0] <= now < w[0] + self.window_s}
        self._sweep_at = max(4096, 2 * len(self._windows))
        self._swept = now


# The same fixed windows in Redis, decided atomically for all of a request's buckets on Redis's
# clock. Returns [allowed, start_ms, count, ...] per bucket (counts after this request if allowed).
_DECIDE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[1])
local out, allowed = {1}, 1
for i, key in ipairs(KEYS) do
  local start = tonumber(redis.call('HGET', key, 's'))
  local count = tonumber(redis.call('HGET', key, 'c'))
  if not start or now >= start + window or now < start then start = now; count = 0 end
  if count >= tonumber(ARGV[1 + i]) then allowed = 0 end
  out[#out + 1] = start; out[#out + 1] = count
end
if allowed == 1 then
  for i, key in ipairs(KEYS) do
    local start, count = out[2 * i], out[2 * i + 1] + 1
    redis.call('HSET', key, 's', start, 'c', count)
    redis.call('PEXPIREAT', key, start + window)
    out[2 * i + 1] = count
  end
end
out[1] = allowed
out[#out + 1] = now
return out
"""


class SharedRateLimiter:
    """`RateLimiter`'s windows in Redis, shared by every process. If Redis cannot be reached, the
    process falls back to counting in memory (logged), rather than refusing or failing requests
    (fail open), and asks Redis again only `retry_s` later: a Redis that hangs costs one request
    the socket timeout (1 s), not every request until it answers again."""

    def __init__(self, url: str, limit: int = DEFAULT_LIMIT, failed_auth_limit: int = DEFAULT_FAILED_AUTH_LIMIT,
                 window_s: float = WINDOW_S, retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio

        self.limit = limit
        self.failed_auth_limit = failed_auth_limit
        self.window_s = window_s
        self.retry_s = retry_s
        self.clock = clock
        # Requests in flight wait for one of a few connections: redis-py's default pool raises on
        # its 101st, which read as an outage and let a burst of one key through uncounted.
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=32, timeout=1.0, socket_timeout=1.0,
                                                             socket_connect_timeout=1.0)
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._decide = self._redis.register_script(_DECIDE)
        self._fallback = RateLimiter(limit, failed_auth_limit, window_s)
        self._redis_after = -math.inf  # clock() before which Redis is not asked (it just failed)
        self._answered = redis.exceptions.ResponseError

    async def decide(self, buckets: Iterable[tuple[str, int]]) -> Decision:
        buckets = list(buckets)
        if self.clock() < self._redis_after:
            return self._fallback.hit(buckets)
        try:
            out = await self._decide(keys=[f"bk:rl:{name}" for name, _ in buckets],
                                     args=[int(self.window_s * 1000), *(limit for _, limit in buckets)])
        except Exception as exc:
            if isinstance(exc, self._answered):  # Redis answered (an error): no timeout to spare
                log.warning("rate limit: Redis refused the script, counting in this process", exc_info=True)
            else:
                # An outage, not a defect: one line, not a traceback every retry_s.
                log.warning("rate limit: Redis unavailable (%s: %s), counting in this process for %g s",
                            type(exc).__name__, exc, self.retry_s)
                self._redis_after = self.clock() + self.retry_s
            return self._fallback.hit(buckets)
        states = [(name, out[1 + 2 * i] / 1000, out[2 + 2 * i], limit) for i, (name, limit) in enumerate(buckets)]
        return _decision(states, bool(out[0]), self.window_s, out[-1] / 1000)


class RateLimit:
    """ASGI middleware applying a RateLimiter to every request under /api/v1 but `exempt` paths."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter | SharedRateLimiter, keys: KeyStore,
                 trusted: Trusted = (), exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.limiter = limiter
        self.keys = keys
        self.trusted = trusted
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not scope["path"].startswith(PREFIX) or scope["path"] in self.exempt
                or (scope.get("state") or {}).get("batch_internal")):
            await self.app(scope, receive, send)
            return
        decision = await self.limiter.decide(await self._buckets(scope))
        extra = decision.headers()
        if not decision.allowed:
            metrics.RATE_LIMITED.labels(decision.bucket.split(":", 1)[0]).inc()
            what = "requests" if decision.bucket.startswith("key:") else "requests without a valid API key"
            message = (f"too many {what}: at most {decision.limit} per {self.limiter.window_s:g} s; "
                       f"retry in {decision.retry_after} s")
            body = orjson.dumps({"error": {"code": "rate_limited", "message": message}})
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"cache-control", NO_STORE.encode()),
                                    (b"content-length", str(len(body)).encode()), *extra]})
            await send({"type": "http.response.body", "body": body})
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {name for name, _ in extra}
                message = {**message, "headers": [
                    *(h for h in message.get("headers", []) if h[0].lower() not in names), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette answers unhandled errors outside every middleware, where these headers
            # would be lost: answer the 500 here (same body), and let the error go on to be logged.
            if not started:
                await error_response(500, "internal_error", "internal server error")(scope, receive, send_with_headers)
            raise

    async def _buckets(self, scope: Scope) -> list[tuple[str, int]]:
        authorization, forwarded = "", []
        for name, value in scope["headers"]:
            if name == b"authorization" and not authorization:
                authorization = value.decode("latin-1")
            elif name == b"x-forwarded-for":  # repeated fields are one list (RFC 9110 §5.3)
                forwarded.append(value.decode("latin-1"))
        token = bearer_token(authorization)
        buckets = []
        if token is not None:
            buckets.append(("key:" + hash_key(token), self.limiter.limit))
            try:
                if self.keys.answers_without_io(token):
                    valid = self.keys.lookup(token) is not None
                else:
                    valid = await asyncio.to_thread(self.keys.lookup, token) is not None
            except Exception:
                # Storage trouble: the route fails the same way and answers 500; count the key only.
                log.warning("rate limit: could not look up an API key", exc_info=True)
                valid = True
            if valid:
                return buckets
        peer = (scope.get("client") or ("", 0))[0] or ""
        address = client_ip(peer, {"x-forwarded-for": ", ".join(forwarded)}, self.trusted)
        buckets.append(("addr:" + address, self.limiter.failed_auth_limit))
        return buckets
