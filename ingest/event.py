"""The event wire contract: what a client posts (`IncomingEvent`, SPEC §5.1), an imported line
(`ImportedEvent`, SPEC §5.3) and the enriched event that travels to the stream core or Kafka
(`Event`). Nothing else defines these shapes."""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated
from urllib.parse import unquote, urlsplit

import orjson
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from besokskollen import metrics

log = logging.getLogger(__name__)

# A site id is its domain with dots as dashes (streams.sites.site_id_for), so as long as a hostname can be.
MAX_SITE_ID = 253
MAX_PROPS = 30
MAX_PROP_KEY = 120
MAX_PROP_VALUE = 500
MAX_REFERRER = 2000
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?")
# Imported timestamps: a clock a little ahead of ours is tolerated, the far past is a mistake.
MAX_CLOCK_SKEW = timedelta(minutes=5)
EARLIEST = datetime(2000, 1, 1, tzinfo=timezone.utc)

# Unicode's control characters (category Cc): C0, DEL and C1 (U+0080–U+009F, such as NEL, U+0085).
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)])


def without_control_characters(text: str) -> str:
    return text.translate(_CONTROL)


def _no_control_characters(value: str) -> str:
    # For names and product fields, which the rollups store as values: a product's fields are
    # joined by \x1f (streams/activity.py), and one inside a field would shift a click to another
    # product, category or partner.
    if without_control_characters(value) != value:
        raise ValueError("must not contain control characters")
    return value


def canonical_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One spelling per address, for the visitor hash: an IPv4-mapped IPv6 address is its IPv4,
    and an IPv6 zone (`fe80::1%eth0`) is dropped: it names an interface of the host that wrote
    the address down, not another client, and the country lookup finds no scoped address."""
    if getattr(ip, "scope_id", None) is not None:
        ip = ipaddress.IPv6Address(int(ip))
    return str(getattr(ip, "ipv4_mapped", None) or ip)


Slug = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200), AfterValidator(_no_control_characters)]
# An event's name as stored; goals and funnel steps read the names they match the same way.
EventName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120),
                      AfterValidator(_no_control_characters)]


def decoded(part: str) -> str:
    """A URL's path or fragment as pages keep it: percent-decoded (browsers send `/produkt/%C3%A5`,
    a goal is typed `/produkt/å`, and `%c3%a5` is the same page; a `%` not followed by two hex
    digits stays), without control characters."""
    return without_control_characters(unquote(part, errors="replace"))


# A page as stored (ingest/enrich.py page_path); goals and funnel steps read the pages they match
# the same way, so a path copied from a URL bar matches.
PagePath = Annotated[str, AfterValidator(decoded)]


class Product(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                  AfterValidator(_no_control_characters)]
    slug: Slug = ""
    category_slug: Slug = ""
    brand_slug: Slug = ""
    partner_slug: Slug = ""

    @field_validator("slug", "category_slug", "brand_slug", "partner_slug", mode="before")
    @classmethod
    def _null_is_none(cls, value: object) -> object:
        return "" if value is None else value  # as `"referrer": null` is none

    @model_validator(mode="after")
    def _slug_defaults_to_id(self) -> Product:
        if not self.slug:
            self.slug = self.id
        return self


class IncomingEvent(BaseModel):
    """A client's event, validated; unknown fields are ignored so trackers can evolve."""

    model_config = ConfigDict(extra="ignore")

    site_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_SITE_ID)] | None = None
    domain: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    name: EventName
    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    referrer: str | None = None
    props: dict[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROP_KEY)],
                Annotated[str, StringConstraints(max_length=MAX_PROP_VALUE)]] = Field(
        default_factory=dict, max_length=MAX_PROPS
    )
    # Validated even when absent, so a click without one is reported against this field.
    product: Product | None = Field(default=None, validate_default=True)
    # The client's own id for this event (a UUID, any version): a retry carrying the same id is
    # counted once (README, "Retries"). Live events store uuid5(event_id, site_id).
    event_id: uuid.UUID | None = None
    # The tracker's data-hash mode: the URL's fragment is part of the page (hash routing).
    hash: bool = False

    @field_validator("props", mode="before")
    @classmethod
    def _null_props_are_none(cls, props: object) -> object:
        # `props: opts.props ?? null` is common tracker code; `referrer: null` is taken too.
        return {} if props is None else props

    @field_validator("event_id")
    @classmethod
    def _one_events_id(cls, event_id: uuid.UUID | None) -> uuid.UUID | None:
        # A client that sends a placeholder for every event would see them all counted as one.
        if event_id is not None and event_id.int in (0, 2**128 - 1):
            raise ValueError("the nil and max UUIDs are placeholders, not an event's id: send a random UUID or none")
        return event_id

    @field_validator("url")
    @classmethod
    def _absolute_http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # e.g. "http://[::1": an unclosed IPv6 literal
            usable = False
        if not usable:
            raise ValueError("must be an absolute http(s) URL")
        return url

    @field_validator("referrer")
    @classmethod
    def _usable_referrer(cls, referrer: str | None) -> str | None:
        """A referrer we cannot parse is dropped, not the event: it is the browser's, not the
        integrator's, and the page view still happened (counted as direct)."""
        if not referrer:
            return None
        try:
            parts = urlsplit(referrer)
            host = parts.hostname
        except ValueError:
            return None
        if not host:
            return None
        # A same-origin referrer is the whole previous URL, query string and all: past the limit
        # it is cut to its origin, which is all a source needs.
        return referrer if len(referrer) <= MAX_REFERRER else f"{parts.scheme}://{parts.netloc}/"[:MAX_REFERRER]

    @field_validator("product")
    @classmethod
    def _clicks_name_a_product(cls, product: Product | None, info: ValidationInfo) -> Product | None:
        if product is None and info.data.get("name") == "click":
            raise ValueError("required for click events")
        return product

    @model_validator(mode="after")
    def _names_a_site(self) -> IncomingEvent:
        if not self.site_id and not self.domain:
            raise ValueError("site_id or domain is required")
        return self


