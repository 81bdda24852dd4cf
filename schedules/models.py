"""Jobs (API name: schedules) and their executions.

Contended rows are changed only by conditional UPDATEs whose row count is checked (see
`schedules/claims.py`); nothing here does a read-modify-save on a Job a worker may hold.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q


class ScheduleType(models.TextChoices):
    ONCE = "once"
    INTERVAL = "interval"
    CRON = "cron"


class Misfire(models.TextChoices):
    RUN_ONCE = "run_once"
    SKIP = "skip"


class Origin(models.TextChoices):
    API = "api"
    TOOL = "tool"
    HEARTBEAT = "heartbeat"
    ADMIN = "admin"


def default_notify_on() -> list[str]:
    return ["success", "failure"]


class JobQuerySet(models.QuerySet["Job"]):
    def live(self) -> JobQuerySet:
        """Not soft-deleted."""
        return self.filter(deleted_at__isnull=True)


class Job(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs"
    )
    name = models.CharField(max_length=200)
    prompt = models.TextField()
    schedule_type = models.CharField(max_length=16, choices=ScheduleType.choices)
    run_at = models.DateTimeField(null=True, blank=True)
    interval_secs = models.PositiveIntegerField(null=True, blank=True)
    cron = models.CharField(max_length=200, blank=True, default="")
    timezone = models.CharField(max_length=64, default="UTC")
    capabilities = models.JSONField(default=list, blank=True)
    enabled = models.BooleanField(default=True)
    max_executions = models.PositiveIntegerField(null=True, blank=True)
    execution_count = models.PositiveIntegerField(default=0)
    timeout_secs = models.PositiveIntegerField(default=300)
    misfire = models.CharField(max_length=16, choices=Misfire.choices, default=Misfire.RUN_ONCE)
    notify_on = models.JSONField(default=default_notify_on, blank=True)
    # None: every channel where the owner has a verified contact.
    notify_channels = models.JSONField(null=True, blank=True)
    active_hours = models.CharField(max_length=32, blank=True, default="")

    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    schedule_version = models.PositiveIntegerField(default=1)
    # A retry keeps the occurrence it retries: next_run_at is then the retry time, while
    # pending_scheduled_for/pending_attempt say which occurrence and which attempt comes next.
    pending_scheduled_for = models.DateTimeField(null=True, blank=True)
    pending_attempt = models.PositiveIntegerField(default=1)

    claim_token = models.UUIDField(null=True, blank=True)
    claimed_by = models.CharField(max_length=200, blank=True, default="")
    claimed_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.API)
    heartbeat_name = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001 (NULL: not a heartbeat; unique when set)
    deleted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        verbose_name = "schedule"
        indexes = [
            # The due-job scan: only enabled, live rows are indexed, so it stays small.
            models.Index(
                fields=["next_run_at"],
                condition=Q(enabled=True, deleted_at__isnull=True),
                name="job_due_idx",
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(claim_token__isnull=False),
                name="job_lease_idx",
            ),
            models.Index(fields=["owner", "created_at"], name="job_owner_created_idx"),
            # The schedules list: an owner's live jobs, newest first, read a page at a time.
            models.Index(
                fields=["owner", "-id"],
                condition=Q(deleted_at__isnull=True),
                name="job_owner_live_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["heartbeat_name"],
                condition=Q(heartbeat_name__isnull=False),
                name="job_unique_heartbeat_name",
            ),
            models.CheckConstraint(
                condition=Q(max_executions__isnull=True) | Q(max_executions__gte=1),
                name="job_max_executions_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} (#{self.pk})"

    @property
    def is_heartbeat(self) -> bool:
        """A heartbeat: `[heartbeats]` in the config file is its source of truth, kept in step
        by `loadheartbeats`, so nothing else should edit it."""
        return self.heartbeat_name is not None


class ExecutionStatus(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    LOST = "lost"
    SUPERSEDED = "superseded"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"


FAILURE_STATUSES = frozenset(
    {ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT, ExecutionStatus.LOST}
)
FINAL_STATUSES = frozenset(set(ExecutionStatus) - {ExecutionStatus.RUNNING})


class Execution(models.Model):
    """One attempt at one occurrence of a job."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="executions")
    # The job's owner, copied when the row is written: the runs in an owner's rolling window are
    # counted from (owner, started_at) alone, whatever number of jobs the owner has had. No
    # constraint of its own: the row goes with its job, and the job with its owner.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        editable=False,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )
    scheduled_for = models.DateTimeField()
    attempt = models.PositiveIntegerField(default=1)
    status = models.CharField(
        max_length=16, choices=ExecutionStatus.choices, default=ExecutionStatus.RUNNING
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker_id = models.CharField(max_length=200, blank=True, default="")
    claim_token = models.UUIDField(null=True, blank=True)
    schedule_version = models.PositiveIntegerField(default=1)
    prompt = models.TextField(blank=True, default="")
    capabilities = models.JSONField(default=list, blank=True)
    output = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    missed_count = models.PositiveIntegerField(default=0)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["job", "scheduled_for", "attempt"], name="execution_unique_attempt"
            )
        ]
        indexes = [
            models.Index(fields=["job", "-id"], name="execution_job_newest_idx"),
            models.Index(
                fields=["status"],
                condition=Q(status="running"),
                name="execution_running_idx",
            ),
            models.Index(fields=["finished_at"], name="execution_finished_idx"),
            # Runs per rolling window, counted under the claim lock for each candidate owner
            # from the index alone, at most max_runs_per_window entries of it (skipped
            # executions never ran and are not in it).
            models.Index(
                fields=["owner", "started_at"],
                condition=~Q(status="skipped"),
                name="execution_owner_started_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job_id}@{self.scheduled_for:%Y-%m-%d %H:%M:%S} #{self.attempt} {self.status}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.owner_id is None and self.job_id is not None:
            owners = Job.objects.filter(pk=self.job_id).values_list("owner_id", flat=True)
            self.owner_id = owners.first()
        super().save(*args, **kwargs)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Worker(models.Model):
    """A `runworker` process, as it last reported itself (see `schedules/workers.py`)."""

    worker_id = models.CharField(max_length=200, unique=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    concurrency = models.PositiveIntegerField(default=1)
    slots_busy = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["last_seen_at"], name="worker_last_seen_idx")]

    def __str__(self) -> str:
        return self.worker_id

    def is_alive(self, now: datetime) -> bool:
        """Seen within a lease: a worker reports every third of `lease_secs`."""
        lease = timedelta(seconds=settings.PICOBOT.scheduler.lease_secs)
        return self.stopped_at is None and self.last_seen_at >= now - lease
