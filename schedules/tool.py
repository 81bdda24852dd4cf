"""The agent's `schedule` tool: create, list, update, delete and cancel the owner's schedules.

The owner, and so where results go, is always the run's user (`context.user`); no argument can
name another. Each call needs `schedule:<action>` (the Kernel checks `required_permissions`).
Everything else is `schedules.lifecycle`, the code the REST API uses (validation, minimum
interval, grant, quotas), plus the rules that only apply to the agent:

- A new schedule's capabilities must be allowed by the calling run's own capabilities (for a
  chat session: its fixed set, within the owner's current grant), passed to the lifecycle as the
  `ceiling`, and may not include any `schedule:` permission: a child is a strict subset and
  cannot spawn schedules. A request for more is refused, naming what exceeded; nothing is
  silently narrowed. No capabilities given: none.
- Inside a scheduled run the tool only lists and cancels the run's own job; it never creates,
  updates or deletes, whatever the job's snapshot allows (no recursion).
- `max_executions` of a schedule made or changed here is at most MAX_TOOL_EXECUTIONS; a
  recurring schedule that does not say gets exactly that, a once schedule 1.
- Natural inputs: `run_at` may be "in 10 minutes" (from the database's clock), an ISO 8601 time
  with an offset, or one without an offset read in `timezone`; `schedule_type` may be left out
  when `run_at`, `interval_secs` or `cron` says it.
- A near-duplicate (same owner, prompt and capabilities, and the same schedule: a once time within
  DUPLICATE_WINDOW of an enabled once schedule's, the same interval, or the same cron in the same
  zone) returns the existing schedule instead of creating a second.

Answers are JSON text; a created or changed schedule comes with its next PREVIEW_COUNT fire
times in its zone and in UTC, so the model can confirm them to the user.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.utils.dateparse import parse_datetime

from kernel.context import lenient_capability_set
from kernel.models import User
from kernel.permissions import InvalidPermission, Permission, parse_permission
from kernel.tools import Tool, ToolError, ToolPermissionDenied
from schedules import lifecycle
from schedules.dbtime import db_now
from schedules.models import Job, Misfire, Origin, ScheduleType
from schedules.serializers import (
    MAX_CAPABILITIES,
    MAX_CRON_CHARS,
    MAX_DB_INT,
    MAX_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TIMEZONE_CHARS,
    NOTIFY_CHANNEL_CHOICES,
    NOTIFY_ON_CHOICES,
    ScheduleSerializer,
    upcoming_runs,
)
from schedules.timing import ScheduleSpec

if TYPE_CHECKING:
    from kernel.context import ToolContext

# The most occurrences a schedule made (or changed) by the agent may run: a runaway follow-up
# stops by itself. A constant rather than a config key: an operator who wants more creates the
# schedule through the API.
MAX_TOOL_EXECUTIONS = 100
DUPLICATE_WINDOW = timedelta(minutes=5)
PREVIEW_COUNT = 3
LIST_LIMIT = 50
LIST_PROMPT_CHARS = 300
MAX_BIGINT = 2**63 - 1

ACTIONS = ("create", "list", "update", "delete", "cancel")
SCHEDULE_FIELDS = ("schedule_type", "run_at", "interval_secs", "cron", "timezone")
# Changes that cannot make a schedule do more than it does: allowed on any of the owner's
# schedules, even one holding capabilities beyond this session's.
HARMLESS_CHANGES = ("name", "notify_on", "notify_channels")

_JOB_FIELDS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
    "prompt": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_PROMPT_CHARS,
        "description": "What the agent is asked at each run. Write it so it makes sense on its "
        "own, without this conversation.",
    },
    "schedule_type": {
        "type": "string",
        "enum": list(ScheduleType.values),
        "description": "Optional: cron given means cron, interval_secs means interval, run_at "
        "alone means once.",
    },
    "run_at": {
        "type": "string",
        "maxLength": 64,
        "description": "once: when to run; interval: the first run. 'in 10 minutes', 'in 2 "
        "hours', 'in 3 days', or ISO 8601 such as 2030-01-31T09:00:00+01:00 (without an "
        "offset, it is read in `timezone`).",
    },
    "interval_secs": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_DB_INT,
        "description": "interval: seconds between runs.",
    },
    "cron": {
        "type": "string",
        "maxLength": MAX_CRON_CHARS,
        "description": "cron: 5 fields (minute hour day-of-month month day-of-week), or 6 with "
        "seconds first; read in `timezone`.",
    },
    "timezone": {
        "type": "string",
        "maxLength": MAX_TIMEZONE_CHARS,
        "description": "An IANA time zone such as Europe/London; default UTC.",
    },
    "capabilities": {
        "type": "array",
        "items": {"type": "string", "maxLength": 1024},
        "maxItems": MAX_CAPABILITIES,
        "description": "Permissions each run may use; default none. Each must be within this "
        "session's capabilities; schedule: permissions are never allowed.",
    },
    "enabled": {"type": "boolean"},
    "max_executions": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_TOOL_EXECUTIONS,
        "description": f"Stop after this many runs (at most {MAX_TOOL_EXECUTIONS}; "
        f"default {MAX_TOOL_EXECUTIONS} for a recurring schedule).",
    },
    "timeout_secs": {"type": "integer", "minimum": 1, "maximum": MAX_DB_INT},
    "misfire": {"type": "string", "enum": list(Misfire.values)},
    "notify_on": {
        "type": "array",
        "items": {"type": "string", "enum": list(NOTIFY_ON_CHOICES)},
        "uniqueItems": True,
    },
    "notify_channels": {
        "type": ["array", "null"],
        "items": {"type": "string", "enum": list(NOTIFY_CHANNEL_CHOICES)},
        "uniqueItems": True,
        "description": "null: every channel where the user has a verified contact.",
    },
}

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": list(ACTIONS)},
        "id": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_BIGINT,
            "description": "The schedule, for update, delete and cancel (and list, for one).",
        },
        **_JOB_FIELDS,
    },
    "required": ["action"],
    "additionalProperties": False,
}

# The arguments each action takes besides `action`.
ACTION_FIELDS: dict[str, frozenset[str]] = {
    "create": frozenset(_JOB_FIELDS),
    "update": frozenset({"id", *_JOB_FIELDS}),
    "list": frozenset({"id"}),
    "delete": frozenset({"id"}),
    "cancel": frozenset({"id"}),
}

_RELATIVE = re.compile(
    r"^\s*in\s+(?P<count>\d{1,6}|an?|one)\s*"
    r"(?P<unit>seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|days?|d|weeks?|w)\s*$",
    re.IGNORECASE,
)
_UNIT_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class ScheduleTool(Tool):
    name = "schedule"
    description = (
        "Manage the user's schedules (prompts the agent runs later, without the user there). "
        "action=create: prompt plus run_at (once), interval_secs (every N seconds) or cron; "
        "optional name, timezone, capabilities (default none), max_executions, misfire, "
        "notify_on. action=list: the user's schedules (or one, by id). action=update: id plus "
        "the fields to change (the next run uses them). action=delete: id. action=cancel: id; "
        "stops the run in progress (the schedule stays). The answer gives the next fire times "
        "in the schedule's zone and in UTC: confirm them with the user. Inside a scheduled run "
        "only list and cancel of that run's own schedule work."
    )
    parameters = PARAMETERS
    timeout_secs = 30

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [parse_permission(f"schedule:{args['action']}")]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        action = args["action"]
        if in_scheduled_run(context):
            return self._in_scheduled_run(action, args, context)
        _refuse_foreign_fields(action, args)
        handler = {
            "create": self._create,
            "list": self._list,
            "update": self._update,
            "delete": self._delete,
            "cancel": self._cancel,
        }[action]
        return handler(args, context)

    # --- inside a scheduled run ----------------------------------------------------------------

    def _in_scheduled_run(self, action: str, args: dict[str, Any], context: ToolContext) -> str:
        required = parse_permission(f"schedule:{action}")
        if action not in ("list", "cancel"):
            raise ToolPermissionDenied(
                required,
                "a scheduled run cannot create, update or delete schedules; it can only list "
                "and cancel its own",
            )
        _refuse_foreign_fields(action, args)
        own = context.job_id
        if "id" in args and args["id"] != own:
            raise ToolPermissionDenied(
                required, f"a scheduled run can only {action} its own schedule (id {own})"
            )
        if own is None:
            raise ToolError("this scheduled run has no schedule of its own")
        args = {**args, "id": own}
        return self._list(args, context) if action == "list" else self._cancel(args, context)

    # --- actions -------------------------------------------------------------------------------

    def _create(self, args: dict[str, Any], context: ToolContext) -> str:
        owner = context.user
        now = db_now()
        data = _body(args, now=now)
        _infer_type(data, current=None)
        if "max_executions" not in data:
            once = data.get("schedule_type") == ScheduleType.ONCE
            data["max_executions"] = 1 if once else MAX_TOOL_EXECUTIONS
        if not any(name in data for name in ("run_at", "interval_secs", "cron")):
            raise ToolError(
                "invalid schedule (schedule: give run_at for once, interval_secs for every N "
                "seconds, or cron); nothing was created"
            )
        values, spec = self._check_create(owner, data, now, context)
        with transaction.atomic():
            # Holding the owner's row (SQLite: the writer lock) makes the duplicate check and
            # the create one step against a concurrent identical request.
            User.objects.select_for_update().filter(pk=owner.pk).first()
            existing = near_duplicate(owner, values, spec)
            if existing is not None:
                return _answer(
                    "existing",
                    existing,
                    "An equivalent schedule already exists (same prompt, capabilities and "
                    "schedule); it was kept and nothing new was created.",
                )
            try:
                job = lifecycle.create_job(
                    owner, data, origin=Origin.TOOL, now=now, ceiling=context.capabilities
                )
            except lifecycle.ScheduleInvalid as exc:
                raise _invalid(exc, "created") from None
            except lifecycle.CapabilitiesExceeded as exc:
                raise _capabilities_error(exc.missing, "created") from None
            except lifecycle.QuotaExceeded as exc:
                raise ToolError(f"{exc.message}; nothing was created") from None
        return _answer("created", job, f"Created schedule {job.pk}.")

    def _check_create(
        self, owner: User, data: dict[str, Any], now: datetime, context: ToolContext
    ) -> tuple[dict[str, Any], ScheduleSpec]:
        """The lifecycle's checks plus the agent's: no `schedule:` permission in a child.

        Every capability that may not be given is named at once, whichever rule refuses it.
        """
        forbidden = _schedule_permissions(data.get("capabilities", []))
        try:
            checked = lifecycle.check_create(owner, data, now=now, ceiling=context.capabilities)
        except lifecycle.ScheduleInvalid as exc:
            raise _invalid(exc, "created") from None
        except lifecycle.CapabilitiesExceeded as exc:
            _refuse_capabilities(
                forbidden, [p for p in exc.missing if p not in forbidden], "created"
            )
            raise _capabilities_error(exc.missing, "created") from None
        _refuse_capabilities(forbidden, [], "created")
        return checked

    def _list(self, args: dict[str, Any], context: ToolContext) -> str:
        jobs = lifecycle.jobs_of(context.user).order_by("-id")
        if "id" in args:
            job = _own_job(context.user, args["id"])
            return json.dumps({"count": 1, "schedules": [_describe(job)]}, ensure_ascii=False)
        total = jobs.count()
        shown = [_describe(job, prompt_chars=LIST_PROMPT_CHARS) for job in jobs[:LIST_LIMIT]]
        result: dict[str, Any] = {"count": total, "schedules": shown}
        if total > len(shown):
            result["note"] = f"showing the newest {len(shown)}; ask for one by id"
        return json.dumps(result, ensure_ascii=False)

    def _update(self, args: dict[str, Any], context: ToolContext) -> str:
        if "id" not in args:
            raise ToolError("id: required for update")
        job = _own_job(context.user, args["id"])
        now = db_now()
        changes = _body(args, now=now)
        if not changes:
            raise ToolError("give at least one field to change; nothing was updated")
        _infer_type(changes, current=job.schedule_type)
        forbidden = _schedule_permissions(changes.get("capabilities", []))
        if not _harmless(changes):
            _refuse_wider_job(job, changes, context)
        try:
            lifecycle.validate_input(changes, partial=True)
        except lifecycle.ScheduleInvalid as exc:
            raise _invalid(exc, "updated") from None
        if "capabilities" in changes:
            beyond = [
                p.text
                for p in lenient_capability_set(changes["capabilities"])
                if not context.capabilities.allows(p) and p.text not in forbidden
            ]
            _refuse_capabilities(forbidden, beyond, "updated")
        try:
            job = lifecycle.update_job(job, changes, now=now, ceiling=context.capabilities)
        except lifecycle.ScheduleInvalid as exc:
            raise _invalid(exc, "updated") from None
        except lifecycle.CapabilitiesExceeded as exc:
            raise _capabilities_error(exc.missing, "updated") from None
        except lifecycle.JobGone:
            raise ToolError(f"id: there is no schedule {args['id']} of yours") from None
        return _answer("updated", job, f"Updated schedule {job.pk}; the next run uses it.")

    def _delete(self, args: dict[str, Any], context: ToolContext) -> str:
        if "id" not in args:
            raise ToolError("id: required for delete")
        job = _own_job(context.user, args["id"])
        if not lifecycle.soft_delete(job):
            raise ToolError(f"id: there is no schedule {args['id']} of yours")
        return json.dumps(
            {
                "result": "deleted",
                "id": job.pk,
                "name": job.name,
                "message": f"Deleted schedule {job.pk}; a run in progress was asked to stop.",
            },
            ensure_ascii=False,
        )

    def _cancel(self, args: dict[str, Any], context: ToolContext) -> str:
        if "id" not in args:
            raise ToolError("id: required for cancel")
        job = _own_job(context.user, args["id"])
        execution = lifecycle.request_cancel(job)
        if execution is None:
            raise ToolError(
                f"id: no run of schedule {job.pk} is in progress, so there is nothing to cancel "
                "(to stop future runs, update it with enabled=false, or delete it)"
            )
        return json.dumps(
            {
                "result": "cancel_requested",
                "id": job.pk,
                "execution": {
                    "id": execution.pk,
                    "scheduled_for": _utc_text(execution.scheduled_for),
                    "cancel_requested_at": _utc_text(execution.cancel_requested_at),
                },
                "message": "The run in progress stops within a few seconds; the schedule "
                "itself stays.",
            },
            ensure_ascii=False,
        )


def in_scheduled_run(context: ToolContext) -> bool:
    """Whether the call comes from a scheduled execution rather than an interactive session."""
    return bool(
        context.in_scheduled_run or context.job_id is not None or context.execution_id is not None
    )


# --- input ------------------------------------------------------------------------------------


def _refuse_foreign_fields(action: str, args: dict[str, Any]) -> None:
    foreign = sorted(set(args) - {"action"} - ACTION_FIELDS[action])
    if foreign:
        raise ToolError("; ".join(f"{name}: does not apply to action {action}" for name in foreign))


def _body(args: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    """The lifecycle's create/PATCH body from the tool arguments, natural inputs normalised."""
    body = {key: value for key, value in args.items() if key not in ("action", "id")}
    if "run_at" in body:
        body["run_at"] = normalise_run_at(body["run_at"], now=now)
    return body


