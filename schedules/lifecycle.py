"""Create, update, cancel and soft-delete of schedules: the one place these rules live.

The REST API, the agent's `schedule` tool and the admin's actions all call these functions, so a
request is validated, checked against the grant and the quotas, and applied the same way
whoever makes it. Callers find jobs through `jobs_of(owner)` (live jobs of that owner only).

Writes to a Job are conditional UPDATEs of the changed fields only, made while holding the row
(`SELECT ... FOR UPDATE` on PostgreSQL, the writer lock on SQLite) in the same order as a worker
completing a run (job first, then its execution), so neither side undoes the other's write and
the two cannot deadlock. A worker completing a run writes `next_run_at` only if the job's
`schedule_version` is still the one the run started with; a PATCH of what runs bumps it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from kernel.context import Capabilities
from kernel.models import User
from kernel.permissions import CapabilitySet
from schedules.claims import wake_workers
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job, JobQuerySet, Origin, ScheduleType
from schedules.quotas import QuotaExceeded, check_can_create
from schedules.serializers import ScheduleInputSerializer, flatten_errors
from schedules.timing import (
    ScheduleError,
    ScheduleSpec,
    first_run,
    next_after,
    spec_of,
    validate_spec,
)

__all__ = [
    "CapabilitiesExceeded",
    "JobGone",
    "QuotaExceeded",
    "ScheduleInvalid",
    "check_create",
    "check_update",
    "create_job",
    "jobs_of",
    "request_cancel",
    "run_now",
    "soft_delete",
    "update_job",
    "validate_input",
]

SCHEDULE_FIELDS = ("schedule_type", "run_at", "interval_secs", "cron", "timezone")
# Changing any of these changes what the next run does: schedule_version is bumped.
VERSIONED_FIELDS = (*SCHEDULE_FIELDS, "prompt", "capabilities", "active_hours")
# Fields the API does not take but the system sets (a heartbeat's key and active hours): passed
# to create_job/update_job as `extra`, written as given, compared like the API's fields.
EXTRA_FIELDS = ("heartbeat_name", "active_hours")
DEFAULT_NAME_CHARS = 60


class ScheduleInvalid(Exception):
    """The request is malformed; `errors` is `{field: [reason, ...]}`."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in self.errors.items()))


class CapabilitiesExceeded(Exception):
    """Requested capabilities the caller may not give; `missing` lists exactly which."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__("capabilities beyond your grant: " + ", ".join(missing))


class JobGone(Exception):
    """The job was deleted (or never existed) by the time the change was applied."""


def jobs_of(owner: User) -> JobQuerySet:
    """The owner's live (not deleted) jobs: the only jobs a caller may see or change."""
    return Job.objects.live().filter(owner=owner)


def validate_input(data: object, *, partial: bool) -> dict[str, Any]:
    """The shape checks of a create (`partial=False`) or PATCH body; raises ScheduleInvalid."""
    serializer = ScheduleInputSerializer(data=data, partial=partial)
    if not serializer.is_valid():
        raise ScheduleInvalid(flatten_errors(serializer.errors))
    return dict(serializer.validated_data)


def _check_capabilities(
    owner: User, requested: Iterable[str], ceiling: CapabilitySet | Capabilities | None
) -> None:
    """Refuse capabilities beyond the owner's current grant (and `ceiling`, when given).

    `ceiling` is anything with `allows(Permission)`: a CapabilitySet, or a run's capabilities
    (a chat session's: its fixed set and the owner's current grant).
    """
    requested = list(requested)
    missing = [p.text for p in owner.capability_set().missing(requested)]
    if ceiling is not None:
        missing += [
            p.text
            for p in CapabilitySet(requested)
            if not ceiling.allows(p) and p.text not in missing
        ]
    if missing:
        raise CapabilitiesExceeded(missing)


def _spec(values: Mapping[str, Any], now: datetime) -> ScheduleSpec:
    config = settings.PICOBOT.scheduler
    try:
        return validate_spec(
            schedule_type=values["schedule_type"],
            run_at=values.get("run_at"),
            interval_secs=values.get("interval_secs"),
            cron=values.get("cron") or "",
            timezone=values.get("timezone") or "UTC",
            timezone_given=bool(values.get("timezone")),
            now=now,
            min_interval_secs=config.min_interval_secs,
        )
    except ScheduleError as exc:
        raise ScheduleInvalid({exc.field: [sentence(exc.message)]}) from None


