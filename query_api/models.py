"""Response shapes of the public API, exactly as the reference shows them (also the OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from ingest.event import without_control_characters


def _printable(value: str) -> str:
    if without_control_characters(value) != value:  # ingest's set: C0, DEL and C1
        raise ValueError("control characters (a NUL, a newline, …) are not allowed")
    return value


# What a person names (sites, goals, funnels, steps): shown in dashboards as it is given.
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]


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
    visitors_7d: int | None = Field(None, description="Visitors in the last 7 days; only with include_stats=true")
    pageviews_7d: int | None = Field(None, description="Pageviews in the last 7 days; only with include_stats=true")


class SiteCreate(BaseModel):
    domain: str = Field(min_length=1, max_length=253, description="A hostname such as example.com (IDNA allowed)")
    name: Annotated[str, Field(max_length=200), AfterValidator(_printable)] = ""
    timezone: str = Field("Europe/Stockholm", max_length=64, description="An IANA timezone")


class SiteChange(BaseModel):
    """What `PATCH /sites/{id}` changes; a field left out stays as it is."""
    name: Annotated[str, Field(max_length=200), AfterValidator(_printable)] | None = None
    timezone: str | None = Field(None, max_length=64, description="An IANA timezone")


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


class Change(BaseModel):
    visitors: int | None = Field(description="Percent change; null when the previous period had none")
    pageviews: int | None
    sessions: int | None
    bounce_rate: int | None = Field(description="Difference in percentage points; null when the previous rate is 0")


class Comparison(BaseModel):
    period: DateRange
    visitors: int
    pageviews: int
    sessions: int
    bounce_rate: int
    change: Change


class Overview(BaseModel):
    period: DateRange
    visitors: int
    pageviews: int
    sessions: int
    bounce_rate: int
    daily: list[DailyPoint]
    comparison: Comparison | None = Field(None, description="Only with compare=true")


class OverviewResponse(BaseModel):
    data: Overview


class PageStats(BaseModel):
    page: str
    visitors: int
    pageviews: int


class PagesResponse(BaseModel):
    data: list[PageStats]


class ReferrerStats(BaseModel):
    source: str
    channel: Literal["search", "social", "referral", "email", "paid"]
    visitors: int
    sessions: int


class ReferrersResponse(BaseModel):
    data: list[ReferrerStats]


class CountryStats(BaseModel):
    country: str = Field(description="ISO 3166-1 alpha-2")
    visitors: int


class CountriesResponse(BaseModel):
    data: list[CountryStats]


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


class CategoryClicks(BaseModel):
    category_slug: str
    clicks: int


class PopularCategoriesResponse(BaseModel):
    data: list[CategoryClicks]
    meta: AffiliateMeta


class PartnerClicks(BaseModel):
    partner_slug: str
    clicks: int
    share: float = Field(description="Part of meta.total_clicks, two decimals")


class PopularPartnersResponse(BaseModel):
    data: list[PartnerClicks]
    meta: AffiliateMeta


class TrendingProduct(BaseModel):
    product_id: str
    product_slug: str
    clicks_recent: int
    clicks_baseline_avg: float = Field(description="Baseline clicks per recent_hours window, one decimal")
    growth_percent: int | None = Field(description="Whole percent; null when the product had no baseline clicks")


class RecentPeriod(BaseModel):
    hours: int
    from_: str = Field(alias="from")
    to: str


class BaselinePeriod(BaseModel):
    days: int
    from_: str = Field(alias="from")
    to: str


class TrendingMeta(BaseModel):
    recent_period: RecentPeriod
    baseline_period: BaselinePeriod
    total_trending: int
    total_clicks: int = Field(description="Clicks in the recent window (filtered)")
    confidence: Literal["high", "medium", "low"]


class TrendingResponse(BaseModel):
    data: list[TrendingProduct]
    meta: TrendingMeta


class GoalOut(BaseModel):
    id: str
    name: str
    event_type: Literal["pageview", "event"]
    match_path: str | None = Field(None, description="Pageview goals: the path, `*` matching any characters")
    match_event: str | None = Field(None, description="Event goals: the event name")
    visitors: int = Field(description="Distinct visitors with a matching event in the period")
    conversions: int = Field(description="Matching events in the period")
    conversion_rate: int = Field(description="visitors of all the period's visitors, whole percent")


class GoalsResponse(BaseModel):
    data: list[GoalOut]


class GoalDefinition(BaseModel):
    id: str
    site_id: str
    name: str
    event_type: Literal["pageview", "event"]
    match_path: str | None = None
    match_event: str | None = None


class GoalCreated(BaseModel):
    data: GoalDefinition


class FunnelStep(BaseModel):
    name: str
    type: Literal["pageview", "event"]
    match_value: str
    match_type: Literal["exact", "startswith"]


class FunnelDefinition(BaseModel):
    id: str
    site_id: str
    name: str
    steps: list[FunnelStep]


class FunnelsResponse(BaseModel):
    data: list[FunnelDefinition]


class FunnelCreated(BaseModel):
    data: FunnelDefinition


class FunnelRef(BaseModel):
    id: str
    name: str


class FunnelStepStats(BaseModel):
    name: str
    sessions: int
    dropoff_rate: int = Field(description="Percent of the previous step's sessions lost, whole")
    conversion_from_start: int = Field(description="Percent of the first step's sessions, whole")


class FunnelStats(BaseModel):
    funnel: FunnelRef
    steps: list[FunnelStepStats]
    overall_conversion: int


class FunnelStatsResponse(BaseModel):
    data: FunnelStats


class BatchResult(BaseModel):
    endpoint: str
    data: Any = Field(None, description="The sub-request's data, when it succeeded")
    meta: dict[str, Any] | None = Field(None, description="The sub-request's meta, where it has one")
    error: ErrorBody | None = Field(None, description="The sub-request's error, when it failed")


class BatchResponse(BaseModel):
    results: list[BatchResult]
