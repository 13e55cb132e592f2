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

router = APIRouter(tags=["affiliate"])

_FILTERS = """
WHERE site_id = {site:String} AND hour >= {start:DateTime('UTC')} AND hour <= {end:DateTime('UTC')}
  AND ({category:String} = '' OR category_slug = {category:String})
  AND ({brand:String} = '' OR brand_slug = {brand:String})
"""
_PRODUCTS = f"""
SELECT product_id, product_slug, sum(clicks) AS n FROM affiliate_clicks_hourly FINAL {_FILTERS}
GROUP BY product_id, product_slug
HAVING n >= {{min_clicks:UInt64}}
ORDER BY n DESC, product_slug, product_id
LIMIT {{limit:UInt32}}
"""
_TOTAL = f"SELECT sum(clicks) FROM affiliate_clicks_hourly FINAL {_FILTERS}"


def confidence(total_clicks: int) -> str:
    return "high" if total_clicks >= 50 else "medium" if total_clicks >= 10 else "low"


def popular_products(client: Client, site_id: str, start: datetime, end: datetime, limit: int,
                     category: str = "", brand: str = "", min_clicks: int = 0) -> dict:
    params = {"site": site_id, "start": start, "end": end, "category": category, "brand": brand,
              "min_clicks": min_clicks, "limit": limit}
    rows = client.query(_PRODUCTS, parameters=params).result_rows
    # total_clicks counts every click matching the period and the category/brand filters,
    # whatever `limit` and `min_clicks` leave in the list.
    total = client.query(_TOTAL, parameters=params).result_rows[0][0] or 0
    return {
        "data": [{"product_id": p, "product_slug": s, "clicks": n} for p, s, n in rows],
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