def normalise_run_at(value: object, *, now: datetime) -> str:
    """`value` as ISO 8601; raises ToolError naming the field.

    Accepts "in N seconds/minutes/hours/days/weeks" (from `now`, the database's clock), ISO 8601
    with an offset, and ISO 8601 without one, which the lifecycle reads in the schedule's
    `timezone` (`timing.parse_run_at`: a skipped local time refused, a repeated one its first).
    """
    if not isinstance(value, str):
        raise ToolError("run_at: must be a string such as 'in 10 minutes' or an ISO 8601 time")
    relative = _RELATIVE.match(value)
    if relative:
        count_text = relative["count"].lower()
        count = 1 if count_text in ("a", "an", "one") else int(count_text)
        unit = relative["unit"].lower()[0]
        try:
            when = now + timedelta(seconds=count * _UNIT_SECS[unit])
        except OverflowError:
            raise ToolError("run_at: too far ahead") from None
        return when.astimezone(UTC).isoformat()
    try:
        parsed = parse_datetime(value.strip())
    except ValueError:
        parsed = None
    if parsed is None:
        raise ToolError(
            "run_at: use 'in 10 minutes', 'in 2 hours' or an ISO 8601 time such as "
            "2030-01-31T09:00:00+01:00"
        )
    # A time without an offset is read in the zone by the parser the API uses too
    # (`timing.parse_run_at`, through the lifecycle), with the same rules and messages.
    return parsed.isoformat()


