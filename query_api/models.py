"""Response shapes of the public API, exactly as the reference shows them (also the OpenAPI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class SiteOut(BaseModel):
    id: str
    domain: str
    name: str
    timezone: str
    verified: bool
    has_data: bool
    visitors_7d: int | None = Field(None, description="Only with include_stats=true")


class SiteCreate(BaseModel):
    domain: str = Field(min_length=3, max_length=253)
    name: str = Field("", max_length=200)
    timezone: str = "Europe/Stockholm"


class ListMeta(BaseModel):
    total: int


class SiteList(BaseModel):
    data: list[SiteOut]
    meta: ListMeta


class SiteResponse(BaseModel):
    data: SiteOut


class DateRange(BaseModel):
    from_: str = Field(alias="from")
    to: str


class DailyPoint(BaseModel):
    date: str
    visitors: int
    pageviews: int


class Overview(BaseModel):
    period: DateRange
    visitors: int
    pageviews: int
    sessions: int
    bounce_rate: int
    daily: list[DailyPoint]


class OverviewResponse(BaseModel):
    data: Overview


class PopularProduct(BaseModel):
    product_id: str
    product_slug: str
    clicks: int


class AffiliateMeta(BaseModel):
    period: DateRange
    total_clicks: int
    confidence: Literal["high", "medium", "low"]


class PopularProductsResponse(BaseModel):
    data: list[PopularProduct]
    meta: AffiliateMeta
