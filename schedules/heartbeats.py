"""Heartbeats: the operator's prompts from `[heartbeats]`, kept in step with the database.

Each prompt is one job owned by the system principal and keyed by `heartbeat_name`.
`plan()` reads the file and the database and says what would change (create / update with the
fields that change / disable / unchanged) after validating the whole file with the API's own
code; `apply()` makes the database match, through `schedules.lifecycle` like any API change, so
an edit bumps `schedule_version` and a running execution finishes under the version it started
with. Jobs are never deleted here: a prompt that leaves the file is disabled and keeps its
history, and coming back re-enables the same job.

The file is the heartbeats' only source of capabilities: the system principal's grant is set to
`[heartbeats] capabilities`, each prompt gets its own list (contained in it) or the whole list,
and no user's grant is ever involved. Loads are serialised (a PostgreSQL advisory lock, SQLite's
writer lock) and re-planned under the lock, so two workers starting at once end with one job per
name and no error; a load with nothing to change writes nothing and takes no lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from kernel.models import User, system_principal
from kernel.permissions import CapabilitySet, canonical_list
from picobot_site.config import HeartbeatPrompt, HeartbeatsConfig, Notify
from schedules import lifecycle
from schedules.dbtime import db_now
from schedules.models import Job, Origin
from schedules.timing import ScheduleError, parse_active_hours

# Key of the advisory lock that serialises heartbeat loads on PostgreSQL ("beat" in ASCII).
LOAD_LOCK_KEY = 0x62656174
# The job fields a heartbeat's prompt decides, compared to find what an update changes.
COMPARED_FIELDS = (
    "name",
    "prompt",
    "schedule_type",
    "interval_secs",
    "cron",
    "timezone",
    "capabilities",
    "notify_on",
    "notify_channels",
    "active_hours",
    "enabled",
)


class HeartbeatsInvalid(Exception):
    """The `[heartbeats]` section cannot be loaded; one line per problem, each naming its prompt."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Wanted:
    """One prompt of the file as a job: the API create body plus the fields the API lacks."""

    name: str
    body: dict[str, Any]
    active_hours: str
    enabled: bool

    def values(self) -> dict[str, Any]:
        """The job fields this prompt decides (COMPARED_FIELDS), normalised."""
        return {
            "interval_secs": None,
            "cron": "",
            **{k: v for k, v in self.body.items() if k in COMPARED_FIELDS},
            "active_hours": self.active_hours,
            "enabled": self.enabled,
        }


@dataclass
class Step:
    """What one load does for one heartbeat name."""

    action: str  # create | update | disable | unchanged
    name: str
    changed: list[str] = field(default_factory=list)
    job: Job | None = None
    wanted: Wanted | None = None

    def line(self) -> str:
        if self.action == "update":
            return f"update {self.name}: {', '.join(self.changed)}"
        return f"{self.action} {self.name}"


@dataclass
class Plan:
    steps: list[Step]
    grant: list[str]  # the system principal's grant the file asks for
    grant_changes: bool

    @property
    def writes(self) -> bool:
        return self.grant_changes or any(s.action != "unchanged" for s in self.steps)

    def lines(self) -> list[str]:
        lines = [step.line() for step in self.steps]
        if self.grant_changes:
            lines.insert(0, f"set heartbeat capabilities: {self.grant or 'none'}")
        return lines


# --- the file ---------------------------------------------------------------------------------


def _notify_fields(notify: Notify) -> dict[str, Any]:
    if notify is False:
        return {"notify_on": [], "notify_channels": None}
    channels = None if notify is True else list(notify)
    return {"notify_on": ["success", "failure"], "notify_channels": channels}


def _body(config: HeartbeatsConfig, prompt: HeartbeatPrompt) -> dict[str, Any]:
    """The API create body of one prompt."""
    body: dict[str, Any] = {
        "name": prompt.name,
        "prompt": prompt.prompt,
        "timezone": prompt.timezone,
        "capabilities": list(
            config.capabilities if prompt.capabilities is None else prompt.capabilities
        ),
        **_notify_fields(config.notify if prompt.notify is None else prompt.notify),
    }
    if prompt.cron is not None:
        body.update(schedule_type="cron", cron=prompt.cron)
    else:
        interval = prompt.interval_secs or config.default_interval_secs
        body.update(schedule_type="interval", interval_secs=interval)
    return body