def _infer_type(data: dict[str, Any], *, current: str | None) -> None:
    """Set `schedule_type` from the fields given when the model left it out."""
    if "schedule_type" in data:
        return
    if "cron" in data:
        inferred = ScheduleType.CRON
    elif "interval_secs" in data:
        inferred = ScheduleType.INTERVAL
    elif "run_at" in data:
        inferred = ScheduleType.INTERVAL if current == ScheduleType.INTERVAL else ScheduleType.ONCE
    else:
        return
    if inferred != current:
        data["schedule_type"] = str(inferred)


# --- the agent's capability rules -----------------------------------------------------------


def _schedule_permissions(capabilities: object) -> list[str]:
    """The `schedule:` permissions among `capabilities` (canonical), which no child may hold."""
    if not isinstance(capabilities, list):
        return []
    found: list[str] = []
    for text in capabilities:
        try:
            permission = parse_permission(text)
        except InvalidPermission:
            continue  # the lifecycle's validation names it
        if permission.kind == "schedule" and permission.text not in found:
            found.append(permission.text)
    return found


def _refuse_capabilities(forbidden: list[str], beyond: list[str], verb: str) -> None:
    reasons = []
    if forbidden:
        reasons.append(
            "a schedule made by the agent cannot manage schedules, so these are not allowed: "
            + ", ".join(forbidden)
        )
    if beyond:
        reasons.append("beyond this session's capabilities: " + ", ".join(beyond))
    if reasons:
        raise ToolError(f"capabilities: {'; '.join(reasons)}; nothing was {verb}")


