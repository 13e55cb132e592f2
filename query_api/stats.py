"""`/stats/*`: traffic statistics from the rollups (streams/rollups.py), in the site's timezone.

A period is whole local days, which are whole UTC quarter hours (streams/buckets.py). Additive
numbers are sums: whole UTC days from `rollup_1d`, the partial first and last day from
`rollup_15m`. Unique visitors add up the same way — a visitor counts in the bucket where it was
first seen — plus, within the first VISITOR_LIFETIME of the period, the visitors whose previous
activity lies before the period started (the `returning` gaps; streams/activity.py)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Literal

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from query_api.deps import ROLLUP_READ, Ctx, Integer, Key, SiteId, readable_site, shared_json
from query_api.models import CountriesResponse, OverviewResponse, PagesResponse, ReferrersResponse
from query_api.periods import Period, change, day_starts, percent, stats_period
from streams.activity import SEPARATOR
from streams.buckets import VISITOR_LIFETIME, utc_midnight

router = APIRouter(tags=["stats"])


def _returning_since(start: str) -> str:
    """Visitors in this bucket whose previous activity lies before `start` (a UTC DateTime)."""
    return (f"arraySum((gap, n) -> if(gap > intDiv(toUInt32(bucket) - toUInt32({start}), 900), n, 0),"
            f" mapKeys(returning), mapValues(returning))")


# Values are bound by the driver (escaped literals, `%(name)s`): server-side parameters cost
# ~0.4 ms each here, a fifth of a whole query.
_START = "toDateTime(%(start)s, 'UTC')"
_END = "toDateTime(%(end)s, 'UTC')"

# Per site and local day: pageviews, visitors, and for the whole period visitors first seen in it
# and visitors back from before it; sessions and bounces by the day their session started. With
# compare, the previous period is read in the same statement (days before `current`). A day begins at
# `toDateTime(day, tz)`, as in `periods.day_starts` (finding it in a bound array of the period's
# days cost rows × days: 161 ms for 731 days with compare, against 19).
_OVERVIEW = f"""
SELECT site_id, day, sum(pageviews), sum(visitors + day_returning), sum(visitors), sum(period_returning),
       sum(sessions), sum(bounces)
FROM (
    SELECT site_id, toDate(bucket, %(tz)s) AS day, pageviews, visitors, sessions, bounces,
           {_returning_since("toDateTime(day, %(tz)s)")} AS day_returning,
           if(bucket >= toDateTime(%(current)s, 'UTC'),
              if(bucket < toDateTime(%(lifetime_end)s, 'UTC'), {_returning_since("toDateTime(%(current)s, 'UTC')")}, 0),
              if(bucket < toDateTime(%(previous_lifetime_end)s, 'UTC'), {_returning_since(_START)}, 0))
               AS period_returning
    FROM rollup_15m FINAL
    WHERE site_id IN %(sites)s AND kind = 'total' AND bucket >= {_START} AND bucket < {_END}
)
GROUP BY site_id, day
"""

# Totals of several sites, each over its own period, whatever their timezones
# (`/sites?include_stats=true`): `_totals` of _OVERVIEW's rows needs no local days, only each
# site's period edges, found by `transform` (a hash of the bound arrays). A statement per
# timezone cost ~8 ms each: 3-5 s for an account with sites in 400 timezones. The arrays are
# bound server-side: written into the statement's text (the site list four times), 1,556 site
# ids of 20 characters passed ClickHouse's max_query_size (256 KiB) and the list answered 500.
_SITE_EDGE = "transform(site_id, sites, {edges}, toUInt32(0))"
_TOTALS = f"""
WITH {{sites:Array(String)}} AS sites, {{starts:Array(UInt32)}} AS starts, {{ends:Array(UInt32)}} AS ends,
     {{lifetime_ends:Array(UInt32)}} AS lifetime_ends
SELECT site_id, sum(pageviews), sum(visitors),
       sum(if(toUInt32(bucket) < {_SITE_EDGE.format(edges="lifetime_ends")},
              {_returning_since(_SITE_EDGE.format(edges="starts"))}, 0)),
       sum(sessions), sum(bounces)
FROM rollup_15m FINAL
WHERE site_id IN {{sites:Array(String)}} AND kind = 'total'
  AND bucket >= toDateTime({{start:UInt32}}, 'UTC') AND bucket < toDateTime({{end:UInt32}}, 'UTC')
  AND toUInt32(bucket) >= {_SITE_EDGE.format(edges="starts")} AND toUInt32(bucket) < {_SITE_EDGE.format(edges="ends")}
