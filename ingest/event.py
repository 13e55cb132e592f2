"""The event wire contract: what a client posts (`IncomingEvent`, SPEC §5.1) and the enriched
event that travels to the stream core or Kafka (`Event`). Nothing else defines these shapes."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

MAX_PROPS = 30

Slug = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]


class Product(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    slug: Slug = ""
    category_slug: Slug = ""
    brand_slug: Slug = ""
    partner_slug: Slug = ""

    @model_validator(mode="after")
    def _slug_defaults_to_id(self) -> Product:
        if not self.slug:
            self.slug = self.id
        return self


class IncomingEvent(BaseModel):
    """A client's event, validated; unknown fields are ignored so trackers can evolve."""

    model_config = ConfigDict(extra="ignore")

    site_id: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    domain: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    referrer: Annotated[str, StringConstraints(max_length=2000)] | None = None
    props: dict[str, Annotated[str, StringConstraints(max_length=2000)]] = Field(
        default_factory=dict, max_length=MAX_PROPS
    )
    product: Product | None = None

    @field_validator("url")
    @classmethod
    def _absolute_http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        return url

    @model_validator(mode="after")
    def _check(self) -> IncomingEvent:
        if not self.site_id and not self.domain:
            raise ValueError("site_id or domain is required")
        if self.name == "click" and self.product is None:
            raise ValueError("product is required for click events")
        return self


class Event(BaseModel):
    """An enriched event. Carries no IP address; `visitor_id` is already the salted hash."""

    event_id: str
    site_id: str
    timestamp: datetime
    name: str
    visitor_id: int
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
    def _utc_milliseconds(cls, at: datetime) -> datetime:
        # Stored as DateTime64(3): an event must compare equal before and after a round trip.
        at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
        return at.replace(microsecond=at.microsecond // 1000 * 1000)

    @property
    def kafka_key(self) -> bytes:
        """One visitor always lands on one partition, so its sessions live in one worker."""
        return f"{self.site_id}:{self.visitor_id}".encode()

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(), option=orjson.OPT_UTC_Z)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Event:
        return cls.model_validate_json(raw)

    @property
    def is_pageview(self) -> bool:
        return self.name == "pageview"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
