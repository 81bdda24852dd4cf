"""The queue in the operator console: schedules, executions and workers.

Every change an operator makes goes through `schedules.lifecycle`, the functions the API uses:
the form is validated by the API's own rules, and the actions (run now, cancel, enable,
disable, delete) are the lifecycle's conditional updates, never a `save()` of a stale row.
Each action is recorded in the admin's log with the operator who made it. Heartbeat jobs are
read-only: the config file is their source of truth (`loadheartbeats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from django import forms
from django.contrib import admin, messages
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from kernel.admin import ConsoleMedia, ReadOnlyAdmin, admin_link
from kernel.forms import PermissionListField
from kernel.models import ToolCall, User
from kernel.permissions import CapabilitySet, InvalidPermission, interpreters_in
from schedules import lifecycle
from schedules.dbtime import db_now
from schedules.models import Execution, Job, Origin, ScheduleType, Worker
from schedules.quotas import QuotaExceeded, check_can_create
from schedules.serializers import WRITABLE_FIELDS, upcoming_runs
from schedules.timing import describe_cron

HEARTBEAT_NOTE = (
    "This is a heartbeat: the [heartbeats] section of the config file is its source of truth. "
    "Edit the file and run loadheartbeats (runworker does at start) to change it."
)
LAST_EXECUTIONS = 10
STATE_FIELDS = (
    "next_run_at",
    "last_run_at",
    "execution_count",
    "consecutive_failures",
    "last_error",
    "schedule_version",
    "claimed_by",
    "lease_expires_at",
    "deleted_at",
    "created_at",
    "updated_at",
)
# The API's writable fields, less the notify settings, which the form does not edit (an owner's
# contacts and channels are theirs to choose through the API).
FORM_FIELDS = tuple(f for f in WRITABLE_FIELDS if f not in ("notify_on", "notify_channels"))
FIELD_HELP = {
    "schedule_type": "once: run_at. interval: interval_secs (and an optional first run_at). "
    "cron: cron.",
    "cron": "5 fields, or 6 with seconds first.",
    "timezone": "An IANA time zone name, e.g. Europe/Paris.",
}


def secs_between(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "—"
    return f"{(end - start).total_seconds():.2f} s"


class JobForm(forms.ModelForm):
    """The schedule form: the API's validation (`lifecycle.check_create/check_update`) decides."""

    capabilities = PermissionListField(
        required=False,
        help_text="One permission per line; must be within the owner's grant. Default: none.",
    )

    class Meta:
        model = Job
        fields = ("owner", *FORM_FIELDS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "owner" in self.fields:
            self.fields["owner"].queryset = User.objects.filter(is_system=False)
        for name, text in FIELD_HELP.items():
            if name in self.fields:
                self.fields[name].help_text = text
        self.lifecycle_values: dict[str, Any] = {}

    def _api_value(self, name: str) -> Any:
        value = self.cleaned_data.get(name)
        if isinstance(value, datetime):
            return value.isoformat()
        return value

    def _api_body(self, names: Iterable[str]) -> dict[str, Any]:
        body = {name: self._api_value(name) for name in names if name in self.cleaned_data}
        return {
            k: v for k, v in body.items() if not (k == "cron" and v == "" and not self.instance.pk)
        }

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        try:
            if self.instance.pk is None:
                owner = cleaned["owner"]
                body = {k: v for k, v in self._api_body(FORM_FIELDS).items() if v is not None}
                lifecycle.check_create(owner, body, now=db_now())
                check_can_create(owner, db_now())
            else:
                body = self._api_body(n for n in FORM_FIELDS if n in self.changed_data)
                lifecycle.check_update(self.instance, body)
        except lifecycle.ScheduleInvalid as exc:
            self._add_lifecycle_errors(exc.errors)
        except lifecycle.CapabilitiesExceeded as exc:
            self.add_error("capabilities", f"Beyond the owner's grant: {', '.join(exc.missing)}")
        except QuotaExceeded as exc:
            self.add_error(None, str(exc))
        else:
            self.lifecycle_values = body
        return cleaned

    def _add_lifecycle_errors(self, errors: dict[str, list[str]]) -> None:
        for field, reasons in errors.items():
            target = field if field in self.fields else None
            prefix = "" if target else f"{field}: "
            for reason in reasons:
                self.add_error(target, prefix + reason)


class LastStatusFilter(admin.SimpleListFilter):
    title = "failing"
    parameter_name = "failing"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "failing (consecutive failures)"), ("no", "not failing")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        if self.value() == "yes":
            return queryset.filter(consecutive_failures__gt=0)
        if self.value() == "no":
            return queryset.filter(consecutive_failures=0)
        return queryset


