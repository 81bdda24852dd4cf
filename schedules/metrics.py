"""Prometheus metrics of the scheduler. Labels are low-cardinality only: never a job, user or
execution id (those go in logs and spans)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EXECUTIONS = Counter(
    "picobot_executions_total",
    "Executions that reached a final status, by status and schedule type.",
    ["status", "schedule_type"],
)
EXECUTION_DURATION = Histogram(
    "picobot_execution_duration_seconds",
    "Wall time of an execution, from claim to completion.",
    ["schedule_type"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
EXECUTION_LAG = Histogram(
    "picobot_execution_lag_seconds",
    "Delay from an occurrence's due time to the claim that starts it.",
    ["schedule_type"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
RUNNING = Gauge("picobot_executions_running", "Executions this worker is running now.")
CLAIMS = Counter("picobot_claims_total", "Occurrences claimed by this worker.")
DEFERRED = Counter(
    "picobot_claims_deferred_total",
    "Due occurrences left for later by a claim because of a limit, by limit.",
    ["limit"],
)
EXPIRED_LEASES = Counter(
    "picobot_expired_leases_total", "Expired leases this worker recovered, by outcome.", ["status"]
)
