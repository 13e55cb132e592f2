"""API keys (`bk_…`): stored only as SHA-256 hashes. User-level keys reach every site of their
account; site-level keys one site."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from clickhouse_connect.driver.client import Client

from query_api.errors import APIError
from streams.read_cache import ReadThroughCache
from streams.sites import Site, SiteRegistry

PREFIX = "bk_"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class ApiKey:
    account_id: str
    site_id: str  # "" for a user-level key

    @property
    def user_level(self) -> bool:
        return not self.site_id

    def reaches(self, site: Site) -> bool:
        """User-level: every site of its account; site-level: its own site only."""
        return self.account_id == site.account_id and self.site_id in ("", site.site_id)

    def readable_site(self, site_id: str, sites: SiteRegistry, asked: str | None = None, fresh: bool = False) -> Site:
        """The site `site_id` when this key may read it; else an APIError. A site-level key gets 403
        for every other id, existing or not: a 404 would tell it which domains use the service
        (SPEC §7: any other site → 403). `asked` names what the caller asked for when that was a
        goal or funnel id, so the 403 does not name the site it belongs to."""
        forbidden = APIError(403, "forbidden", f"this API key has no access to {asked or f'site {site_id!r}'}")
        if self.site_id and self.site_id != site_id:
            raise forbidden
        site = sites.fresh(site_id) if fresh else sites.get(site_id)
        if site is None:
            raise APIError(404, "site_not_found", f"no site with id {site_id!r}")
        if not self.reaches(site):
            raise forbidden
        return site


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer …` header, or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, client: Client, lookups: Client | None = None) -> None:
        """`lookups`: the client the reads behind the cache use, which every request waits on
        (`storage.for_lookups`); keys are written through `client`."""
        self._client = client
        self._lookups = lookups or client
        self._cache: ReadThroughCache[str, ApiKey] = ReadThroughCache(self._load, known=self._hashes, read_ahead=True)

    def create(self, account_id: str, site_id: str = "", key: str | None = None) -> str:
        """Store a key (a new random one unless given) and return it; the only time it is seen."""
        key = key or PREFIX + secrets.token_urlsafe(24)
        if not key.startswith(PREFIX):
            raise ValueError(f"API keys start with {PREFIX!r}")
        self._client.insert(
            "api_keys", [[hash_key(key), key[:7], account_id, site_id, datetime.now(timezone.utc)]],
            column_names=["key_hash", "prefix", "account_id", "site_id", "created_at"],
        )
        self._cache.put(hash_key(key), ApiKey(account_id, site_id))
        return key

    def revoke(self, key: str) -> bool:
        """Stop a key from working (here at once, in other processes within seconds); False if
        there is no such key."""
        found = self._load(hash_key(key))
        if found is None:
            return False
        self._client.insert(
            "api_keys", [[hash_key(key), key[:7], found.account_id, found.site_id, datetime.now(timezone.utc), 1]],
            column_names=["key_hash", "prefix", "account_id", "site_id", "created_at", "revoked"],
        )
        self._cache.forget(hash_key(key))
        return True

    def revoke_site(self, site_id: str) -> None:
        """Revoke every site-level key of a site (its delete): the account may create a site for
        the same domain again, which gets the same id, and keys handed out for the old one must not
        open it. Other processes stop taking them within seconds, as after `revoke`."""
        rows = self._client.query(
            "SELECT key_hash, prefix, account_id FROM api_keys FINAL WHERE site_id = {s:String} AND revoked = 0",
            parameters={"s": site_id},
        ).result_rows
        if not rows:
            return
        now = datetime.now(timezone.utc)
        self._client.insert(
            "api_keys", [[digest, prefix, account_id, site_id, now, 1] for digest, prefix, account_id in rows],
            column_names=["key_hash", "prefix", "account_id", "site_id", "created_at", "revoked"],
        )
        for digest, _prefix, _account_id in rows:
            self._cache.forget(digest)

    def ever_stored(self, key: str) -> bool:
        """Whether the key was ever created, revoked or not."""
        return bool(self._client.query("SELECT count() FROM api_keys WHERE key_hash = {h:String}",
                                       parameters={"h": hash_key(key)}).result_rows[0][0])

    def any_exist(self) -> bool:
        return bool(self._client.query("SELECT count() FROM api_keys").result_rows[0][0])

    def lookup(self, key: str) -> ApiKey | None:
        return self._cache.get(hash_key(key))

    def authenticate(self, authorization: str) -> ApiKey:
        """The key an `Authorization` header carries; a 401 APIError when it carries none that works."""
        token = bearer_token(authorization)
        if token is None:
            raise APIError(401, "unauthorized", "missing API key: send Authorization: Bearer bk_…", _CHALLENGE)
        key = self.lookup(token)
        if key is None:
            raise APIError(401, "unauthorized", "invalid API key", _CHALLENGE)
        return key

    def answers_without_io(self, key: str) -> bool:
        """Whether `lookup(key)` would be answered from memory (no database round trip)."""
        return self._cache.answers_without_io(hash_key(key))

    def _hashes(self) -> list[str]:
        return [row[0] for row in self._lookups.query("SELECT key_hash FROM api_keys FINAL WHERE revoked = 0").result_rows]

    def _load(self, digest: str) -> ApiKey | None:
        rows = self._lookups.query(
            "SELECT account_id, site_id FROM api_keys FINAL WHERE key_hash = {h:String} AND revoked = 0 LIMIT 1",
            parameters={"h": digest},
        ).result_rows
        return ApiKey(*rows[0]) if rows else None