def wanted_jobs(config: HeartbeatsConfig, now: datetime) -> list[Wanted]:
    """Every prompt of the file, checked by the API's rules; raises HeartbeatsInvalid naming
    every bad prompt and why (nothing is written before the whole file is known good)."""
    if not config.enabled:
        return []
    section = CapabilitySet.parse(list(config.capabilities))
    problems: list[str] = []
    wanted: list[Wanted] = []
    for prompt in config.prompts:
        where = f"heartbeat {prompt.name!r}"
        try:
            values, spec = lifecycle.check_body(_body(config, prompt), now=now)
        except lifecycle.ScheduleInvalid as exc:
            problems += [f"{where}: {k}: {' '.join(v)}" for k, v in exc.errors.items()]
            continue
        beyond = [p.text for p in section.missing(values.get("capabilities", []))]
        if beyond:
            problems.append(
                f"{where}: capabilities beyond [heartbeats] capabilities: {', '.join(beyond)}"
            )
        if prompt.active_hours is not None:
            try:
                parse_active_hours(prompt.active_hours)
            except ScheduleError as exc:
                problems.append(f"{where}: active_hours: {exc.message}")
        body = {**values, "cron": spec.cron, "timezone": spec.timezone}
        body["interval_secs"] = spec.interval_secs
        wanted.append(Wanted(prompt.name, body, prompt.active_hours or "", prompt.enabled))
    if problems:
        raise HeartbeatsInvalid(problems)
    return wanted


# --- planning and applying ---------------------------------------------------------------------


def plan(config: HeartbeatsConfig | None = None, now: datetime | None = None) -> Plan:
    """What a load would do now. Raises HeartbeatsInvalid for a bad file. Reads only."""
    config = config or settings.PICOBOT.heartbeats
    wanted = wanted_jobs(config, now or db_now())
    existing = {
        job.heartbeat_name: job
        for job in Job.objects.live().filter(heartbeat_name__isnull=False).order_by("id")
    }
    steps: list[Step] = []
    for item in wanted:
        job = existing.pop(item.name, None)
        if job is None:
            steps.append(Step("create", item.name, wanted=item))
            continue
        values = item.values()
        changed = [k for k in COMPARED_FIELDS if getattr(job, k) != values[k]]
        steps.append(Step("update" if changed else "unchanged", item.name, changed, job, item))
    for name, job in existing.items():
        steps.append(Step("disable" if job.enabled else "unchanged", name, job=job))
    grant = canonical_list(config.capabilities)[0] if config.enabled else []
    principal = User.objects.filter(is_system=True).first()
    if principal is None:
        # Made with an empty grant when the first heartbeat needs an owner.
        grant_changes = bool(grant) and any(s.action == "create" for s in steps)
    else:
        grant_changes = list(principal.grant) != grant
    return Plan(steps, grant, grant_changes)


def load(*, dry_run: bool = False, config: HeartbeatsConfig | None = None) -> Plan:
    """Make the database match `[heartbeats]` (or only say how, with `dry_run`)."""
    config = config or settings.PICOBOT.heartbeats
    first = plan(config)
    if dry_run or not first.writes:
        return first
    with transaction.atomic():
        _serialise_loads()
        now = db_now()
        final = plan(config, now)  # another load may have done the work meanwhile
        if final.writes:
            _apply(final, now)
        return final


def _serialise_loads() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [LOAD_LOCK_KEY])
    # SQLite: the transaction began IMMEDIATE (settings), so it already holds the writer lock.


def _apply(plan: Plan, now: datetime) -> None:
    owner = system_principal()
    if list(owner.grant) != plan.grant:
        User.objects.filter(pk=owner.pk).update(grant=plan.grant)
        owner.grant = plan.grant
    for step in plan.steps:
        if step.action == "create":
            assert step.wanted is not None
            _create(owner, step.wanted, now)
        elif step.action == "update":
            assert step.job is not None and step.wanted is not None
            _update(step.job, step.wanted, step.changed, now)
        elif step.action == "disable":
            assert step.job is not None
            lifecycle.update_job(step.job, {"enabled": False}, now=now)


def _create(owner: User, wanted: Wanted, now: datetime) -> None:
    # A soft-deleted job may still hold the name: it keeps its history, the name moves on.
    Job.objects.filter(heartbeat_name=wanted.name, deleted_at__isnull=False).update(
        heartbeat_name=None
    )
    body = {k: v for k, v in wanted.body.items() if v not in (None, "")}
    lifecycle.create_job(
        owner,
        {**body, "enabled": wanted.enabled},
        origin=Origin.HEARTBEAT,
        now=now,
        extra={"heartbeat_name": wanted.name, "active_hours": wanted.active_hours},
    )


def _update(job: Job, wanted: Wanted, changed: list[str], now: datetime) -> None:
    values = wanted.values()
    changes = {k: values[k] for k in changed if k != "active_hours"}
    if any(k in changes for k in lifecycle.SCHEDULE_FIELDS):
        # The whole schedule, so a change of type leaves nothing of the old one behind.
        changes.update(
            {
                k: values[k]
                for k in lifecycle.SCHEDULE_FIELDS
                if k != "run_at" and values[k] not in (None, "")
            }
        )
    extra = {"active_hours": values["active_hours"]} if "active_hours" in changed else None
    lifecycle.update_job(job, changes, now=now, extra=extra)
