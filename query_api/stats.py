"""`/stats/*`: traffic statistics over raw events and sessions, in the site's timezone."""

from __future__ import annotations

from typing import Annotated, Literal

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from query_api.deps import Ctx, Key, cached_json, readable_site
from query_api.models import OverviewResponse
from query_api.periods import Period, round_half_away, stats_period

router = APIRouter(tags=["stats"])

_DAILY = """
SELECT toDate(timestamp, {tz:String}) AS day, uniqExact(visitor_id), countIf(name = 'pageview')
FROM events FINAL
WHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
GROUP BY day
"""
_VISITORS = """
SELECT uniqExact(visitor_id) FROM events FINAL
WHERE site_id = {site:String} AND timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
"""
# A session belongs to the day it started; a bounce has at most one pageview and nothing else.
_SESSIONS = """
SELECT count(), countIf(pageviews <= 1 AND events = pageviews) FROM sessions FINAL
WHERE site_id = {site:String} AND start >= {start:DateTime64(3, 'UTC')} AND start < {end:DateTime64(3, 'UTC')}
"""


def _params(site_id: str, period: Period) -> dict:
    return {"site": site_id, "tz": period.tz, "start": period.start_utc, "end": period.end_utc}


def visitors(client: Client, site_id: str, period: Period) -> int:
    return client.query(_VISITORS, parameters=_params(site_id, period)).result_rows[0][0]


def overview(client: Client, site_id: str, period: Period) -> dict:
    params = _params(site_id, period)
    daily = {row[0]: row[1:] for row in client.query(_DAILY, parameters=params).result_rows}
    sessions, bounces = client.query(_SESSIONS, parameters=params).result_rows[0]
    series = [{"date": day.isoformat(), "visitors": daily.get(day, (0, 0))[0], "pageviews": daily.get(day, (0, 0))[1]}
              for day in period.days]
    return {
        "period": {"from": period.first.isoformat(), "to": period.last.isoformat()},
        "visitors": visitors(client, site_id, period),
        "pageviews": sum(point["pageviews"] for point in series),
        "sessions": sessions,
        "bounce_rate": round_half_away(bounces / sessions * 100) if sessions else 0,
        "daily": series,
    }


@router.get("/stats/overview", response_model=OverviewResponse)
def get_overview(
    request: Request, ctx: Ctx, key: Key,
    site_id: Annotated[str, Query(description="Site ID")],
    period: Annotated[Literal["7d", "30d", "90d", "custom"], Query()] = "30d",
    from_: Annotated[str | None, Query(alias="from", description="YYYY-MM-DD, with period=custom")] = None,
    to: Annotated[str | None, Query(description="YYYY-MM-DD, with period=custom")] = None,
) -> Response:
    site = readable_site(ctx, key, site_id)
    return cached_json(request, {"data": overview(ctx.client, site.site_id, stats_period(period, site.timezone, from_, to))})
