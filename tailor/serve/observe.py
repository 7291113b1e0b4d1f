"""What an operator watches: one access-log line per request, and Prometheus metrics at /metrics.

The access log line is `<UTC time> tenant=<id or -> <METHOD> <path> <status> <ms>ms`, written when the response has
been sent (a streamed one when its last event has). The metrics are the server's own registry (so several apps in one
process do not mix): requests by route template, method and status; request latency by route; rows per forward and
rows waiting, per backbone; answers given from a stale state; and personalize jobs by deployment and status, read from
the store at each scrape (the worker process writes them there).
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tailor.store.store import Store

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Jobs:
    """Personalize jobs by deployment and status, counted in the store when scraped."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("tailor_personalize_jobs", "Personalize jobs in the store by deployment and status",
                                   labels=["deployment", "status"])
        for (slot, status), count in sorted(self.store.job_counts().items()):
            family.add_metric([slot, status], count)
        yield family


class Metrics:
    def __init__(self, store: Store):
        self.registry = CollectorRegistry()
        self.requests = Counter("tailor_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("tailor_http_request_seconds", "Time from request to the response's last byte",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("tailor_batch_rows", "Rows answered together by one micro-batch", ["backbone"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_rows = Gauge("tailor_queue_rows", "Rows waiting for the model", ["backbone"],
                                registry=self.registry)
        self.stale_answers = Counter("tailor_stale_answers", "Personalized answers given from a state older than "
                                     "the user's history", ["deployment"], registry=self.registry)
        self.registry.register(_Jobs(store))

    def watch_batcher(self, backbone: str, queued: Callable[[], int]) -> Callable[[int], None]:
        """Report a batcher's queue; returns what it tells each batch's size."""
        self.queue_rows.labels(backbone).set_function(queued)
        return self.batch_rows.labels(backbone).observe

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def access_logger(target: str) -> logging.Logger | None:
    """The access log: "-" writes to stderr, "" to nowhere, anything else appends to that file."""
    if not target:
        return None
    logger = logging.getLogger("tailor.access")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class Observe:
    """ASGI middleware: times each request, counts it by route and status, and writes its access-log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: logging.Logger | None):
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if self.log is not None:
                tenant = scope.get("state", {}).get("tenant", "-")
                now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                self.log.info("%s tenant=%s %s %s %d %.1fms", now, tenant, scope["method"], scope["path"], status,
                              1000 * seconds)
