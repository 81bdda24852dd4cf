"""Serializers of the schedules API: strict input validation and the JSON shapes of responses.

`ScheduleInputSerializer` checks the *shape* of a create or PATCH body (JSON types, lengths,
choices, permission syntax, unknown fields, text the database cannot store). The schedule rules
themselves (time zones, crons, intervals, run times) live in `schedules.timing` and are applied
by `schedules.lifecycle`, which is the single entry point for the API and the `schedule` tool.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from kernel.permissions import canonical_list
from schedules.models import Execution, Job, Misfire, ScheduleType
from schedules.timing import describe_cron, next_after, preview, spec_of

MAX_PROMPT_CHARS = 20_000
MAX_NAME_CHARS = 200
MAX_CRON_CHARS = 200
MAX_TIMEZONE_CHARS = 64
MAX_CAPABILITIES = 100
# The largest value a PostgreSQL `integer` column holds.
MAX_DB_INT = 2_147_483_647
NOTIFY_ON_CHOICES = ("success", "failure")
NOTIFY_CHANNEL_CHOICES = ("whatsapp", "webhook", "console")
NEXT_RUNS_COUNT = 5

WRITABLE_FIELDS = (
    "name",
    "prompt",
    "schedule_type",
    "run_at",
    "interval_secs",
    "cron",
    "timezone",
    "capabilities",
    "enabled",
    "max_executions",
    "timeout_secs",
    "misfire",
    "notify_on",
    "notify_channels",
)
READ_ONLY_FIELDS = (
    "id",
    "next_run_at",
    "last_run_at",
    "execution_count",
    "consecutive_failures",
    "last_error",
    "created_at",
    "updated_at",
    "next_runs",
    "cron_description",
)


def unstorable_text_reason(value: str) -> str | None:
    """Why the database cannot store `value` (NUL, lone surrogates), or None when it can."""
    if "\x00" in value:
        return "NUL characters are not allowed."
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "Lone surrogate characters are not allowed."
    return None


def _find_unstorable(value: object) -> str | None:
    if isinstance(value, str):
        return unstorable_text_reason(value)
    if isinstance(value, list):
        for item in value:
            reason = _find_unstorable(item)
            if reason:
                return reason
    if isinstance(value, dict):
        for key, item in value.items():
            reason = _find_unstorable(key) or _find_unstorable(item)
            if reason:
                return reason
    return None


def printable_key(key: object) -> str:
    """A field name safe to echo back in an error body (no NUL, no lone surrogates)."""
    text = str(key)[:100]
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


# --- strict JSON fields: no coercion between JSON types ---------------------------------------


class StrictCharField(serializers.CharField):
    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    default_error_messages = {"invalid": "Must be an integer."}

    def to_internal_value(self, data: Any) -> int:
        if not isinstance(data, int) or isinstance(data, bool):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictChoiceField(serializers.ChoiceField):
    """A choice field whose error lists the choices and never echoes the input."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str) or data not in self.choices:
            choices = ", ".join(str(c) for c in self.choices)
            raise serializers.ValidationError(f"Must be one of: {choices}.", code="invalid_choice")
        return data


@extend_schema_field(OpenApiTypes.DATETIME)
class AwareDateTimeField(serializers.Field):
    """An ISO 8601 date-time: with an offset it becomes an aware UTC datetime; without one it
    stays naive, for `schedules.timing.parse_run_at` to read in the request's `timezone`."""

    default_error_messages = {
        "invalid": "Must be an ISO 8601 date-time, e.g. 2030-01-31T09:00:00+01:00 (or a local "
        "time such as 2030-01-31T09:00:00 together with `timezone`).",
    }

    def to_internal_value(self, data: Any) -> datetime:
        if not isinstance(data, str) or len(data) > 64:
            self.fail("invalid")
        try:
            parsed = parse_datetime(data.strip())
        except ValueError:
            parsed = None
        if parsed is None:
            self.fail("invalid")
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            return parsed.replace(tzinfo=None)
        try:
            return parsed.astimezone(UTC)
        except (OverflowError, ValueError):
            self.fail("invalid")

    def to_representation(self, value: datetime) -> str:
        return serializers.DateTimeField().to_representation(value)