def _capabilities_error(missing: list[str], verb: str) -> ToolError:
    return ToolError(
        f"capabilities: beyond this session's capabilities: {', '.join(missing)}; "
        f"nothing was {verb}"
    )


def _harmless(changes: dict[str, Any]) -> bool:
    return all(
        name in HARMLESS_CHANGES or (name == "enabled" and value is False)
        for name, value in changes.items()
    )


def _refuse_wider_job(job: Job, changes: dict[str, Any], context: ToolContext) -> None:
    """Refuse to change what runs, or when, for a job holding more than this session may give.

    Otherwise a narrow session could re-prompt (or re-enable) a job made through the API with
    wider capabilities and so use them.
    """
    if "capabilities" in changes:
        return  # the new capabilities are checked instead; the old ones are replaced
    held = lenient_capability_set(job.capabilities if isinstance(job.capabilities, list) else [])
    wider = [p.text for p in held if p.kind == "schedule" or not context.capabilities.allows(p)]
    if wider:
        raise ToolError(
            f"id: schedule {job.pk} holds capabilities this session cannot give "
            f"({', '.join(wider)}), so the agent may only rename, disable or delete it; "
            "nothing was updated"
        )


def _own_job(owner: User, job_id: int) -> Job:
    job = lifecycle.jobs_of(owner).filter(pk=job_id).first()
    if job is None:
        raise ToolError(f"id: there is no schedule {job_id} of yours")
    return job