class DeletedFilter(admin.SimpleListFilter):
    """Deleted schedules are hidden unless asked for, as in the API."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("deleted", "deleted"), ("all", "all")]

    def choices(self, changelist: Any) -> Any:
        for choice in super().choices(changelist):
            if choice["display"] == "All":
                choice["display"] = "live"
            yield choice

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        if self.value() == "deleted":
            return queryset.filter(deleted_at__isnull=False)
        if self.value() == "all":
            return queryset
        return queryset.filter(deleted_at__isnull=True)


class ExecutionInline(admin.TabularInline):
    """The last executions of a schedule (read-only, newest first)."""

    model = Execution
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("scheduled_for", "attempt", "status", "started_at", "finished_at", "worker_id")
    readonly_fields = fields
    ordering = ("-id",)
    verbose_name_plural = f"last {LAST_EXECUTIONS} executions"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Execution]:
        return super().get_queryset(request).order_by("-id")

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        formset = super().get_formset(request, obj, **kwargs)
        original = formset.get_queryset

        def newest(self_: Any) -> QuerySet[Execution]:
            ids = list(original(self_).values_list("id", flat=True)[:LAST_EXECUTIONS])
            return Execution.objects.filter(id__in=ids).order_by("-id")

        formset.get_queryset = newest
        return formset

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _each(
    verb: str, apply: Callable[[Job], str | None]
) -> Callable[[JobAdmin, HttpRequest, QuerySet[Job]], None]:
    """An admin action that applies a lifecycle function to each selected job, logs who did
    it, and reports which jobs it could not change and why."""

    def action(model_admin: JobAdmin, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        done: list[str] = []
        refused: list[str] = []
        for job in queryset.select_related("owner"):
            reason = apply(job)
            if reason:
                refused.append(f"{job}: {reason}")
                continue
            done.append(str(job))
            model_admin.log_change(request, job, f"{verb} (from the admin)")
        if done:
            model_admin.message_user(request, f"{verb}: {', '.join(done)}.")
        for line in refused:
            model_admin.message_user(request, f"Not {verb.lower()}: {line}", messages.WARNING)

    action.__name__ = verb.lower().replace(" ", "_")
    return action


def _run_now(job: Job) -> str | None:
    if job.deleted_at is not None:
        return "deleted"
    if not job.enabled:
        return "disabled; enable it first"
    return None if lifecycle.run_now(job) else "it is running now (or was just claimed)"


def _cancel(job: Job) -> str | None:
    return None if lifecycle.request_cancel(job) else "no execution is running"


def _set_enabled(enabled: bool) -> Callable[[Job], str | None]:
    def apply(job: Job) -> str | None:
        if job.heartbeat_name:
            return "a heartbeat; the config file decides whether it is enabled"
        try:
            lifecycle.update_job(job, {"enabled": enabled})
        except lifecycle.ScheduleInvalid as exc:
            return str(exc)
        except lifecycle.JobGone:
            return "deleted"
        return None

    return apply


def _delete(job: Job) -> str | None:
    if job.heartbeat_name:
        return "a heartbeat; remove it from the config file"
    return None if lifecycle.soft_delete(job) else "already deleted"


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    form = JobForm
    list_display = (
        "name",
        "owner_link",
        "schedule_type",
        "schedule_in_words",
        "timezone",
        "next_run_local",
        "enabled",
        "last_status",
        "consecutive_failures",
        "origin",
    )
    list_filter = (
        DeletedFilter,
        "schedule_type",
        "enabled",
        "origin",
        LastStatusFilter,
        "owner",
    )
    search_fields = ("name", "prompt", "owner__username")
    list_select_related = ("owner",)
    list_per_page = 50
    show_full_result_count = False
    inlines = [ExecutionInline]
    Media = ConsoleMedia
    actions = [
        _each("Run now", _run_now),
        _each("Cancel", _cancel),
        _each("Enabled", _set_enabled(True)),
        _each("Disabled", _set_enabled(False)),
        _each("Deleted", _delete),
    ]
    readonly_fields = (
        "heartbeat_note",
        "origin",
        "schedule_in_words",
        "next_five_runs",
        "capability_list",
        *STATE_FIELDS,
    )

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        for name, label in (
            ("run_now", "Run now"),
            ("cancel", "Cancel the running execution"),
            ("enabled", "Enable"),
            ("disabled", "Disable"),
            ("deleted", "Delete (soft; history is kept)"),
        ):
            if name in actions:
                func, key, _ = actions[name]
                actions[name] = (func, key, f"{label} selected schedules")
        return actions

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        last_status = (
            Execution.objects.filter(job=OuterRef("pk")).order_by("-id").values("status")[:1]
        )
        return super().get_queryset(request).annotate(last_status=Subquery(last_status))

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return [(None, {"fields": ("owner", *FORM_FIELDS)})]
        overview = (
            "owner_link",
            "origin",
            "schedule_in_words",
            "next_five_runs",
            "capability_list",
        )
        if obj.heartbeat_name:
            overview = ("heartbeat_note", *overview)
        return [
            ("Overview", {"fields": overview}),
            ("Schedule" if obj.heartbeat_name else "Edit", {"fields": FORM_FIELDS}),
            ("State", {"fields": STATE_FIELDS}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return ("owner_link", *self.readonly_fields)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and (obj.heartbeat_name or obj.deleted_at is not None):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting is the soft-delete action: a hard delete would drop the history.
        return False

    def save_model(self, request: HttpRequest, obj: Job, form: JobForm, change: bool) -> None:
        body = form.lifecycle_values
        if change:
            if body:
                lifecycle.update_job(obj, body)
            return
        job = lifecycle.create_job(obj.owner, body, origin=Origin.ADMIN)
        obj.pk = job.pk
        obj.refresh_from_db()

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.inlines if obj is not None else []

    @admin.display(description="owner", ordering="owner__username")
    def owner_link(self, obj: Job) -> SafeString | str:
        return admin_link(obj.owner)

    @admin.display(description="schedule")
    def schedule_in_words(self, obj: Job) -> str:
        if obj.schedule_type == ScheduleType.CRON:
            return f"{describe_cron(obj.cron)} ({obj.cron})"
        if obj.schedule_type == ScheduleType.INTERVAL:
            return f"every {obj.interval_secs} s"
        return "once" if obj.run_at is None else f"once, at {obj.run_at.isoformat()}"

    @admin.display(description="next run (job's zone)", ordering="next_run_at")
    def next_run_local(self, obj: Job) -> str:
        if obj.next_run_at is None or not obj.enabled or obj.deleted_at is not None:
            return "—"
        return obj.next_run_at.astimezone(ZoneInfo(obj.timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")

    @admin.display(description="last status")
    def last_status(self, obj: Job) -> str:
        return getattr(obj, "last_status", None) or "—"

    @admin.display(description="heartbeat")
    def heartbeat_note(self, obj: Job) -> str:
        return HEARTBEAT_NOTE if obj.heartbeat_name else "—"

    @admin.display(description="next five runs")
    def next_five_runs(self, obj: Job) -> SafeString | str:
        runs = upcoming_runs(obj, 5)
        if not runs:
            return "none (disabled, deleted or finished)"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td></tr>",
            ((local.isoformat(), utc.isoformat()) for local, utc in runs),
        )
        return format_html("<table><tr><th>{}</th><th>UTC</th></tr>{}</table>", obj.timezone, rows)

    @admin.display(description="capabilities")
    def capability_list(self, obj: Job) -> SafeString | str:
        capabilities = list(obj.capabilities or [])
        if not capabilities:
            return "none"
        lines = format_html_join("", "<li><code>{}</code></li>", ((c,) for c in capabilities))
        warning = _interpreter_warning(capabilities)
        return format_html("<ul>{}</ul>{}", lines, warning)


def _interpreter_warning(capabilities: list[str]) -> SafeString | str:
    try:
        risky = interpreters_in(CapabilitySet.parse(capabilities))
    except InvalidPermission:
        return ""
    if not risky:
        return ""
    return format_html(
        '<p class="errornote">Interpreters ({}) amount to shell:* — they can run anything.</p>',
        ", ".join(risky),
    )


class ToolCallInline(admin.TabularInline):
    """The audit of a run: every tool call, allowed or denied, with redacted arguments."""

    model = ToolCall
    extra = 0
    can_delete = False
    fields = (
        "created_at",
        "tool",
        "decision",
        "missing_permission",
        "arguments",
        "error",
        "duration_ms",
    )
    readonly_fields = fields
    ordering = ("id",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Execution)
class ExecutionAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "job_link",
        "owner_link",
        "scheduled_for",
        "attempt",
        "status",
        "lag",
        "duration",
        "worker_id",
    )
    list_filter = (
        "status",
        "scheduled_for",
        "started_at",
        "job__owner",
    )
    search_fields = ("job__name", "job__owner__username", "worker_id")
    list_select_related = ("job__owner",)
    list_per_page = 50
    show_full_result_count = False
    inlines = [ToolCallInline]
    Media = ConsoleMedia
    fields = (
        "job_link",
        "owner_link",
        "scheduled_for",
        "attempt",
        "status",
        "started_at",
        "finished_at",
        "lag",
        "duration",
        "worker_id",
        "missed_count",
        "cancel_requested_at",
        "prompt_block",
        "capability_list",
        "output_block",
        "error_block",
        "prompt_tokens",
        "completion_tokens",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Execution]:
        return super().get_queryset(request).select_related("job__owner")

    @admin.display(description="schedule", ordering="job__name")
    def job_link(self, obj: Execution) -> SafeString | str:
        return admin_link(obj.job)

    @admin.display(description="owner")
    def owner_link(self, obj: Execution) -> SafeString | str:
        return admin_link(obj.job.owner)

    @admin.display(description="lag")
    def lag(self, obj: Execution) -> str:
        return secs_between(obj.scheduled_for, obj.started_at)

    @admin.display(description="duration")
    def duration(self, obj: Execution) -> str:
        return secs_between(obj.started_at, obj.finished_at)

    @admin.display(description="prompt")
    def prompt_block(self, obj: Execution) -> SafeString:
        return format_html('<pre class="picobot-text">{}</pre>', obj.prompt)

    @admin.display(description="output")
    def output_block(self, obj: Execution) -> SafeString:
        return format_html('<pre class="picobot-text">{}</pre>', obj.output or "—")

    @admin.display(description="error")
    def error_block(self, obj: Execution) -> SafeString:
        return format_html('<pre class="picobot-text">{}</pre>', obj.error or "—")

    @admin.display(description="capabilities")
    def capability_list(self, obj: Execution) -> SafeString | str:
        return JobAdmin.capability_list(None, obj)  # type: ignore[arg-type]


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ("worker_id", "host", "pid", "started_at", "last_seen_at", "slots", "alive")
    list_per_page = 50
    ordering = ("-last_seen_at",)
    Media = ConsoleMedia

    @admin.display(description="slots busy")
    def slots(self, obj: Worker) -> str:
        return f"{obj.slots_busy} / {obj.concurrency}"

    @admin.display(boolean=True)
    def alive(self, obj: Worker) -> bool:
        return obj.is_alive(db_now())