GROUP BY site_id
"""

# Per value of one kind: whole UTC days from rollup_1d, the partial first and last days and the
# returning visitors from rollup_15m.
_BREAKDOWN = f"""
SELECT value, sum(visitors) AS visitors, sum(events) AS events, sum(sessions) AS sessions FROM (
    SELECT value, visitors, events, sessions FROM rollup_1d FINAL
    WHERE site_id = %(site)s AND kind = %(kind)s AND day >= toDate(%(full_from)s) AND day < toDate(%(full_to)s)
    UNION ALL
    SELECT value,
           if(edge, visitors, 0)
             + if(bucket < toDateTime(%(lifetime_end)s, 'UTC'), {_returning_since(_START)}, 0),
           if(edge, events, 0), if(edge, sessions, 0)
    FROM (SELECT *, bucket < toDateTime(%(full_start)s, 'UTC') OR bucket >= toDateTime(%(full_end)s, 'UTC') AS edge
          FROM rollup_15m FINAL
          WHERE site_id = %(site)s AND kind = %(kind)s AND bucket >= {_START} AND bucket < {_END})
    WHERE edge OR bucket < toDateTime(%(lifetime_end)s, 'UTC')
)
GROUP BY value
HAVING {{having}}
ORDER BY visitors DESC, value ASC
LIMIT %(limit)s
"""


def _params(tz: str, start: datetime, end: datetime, **extra) -> dict:
    full_from = start.date() + timedelta(days=1) if start.time() != datetime.min.time() else start.date()
    full_to = end.date()
    if full_from >= full_to:  # no whole UTC day inside: all of it is edge
        full_from = full_to = end.date()
        full_start = full_end = end
    else:
        full_start, full_end = utc_midnight(full_from), utc_midnight(full_to)
    return {"tz": tz, "start": start, "end": end,
            "lifetime_end": min(end, start + VISITOR_LIFETIME), "full_from": full_from, "full_to": full_to,
            "full_start": full_start, "full_end": full_end, **extra}


def _query(client: Client, sql: str, params: dict) -> list[tuple]:
    return client.query(sql, parameters=params, settings=ROLLUP_READ).result_rows


def _by_day(client: Client, site_id: str, period: Period, before: Period | None = None) -> dict[date, tuple]:
    """Overview rows per local day of `period`, and of `before` (just before it) if given."""
    days = (before.days if before else []) + period.days
    # Where each day begins, and where the last one ends: asked of the ClickHouse whose toDate
    # dates the buckets below, so both draw the same days (query_api/periods.py).
    starts = day_starts(client, period.tz, days[0], period.last + timedelta(days=1))
    start, current, end = starts[0], starts[len(days) - period.length], starts[-1]
    params = _params(period.tz, start, end, sites=(site_id,), current=current,
                     previous_lifetime_end=min(current, start + VISITOR_LIFETIME),
                     lifetime_end=min(end, current + VISITOR_LIFETIME))
    return {row[1]: row[1:] for row in _query(client, _OVERVIEW, params)}


def _totals(rows: dict[date, tuple], period: Period) -> dict:
    mine = [rows[day] for day in period.days if day in rows]
    return _numbers(sum(row[3] + row[4] for row in mine), sum(row[1] for row in mine), sum(row[5] for row in mine),
                    sum(row[6] for row in mine))


def _numbers(visitors: int, pageviews: int, sessions: int, bounces: int) -> dict:
    return {"visitors": visitors, "pageviews": pageviews, "sessions": sessions,
            "bounce_rate": percent(bounces, sessions)}


def totals(client: Client, site_id: str, period: Period) -> dict:
    return _totals(_by_day(client, site_id, period), period)


def totals_of_sites(client: Client, periods: dict[str, Period]) -> dict[str, dict]:
    """`totals` of each site over its period (site id → period), in one statement."""
    if not periods:
        return {}
    edges = {period: (int(period.start_utc(client).timestamp()), int(period.end_utc(client).timestamp()))
             for period in set(periods.values())}
    site_list = list(periods)
    starts = [edges[period][0] for period in periods.values()]
    ends = [edges[period][1] for period in periods.values()]
    rows = client.query(_TOTALS, parameters={
        "sites": site_list, "starts": starts, "ends": ends,
        "lifetime_ends": [min(end, start + int(VISITOR_LIFETIME.total_seconds())) for start, end in zip(starts, ends)],
        "start": min(starts), "end": max(ends)}).result_rows
    found = {site_id: (visitors + returning, pageviews, sessions, bounces)
             for site_id, pageviews, visitors, returning, sessions, bounces in rows}
    return {site_id: _numbers(*found.get(site_id, (0, 0, 0, 0))) for site_id in periods}


def overview(client: Client, site_id: str, period: Period, compare: bool = False) -> dict:
    before = period.previous() if compare else None
    rows = _by_day(client, site_id, period, before)
    current = _totals(rows, period)
    daily = [{"date": day.isoformat(), "visitors": rows[day][2] if day in rows else 0,
              "pageviews": rows[day][1] if day in rows else 0} for day in period.days]
    out = {"period": period.as_json(), **current, "daily": daily}
    if before:
        previous = _totals(rows, before)
        out["comparison"] = {
            "period": before.as_json(), **previous,
            "change": {
                "visitors": change(current["visitors"], previous["visitors"]),
                "pageviews": change(current["pageviews"], previous["pageviews"]),
                "sessions": change(current["sessions"], previous["sessions"]),
                # SPEC §7.1 to the letter: in points, the difference of the two rates shown; null
                # when the previous value is 0, as for the other changes.
                "bounce_rate": (current["bounce_rate"] - previous["bounce_rate"]
                                if previous["bounce_rate"] else None),
            },
        }
    return out


def breakdown(client: Client, site_id: str, period: Period, kind: str, having: str, limit: int, **extra) -> list[tuple]:
    """(value, visitors, events, sessions) of one kind in the period, best first."""
    params = _params(period.tz, period.start_utc(client), period.end_utc(client), site=site_id, kind=kind, limit=limit,
                     **extra)
    return _query(client, _BREAKDOWN.replace("{having}", having), params)


def pages(client: Client, site_id: str, period: Period, limit: int) -> list[dict]:
    rows = breakdown(client, site_id, period, "page", "events > 0", limit)
    return [{"page": page, "visitors": visitors, "pageviews": views} for page, visitors, views, _ in rows]


def referrers(client: Client, site_id: str, period: Period, limit: int, include_social: bool) -> list[dict]:
    """By the session's entry source; sessions without a source (direct) are not listed."""
    having = ("sessions > 0 AND NOT startsWith(value, %(separator)s)"
              " AND (%(include_social)s OR NOT endsWith(value, concat(%(separator)s, 'social')))")
    rows = breakdown(client, site_id, period, "source", having, limit, separator=SEPARATOR,
                      include_social=include_social)
    out = []
    for value, visitors, _, sessions in rows:
        source, _, channel = value.rpartition(SEPARATOR)  # a channel is one word
        out.append({"source": source, "channel": channel, "visitors": visitors, "sessions": sessions})
    return out


