"""`/funnels`: list, create and delete a site's funnels, and `/funnels/{id}/stats`: how many
sessions that started in the period went through the steps in order.

Counted from each session's events in order, as the stream core stores them with the session
(`sessions.event_names`, `event_pages`: streams/sessions.py). Per session, each event gets a bit
per step it matches, and one pass over them (arrayFold) does the steps greedily: an event that
matches the next step does it, and the pass goes on with the step after (the earliest match for
each step is optimal for an ordered subsequence). ClickHouse's windowFunnel is not used: with an
event that matches two neighbouring steps its 'strict_increase' mode never lets the session past
the first of them, and it orders events of one millisecond as they come."""

from __future__ import annotations

from typing import Annotated, Literal

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from ingest.event import MAX_SITE_ID, EventName, PagePath
from query_api.deps import BATCH_SITE, Ctx, Key, SiteId, cached_json, readable_site, shared_json
from query_api.errors import APIError
from query_api.models import FunnelCreated, FunnelsResponse, FunnelStatsResponse, Name
from query_api.periods import Period, percent, stats_period
from query_api.stats import From, PeriodName, To
from streams.funnels import Funnel, Step
from streams.sites import Site

router = APIRouter(tags=["funnels"])

MIN_STEPS, MAX_STEPS = 2, 8
_EVENT_NAME = TypeAdapter(EventName)
_PAGE_PATH = TypeAdapter(PagePath)