class PermissionListField(serializers.ListField):
    """A list of permission strings; each malformed one is named in the error."""

    child = StrictCharField(allow_blank=True, trim_whitespace=False)

    def to_internal_value(self, data: Any) -> list[str]:
        if not isinstance(data, list):
            raise serializers.ValidationError("Must be a list of permission strings.")
        if len(data) > MAX_CAPABILITIES:
            raise serializers.ValidationError(f"At most {MAX_CAPABILITIES} permissions.")
        canonical, errors = canonical_list(data)
        if errors:
            raise serializers.ValidationError(list(errors.values()))
        return canonical


class SubsetListField(serializers.ListField):
    """A list of distinct values from fixed choices."""

    child = StrictCharField()

    def __init__(self, *, choices: tuple[str, ...], **kwargs: Any) -> None:
        self.choices_allowed = choices
        # The child documents the values in the schema; to_internal_value checks them.
        kwargs["child"] = serializers.ChoiceField(choices=choices)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[str]:
        allowed = ", ".join(self.choices_allowed)
        if not isinstance(data, list):
            raise serializers.ValidationError(f"Must be a list of values from: {allowed}.")
        if not all(isinstance(v, str) and v in self.choices_allowed for v in data):
            raise serializers.ValidationError(f"Every value must be one of: {allowed}.")
        return [v for v in self.choices_allowed if v in data]


# --- input -------------------------------------------------------------------------------------