def sentence(message: str) -> str:
    """A schedule rule's message written like the API's other reasons: a capital, a full stop."""
    if message[:1].islower():
        message = message[0].upper() + message[1:]
    return message if message.endswith((".", "?", "!")) else message + "."


def _spec_fields(spec: ScheduleSpec) -> dict[str, Any]:
    """The model's schedule fields as the validated spec normalised them."""
    return {
        "schedule_type": spec.schedule_type,
        "run_at": spec.run_at,
        "interval_secs": spec.interval_secs,
        "cron": spec.cron or "",
        "timezone": spec.timezone,
    }


def default_name(prompt: str) -> str:
    first_line = prompt.strip().splitlines()[0] if prompt.strip() else "schedule"
    if len(first_line) > DEFAULT_NAME_CHARS:
        first_line = first_line[: DEFAULT_NAME_CHARS - 1] + "…"
    return first_line


def check_body(data: object, *, now: datetime) -> tuple[dict[str, Any], ScheduleSpec]:
    """The shape and schedule rules of a create body, for no owner in particular.

    Returns the validated values and the normalised schedule; raises ScheduleInvalid.
    """
    values = validate_input(data, partial=False)
    return values, _spec(values, now)


def check_create(
    owner: User,
    data: object,
    *,
    now: datetime,
    ceiling: CapabilitySet | Capabilities | None = None,
) -> tuple[dict[str, Any], ScheduleSpec]:
    """The checks `create_job` makes before its quota check, without creating anything.

    Returns the validated values and the normalised schedule (for a caller that looks for an
    existing equivalent schedule first, as the `schedule` tool does). Raises ScheduleInvalid or
    CapabilitiesExceeded, as `create_job` would.
    """
    values, spec = check_body(data, now=now)
    _check_capabilities(owner, values.get("capabilities", []), ceiling)
    return values, spec