class StepIn(BaseModel):
    name: Name
    type: Literal["pageview", "event"]
    match_value: Annotated[str, Field(min_length=1, max_length=2000)]
    match_type: Literal["exact", "startswith"] = "exact"

    @field_validator("match_type", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: object) -> object:
        return "exact" if value is None else value  # as `"props": null` is none (README)

    @model_validator(mode="after")
    def _read_as_stored(self) -> StepIn:
        # Compared with what ingest stored, so read the same way (ingest/event.py): a page as
        # PagePath, an exact event name as EventName.
        if self.type == "pageview":
            self.match_value = _PAGE_PATH.validate_python(self.match_value)
            if not self.match_value.startswith("/"):  # every stored page does: "checkout" would match none
                raise ValueError("match_value: a page path starting with '/' (as goals' match_path)")
        elif self.match_type == "exact":
            try:
                self.match_value = _EVENT_NAME.validate_python(self.match_value)
            except ValidationError as e:
                raise ValueError(f"match_value: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self


class FunnelCreate(BaseModel):
    site_id: Annotated[str, Field(min_length=1, max_length=MAX_SITE_ID)]
    name: Name
    steps: Annotated[list[StepIn], Field(min_length=MIN_STEPS, max_length=MAX_STEPS)]


def _condition(step: Step, n: int) -> str:
    # A page is stored for pageviews only ("" for other events), and a step's page is never empty.
    field = "page" if step.type == "pageview" else "name"
    return f"{field} = %(v{n})s" if step.match_type == "exact" else f"startsWith({field}, %(v{n})s)"


# Sessions that started in the period (the sorting key's range; FINAL: a session's newest row,
# none for a session that was merged into another), and per session the number of steps done in
# order (module docstring). `mask` has bit k set when the event matches step k; the fold's
# accumulator is the number of steps done, so `bitTest(m, done)` asks whether the event (its mask
# `m`) does the next step. Bit N (past the last step) is never set, so a finished session stays
# at N. Read from the raw events instead (grouped and sorted by session per request), a 30-day
# funnel at 10M events took 3.5× as long (docs/benchmarks.md).
_STATS = """
SELECT level, count() FROM (
    SELECT arrayFold((done, m) -> done + bitTest(m, done),
                     arrayMap((name, page) -> {mask}, event_names, event_pages), toUInt64(0)) AS level
    FROM sessions FINAL
    WHERE site_id = %(site)s AND start >= toDateTime64(%(start)s, 3, 'UTC') AND start < toDateTime64(%(end)s, 3, 'UTC')
      AND NOT is_deleted
)
WHERE level > 0
GROUP BY level
SETTINGS optimize_move_to_prewhere_if_final = 0
"""


def stats_sql(funnel: Funnel) -> str:
    mask = " + ".join(f"{1 << n} * ({_condition(step, n)})" for n, step in enumerate(funnel.steps))
    return _STATS.replace("{mask}", f"toUInt16({mask})")


def funnel_stats(client: Client, funnel: Funnel, period: Period) -> dict:
    start, end = period.start_utc(client), period.end_utc(client)
    params = {"site": funnel.site_id, "start": start, "end": end,
              **{f"v{n}": s.match_value for n, s in enumerate(funnel.steps)}}
    at_level = dict(client.query(stats_sql(funnel), parameters=params).result_rows)
    reached = [sum(n for level, n in at_level.items() if level >= k) for k in range(1, len(funnel.steps) + 1)]
    steps = []
    for k, (step, sessions) in enumerate(zip(funnel.steps, reached)):
        before = reached[k - 1] if k else 0
        steps.append({"name": step.name, "sessions": sessions,
                      "dropoff_rate": percent(before - sessions, before) if k else 0,
                      "conversion_from_start": percent(sessions, reached[0])})
    return {"funnel": {"id": funnel.funnel_id, "name": funnel.name}, "steps": steps,
            "overall_conversion": percent(reached[-1], reached[0])}


def _readable_funnel(ctx, key, funnel_id: str, fresh: bool = False, on_site: str | None = None) -> tuple[Funnel, Site]:
    """The funnel and its site, as the key may read them; with `on_site` (a batch's site), a funnel
    of another site is not found, whoever may read it."""
    funnel = ctx.funnels.get(funnel_id)
    if funnel is None:
        raise APIError(404, "funnel_not_found", f"no funnel with id {funnel_id!r}")
    if on_site is not None and funnel.site_id != on_site:
        raise APIError(404, "funnel_not_found", f"no funnel {funnel_id!r} on site {on_site!r}")
    return funnel, readable_site(ctx, key, funnel.site_id, f"funnel {funnel_id!r}", fresh)


@router.get("/funnels", response_model=FunnelsResponse)
def list_funnels(request: Request, ctx: Ctx, key: Key, site_id: SiteId) -> Response:
    site = readable_site(ctx, key, site_id)
    return cached_json(request, {"data": [f.as_json() for f in ctx.funnels.for_site(site.site_id)]})


@router.post("/funnels", response_model=FunnelCreated, status_code=201)
def create_funnel(request: Request, ctx: Ctx, key: Key, body: FunnelCreate) -> Response:
    site = readable_site(ctx, key, body.site_id, fresh=True)
    funnel = ctx.funnels.create(site.site_id, body.name, [Step(**s.model_dump()) for s in body.steps])
    return cached_json(request, {"data": funnel.as_json()}, status=201)


@router.delete("/funnels/{funnel_id}", status_code=204, response_class=Response)
def delete_funnel(ctx: Ctx, key: Key, funnel_id: str) -> Response:
    ctx.funnels.delete(_readable_funnel(ctx, key, funnel_id, fresh=True)[0])
    return Response(status_code=204)


@router.get("/funnels/{funnel_id}/stats", response_model=FunnelStatsResponse)
def get_funnel_stats(request: Request, ctx: Ctx, key: Key, funnel_id: str, period: PeriodName = "30d",
                     from_: From = None, to: To = None) -> Response:
    # The site as checked: read again, a site deleted meanwhile would be None.
    funnel, site = _readable_funnel(ctx, key, funnel_id, on_site=request.scope.get("state", {}).get(BATCH_SITE))
    return shared_json(request, site, funnel_stats, ctx.client, funnel,
                       stats_period(ctx.client, period, site.timezone, from_, to), data=True)
