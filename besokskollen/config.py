"""All configuration, read once from the environment (`BK_` prefix); CLI flags override."""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


_PLACEHOLDER = "bk_change_me"  # deploy/'s keys start so
_ADMIN_KEY = re.compile(r"bk_[A-Za-z0-9_-]{16,}")
# A key made of few characters (bk_aaaaaaaaaaaaaaaa, bk_0101010101010101) is guessed by trying;
# 16 random hex digits have fewer than 5 different ones less than once in 10^6 (8: once in 90).
_FEWEST_CHARACTERS = 5
# A hostname or an address as a Kafka bootstrap server names it (Docker's names may hold `_`).
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
# Settings whose value an error line must not show.
_SECRET = frozenset({"admin_key"})


def _default_clickhouse_url() -> str:
    return "chdb://" + str(Path("./data").resolve())


# The most partitions a topic may be given (`BK_KAFKA_PARTITIONS`, `besokskollen partitions`):
# more than a topic is ever given (Kafka advises ~4,000 partitions per broker); a number Kafka's
# protocol cannot carry stopped ingest and the worker with a traceback.
MAX_PARTITIONS = 10_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BK_", extra="ignore")

    clickhouse_url: str = _default_clickhouse_url()
    kafka_bootstrap: str | None = None
    # Kafka's own rule for a topic name (a name it refuses left ingest spooling every event).
    kafka_topic: str = Field("events", min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    # The workers' consumer group (Faust's app id is `<group>-worker`): deployments sharing one
    # Kafka cluster give each its own, so one's rebalances never pause the other's workers.
    kafka_group: str = Field("besokskollen", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    # Partitions of the events topic when it is created; the most workers that can share it.
    kafka_partitions: int = Field(12, ge=1, le=MAX_PARTITIONS)
    # Replication of the topics we and Faust create; 1 suits a single broker, use 3 on a cluster.
    kafka_replication_factor: int = Field(1, ge=1, le=32_767)  # the protocol's 16 bits
    admin_key: str | None = None
    trusted_proxies: str = "127.0.0.1/32,::1/128"
    session_timeout_s: int = Field(1800, ge=60, le=86_400)
    # A worker's name in status reports (default host:pid) and, when set, its static member id
    # in the consumer group: a restarted worker takes its partitions back without a rebalance.
    worker_instance_id: str | None = None
    # Raw events older than this are deleted by ClickHouse (TTL); rollups keep every number.
    raw_events_ttl_days: int = 400
    # Requests per minute per API key on /api/v1 (per process).
    rate_limit_per_minute: int = Field(100, ge=1)
    # Largest accepted /api/event body; larger answers 413.
    max_event_bytes: int = Field(16 * 1024, ge=1024)
    # Largest accepted /api/v1/events/import body; larger answers 413.
    max_import_bytes: int = Field(20 * 1024 * 1024, ge=64 * 1024)
    # A salt made for a past day by an import is kept as long as imports for that day may arrive
    # (SPEC §5.3; live salts: 48 h); set, at most this many days after it was made.
    historic_salt_days: int | None = Field(None, ge=1, le=36_500)
    # Where ingest keeps events answered 202 but not yet safe elsewhere (one directory per
    # process): distributed, those Kafka did not acknowledge in time; embedded, those the stream
    # core has not written yet. Unset: `spool` inside the embedded data folder, else `./spool`.
    spool_dir: Path | None = None
    # The spool's largest size; when full, /api/event answers 503 with Retry-After.
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=64 * 1024)
    # How long an event waits for Kafka's acknowledgement before it is spooled instead.
    spool_after_ms: int = Field(250, gt=0)
    # Address and port a process listens on when its command line gives none (containers set
    # them once for every process; the commands' own defaults are 127.0.0.1 and 8080–8083).
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    # Redis for the per-key rate limit shared by every api process; unset: per process.
    redis_url: str | None = None
    # A ClickHouse cluster name: DDL runs ON CLUSTER with Replicated engines and Distributed
    # fronts (streams/migrations.py); unset: a single server or the embedded engine.
    clickhouse_cluster: str | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _whole_number(cls, value: object, info: ValidationInfo) -> object:
        # pydantic's lax mode reads "7.0", "+1800" and "1_800" as numbers: a value in another unit
        # or with a typo passed unnoticed. Every integer setting, by its type.
        if (cls.model_fields[info.field_name].annotation in (int, int | None) and isinstance(value, str)
                and value.strip() and not re.fullmatch(r"-?[0-9]+", value.strip())):
            raise ValueError("must be a whole number written in digits")
        return value

    @field_validator("clickhouse_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("chdb://", "http://", "https://")):
            raise ValueError("must start with chdb://, http:// or https://")
        return url

    @field_validator("clickhouse_url")
    @classmethod
    def _usable(cls, url: str) -> str:
        if url.startswith("chdb://") and not url.removeprefix("chdb://").startswith("/"):
            raise ValueError("a chdb:// URL names an absolute folder: chdb:///var/lib/besokskollen")
        if url.startswith(("http://", "https://")) and (problem := server_url_problem(url)):
            raise ValueError(problem)
        return url

    @field_validator("kafka_topic")
    @classmethod
    def _not_dots(cls, topic: str) -> str:
        if topic in (".", ".."):
            raise ValueError("Kafka takes no topic named . or ..")
        return topic

    @field_validator("clickhouse_cluster")
    @classmethod
    def _on_a_server(cls, cluster: str | None, info: ValidationInfo) -> str | None:
        if cluster and str(info.data.get("clickhouse_url", "")).startswith("chdb://"):
            raise ValueError("needs a ClickHouse server (an http(s):// BK_CLICKHOUSE_URL): the embedded engine has no"
                             " clusters")
        return cluster

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, cidrs: str) -> str:
        for cidr in cidrs.split(","):
            if cidr.strip():
                try:
                    ipaddress.ip_network(cidr.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{cidr.strip()!r} is not an address or CIDR network") from None
        return cidrs

    @field_validator("kafka_bootstrap", "worker_instance_id", "host", "port", "redis_url", "clickhouse_cluster",
                     "spool_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose and Kubernetes set a variable empty to leave it out: an empty BK_SPOOL_DIR put
        # the spool in the working directory, a blank BK_KAFKA_BOOTSTRAP meant "Kafka at ''".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _servers(cls, bootstrap: str | None) -> str | None:
        if bootstrap is not None and not _bootstrap_list(bootstrap):
            raise ValueError("names no server: host:port, comma-separated")
        for server in _bootstrap_list(bootstrap):
            try:
                host, port = _host_port(server)
            except ValueError:
                host, port = "", 0
            if not 1 <= port <= 65535 or not (_HOST.fullmatch(host) or _is_address(host)):
                raise ValueError(f"{server!r} is not host:port")
        return bootstrap

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, url: str | None) -> str | None:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        if url and not url.startswith("unix://"):
            try:
                port = urlsplit(url).port
            except ValueError:  # not a number, or past 65535
                port = 0
            if port == 0:
                raise ValueError("has a port that is not a number from 1 to 65535")
        return url

    @field_validator("admin_key")
    @classmethod
    def _a_key_of_your_own(cls, key: str | None) -> str | None:
        if not key:
            return None
        # Published in deploy/ and the README: kept in a deployment, it opens the account to anyone.
        if key.startswith(_PLACEHOLDER):
            raise ValueError("is the placeholder from the deploy files; set a key of your own")
        # The shape every key has (query_api/keys.py makes bk_ + 32): one that could be guessed
        # opens a user-level key to anyone who tries.
        if not _ADMIN_KEY.fullmatch(key):
            raise ValueError("must be bk_ and at least 16 more letters, digits, '-' or '_'"
                             " (such as bk_$(openssl rand -hex 24))")
        if len(set(key.removeprefix("bk_"))) < _FEWEST_CHARACTERS:
            raise ValueError(f"could be guessed: fewer than {_FEWEST_CHARACTERS} different characters after bk_; set a"
                             " random one (such as bk_$(openssl rand -hex 24))")
        return key

    @field_validator("raw_events_ttl_days")
    @classmethod
    def _outlives_a_visitor(cls, days: int) -> int:
        # The stream core reads a visitor's last three days of raw events; imports older than
        # the TTL are refused (ingest/importer.py).
        if days < 7:
            raise ValueError("must be at least 7")
        # 100 years is "for ever" here, and the import's oldest accepted day (now - days) must be
        # a date Python can hold.
        if days > 36_500:
            raise ValueError("must be at most 36500 (100 years)")
        return days

    @cached_property
    def trusted_networks(self) -> frozenset[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        # A frozenset caches its hash: ingest/clients.py caches verdicts keyed by it per request.
        return frozenset(
            ipaddress.ip_network(cidr.strip(), strict=False)
            for cidr in self.trusted_proxies.split(",")
            if cidr.strip()
        )

    @property
    def data_folder(self) -> Path | None:
        """The embedded engine's folder, when the ClickHouse URL names one (chdb://)."""
        url = self.clickhouse_url
        return Path(url.removeprefix("chdb://")) if url.startswith("chdb://") else None

    @property
    def spool_path(self) -> Path:
        if self.spool_dir is not None:
            return self.spool_dir.resolve()
        if self.data_folder is not None:
            return self.data_folder.resolve() / "spool"
        return Path("spool").resolve()

    @property
    def kafka_servers(self) -> list[tuple[str, int]]:
        """The bootstrap servers' (host, port), read as the Kafka client reads them (`kafka` alone
        is port 9092)."""
        return [_host_port(server) for server in _bootstrap_list(self.kafka_bootstrap)]

    @property
    def embedded(self) -> bool:
        """No Kafka configured: ingest hands events to the stream core in-process."""
        return self.kafka_bootstrap is None


def server_url_problem(url: str) -> str | None:
    """What is wrong with a ClickHouse server's URL (http(s)://user:pass@host:8123/db), or None."""
    if not url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        return f"not a URL: {exc}"
    return None if parts.hostname else "names no host"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _bootstrap_list(bootstrap: str | None) -> list[str]:
    return [part.strip() for part in (bootstrap or "").split(",") if part.strip()]


def _host_port(server: str) -> tuple[str, int]:
    from aiokafka.conn import get_ip_port_afi  # read as the Kafka client will read it

    host, port, _family = get_ip_port_afi(server)
    return host, port


def misspelt(environ: Mapping[str, str]) -> list[str]:
    """A line for each BK_ variable that is no setting but close to one's name: such a variable is
    ignored, so a typo (BK_SESSION_TIMEOUT) would silently leave the default. Other BK_ variables
    (deploy/kafka's scripts have their own) are none of ours."""
    names = ["BK_" + name.upper() for name in Settings.model_fields]
    lines = []
    for variable in sorted(environ):
        if variable.startswith("BK_") and variable not in names:
            close = difflib.get_close_matches(variable, names, n=1, cutoff=0.78)
            if close:
                lines.append(f"{variable} is not a setting and is ignored; did you mean {close[0]}?")
    return lines


def settings_problems(error: ValidationError) -> list[str]:
    """One line per bad setting, named as it is set: BK_SESSION_TIMEOUT_S: …"""
    lines = []
    for problem in error.errors():
        name = "BK_" + "_".join(str(part) for part in problem["loc"]).upper()
        shown = "" if problem["loc"][0] in _SECRET else f" (got {_shown(problem.get('input'))!r})"
        lines.append(f"{name}: {problem['msg'].removeprefix('Value error, ')}{shown}")
    return lines


def _shown(value):
    """A setting's value as an error line may show it: a URL's user:password@ goes (these lines
    end up in logs)."""
    return re.sub(r"://[^@]*@", "://***@", value) if isinstance(value, str) else value