def create_job(
    owner: User,
    data: object,
    *,
    origin: str = Origin.API,
    now: datetime | None = None,
    ceiling: CapabilitySet | Capabilities | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Job:
    """Validate `data` (a create body) and create the owner's job.

    Raises, in this order: ScheduleInvalid (400), CapabilitiesExceeded (403: beyond the owner's
    grant, or beyond `ceiling` when the caller is itself limited, e.g. a chat session),
    QuotaExceeded (429). `now` defaults to the database's clock. `extra` sets EXTRA_FIELDS.
    """
    values = validate_input(data, partial=False)
    now = now or db_now()
    spec = _spec(values, now)
    capabilities = values.get("capabilities", [])
    _check_capabilities(owner, capabilities, ceiling)
    config = settings.PICOBOT.scheduler
    fields: dict[str, Any] = {
        "name": values.get("name") or default_name(values["prompt"]),
        "prompt": values["prompt"],
        "capabilities": capabilities,
        "enabled": values.get("enabled", True),
        "max_executions": values.get("max_executions"),
        "timeout_secs": values.get("timeout_secs", config.default_timeout_secs),
        "notify_channels": values.get("notify_channels"),
        **_spec_fields(spec),
        "next_run_at": first_run(spec, now),
        **_extra(extra),
    }
    for optional in ("misfire", "notify_on"):
        if optional in values:
            fields[optional] = values[optional]
    with transaction.atomic():
        # Holding the owner's row makes the quota count exact against concurrent creates.
        User.objects.select_for_update().filter(pk=owner.pk).first()
        check_can_create(owner, now)
        job = Job.objects.create(owner=owner, origin=origin, **fields)
        wake_workers()
        return job


def update_job(
    job: Job,
    changes: object,
    *,
    now: datetime | None = None,
    ceiling: CapabilitySet | Capabilities | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Job:
    """Validate `changes` (a PATCH body) and apply them to `job`; returns the job as stored.

    A change of the schedule, the prompt or the capabilities affects the next run only: it bumps
    `schedule_version`, resets the failure count, drops a pending retry and recomputes
    `next_run_at` (a running execution keeps what it started with) — except that a once job
    whose run_at is unchanged keeps its one occurrence: a pending or later retry of it runs
    the change. Re-enabling computes the
    next run from now; a once job whose time has passed cannot be re-enabled. Raises
    ScheduleInvalid (400), CapabilitiesExceeded (403) or JobGone (404). `extra` changes
    EXTRA_FIELDS (an active hours change is versioned too).
    """
    values = {**validate_input(changes, partial=True), **_extra(extra)}
    now = now or db_now()
    with transaction.atomic():
        current = Job.objects.select_for_update().filter(pk=job.pk, deleted_at__isnull=True).first()
        if current is None:
            raise JobGone(f"schedule {job.pk} does not exist")
        fields = _changed_fields(current, values, now)
        if "capabilities" in values:
            _check_capabilities(current.owner, values["capabilities"], ceiling)
        if fields:
            fields["updated_at"] = now
            Job.objects.filter(pk=current.pk, deleted_at__isnull=True).update(**fields)
            if "next_run_at" in fields:
                wake_workers()
    return Job.objects.get(pk=job.pk)


def _extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    unknown = set(extra or {}) - set(EXTRA_FIELDS)
    if unknown:
        raise ValueError(f"not extra job fields: {sorted(unknown)}")
    return dict(extra or {})


def check_update(job: Job, changes: object, *, now: datetime | None = None) -> dict[str, Any]:
    """The checks `update_job` makes, without writing: the columns it would write.

    For a form that shows every reason before anything is saved (the admin); `update_job`
    checks again under the row lock. Raises ScheduleInvalid or CapabilitiesExceeded.
    """
    values = validate_input(changes, partial=True)
    fields = _changed_fields(job, values, now or db_now())
    if "capabilities" in values:
        _check_capabilities(job.owner, values["capabilities"], None)
    return fields


def _changed_fields(job: Job, values: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The columns to write for the PATCH `values` on `job` (locked), and only those.

    Raises ScheduleInvalid for a schedule that breaks the rules or a re-enable that cannot be.
    """
    fields = {
        name: value
        for name, value in values.items()
        if name not in SCHEDULE_FIELDS and getattr(job, name) != value
    }
    spec = spec_of(job)
    if any(name in values and getattr(job, name) != values[name] for name in SCHEDULE_FIELDS):
        spec = _spec(_merged_schedule(job, values, now), now)
        fields.update(
            {name: v for name, v in _spec_fields(spec).items() if getattr(job, name) != v}
        )
    schedule_changed = any(name in fields for name in SCHEDULE_FIELDS)
    if any(name in fields for name in VERSIONED_FIELDS):
        fields.update(schedule_version=job.schedule_version + 1, consecutive_failures=0)
        if schedule_changed:
            fields.update(pending_scheduled_for=None, pending_attempt=1)
            fields["next_run_at"] = first_run(spec, now)
        elif job.schedule_type != ScheduleType.ONCE:
            fields.update(pending_scheduled_for=None, pending_attempt=1)
            fields["next_run_at"] = _next_unstarted(job, spec)
        # A once job has one occurrence: its next attempt (a pending retry, or the one after a
        # running attempt that fails or is interrupted) is its next run, and runs the change.
        # Dropping it would leave the job enabled with nothing ever to run.
    if fields.get("enabled") is True:
        # A retry pending from before the job was disabled belongs to an occurrence long gone:
        # running it now and then moving on from that old occurrence would run twice.
        fields.update(consecutive_failures=0, pending_scheduled_for=None, pending_attempt=1)
        if not schedule_changed:
            fields["next_run_at"] = _next_run_on_re_enable(job, spec, now)
    _check_runs_left(job, fields)
    return fields


def _check_runs_left(job: Job, fields: Mapping[str, Any]) -> None:
    """Refuse a PATCH that would leave the job enabled with no executions left to run."""
    enabled = fields.get("enabled", job.enabled)
    limit = fields.get("max_executions", job.max_executions)
    if not enabled or limit is None or job.execution_count < limit:
        return
    field = "max_executions" if "max_executions" in fields else "enabled"
    raise ScheduleInvalid(
        {
            field: [
                f"This schedule has already run {job.execution_count} time(s); "
                f"max_executions must be above that for it to be enabled."
            ]
        }
    )


def _merged_schedule(job: Job, values: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The schedule the PATCH asks for: the job's own fields, overridden by `values`.

    Changing the schedule type starts from nothing but the time zone, so fields of the old type
    (an old cron, an old interval) are not carried into the new one. An interval's first run
    that has already passed is not carried either: the changed interval counts from now.
    """
    if "schedule_type" in values and values["schedule_type"] != job.schedule_type:
        base: dict[str, Any] = {"timezone": job.timezone}
    else:
        base = {name: getattr(job, name) for name in SCHEDULE_FIELDS}
        if job.schedule_type == ScheduleType.INTERVAL and job.run_at and job.run_at <= now:
            base["run_at"] = None
    base.update({k: v for k, v in values.items() if k in SCHEDULE_FIELDS})
    return base


def _next_unstarted(job: Job, spec: ScheduleSpec) -> datetime | None:
    """The first occurrence that no attempt has started yet (the schedule itself unchanged).

    A running occurrence and a pending retry belong to the old version: the retry is dropped and
    the next run is the occurrence after them.
    """
    running = (
        Execution.objects.filter(job_id=job.pk, status=ExecutionStatus.RUNNING)
        .order_by("-scheduled_for")
        .values_list("scheduled_for", flat=True)
        .first()
    )
    started = [t for t in (running, job.pending_scheduled_for) if t is not None]
    if not started:
        return job.next_run_at
    return next_after(spec, max(started))


def _next_run_on_re_enable(job: Job, spec: ScheduleSpec, now: datetime) -> datetime | None:
    if job.schedule_type == ScheduleType.ONCE:
        if job.run_at is None or job.run_at <= now:
            raise ScheduleInvalid(
                {"enabled": ["This once schedule's time has passed; give a new run_at."]}
            )
        return job.run_at
    return first_run(spec, now)


def request_cancel(job: Job) -> Execution | None:
    """Ask the worker running `job` to stop; returns that execution, or None if none runs.

    The worker sees `cancel_requested_at` within about a second and finishes the execution as
    `cancelled`. Asking again keeps the first request's time.
    """
    now = db_now()
    Execution.objects.filter(
        job_id=job.pk, status=ExecutionStatus.RUNNING, cancel_requested_at__isnull=True
    ).update(cancel_requested_at=now)
    return (
        Execution.objects.filter(job_id=job.pk, status=ExecutionStatus.RUNNING)
        .order_by("-id")
        .first()
    )


def run_now(job: Job) -> bool:
    """Make the job's next occurrence due now and wake the workers; False when it cannot run.

    Only an enabled, live job that no worker holds is moved (a held job's completion would
    overwrite the time). The occurrence then runs as scheduled at this instant, and the job
    continues with the schedule's next fire time after it.
    """
    with transaction.atomic():
        now = db_now()
        moved = Job.objects.filter(
            pk=job.pk, deleted_at__isnull=True, enabled=True, claim_token__isnull=True
        ).update(next_run_at=now, pending_scheduled_for=None, pending_attempt=1, updated_at=now)
        if moved:
            wake_workers()
    return moved == 1


def soft_delete(job: Job) -> bool:
    """Cancel the job's running execution, then mark the job deleted; False if already gone.

    One transaction, holding the job row first as a completing worker does, so a run that ends
    at the same moment either finishes before (and nothing is left to cancel) or sees the
    cancel request; either way the job stays deleted, as the worker never writes `deleted_at`.
    """
    with transaction.atomic():
        now = db_now()
        held = Job.objects.select_for_update().filter(pk=job.pk, deleted_at__isnull=True).first()
        if held is None:
            return False
        Execution.objects.filter(
            job_id=job.pk, status=ExecutionStatus.RUNNING, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=now)
        updated = Job.objects.filter(pk=job.pk, deleted_at__isnull=True).update(
            deleted_at=now, updated_at=now
        )
        return updated == 1
