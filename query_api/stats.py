"""`/stats/*`: traffic statistics from the rollups (streams/rollups.py), in the site's timezone.

A period is whole local days, which are whole UTC quarter hours (streams/buckets.py), so every
number is a sum over quarter-hour buckets — except unique visitors, which are the visitors first
seen in the period's buckets plus the visitors first seen before it and active in it again
(streams/spans.py explains why that is exact)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from query_api.deps import Ctx, Key, cached_json, readable_site
from query_api.models import CountriesResponse, OverviewResponse, PagesResponse, ReferrersResponse
from query_api.periods import Period, change, percent, stats_period
from streams.buckets import VISITOR_LIFETIME
from streams.spans import SOURCE_SEPARATOR
from streams.storage import FINAL_SETTINGS

router = APIRouter(tags=["stats"])

_IN_PERIOD = "site_id = {site:String} AND bucket >= {start:DateTime('UTC')} AND bucket < {end:DateTime('UTC')}"

# Visitors of one kind of span, by value: first seen in the period, plus seen before and again in it.
_VISITORS_BY_VALUE = f"""
SELECT value, sum(n) AS visitors FROM (
    SELECT value, sum(visitors) AS n FROM visitors_15m FINAL
    WHERE {_IN_PERIOD} AND kind = {{kind:String}}
    GROUP BY value
    UNION ALL
    SELECT value, count() AS n FROM visitor_spans FINAL
    WHERE site_id = {{site:String}} AND kind = {{kind:String}} AND multi = 1
      AND first_bucket >= {{lookback:DateTime('UTC')}} AND first_bucket < {{start:DateTime('UTC')}}
      AND last_bucket >= {{start:DateTime('UTC')}}
      AND arrayExists(o -> first_bucket + o * 900 >= {{start:DateTime('UTC')}}
                       AND first_bucket + o * 900 < {{end:DateTime('UTC')}}, offsets)
    GROUP BY value
)
GROUP BY value
"""

_TOTALS = f"""
SELECT
    (SELECT sum(visitors) FROM ({_VISITORS_BY_VALUE})),
    (SELECT sum(events) FROM event_counts_15m FINAL WHERE {_IN_PERIOD} AND name = 'pageview'),
    (SELECT tuple(sum(sessions), sum(bounces)) FROM sessions_15m FINAL WHERE {_IN_PERIOD})
"""

# Per local day: pageviews, visitors first seen that day, and visitors first seen on an earlier
# local day and active again on this one (a span lists every bucket it was active in).
_DAILY = f"""
SELECT day, sum(pageviews), sum(visitors) FROM (
    SELECT toDate(bucket, {{tz:String}}) AS day, sum(events) AS pageviews, 0 AS visitors
    FROM event_counts_15m FINAL WHERE {_IN_PERIOD} AND name = 'pageview'
    GROUP BY day
    UNION ALL
    SELECT toDate(bucket, {{tz:String}}) AS day, 0, sum(visitors)
    FROM visitors_15m FINAL WHERE {_IN_PERIOD} AND kind = 'total'
    GROUP BY day
    UNION ALL
    SELECT day, 0, count() FROM (
        SELECT toDate(first_bucket, {{tz:String}}) AS first_day,
               arrayJoin(arrayDistinct(arrayMap(o -> toDate(first_bucket + o * 900, {{tz:String}}), offsets))) AS day
        FROM visitor_spans FINAL
        WHERE site_id = {{site:String}} AND kind = 'total' AND multi = 1
          AND first_bucket >= {{lookback:DateTime('UTC')}} AND first_bucket < {{end:DateTime('UTC')}}
          AND toDate(last_bucket, {{tz:String}}) > toDate(first_bucket, {{tz:String}})
    )
    WHERE day > first_day AND day >= {{first_day:Date}} AND day <= {{last_day:Date}}
    GROUP BY day
)
GROUP BY day
"""

_PAGES = f"""
WITH visitors AS ({_VISITORS_BY_VALUE}),
     views AS (SELECT page, sum(events) AS pageviews FROM event_counts_15m FINAL
               WHERE {_IN_PERIOD} AND name = 'pageview' GROUP BY page)
SELECT value, visitors, pageviews FROM visitors INNER JOIN views ON views.page = visitors.value
ORDER BY visitors DESC, value ASC
LIMIT {{limit:UInt32}}
"""

# Referrers: by the session's entry source; sessions without a source (direct) are not listed.
_REFERRERS = f"""
WITH visitors AS ({_VISITORS_BY_VALUE}),
     started AS (SELECT concat(source, {{separator:String}}, channel) AS value, sum(sessions) AS sessions
                 FROM sessions_15m FINAL WHERE {_IN_PERIOD} GROUP BY value)
SELECT visitors.value, visitors, sessions FROM visitors INNER JOIN started ON started.value = visitors.value
WHERE NOT startsWith(visitors.value, {{separator:String}})
  AND ({{include_social:Bool}} OR NOT endsWith(visitors.value, concat({{separator:String}}, 'social')))
