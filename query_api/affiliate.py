"""`/popular/*`: affiliate clicks from the hourly rollups, over the last N UTC calendar days."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from query_api.deps import Ctx, Key, cached_json, readable_site
from query_api.models import PopularProductsResponse
from query_api.periods import iso_z, utc_days
from streams.activity import SEPARATOR

router = APIRouter(tags=["affiliate"])

# Clicks per product dimensions and UTC day (kind `click`, value "id\x1fslug\x1fcategory\x1fbrand\x1fpartner").
_CLICKS = """
SELECT parts[1] AS product_id, parts[2] AS product_slug, events AS clicks
FROM (SELECT splitByChar(%(separator)s, value) AS parts, events FROM rollup_1d FINAL
      WHERE site_id = %(site)s AND kind = 'click' AND day >= toDate(%(first)s) AND day <= toDate(%(last)s))
WHERE (%(category)s = '' OR parts[3] = %(category)s)
  AND (%(brand)s = '' OR parts[4] = %(brand)s)
"""
# Values are bound by the driver (escaped literals), as in query_api/stats.py.
_PRODUCTS = f"""
SELECT product_id, product_slug, sum(clicks) AS n, sum(n) OVER () AS total FROM ({_CLICKS})
GROUP BY product_id, product_slug
ORDER BY n DESC, product_slug, product_id
"""


def confidence(total_clicks: int) -> str:
    return "high" if total_clicks >= 50 else "medium" if total_clicks >= 10 else "low"


def popular_products(client: Client, site_id: str, start: datetime, end: datetime, limit: int,
                     category: str = "", brand: str = "", min_clicks: int = 0) -> dict:
    params = {"site": site_id, "first": start.date(), "last": end.date(), "category": category, "brand": brand,
              "separator": SEPARATOR}
    rows = client.query(_PRODUCTS, parameters=params).result_rows
    # total_clicks counts every click matching the period and the category/brand filters,
    # whatever `limit` and `min_clicks` leave in the list.
    total = rows[0][3] if rows else 0
    listed = [row for row in rows if row[2] >= min_clicks][:limit]
    return {
        "data": [{"product_id": p, "product_slug": s, "clicks": n} for p, s, n, _ in listed],
        "meta": {"period": {"from": iso_z(start), "to": iso_z(end)}, "total_clicks": total,
                 "confidence": confidence(total)},
    }


@router.get("/popular/products", response_model=PopularProductsResponse)
def get_popular_products(
    request: Request, ctx: Ctx, key: Key,
    site_id: Annotated[str, Query(description="Site ID")],
    days: Annotated[int, Query(ge=1, le=365, description="Number of UTC days including today")] = 30,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    category_slug: Annotated[str, Query(max_length=200)] = "",
    brand_slug: Annotated[str, Query(max_length=200)] = "",
    min_clicks: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    site = readable_site(ctx, key, site_id)
    start, end = utc_days(days)
    return cached_json(request, popular_products(ctx.client, site.site_id, start, end, limit,
                                                 category_slug, brand_slug, min_clicks))
