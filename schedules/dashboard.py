"""The operator's dashboard: the queue's health on one admin page, with a server-side SVG chart.

Each number comes from one indexed query (`schedules.health`); the chart is drawn here as SVG
geometry and rendered by the template (autoescaped: nothing in it is markup from the data).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from schedules import health, workers
from schedules.models import ExecutionStatus

S = ExecutionStatus
# The chart's colours, in stacking order (bottom first).
STATUS_COLOURS = {
    S.SUCCEEDED: "#2e7d32",
    S.RUNNING: "#1565c0",
    S.SKIPPED: "#9e9e9e",
    S.INTERRUPTED: "#6d4c41",
    S.SUPERSEDED: "#8e24aa",
    S.CANCELLED: "#f9a825",
    S.TIMED_OUT: "#ef6c00",
    S.LOST: "#ad1457",
    S.FAILED: "#c62828",
}
CHART_WIDTH = 960
CHART_HEIGHT = 200
BAR_GAP = 4


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str


def chart_bars(chart: health.HourlyChart) -> list[Bar]:
    """Stacked bars, one column per hour, one segment per status present."""
    peak = max(chart.peak, 1)
    step = CHART_WIDTH / len(chart.hours)
    bars: list[Bar] = []
    for index, hour in enumerate(chart.hours):
        by_status = chart.counts.get(hour, {})
        top = float(CHART_HEIGHT)
        for status, colour in STATUS_COLOURS.items():
            count = by_status.get(status, 0)
            if not count:
                continue
            height = CHART_HEIGHT * count / peak
            top -= height
            title = f"{hour:%Y-%m-%d %H:00} UTC: {count} {status}"
            bars.append(Bar(index * step + BAR_GAP / 2, top, step - BAR_GAP, height, colour, title))
    return bars


def context(now: datetime | None = None) -> dict[str, Any]:
    state = health.queue_state()
    now = now or state.now
    chart = health.hourly_chart(now)
    p50, p95 = health.lag_percentiles(now)
    return {
        "state": state,
        "lag_p50": p50,
        "lag_p95": p95,
        "failures_24h": chart.total(health.FAILURES),
        "lost_24h": chart.total({S.LOST}),
        "executions_24h": chart.total(set(S)),
        "workers": workers.alive(state.now),
        "bars": chart_bars(chart),
        "legend": [(status, colour) for status, colour in STATUS_COLOURS.items()],
        "chart_width": CHART_WIDTH,
        "chart_height": CHART_HEIGHT,
        "first_hour": chart.hours[0],
    }


def dashboard(request: HttpRequest) -> HttpResponse:
    return TemplateResponse(
        request,
        "admin/picobot/dashboard.html",
        {**admin.site.each_context(request), "title": "Queue health", **context()},
    )
