"""`/sites`: list, create, read, change and delete the sites of the caller's account (user-level keys only)."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from query_api import stats
from query_api.deps import Ctx, UserKey, cached_json, readable_site
from query_api.errors import APIError
from query_api.models import SiteChange, SiteCreate, SiteList, SiteResponse
from query_api.periods import stats_period
from streams.rollups import sites_with_events
from streams.sites import DomainTaken, Site, normalize_domain

router = APIRouter(tags=["sites"])

# Whether a domain is taken and taking it are one step: routes run on a thread pool, and two
# creates of one domain (from two accounts) would both pass the check and the later row win,
# leaving the earlier 201's account without its site. In a process, this lock; across processes,
# the domain's claim in ClickHouse (`SiteRegistry.claim`).
_creating = threading.Lock()


def _out(site: Site, has_data: bool, last_7d: dict | None = None) -> dict:
    # A site counts as verified once its tracker has delivered an event.
    out = {"id": site.site_id, "domain": site.domain, "name": site.name, "timezone": site.timezone,
           "verified": has_data, "has_data": has_data}
    if last_7d is not None:
        out["visitors_7d"] = last_7d["visitors"]
        out["pageviews_7d"] = last_7d["pageviews"]
    return out


@router.get("/sites", response_model=SiteList, response_model_exclude_none=True)
def list_sites(request: Request, ctx: Ctx, key: UserKey,
               include_stats: Annotated[bool, Query(description="Include visitors of the last 7 days")] = False) -> Response:
    sites = ctx.sites.list(key.account_id)
    with_data = sites_with_events(ctx.client, [s.site_id for s in sites])
    last_7d = _last_7d(ctx, sites) if include_stats else {}
    data = [_out(s, s.site_id in with_data, last_7d.get(s.site_id)) for s in sites]
    data.sort(key=lambda site: (-site.get("visitors_7d", 0), site["name"], site["domain"]))  # SPEC §7.1
    return cached_json(request, {"data": data, "meta": {"total": len(data)}})


def _last_7d(ctx: Ctx, sites: list[Site]) -> dict[str, dict]:
    """Each site's totals of its last 7 days (in its timezone), in one statement."""
    periods = {tz: stats_period(ctx.client, "7d", tz) for tz in {site.timezone for site in sites}}
    return stats.totals_of_sites(ctx.client, {site.site_id: periods[site.timezone] for site in sites})


@router.post("/sites", response_model=SiteResponse, status_code=201)
def create_site(request: Request, ctx: Ctx, key: UserKey, body: SiteCreate) -> Response:
    try:
        domain = normalize_domain(body.domain)
    except ValueError:
        raise APIError(400, "invalid_parameter", "domain must be a hostname such as example.com") from None
    if not ctx.sites.valid_timezone(body.timezone):
        raise APIError(400, "invalid_parameter", f"timezone: {body.timezone[:64]!r} is not a known IANA timezone") from None
    taken = APIError(409, "site_exists", f"a site for {domain} exists already")
    with _creating:
        # Read anew: a site another process deleted a moment ago is still in this one's cache.
        if ctx.sites.fresh_by_domain(domain) is not None or (claimed := ctx.sites.claim(domain, key.account_id)) is False:
            raise taken
        try:
            site = claimed if isinstance(claimed, Site) else ctx.sites.create(key.account_id, domain, body.name,
                                                                              body.timezone)
        except DomainTaken:
            raise taken from None
    ctx.goals.forget_site(site.site_id)  # a deleted site's with the id, if this process still had them
    return cached_json(request, {"data": _out(site, False)}, status=201)


@router.get("/sites/{site_id}", response_model=SiteResponse, response_model_exclude_none=True)
def get_site(request: Request, ctx: Ctx, key: UserKey, site_id: str) -> Response:
    site = readable_site(ctx, key, site_id)
    return cached_json(request, {"data": _out(site, site.site_id in sites_with_events(ctx.client, [site.site_id]))})


@router.patch("/sites/{site_id}", response_model=SiteResponse)
def change_site(request: Request, ctx: Ctx, key: UserKey, site_id: str, body: SiteChange) -> Response:
    """A site's name or time zone, in place: its data stays, and every period is drawn in the new
    zone from now on (past days too). Other processes serve the change within 5 s."""
    if body.name is None and body.timezone is None:
        raise APIError(400, "invalid_parameter", "give the name or the timezone to change (or both)")
    if body.timezone is not None and not ctx.sites.valid_timezone(body.timezone):
        raise APIError(400, "invalid_parameter", f"timezone: {body.timezone[:64]!r} is not a known IANA timezone")
    site = readable_site(ctx, key, site_id, fresh=True)
    changed = ctx.sites.change(site, body.name, body.timezone)
    if changed is None:  # deleted meanwhile
        raise APIError(404, "site_not_found", f"no site with id {site_id!r}")
    return cached_json(request, {"data": _out(changed, changed.site_id in sites_with_events(ctx.client, [site_id]))})


@router.delete("/sites/{site_id}", status_code=204, response_class=Response)
def delete_site(ctx: Ctx, key: UserKey, site_id: str) -> Response:
    """Deletes the site and all its data, and revokes its site-level keys; its stats answer 404
    from now on."""
    site = readable_site(ctx, key, site_id, fresh=True)
    ctx.keys.revoke_site(site.site_id)  # first: a delete that fails halfway leaves no key behind
    ctx.sites.delete(site)
    ctx.goals.forget_site(site.site_id)  # its goals go from lists (and this process's stream core) at once
    return Response(status_code=204)
