"""`/goals`: list (with converted visitors, conversions and conversion rate for a period), create
and delete a site's goals. The numbers come from the rollups of kind `goal` (streams/goals.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, model_validator

from ingest.event import MAX_SITE_ID, EventName, PagePath
from query_api import stats
from query_api.deps import Ctx, Integer, Key, SiteId, cached_json, readable_site, shared_json
from query_api.errors import APIError
from query_api.models import GoalCreated, GoalsResponse, Name
from query_api.periods import Period, percent, stats_period
from query_api.stats import From, PeriodName, To
from streams.goals import Goal, GoalRegistry

router = APIRouter(tags=["goals"])


class GoalCreate(BaseModel):
    site_id: Annotated[str, Field(min_length=1, max_length=MAX_SITE_ID)]
    name: Name
    event_type: Literal["pageview", "event"]
    # Read as ingest stores pages and event names: a goal for "/produkt/%C3%A5" is the page
    # "/produkt/å", and one for " purchase" could never match.
    match_path: Annotated[PagePath, Field(min_length=1, max_length=2000, pattern=r"^/")] | None = None
    match_event: EventName | None = None

    @model_validator(mode="after")
    def _one_match(self) -> GoalCreate:
        if self.event_type == "pageview" and (self.match_path is None or self.match_event is not None):
            raise ValueError("a pageview goal needs match_path (a path starting with /) and no match_event")
        if self.event_type == "event" and (self.match_event is None or self.match_path is not None):
            raise ValueError("an event goal needs match_event and no match_path")
        return self


def _describe(goal: Goal) -> dict:
    match = {"match_path": goal.match_path} if goal.event_type == "pageview" else {"match_event": goal.match_event}
    return {"id": goal.goal_id, "name": goal.name, "event_type": goal.event_type, **match}


# All goals by default: the reference's list "returns all goals for a site" (not a stats list's 10).
GoalLimit = Annotated[Integer | None, Query(ge=1, le=1000, description="Most goals to return (default: all)")]


@router.get("/goals", response_model=GoalsResponse, response_model_exclude_none=True)
def list_goals(request: Request, ctx: Ctx, key: Key, site_id: SiteId, period: PeriodName = "30d",
               from_: From = None, to: To = None, limit: GoalLimit = None) -> Response:
    """The site's goals, most converted visitors first (ties by name), with converted visitors
    (distinct visitors with a matching event in the period), conversions (matching events) and
    conversion_rate (converted visitors of all the period's visitors, percent)."""
    site = readable_site(ctx, key, site_id)
    span = stats_period(ctx.client, period, site.timezone, from_, to)
    return shared_json(request, site, goals_with_stats, ctx.client, ctx.goals, site.site_id, span, limit, data=True)


def goals_with_stats(client: Client, registry: GoalRegistry, site_id: str, span: Period, limit: int | None) -> list:
    goals = registry.for_site(site_id)
    # Only live goals: a deleted goal's rows linger until its delete mutations have run.
    converted = {goal_id: (visitors, events) for goal_id, visitors, events, _ in
                 stats.breakdown(client, site_id, span, "goal", "value IN %(live)s", len(goals),
                                 live=tuple(goal.goal_id for goal in goals))} if goals else {}
    all_visitors = stats.totals(client, site_id, span)["visitors"] if goals else 0
    data = []
    for goal in goals:
        visitors, conversions = converted.get(goal.goal_id, (0, 0))
        data.append({**_describe(goal), "visitors": visitors, "conversions": conversions,
                     "conversion_rate": percent(visitors, all_visitors)})
    data.sort(key=lambda row: (-row["visitors"], row["name"], row["id"]))
    return data[:limit]


@router.post("/goals", response_model=GoalCreated, status_code=201, response_model_exclude_none=True)
def create_goal(request: Request, ctx: Ctx, key: Key, body: GoalCreate) -> Response:
    """Applies to all stored data: answers once the goal's past conversions are counted."""
    site = readable_site(ctx, key, body.site_id, fresh=True)
    goal = ctx.goals.create(site.site_id, body.name, body.event_type, body.match_path or "", body.match_event or "")
    try:
        ctx.goals.apply_to_past(goal)
    except Exception:
        # The client is told it failed and will retry: a goal kept without its past would be a
        # duplicate then. (If this delete fails too, the second backfill gives it its past.)
        ctx.goals.delete(goal)
        raise
    return cached_json(request, {"data": {**_describe(goal), "site_id": site.site_id}}, status=201)


@router.delete("/goals/{goal_id}", status_code=204, response_class=Response)
def delete_goal(ctx: Ctx, key: Key, goal_id: str) -> Response:
    goal = ctx.goals.get(goal_id)
    if goal is None:
        raise APIError(404, "goal_not_found", f"no goal with id {goal_id!r}")
    readable_site(ctx, key, goal.site_id, f"goal {goal_id!r}", fresh=True)
    ctx.goals.delete(goal)
    return Response(status_code=204)
