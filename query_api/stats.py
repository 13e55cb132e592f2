"""`/stats/*`: traffic statistics from the rollups (streams/rollups.py), in the site's timezone.

A period is whole local days, which are whole UTC quarter hours (streams/buckets.py). Additive
numbers are sums: whole UTC days from `rollup_1d`, the partial first and last day from
`rollup_15m`. Unique visitors add up the same way — a visitor counts in the bucket where it was
first seen — plus, within the first VISITOR_LIFETIME of the period, the visitors whose previous
activity lies before the period started (the `returning` gaps; streams/activity.py)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Literal

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from query_api.deps import Ctx, Key, cached_json, readable_site
from query_api.models import CountriesResponse, OverviewResponse, PagesResponse, ReferrersResponse
from query_api.periods import Period, change, local_midnight, percent, stats_period
from streams.activity import SEPARATOR
from streams.buckets import VISITOR_LIFETIME

router = APIRouter(tags=["stats"])


def _returning_since(start: str) -> str:
    """Visitors in this bucket whose previous activity lies before `start` (a UTC DateTime)."""
    return (f"arraySum((gap, n) -> if(gap > intDiv(toUInt32(bucket) - toUInt32({start}), 900), n, 0),"
            f" mapKeys(returning), mapValues(returning))")


# Per local day of the period: pageviews, visitors, and for the whole period visitors first seen
# in it and visitors back from before it; sessions and bounces by the day their session started.
_OVERVIEW = f"""
SELECT day, sum(pageviews), sum(visitors + day_returning), sum(visitors), sum(period_returning),
       sum(sessions), sum(bounces)
FROM (
    SELECT toDate(bucket, {{tz:String}}) AS day, pageviews, visitors, sessions, bounces,
           {_returning_since("arrayElement({day_starts:Array(DateTime('UTC'))}, indexOf({days:Array(Date)}, day))")}
               AS day_returning,
           if(bucket < {{lifetime_end:DateTime('UTC')}}, {_returning_since("{start:DateTime('UTC')}")}, 0)
               AS period_returning
    FROM rollup_15m FINAL
    WHERE site_id = {{site:String}} AND kind = 'total'
      AND bucket >= {{start:DateTime('UTC')}} AND bucket < {{end:DateTime('UTC')}}
)
GROUP BY day
"""

# Per value of one kind: whole UTC days from rollup_1d, the partial first and last days and the
# returning visitors from rollup_15m.
_BREAKDOWN = f"""
SELECT value, sum(visitors) AS visitors, sum(events) AS events, sum(sessions) AS sessions FROM (
    SELECT value, visitors, events, sessions FROM rollup_1d FINAL
    WHERE site_id = {{site:String}} AND kind = {{kind:String}}
      AND day >= {{full_from:Date}} AND day < {{full_to:Date}}
    UNION ALL
    SELECT value,
           if(edge, visitors, 0)
             + if(bucket < {{lifetime_end:DateTime('UTC')}}, {_returning_since("{start:DateTime('UTC')}")}, 0),
           if(edge, events, 0), if(edge, sessions, 0)
    FROM (SELECT *, bucket < {{full_start:DateTime('UTC')}} OR bucket >= {{full_end:DateTime('UTC')}} AS edge
          FROM rollup_15m FINAL
          WHERE site_id = {{site:String}} AND kind = {{kind:String}}
            AND bucket >= {{start:DateTime('UTC')}} AND bucket < {{end:DateTime('UTC')}})
    WHERE edge OR bucket < {{lifetime_end:DateTime('UTC')}}
)
GROUP BY value
HAVING %s
ORDER BY visitors DESC, value ASC
LIMIT {{limit:UInt32}}
"""


def _params(site_id: str, period: Period, **extra) -> dict:
    start, end = period.start_utc, period.end_utc
    full_from = start.date() + timedelta(days=1) if start.time() != datetime.min.time() else start.date()
    full_to = end.date()
    if full_from >= full_to:  # no whole UTC day inside: all of it is edge
        full_from = full_to = end.date()
        full_start = full_end = end
    else:
        full_start, full_end = _utc(full_from), _utc(full_to)
    return {"site": site_id, "tz": period.tz, "start": start, "end": end,
            "lifetime_end": min(end, start + VISITOR_LIFETIME), "full_from": full_from, "full_to": full_to,
            "full_start": full_start, "full_end": full_end, **extra}


def _utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def _query(client: Client, sql: str, params: dict) -> list[tuple]:
    return client.query(sql, parameters=params).result_rows


def _overview_rows(client: Client, site_id: str, period: Period) -> tuple[dict, list[dict]]:
    days = period.days
    rows = _query(client, _OVERVIEW, _params(site_id, period, days=days,
                                             day_starts=[local_midnight(d, period.tz) for d in days]))
    by_day = {row[0]: row for row in rows}
    first_seen = sum(row[3] for row in rows)
    back = sum(row[4] for row in rows)
    sessions, bounces = sum(row[5] for row in rows), sum(row[6] for row in rows)
    totals = {"visitors": first_seen + back, "pageviews": sum(row[1] for row in rows), "sessions": sessions,
              "bounce_rate": percent(bounces, sessions)}
    daily = [{"date": day.isoformat(), "visitors": by_day[day][2] if day in by_day else 0,
              "pageviews": by_day[day][1] if day in by_day else 0} for day in days]
    return totals, daily


def totals(client: Client, site_id: str, period: Period) -> dict:
    return _overview_rows(client, site_id, period)[0]


def overview(client: Client, site_id: str, period: Period, compare: bool = False) -> dict:
    current, daily = _overview_rows(client, site_id, period)
    out = {"period": period.as_json(), **current, "daily": daily}
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


def _breakdown(client: Client, site_id: str, period: Period, kind: str, having: str, limit: int, **extra) -> list[tuple]:
    return _query(client, _BREAKDOWN % having, _params(site_id, period, kind=kind, limit=limit, **extra))


def pages(client: Client, site_id: str, period: Period, limit: int) -> list[dict]:
    rows = _breakdown(client, site_id, period, "page", "events > 0", limit)
    return [{"page": page, "visitors": visitors, "pageviews": views} for page, visitors, views, _ in rows]


def referrers(client: Client, site_id: str, period: Period, limit: int, include_social: bool) -> list[dict]:
    """By the session's entry source; sessions without a source (direct) are not listed."""
    having = ("sessions > 0 AND NOT startsWith(value, {separator:String})"
              " AND ({include_social:Bool} OR NOT endsWith(value, concat({separator:String}, 'social')))")
    rows = _breakdown(client, site_id, period, "source", having, limit, separator=SEPARATOR,
                      include_social=include_social)
    out = []
    for value, visitors, _, sessions in rows:
        source, _, channel = value.partition(SEPARATOR)
        out.append({"source": source, "channel": channel, "visitors": visitors, "sessions": sessions})
    return out


def countries(client: Client, site_id: str, period: Period, limit: int) -> list[dict]:
    rows = _breakdown(client, site_id, period, "country", "value != '' AND sessions > 0", limit)
    return [{"country": country, "visitors": visitors} for country, visitors, _, _ in rows]


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
