"""Schemathesis over the query API's own OpenAPI document, in-process (ASGI): no 5xx, and every
response conforms to the document (status codes documented, bodies, content types and headers
match).

Bounded: at most MAX_EXAMPLES generated cases per operation, derandomized (the same cases every
run). `DELETE /sites/{site_id}` is left out: `site_id` is always the fuzz site, which it would
delete under the other operations. The fuzz has an API key and a site of its own, and an app
whose rate limit is raised, so it sees no 429s.

The document is read at import, from an app that is never called (operations become test items);
requests go to an app over the session's storage (`fuzz_app`)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from query_api.app import create_app
from query_api.rate_limit import RateLimiter

MAX_EXAMPLES = 25
FUZZ_KEY = "bk_fuzz_key_0123456789abcdef"
FUZZ_DOMAIN = "fuzz-target.example"
FUZZ_SITE = "fuzz-target-example"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]

class _NoStorage:
    """A Context for an app that only renders its OpenAPI document."""

    def __getattr__(self, name: str) -> None:
        return None


schema = schemathesis.openapi.from_dict(create_app(_NoStorage()).openapi())
schema.config.update(headers={"Authorization": f"Bearer {FUZZ_KEY}"}, parameters={"site_id": FUZZ_SITE})
schema = schema.exclude(method="DELETE", path="/api/v1/sites/{site_id}")  # would delete the fuzz site


@pytest.fixture(scope="module")
def fuzz_app(services):
    if services.keys.lookup(FUZZ_KEY) is None:
        services.keys.create("default", key=FUZZ_KEY)
    if services.sites.get(FUZZ_SITE) is None:
        services.sites.create("default", FUZZ_DOMAIN, "Fuzz", site_id=FUZZ_SITE)
    return create_app(services.query_context, rate_limiter=RateLimiter(limit=10**9, failed_auth_limit=10**9))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case, fuzz_app):
    case.call_and_validate(app=fuzz_app, checks=CHECKS)
