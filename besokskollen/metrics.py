"""Prometheus metrics of every process, defined in one place (`prometheus-client`'s default
registry); each process serves them at `/metrics`."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

EVENTS_ACCEPTED = Counter("bk_events_accepted_total", "Events answered 202 and handed on")
EVENTS_DROPPED = Counter("bk_events_dropped_total", "Events answered 202 and dropped, by reason", ["reason"])
EVENTS_REJECTED = Counter("bk_events_rejected_total", "Events refused, by HTTP status", ["status"])
SPOOL_BYTES = Gauge("bk_spool_bytes", "Bytes in the local spool not yet sent to Kafka")
SPOOLING = Gauge("bk_spooling", "1 while events go to the spool instead of Kafka")
PRODUCER_LATENCY = Histogram("bk_producer_ack_seconds", "Time from send to Kafka's acknowledgement",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/metrics", metrics, methods=["GET"])]
