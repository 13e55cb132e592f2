"""`/popular/*` and `/trending/products`: affiliate clicks from the rollups (kind `click`, value
"id\x1fslug\x1fcategory\x1fbrand\x1fpartner"). `days` are the last N UTC calendar days (whole
days of `rollup_1d`); trending windows count back from now, to the second (`rollup_15m` and, for
the quarter hours their edges cut, the raw clicks)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Annotated

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import AfterValidator

from query_api.deps import ROLLUP_READ, Ctx, DecimalNumber, Integer, Key, SiteId, readable_site, shared_json
from query_api.models import (PopularCategoriesResponse, PopularPartnersResponse, PopularProductsResponse,
                              TrendingResponse)
from query_api.periods import iso_z, round_half_away, utc_days
from streams.activity import SEPARATOR
from streams.buckets import BUCKET, bucket_of

router = APIRouter(tags=["affiliate"])

# Click rows of the period, split into their product dimensions; filters by category and brand.
_DAILY_CLICKS = """
SELECT parts[1] AS product_id, parts[2] AS product_slug, parts[3] AS category_slug, parts[5] AS partner_slug,
       day, events AS clicks
FROM (SELECT splitByChar(%(separator)s, value) AS parts, day, events FROM rollup_1d FINAL
      WHERE site_id = %(site)s AND kind = 'click' AND day >= toDate(%(first)s) AND day <= toDate(%(last)s))
WHERE (%(category)s = '' OR parts[3] = %(category)s) AND (%(brand)s = '' OR parts[4] = %(brand)s)
"""
# Values are bound by the driver (escaped literals), as in query_api/stats.py. Every list comes
# with the total of the filtered set (for meta.total_clicks), whatever the limit leaves out. The
# rows the list shows (`listed`) sort first, so the limit's rows hold them, and at least one row
# carries the total when clicks exist (sending every product to Python cost ~25 % of a request
# at 100,000 products).
_POPULAR = f"""
SELECT {{columns}}, sum(clicks) AS n, sum(n) OVER () AS total FROM ({_DAILY_CLICKS})
GROUP BY {{dims}}
ORDER BY {{listed}} DESC, n DESC, {{order}}
LIMIT %(limit)s
"""
# A product is its id: a rename changes its slug, not which product it is. It is listed once,
# under the slug of its latest clicks (latest day or quarter hour; ties by the greater slug).
_PRODUCT_COLUMNS = "product_id, argMax(product_slug, ({time}, product_slug)) AS slug"
# Whole quarter hours from the rollup; the quarter hours cut by a window's edge (its start, the
# recent window's start, now) from the raw clicks in them, so the windows count back from now to
# the second (SPEC §7). A raw click is an event named `click` with a product id, as the rollup's
# (streams/activity.py). `at` sorts a row into the recent window or the baseline. A product without
# recent clicks neither trends nor adds to total_clicks: left in ClickHouse.
_TRENDING = f"""
SELECT {_PRODUCT_COLUMNS.format(time="bucket")},
       sumIf(clicks, at >= toDateTime64(%(recent_start)s, 3, 'UTC')) AS recent,
       sumIf(clicks, at < toDateTime64(%(recent_start)s, 3, 'UTC')) AS baseline
FROM (
    SELECT parts[1] AS product_id, parts[2] AS product_slug, parts[3] AS category_slug, parts[4] AS brand_slug,
           bucket, toDateTime64(bucket, 3, 'UTC') AS at, events AS clicks
    FROM (SELECT splitByChar(%(separator)s, value) AS parts, bucket, events FROM rollup_15m FINAL
          WHERE site_id = %(site)s AND kind = 'click'
            AND bucket >= toDateTime(%(whole_start)s, 'UTC') AND bucket < toDateTime(%(whole_end)s, 'UTC')
            AND NOT (bucket >= toDateTime(%(cut)s, 'UTC') AND bucket < toDateTime(%(cut_end)s, 'UTC')))
    UNION ALL
    SELECT product_id, product_slug, category_slug, brand_slug, toStartOfFifteenMinutes(timestamp) AS bucket,
           timestamp AS at, 1 AS clicks
    FROM events FINAL
    WHERE site_id = %(site)s AND name = 'click' AND product_id != ''
      AND (timestamp >= toDateTime64(%(baseline_start)s, 3, 'UTC') AND timestamp < toDateTime64(%(whole_start)s, 3, 'UTC')
           OR timestamp >= toDateTime64(%(cut)s, 3, 'UTC') AND timestamp < toDateTime64(%(cut_end)s, 3, 'UTC')
           OR timestamp >= toDateTime64(%(whole_end)s, 3, 'UTC') AND timestamp < toDateTime64(%(recent_end)s, 3, 'UTC')))