class ImportedEvent(IncomingEvent):
    """One line of an import: a client event plus the facts a live request would have given —
    when it happened, from which address and browser — and optionally its own id. Validate with
    `context={"now": …}` so "not in the future" is judged against the caller's clock."""

    timestamp: datetime
    ip: str
    user_agent: str  # the whole header, as live ones (limited only by the line)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _iso_8601(cls, value: object) -> datetime:
        # Only ISO 8601 date-time text: pydantic would also take epoch numbers, whose unit is a
        # guess, and fromisoformat alone a bare date (midnight: a pile of one-second sessions),
        # week dates and compact forms.
        if isinstance(value, str) and _DATE_TIME.fullmatch(value):
            try:
                return _utc_milliseconds(datetime.fromisoformat(value.upper()))
            except (ValueError, OverflowError):  # overflow: year 1 or 9999 moved into UTC
                pass
        raise ValueError("must be an ISO 8601 date-time such as 2025-03-10T14:05:00Z")

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, at: datetime, info: ValidationInfo) -> datetime:
        context = info.context or {}
        now = context.get("now") or utcnow()
        if at > now + MAX_CLOCK_SKEW:
            raise ValueError("is in the future")
        if at < EARLIEST:
            raise ValueError("is before 2000-01-01")
        if at < context.get("oldest", EARLIEST):
            raise ValueError(f"is older than the raw events are kept (before {context['oldest']:%Y-%m-%d %H:%M:%S} UTC;"
                             " BK_RAW_EVENTS_TTL_DAYS, or a shorter one the database had before)")
        return at

    @field_validator("ip")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        if (ip := canonical_ip_text(value)) is None:
            raise ValueError("must be an IPv4 or IPv6 address")
        return ip