def countries(client: Client, site_id: str, period: Period, limit: int) -> list[dict]:
    rows = breakdown(client, site_id, period, "country", "value != '' AND events > 0", limit)
    return [{"country": country, "visitors": visitors} for country, visitors, _, _ in rows]


# -- routes -------------------------------------------------------------------------------------

PeriodName = Annotated[Literal["7d", "30d", "90d", "custom"], Query(description="7d, 30d, 90d or custom")]
From = Annotated[str | None, Query(alias="from", description="YYYY-MM-DD, with period=custom")]
To = Annotated[str | None, Query(description="YYYY-MM-DD, with period=custom")]
Limit = Annotated[Integer, Query(ge=1, le=1000, description="Most rows to return")]


def _site_period(ctx, key, site_id: str, period: str, from_: str | None, to: str | None):
    site = readable_site(ctx, key, site_id)
    return site, stats_period(ctx.client, period, site.timezone, from_, to)


@router.get("/stats/overview", response_model=OverviewResponse, response_model_exclude_none=True)
def get_overview(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
                 from_: From = None, to: To = None,
                 compare: Annotated[bool, Query(description="Add the previous period of equal length")] = False,
                 ) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return shared_json(request, site, overview, ctx.client, site.site_id, span, compare, data=True)


@router.get("/stats/pages", response_model=PagesResponse)
def get_pages(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
              from_: From = None, to: To = None, limit: Limit = 10) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return shared_json(request, site, pages, ctx.client, site.site_id, span, limit, data=True)


@router.get("/stats/referrers", response_model=ReferrersResponse)
def get_referrers(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
                  from_: From = None, to: To = None, limit: Limit = 10,
                  include_social: Annotated[bool, Query(description="Include social networks")] = False,
                  ) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return shared_json(request, site, referrers, ctx.client, site.site_id, span, limit, include_social, data=True)


@router.get("/stats/countries", response_model=CountriesResponse)
def get_countries(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
                  from_: From = None, to: To = None, limit: Limit = 10) -> Response:
    site, span = _site_period(ctx, key, site_id, period, from_, to)
    return shared_json(request, site, countries, ctx.client, site.site_id, span, limit, data=True)
