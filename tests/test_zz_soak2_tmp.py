"""Throwaway (not committed): the distributed comparison with another seed and odd timezones."""
from datetime import datetime, timezone

import pytest

from tests import test_stats_reference as t
from tests.reference import Reference, SiteSpec, generate

ZONES = [("Asia/Kathmandu", ("2026-11-01", "2026-11-10")), ("America/St_Johns", ("2026-10-28", "2026-11-04")),
         ("Australia/Lord_Howe", ("2026-09-30", "2026-10-08"))]


@pytest.fixture(scope="module")
def sample():
    for tz, rng in ZONES:
        t.CUSTOM[tz] = rng
    sites = [SiteSpec(f"dz{i}-example", f"dz{i}.example", tz, 1.0, (("SE", 30), ("US", 30), ("IN", 20), ("", 5)))
             for i, (tz, _) in enumerate(ZONES)]
    now = datetime.now(timezone.utc)
    lines = generate(seed=99, sites=sites, now=now, target_events=20_000, clicks=True)
    return sites, lines, Reference(lines, sites, now)


test_soak_distributed = t.test_distributed_answers_equal_the_reference_and_the_embedded_topology