# --- near-duplicates ----------------------------------------------------------------------------


def near_duplicate(owner: User, values: dict[str, Any], spec: ScheduleSpec) -> Job | None:
    """An enabled live job of `owner` equivalent to the validated request, or None.

    Equivalent: the same prompt and capabilities, and a once time within DUPLICATE_WINDOW, the
    same interval, or the same cron in the same zone.
    """
    candidates = lifecycle.jobs_of(owner).filter(
        enabled=True,
        prompt=values["prompt"],
        schedule_type=spec.schedule_type,
        next_run_at__isnull=False,
    )
    if spec.schedule_type == ScheduleType.ONCE:
        assert spec.run_at is not None
        candidates = candidates.filter(
            run_at__gte=spec.run_at - DUPLICATE_WINDOW, run_at__lte=spec.run_at + DUPLICATE_WINDOW
        )
    elif spec.schedule_type == ScheduleType.INTERVAL:
        candidates = candidates.filter(interval_secs=spec.interval_secs)
    else:
        candidates = candidates.filter(cron=spec.cron, timezone=spec.timezone)
    wanted = sorted(values.get("capabilities", []))
    for job in candidates.order_by("id")[:20]:
        if sorted(job.capabilities or []) == wanted:
            return job
    return None


# --- output -------------------------------------------------------------------------------------


def _describe(job: Job, *, prompt_chars: int | None = None) -> dict[str, Any]:
    data = dict(ScheduleSerializer(job).data)
    data["next_runs"] = [
        {"local": local.isoformat(), "utc": _utc_text(utc)}
        for local, utc in upcoming_runs(job, PREVIEW_COUNT)
    ]
    if prompt_chars is not None and len(job.prompt) > prompt_chars:
        data["prompt"] = job.prompt[:prompt_chars] + "…"
    return data


def _answer(result: str, job: Job, message: str) -> str:
    described = _describe(job)
    runs = described["next_runs"]
    if runs:
        times = ", ".join(run["local"] for run in runs)
        message += f" Next runs ({job.timezone}): {times}. Confirm these times with the user."
    else:
        message += " It has no upcoming run."
    return json.dumps(
        {"result": result, "message": message, "schedule": described}, ensure_ascii=False
    )


def _utc_text(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _invalid(exc: lifecycle.ScheduleInvalid, verb: str) -> ToolError:
    reasons = "; ".join(f"{field}: {' '.join(messages)}" for field, messages in exc.errors.items())
    return ToolError(f"invalid schedule ({reasons}); nothing was {verb}")
