"""Prometheus metrics of notification delivery. Labels: channel and status only (never a
contact, user or notification id)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

NOTIFICATIONS = Counter(
    "picobot_notifications_total",
    "Delivery outcomes, by channel and status (sent, retry, dead).",
    ["channel", "status"],
)
DELIVERY_SECONDS = Histogram(
    "picobot_notification_delivery_seconds",
    "Time from a notification being written to the provider accepting it.",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)


def record(channel: str, status: str, seconds: float | None = None) -> None:
    NOTIFICATIONS.labels(channel, status).inc()
    if seconds is not None:
        DELIVERY_SECONDS.labels(channel).observe(max(0.0, seconds))
