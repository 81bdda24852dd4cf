"""`/metrics`: the web app's Prometheus exposition, and the queue's state read at scrape time.

Besides django-prometheus's request metrics (and, in multiprocess mode, every process's own),
each scrape reads the queue from the database in one query (`schedules.health.queue_state`), so
an alert on an overdue queue fires whichever worker is up or down. With PICOBOT_METRICS_TOKEN
set, a scrape needs `Authorization: Bearer <token>` (401 otherwise).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

import prometheus_client
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class QueueCollector(Collector):
    """The `picobot_queue_*` gauges, from one database query per scrape."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from schedules.health import queue_state

        state = queue_state()
        yield GaugeMetricFamily(
            "picobot_queue_due_jobs", "Schedules due now and not claimed.", value=state.due
        )
        yield GaugeMetricFamily(
            "picobot_queue_overdue_jobs",
            "Schedules due more than tick_secs ago and still not claimed.",
            value=state.overdue,
        )
        yield GaugeMetricFamily(
            "picobot_queue_oldest_overdue_seconds",
            "Age of the oldest overdue occurrence (0 when none).",
            value=state.oldest_overdue_secs,
        )
        yield GaugeMetricFamily(
            "picobot_queue_running_executions",
            "Executions running now, across every worker.",
            value=state.running,
        )
        yield GaugeMetricFamily(
            "picobot_queue_workers_alive",
            "Workers that reported within one lease.",
            value=state.workers_alive,
        )
        if state.dead_notifications is not None:
            yield GaugeMetricFamily(
                "picobot_queue_dead_notifications",
                "Notifications given up on (dead).",
                value=state.dead_notifications,
            )


QUEUE_REGISTRY = CollectorRegistry(auto_describe=False)
QUEUE_REGISTRY.register(QueueCollector())


def _process_registry() -> CollectorRegistry:
    """This process's metrics, or every process's in prometheus multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return prometheus_client.REGISTRY


def authorised(request: HttpRequest) -> bool:
    token = settings.PICOBOT_METRICS_TOKEN
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not authorised(request):
        response = HttpResponse("A metrics token is required.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body = prometheus_client.generate_latest(_process_registry())
    body += prometheus_client.generate_latest(QUEUE_REGISTRY)
    return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)