WHERE (%(category)s = '' OR category_slug = %(category)s) AND (%(brand)s = '' OR brand_slug = %(brand)s)
GROUP BY product_id
HAVING recent > 0
"""
# Raw events of a window's first quarter hour are read only while the TTL surely keeps them (a
# margin for clocks that differ between processes); past that the baseline starts at that whole
# quarter hour, so an answer never changes when ClickHouse applies the TTL.
_TTL_MARGIN = timedelta(hours=1)


def _quarter_ceil(at: datetime) -> datetime:
    floor = bucket_of(at)
    return floor if floor == at else floor + BUCKET


def trending_windows(now: datetime, recent_hours: int, baseline_days: int,
                     complete_since: datetime | None = None) -> tuple[datetime, datetime, datetime]:
    """(baseline start, recent start, recent end): the recent window is the `recent_hours` up to
    now, to the second — it ends at the next whole second, so every event up to now is in it — and
    the baseline the `baseline_days` before it. An edge where raw events may be gone
    (`complete_since`, streams/retention.py) moves back to its whole quarter hour."""
    end = now.replace(microsecond=0) + timedelta(seconds=1)
    edge = complete_since + _TTL_MARGIN if complete_since else None
    recent_start = end - timedelta(hours=recent_hours)
    if edge and recent_start < edge:
        recent_start = bucket_of(recent_start)
    baseline_start = recent_start - timedelta(days=baseline_days)
    if edge and baseline_start < edge:
        baseline_start = bucket_of(baseline_start)
    return baseline_start, recent_start, end


def confidence(total_clicks: int) -> str:
    return "high" if total_clicks >= 50 else "medium" if total_clicks >= 10 else "low"


def _popular(client: Client, site_id: str, start: datetime, end: datetime, dims: str, order: str, listed: str,
             limit: int, category: str = "", brand: str = "", columns: str = "",
             min_clicks: int = 0) -> tuple[list[tuple], dict]:
    """The first `limit` rows, those for which `listed` holds first, and the meta."""
    params = {"site": site_id, "first": start.date(), "last": end.date(), "category": category, "brand": brand,
              "separator": SEPARATOR, "limit": limit, "min_clicks": min_clicks}
    sql = (_POPULAR.replace("{columns}", columns or dims).replace("{dims}", dims).replace("{order}", order)
           .replace("{listed}", listed))
    rows = client.query(sql, parameters=params, settings=ROLLUP_READ).result_rows
    total = rows[0][-1] if rows else 0
    meta = {"period": {"from": iso_z(start), "to": iso_z(end)}, "total_clicks": total, "confidence": confidence(total)}
    return rows, meta


def popular_products(client: Client, site_id: str, start: datetime, end: datetime, limit: int,
                     category: str = "", brand: str = "", min_clicks: int = 0) -> dict:
    rows, meta = _popular(client, site_id, start, end, "product_id", "slug, product_id", "n >= %(min_clicks)s", limit,
                          category, brand, _PRODUCT_COLUMNS.format(time="day"), min_clicks)
    listed = [row for row in rows if row[2] >= min_clicks]
    return {"data": [{"product_id": p, "product_slug": s, "clicks": n} for p, s, n, _ in listed], "meta": meta}


def popular_categories(client: Client, site_id: str, start: datetime, end: datetime, limit: int) -> dict:
    """Clicks without a category are in total_clicks but not listed."""
    rows, meta = _popular(client, site_id, start, end, "category_slug", "category_slug", "category_slug != ''", limit)
    return {"data": [{"category_slug": c, "clicks": n} for c, n, _ in rows if c], "meta": meta}


def popular_partners(client: Client, site_id: str, start: datetime, end: datetime, limit: int) -> dict:
    """`share` is the partner's part of total_clicks, two decimals (half away from zero)."""
    rows, meta = _popular(client, site_id, start, end, "partner_slug", "partner_slug", "partner_slug != ''", limit)
    total = meta["total_clicks"]
    return {"data": [{"partner_slug": p, "clicks": n, "share": round_half_away(Fraction(n, total), 2)}
                     for p, n, _ in rows if p], "meta": meta}


