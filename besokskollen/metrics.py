"""Prometheus metrics of every process, defined in one place (`prometheus-client`'s default
registry); each process serves them at `/metrics`."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

EVENTS_ACCEPTED = Counter("bk_events_accepted_total", "Events answered 202 and handed on")
EVENTS_DROPPED = Counter("bk_events_dropped_total", "Events answered 202 and dropped, by reason", ["reason"])
EVENTS_REJECTED = Counter("bk_events_rejected_total", "Events refused, by HTTP status", ["status"])
SPOOL_BYTES = Gauge("bk_spool_bytes", "Bytes in the local spool not yet sent to Kafka (embedded: in the journal, not yet written)")
SPOOLING = Gauge("bk_spooling", "1 while events go to the spool instead of Kafka")
PRODUCER_LATENCY = Histogram("bk_producer_ack_seconds", "Time from send to Kafka's acknowledgement",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

SPOOL_RECORDS = Gauge("bk_spool_records", "Events in the local spool not yet sent to Kafka (embedded: in the journal, not yet written)")
EVENTS_PROCESSED = Counter("bk_stream_events_total", "Events the stream core processed (a worker, or up)")
RECORDS_SKIPPED = Counter("bk_records_skipped_total", "Kafka or journal records that are no event, logged and skipped")
EVENTS_OF_DELETED_SITES = Counter("bk_events_of_deleted_sites_total",
                                  "Events of deleted sites dropped by a worker or up (also those of a site deleted"
                                  " and created again with the id since ingest took them)")
BATCH_SECONDS = Histogram("bk_stream_batch_seconds", "Time to process one batch in the stream core",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STAGE_SECONDS = Counter("bk_stream_stage_seconds", "Time the stream core spent in each stage of its batches",
                        ["stage"])
CONSUMER_LAG = Gauge("bk_consumer_lag", "Events in a partition not yet processed by the group", ["partition"])
ROWS_WRITTEN = Counter("bk_rows_written_total", "Rows the stream core wrote, by table", ["table"])
QUERY_SECONDS = Histogram("bk_query_seconds", "Query API response time, by endpoint", ["endpoint"],
                          buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ANSWERS_SHARED = Counter("bk_query_answers_shared_total",
                         "Query API answers shared with identical questions asked at the same time")


class _StepTimes:
    """The wall time of each step of `POST /api/event` (ingest/app.py `EventSteps`), awaited waits
    included, and how many runs were timed: one request in `TIME_EVERY`. Summed in plain lists
    the event loop adds to, not prometheus-client's Counters, whose every `inc` takes a lock."""

    def __init__(self) -> None:
        self._steps: dict[str, list[int]] = {}

    def of(self, step: str) -> list[int]:
        """[nanoseconds, runs] of the step, to add to."""
        return self._steps.setdefault(step, [0, 0])

    def collect(self):
        seconds = CounterMetricFamily("bk_event_step_seconds", "Wall time of each step of /api/event, awaited"
                                      " waits included, in the requests timed", labels=["step"])
        runs = CounterMetricFamily("bk_event_steps", "Runs of each step of /api/event that were timed",
                                   labels=["step"])
        for step, (nanoseconds, count) in list(self._steps.items()):
            seconds.add_metric([step], nanoseconds / 1e9)
            runs.add_metric([step], count)
        yield seconds
        yield runs


EVENT_STEPS = _StepTimes()
REGISTRY.register(EVENT_STEPS)
RATE_LIMITED = Counter("bk_rate_limited_total", "Requests answered 429, by bucket kind", ["bucket"])


def watch_spool(spool) -> None:
    """Report this spool's backlog (ingest's spool, or `up`'s journal) from now on."""
    SPOOL_BYTES.set_function(lambda: spool.pending_bytes)
    SPOOL_RECORDS.set_function(lambda: spool.pending_records)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/metrics", metrics, methods=["GET"])]