ORDER BY visitors DESC, visitors.value ASC
LIMIT {{limit:UInt32}}
"""

_COUNTRIES = f"""
SELECT value, visitors FROM ({_VISITORS_BY_VALUE})
WHERE value != ''
ORDER BY visitors DESC, value ASC
LIMIT {{limit:UInt32}}
"""


def _params(site_id: str, period: Period, **extra) -> dict:
    return {"site": site_id, "tz": period.tz, "start": period.start_utc, "end": period.end_utc,
            "lookback": period.start_utc - VISITOR_LIFETIME, "first_day": period.first, "last_day": period.last,
            **extra}


def _query(client: Client, sql: str, params: dict) -> list[tuple]:
    return client.query(sql, parameters=params, settings=FINAL_SETTINGS).result_rows


def totals(client: Client, site_id: str, period: Period) -> dict:
    visitors, pageviews, (sessions, bounces) = _query(client, _TOTALS, _params(site_id, period, kind="total"))[0]
    return {"visitors": visitors or 0, "pageviews": pageviews or 0, "sessions": sessions or 0,
            "bounce_rate": percent(bounces or 0, sessions or 0)}


def daily(client: Client, site_id: str, period: Period) -> list[dict]:
    by_day: dict[date, tuple[int, int]] = {row[0]: row[1:] for row in _query(client, _DAILY, _params(site_id, period))}
    return [{"date": day.isoformat(), "visitors": by_day.get(day, (0, 0))[1], "pageviews": by_day.get(day, (0, 0))[0]}
            for day in period.days]


def overview(client: Client, site_id: str, period: Period, compare: bool = False) -> dict:
    current = totals(client, site_id, period)
    out = {"period": period.as_json(), **current, "daily": daily(client, site_id, period)}
    if compare:
        before = period.previous()
        previous = totals(client, site_id, before)
        out["comparison"] = {
            "period": before.as_json(), **previous,
            "change": {
                "visitors": change(current["visitors"], previous["visitors"]),
                "pageviews": change(current["pageviews"], previous["pageviews"]),
                "sessions": change(current["sessions"], previous["sessions"]),
                # In points: the difference of the two rates shown.
                "bounce_rate": current["bounce_rate"] - previous["bounce_rate"] if previous["sessions"] else None,
            },
        }
    return out


def pages(client: Client, site_id: str, period: Period, limit: int) -> list[dict]:
    rows = _query(client, _PAGES, _params(site_id, period, kind="page", limit=limit))
    return [{"page": page, "visitors": visitors, "pageviews": pageviews} for page, visitors, pageviews in rows]


def referrers(client: Client, site_id: str, period: Period, limit: int, include_social: bool) -> list[dict]:
    rows = _query(client, _REFERRERS, _params(site_id, period, kind="source", limit=limit, separator=SOURCE_SEPARATOR,
                                               include_social=include_social))
    out = []
    for value, visitors, sessions in rows:
        source, _, channel = value.partition(SOURCE_SEPARATOR)
        out.append({"source": source, "channel": channel, "visitors": visitors, "sessions": sessions})
    return out


def countries(client: Client, site_id: str, period: Period, limit: int) -> list[dict]:
    rows = _query(client, _COUNTRIES, _params(site_id, period, kind="country", limit=limit))
    return [{"country": country, "visitors": visitors} for country, visitors in rows]


# -- routes -------------------------------------------------------------------------------------

PeriodName = Annotated[Literal["7d", "30d", "90d", "custom"], Query(description="7d, 30d, 90d or custom")]
From = Annotated[str | None, Query(alias="from", description="YYYY-MM-DD, with period=custom")]
To = Annotated[str | None, Query(description="YYYY-MM-DD, with period=custom")]
SiteId = Annotated[str, Query(description="Site ID", max_length=100)]
Limit = Annotated[int, Query(ge=1, le=1000, description="Most rows to return")]


def _site_period(ctx, key, site_id: str, period: str, from_: str | None, to: str | None):
    site = readable_site(ctx, key, site_id)
    return site, stats_period(period, site.timezone, from_, to)


@router.get("/stats/overview", response_model=OverviewResponse, response_model_exclude_none=True)
def get_overview(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
                 from_: From = None, to: To = None,
                 compare: Annotated[bool, Query(description="Add the previous period of equal length")] = False,
                 ) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return cached_json(request, {"data": overview(ctx.client, site.site_id, span, compare)})


@router.get("/stats/pages", response_model=PagesResponse)
def get_pages(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
              from_: From = None, to: To = None, limit: Limit = 10) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return cached_json(request, {"data": pages(ctx.client, site.site_id, span, limit)})


@router.get("/stats/referrers", response_model=ReferrersResponse)
def get_referrers(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
                  from_: From = None, to: To = None, limit: Limit = 10,
                  include_social: Annotated[bool, Query(description="Include social networks")] = False,
                  ) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return cached_json(request, {"data": referrers(ctx.client, site.site_id, span, limit, include_social)})


@router.get("/stats/countries", response_model=CountriesResponse)
def get_countries(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
                  from_: From = None, to: To = None, limit: Limit = 10) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return cached_json(request, {"data": countries(ctx.client, site.site_id, span, limit)})