class ScheduleInputSerializer(serializers.Serializer):
    """The body of POST (all rules) and PATCH (`partial=True`) of a schedule.

    Shape only: `schedules.lifecycle` applies the schedule rules, the grant and the quotas.
    """

    name = StrictCharField(max_length=MAX_NAME_CHARS, required=False)
    prompt = StrictCharField(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        trim_whitespace=False,
        help_text=f"What the agent is asked to do; 1 to {MAX_PROMPT_CHARS} characters.",
    )
    schedule_type = StrictChoiceField(choices=ScheduleType.choices)
    run_at = AwareDateTimeField(
        required=False,
        allow_null=True,
        help_text="once: when to run, in the future. interval: the first run. ISO 8601 with an "
        "offset (2030-01-31T09:00:00+01:00), or a local time without one read in `timezone` "
        "(which must then be given): a local time the clocks skip is refused, one that occurs "
        "twice means its first occurrence.",
    )
    interval_secs = StrictIntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_DB_INT
    )
    cron = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=MAX_CRON_CHARS,
        help_text="5 fields, or 6 with seconds first.",
    )
    timezone = StrictCharField(
        required=False,
        max_length=MAX_TIMEZONE_CHARS,
        help_text="An IANA region name such as Europe/London; default UTC. Abbreviations (EST, "
        "PST8PDT, CET, ...) are refused: use the region, or Etc/GMT+5 / UTC for a fixed offset.",
    )
    capabilities = PermissionListField(
        required=False,
        max_length=MAX_CAPABILITIES,
        help_text="Permission strings the runs may use; default none. Must be within your grant.",
    )
    enabled = StrictBooleanField(required=False)
    max_executions = StrictIntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_DB_INT
    )
    timeout_secs = StrictIntegerField(required=False, min_value=1, max_value=MAX_DB_INT)
    misfire = StrictChoiceField(choices=Misfire.choices, required=False)
    notify_on = SubsetListField(choices=NOTIFY_ON_CHOICES, required=False)
    notify_channels = SubsetListField(
        choices=NOTIFY_CHANNEL_CHOICES,
        required=False,
        allow_null=True,
        help_text="null: every channel where you have a verified contact.",
    )

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if isinstance(data, Mapping):
            errors: dict[str, list[str]] = {}
            for key, value in data.items():
                if key not in WRITABLE_FIELDS:
                    reason = (
                        "This field is read-only." if key in READ_ONLY_FIELDS else "Unknown field."
                    )
                    errors[printable_key(key)] = [reason]
                    continue
                bad_text = _find_unstorable(value)
                if bad_text:
                    errors[key] = [bad_text]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)

    def validate_prompt(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("Must not be blank.")
        return value

    def validate_name(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("Must not be blank.")
        return value

    def validate_timeout_secs(self, value: int) -> int:
        limit = settings.PICOBOT.scheduler.max_timeout_secs
        if value > limit:
            raise serializers.ValidationError(f"Must be at most {limit} (max_timeout_secs).")
        return value


def flatten_errors(detail: Any) -> dict[str, list[str]]:
    """DRF error details as plain `{field: [reason, ...]}`."""
    if isinstance(detail, Mapping):
        flat: dict[str, list[str]] = {}
        for key, value in detail.items():
            flat[str(key)] = _messages(value)
        return flat
    return {"non_field_errors": _messages(detail)}


def _messages(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [m for v in value.values() for m in _messages(v)]
    if isinstance(value, list | tuple):
        return [m for v in value for m in _messages(v)]
    return [str(value)]


# --- output ------------------------------------------------------------------------------------


def upcoming_runs(job: Job, count: int) -> list[tuple[datetime, datetime]]:
    """The job's next `count` fire times as (local, UTC); none when it will not run again.

    A pending retry comes first, then the occurrences after the one it retries.
    """
    if not job.enabled or job.next_run_at is None or count <= 0:
        return []
    spec = spec_of(job)
    if job.pending_scheduled_for is None:
        return preview(spec, count, job.next_run_at, start=job.next_run_at)
    retry = job.next_run_at.astimezone(UTC)
    following = next_after(spec, job.pending_scheduled_for)
    rest = [] if following is None else preview(spec, count - 1, retry, start=following)
    return [(retry.astimezone(ZoneInfo(spec.timezone)), retry), *rest]


class NextRunSerializer(serializers.Serializer):
    local = serializers.DateTimeField(help_text="In the schedule's time zone.")
    utc = serializers.DateTimeField()


class ScheduleSerializer(serializers.ModelSerializer):
    """A schedule as the API shows it, with its next fire times and a readable cron."""

    capabilities = serializers.ListField(child=serializers.CharField())
    notify_on = serializers.ListField(child=serializers.ChoiceField(choices=NOTIFY_ON_CHOICES))
    notify_channels = serializers.ListField(
        child=serializers.ChoiceField(choices=NOTIFY_CHANNEL_CHOICES), allow_null=True
    )
    next_runs = serializers.SerializerMethodField(
        help_text=f"The next {NEXT_RUNS_COUNT} fire times, in the schedule's zone and in UTC."
    )
    cron_description = serializers.SerializerMethodField(
        help_text="A human-readable reading of `cron` (null for other schedule types)."
    )

    class Meta:
        model = Job
        fields = ("id", *WRITABLE_FIELDS, *READ_ONLY_FIELDS[1:])
        read_only_fields = fields

    def to_representation(self, instance: Job) -> dict[str, Any]:
        # DRF's own loop, with the field list looked up once per serializer rather than once per
        # schedule: a list page shows a hundred of them.
        fields = self.__dict__.get("_shown")
        if fields is None:
            fields = self.__dict__["_shown"] = [
                (name, field) for name, field in self.fields.items() if not field.write_only
            ]
        shown: dict[str, Any] = {}
        for name, field in fields:
            value = field.get_attribute(instance)
            shown[name] = None if value is None else field.to_representation(value)
        if not instance.enabled:
            # A disabled schedule has no next run; re-enabling computes one from then.
            shown["next_run_at"] = None
        return shown

    @extend_schema_field(NextRunSerializer(many=True))
    def get_next_runs(self, job: Job) -> list[dict[str, str]]:
        return [
            {"local": local.isoformat(), "utc": utc.isoformat().replace("+00:00", "Z")}
            for local, utc in upcoming_runs(job, NEXT_RUNS_COUNT)
        ]

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_cron_description(self, job: Job) -> str | None:
        if job.schedule_type != ScheduleType.CRON:
            return None
        return describe_cron(job.cron)


class ExecutionSerializer(serializers.ModelSerializer):
    schedule = serializers.IntegerField(source="job_id", help_text="The schedule's id.")

    class Meta:
        model = Execution
        fields = (
            "id",
            "schedule",
            "scheduled_for",
            "attempt",
            "status",
            "started_at",
            "finished_at",
            "output",
            "error",
            "cancel_requested_at",
        )
        read_only_fields = fields


# --- error bodies (for the OpenAPI schema) -----------------------------------------------------


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class CapabilitiesDeniedSerializer(serializers.Serializer):
    detail = serializers.CharField()
    missing = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="The requested permissions your grant does not allow.",
    )


class QuotaErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    quota = serializers.CharField(
        required=False, help_text="The quota that was exceeded (absent when throttled)."
    )