def trending_products(client: Client, site_id: str, now: datetime, recent_hours: int, baseline_days: int,
                      min_growth: Decimal | float, min_recent_clicks: int, limit: int, category: str = "",
                      brand: str = "", complete_since: datetime | None = None) -> dict:
    """Clicks in the last `recent_hours` against the average per `recent_hours` window of the
    `baseline_days` before them. A product without baseline clicks has no growth to compute: it
    trends when it reaches min_recent_clicks, with growth_percent null."""
    baseline_start, recent_start, recent_end = trending_windows(now, recent_hours, baseline_days, complete_since)
    # `recent_hours` windows in the baseline (exact), as long as it is (an edge moved back to its
    # quarter hour makes it longer)
    windows = Fraction(int((recent_start - baseline_start).total_seconds()), recent_hours * 3600)
    rows = client.query(_TRENDING, parameters={
        "site": site_id, "separator": SEPARATOR, "category": category, "brand": brand,
        "baseline_start": baseline_start, "recent_start": recent_start, "recent_end": recent_end,
        "whole_start": _quarter_ceil(baseline_start), "whole_end": bucket_of(recent_end),
        "cut": bucket_of(recent_start), "cut_end": _quarter_ceil(recent_start)}).result_rows
    threshold = Fraction(str(min_growth))  # exact: as written (a Decimal), not as a float holds it
    # growth = (recent − average)·100 / average with average = baseline / windows, so growth ≥
    # threshold is, multiplied out, a comparison of integers: a Fraction per product cost 80 % of
    # a request at 100,000 products. Growth itself is computed for the listed products only.
    w, w_den, t, t_den = windows.numerator, windows.denominator, threshold.numerator, threshold.denominator
    least = max(min_recent_clicks, 1)
    trending, recent_total = [], 0
    for product_id, slug, recent, baseline in rows:
        recent_total += recent
        if recent >= least and (not baseline or (recent * w - baseline * w_den) * 100 * t_den >= t * baseline * w_den):
            trending.append((recent, slug, product_id, baseline))
    # Growth decides what trends; the list is ordered as every list (SPEC §7.1): by its first
    # metric, clicks_recent, ties by slug.
    trending.sort(key=lambda t: (-t[0], t[1], t[2]))
    data = []
    for recent, slug, product_id, baseline in trending[:limit]:
        average = baseline / windows
        data.append({"product_id": product_id, "product_slug": slug, "clicks_recent": recent,
                     "clicks_baseline_avg": round_half_away(average, 1) if baseline else 0.0,
                     "growth_percent": round_half_away((recent - average) * 100 / average) if baseline else None})
    return {
        "data": data,
        "meta": {"recent_period": {"hours": recent_hours, "from": iso_z(recent_start), "to": iso_z(recent_end)},
                 "baseline_period": {"days": baseline_days, "from": iso_z(baseline_start), "to": iso_z(recent_start)},
                 "total_trending": len(trending), "total_clicks": recent_total, "confidence": confidence(recent_total)},
    }


Days = Annotated[Integer, Query(ge=1, le=365, description="Number of UTC days including today")]
# Read as ingest stores a click's slugs (ingest/event.py): without surrounding whitespace, so
# `category_slug=%20kablar` finds the clicks sent with " kablar".
Slug = Annotated[str, Query(max_length=200), AfterValidator(str.strip)]


@router.get("/popular/products", response_model=PopularProductsResponse)
def get_popular_products(request: Request, ctx: Ctx, key: Key, site_id: SiteId, days: Days = 30,
                         limit: Annotated[Integer, Query(ge=1, le=100)] = 20, category_slug: Slug = "",
                         brand_slug: Slug = "", min_clicks: Annotated[Integer, Query(ge=0)] = 0) -> Response:
    site = readable_site(ctx, key, site_id)
    start, end = utc_days(days)
    return shared_json(request, site, popular_products, ctx.client, site.site_id, start, end, limit, category_slug,
                       brand_slug, min_clicks)


@router.get("/popular/categories", response_model=PopularCategoriesResponse)
def get_popular_categories(request: Request, ctx: Ctx, key: Key, site_id: SiteId, days: Days = 30,
                           limit: Annotated[Integer, Query(ge=1, le=100)] = 10) -> Response:
    site = readable_site(ctx, key, site_id)
    start, end = utc_days(days)
    return shared_json(request, site, popular_categories, ctx.client, site.site_id, start, end, limit)


@router.get("/popular/partners", response_model=PopularPartnersResponse)
def get_popular_partners(request: Request, ctx: Ctx, key: Key, site_id: SiteId, days: Days = 30,
                         limit: Annotated[Integer, Query(ge=1, le=100)] = 10) -> Response:
    site = readable_site(ctx, key, site_id)
    start, end = utc_days(days)
    return shared_json(request, site, popular_partners, ctx.client, site.site_id, start, end, limit)


@router.get("/trending/products", response_model=TrendingResponse)
def get_trending_products(
    request: Request, ctx: Ctx, key: Key, site_id: SiteId,
    limit: Annotated[Integer, Query(ge=1, le=100)] = 10,
    recent_hours: Annotated[Integer, Query(ge=1, le=168, description="Hours to analyse, back from now")] = 24,
    baseline_days: Annotated[Integer, Query(ge=1, le=90, description="Days before the recent window")] = 7,
    min_growth: Annotated[DecimalNumber, Query(ge=-100, le=1_000_000, description="Minimum growth in percent")] = 100,
    min_recent_clicks: Annotated[Integer, Query(ge=0, description="Minimum clicks in the recent window")] = 3,
    category_slug: Slug = "", brand_slug: Slug = "",
) -> Response:
    site = readable_site(ctx, key, site_id)
    # To the second, as the windows are (`trending_windows`): questions of one second share an answer.
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return shared_json(request, site, trending_products, ctx.client, site.site_id, now, recent_hours, baseline_days,
                       min_growth, min_recent_clicks, limit, category_slug, brand_slug,
                       ctx.raw_events.complete_since(now) if ctx.raw_events else None)