@functools.lru_cache(maxsize=65_536)
def canonical_ip_text(value: str) -> str | None:
    """`canonical_ip` of an address as text, None if it is none. A port that a proxy or a log
    appended (`81.2.69.160:5000`, `[2001:db8::1]:443`) is dropped. Cached: a file repeats each
    person's address on every line, and parsing one took a quarter of an import line's validation."""
    text = value.strip()
    if text.startswith("[") and "]" in text:
        text, port = text[1:].split("]", 1)
        if port and not (port[0] == ":" and port[1:].isdigit()):
            return None
    elif text.count(":") == 1:
        text, port = text.split(":")
        if not port.isdigit():
            return None
    try:
        return canonical_ip(ipaddress.ip_address(text))
    except ValueError:
        return None


# What the events table can hold; a record outside it (a foreign producer's) would fail every
# batch it is in, forever: decode_each skips it instead.
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_STORABLE_FROM, _STORABLE_UNTIL = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2106, 1, 1, tzinfo=timezone.utc)


class Event(BaseModel):
    """An enriched event. Carries no IP address; `visitor_id` is already the salted hash."""

    event_id: Annotated[str, StringConstraints(pattern=_UUID)]
    site_id: str
    timestamp: datetime
    name: str
    visitor_id: Annotated[int, Field(ge=0, lt=2**64)]
    hostname: str = ""
    pathname: str = "/"
    referrer: str = ""
    source: str = ""
    channel: str = "direct"
    utm_source: str = ""
    utm_medium: str = ""
    utm_campaign: str = ""
    country: str = ""
    device: str = ""
    browser: str = ""
    os: str = ""
    props: dict[str, str] = Field(default_factory=dict)
    product_id: str = ""
    product_slug: str = ""
    category_slug: str = ""
    brand_slug: str = ""
    partner_slug: str = ""

    @field_validator("timestamp")
    @classmethod
    def _stored_precision(cls, at: datetime) -> datetime:
        return _utc_milliseconds(at)

    @property
    def kafka_key(self) -> bytes:
        """One visitor always lands on one partition, so its sessions live in one worker."""
        return f"{self.site_id}:{self.visitor_id}".encode()

    def to_bytes(self) -> bytes:
        # The fields are plain values, so orjson serialises them as they are: the same bytes as
        # from `model_dump()`, at a sixth of its cost (once per event, on the request path).
        return orjson.dumps(self.__dict__, option=orjson.OPT_UTC_Z)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Event:
        return cls.model_validate_json(raw)

    @field_validator("timestamp")
    @classmethod
    def _storable(cls, at: datetime) -> datetime:
        if at.tzinfo is None or not _STORABLE_FROM <= at < _STORABLE_UNTIL:
            raise ValueError("must be an aware time from 1970 to 2105")
        return at

    @classmethod
    def decode_each(cls, records: list[bytes | None]) -> list[Event | None]:
        """The events of these Kafka or journal records, None in place of each that is not an
        event (a foreign producer's, an older release's, a tombstone without a value, values the
        tables cannot hold): it is logged and skipped, rather than stop the reader on every
        restart."""
        events: list[Event | None] = []
        for raw in records:
            try:
                events.append(cls.from_bytes(raw))
            except (ValueError, TypeError):
                log.error("skipping a record that is not an event: %r", raw[:200] if raw else raw)
                metrics.RECORDS_SKIPPED.inc()
                events.append(None)
        return events


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _utc_milliseconds(at: datetime) -> datetime:
    """Naive means UTC. Stored as DateTime64(3): an event must compare equal before and after a
    round trip."""
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def problem(exc: ValidationError) -> tuple[str, str, str]:
    """The first error of a failed validation as (field, code, message) for an error reply; the
    message names the field."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "json_invalid":
        return "", "invalid_json", "is not valid JSON"
    if first["type"] == "model_type" and not field:
        return "", "invalid_json", "must be a JSON object"
    if first["type"] == "missing":
        return field, "missing_field", f"{field} is required"
    message = first["msg"].removeprefix("Value error, ")
    return field, "invalid_field", f"{field}: {message}" if field else message
