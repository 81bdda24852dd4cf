"""Query-string filters of the schedules and executions lists.

Each filter is a serializer of the query string: a bad value is a 400 naming the parameter, the
schema documents the parameters from the same declaration, and `KnownQueryParams` (in the
settings) refuses any parameter a route does not declare.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, serializers

from schedules.models import ExecutionStatus, ScheduleType
from schedules.serializers import AwareDateTimeField, flatten_errors

PAGINATION_PARAMS = frozenset({"limit", "offset"})


class _Strict(serializers.Serializer):
    """A query-string filter: a parameter given twice is refused, not half-read."""

    def validate_query(self, params: Any) -> dict[str, Any]:
        repeated = sorted(name for name in self.fields if len(params.getlist(name)) > 1)
        if repeated:
            raise exceptions.ValidationError(
                {name: ["Give this parameter once."] for name in repeated}
            )
        serializer = type(self)(data={name: params[name] for name in self.fields if name in params})
        if not serializer.is_valid():
            raise exceptions.ValidationError(flatten_errors(serializer.errors))
        return dict(serializer.validated_data)


@extend_schema_field(OpenApiTypes.BOOL)
class QueryBooleanField(serializers.Field):
    """Exactly `true` or `false`."""

    def to_internal_value(self, data: Any) -> bool:
        if data not in ("true", "false"):
            raise serializers.ValidationError("Must be true or false.")
        return data == "true"

    def to_representation(self, value: bool) -> str:
        return "true" if value else "false"


class ScheduleFilters(_Strict):
    enabled = QueryBooleanField(
        required=False, help_text="true: enabled schedules only; false: disabled ones only."
    )
    schedule_type = serializers.ChoiceField(choices=ScheduleType.choices, required=False)
    name = serializers.CharField(
        required=False,
        max_length=200,
        help_text="Schedules whose name contains this text (any case).",
    )

    def apply(self, queryset: QuerySet, values: dict[str, Any]) -> QuerySet:
        if "enabled" in values:
            queryset = queryset.filter(enabled=values["enabled"])
        if "schedule_type" in values:
            queryset = queryset.filter(schedule_type=values["schedule_type"])
        if "name" in values:
            queryset = queryset.filter(name__icontains=values["name"])
        return queryset


class StatusListField(serializers.CharField):
    """One status or several separated by commas: `status=failed,timed_out`."""

    def to_internal_value(self, data: Any) -> list[str]:
        text = super().to_internal_value(data)
        statuses = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [s for s in statuses if s not in ExecutionStatus.values]
        if unknown or not statuses:
            raise serializers.ValidationError(
                f"Must be one or more of: {', '.join(ExecutionStatus.values)} (comma-separated)."
            )
        return statuses


class ExecutionFilters(_Strict):
    status = StatusListField(
        required=False,
        help_text="One status or several, comma-separated: "
        + ", ".join(ExecutionStatus.values)
        + ".",
    )
    scheduled_after = AwareDateTimeField(
        required=False,
        help_text="Executions of occurrences scheduled at or after this time (ISO 8601 with an "
        "offset).",
    )
    scheduled_before = AwareDateTimeField(
        required=False,
        help_text="Executions of occurrences scheduled before this time (ISO 8601 with an offset).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        for name in ("scheduled_after", "scheduled_before"):
            if name in attrs and attrs[name].tzinfo is None:
                raise serializers.ValidationError(
                    {name: ["Give a UTC offset, e.g. 2030-01-31T09:00:00Z."]}
                )
        after, before = attrs.get("scheduled_after"), attrs.get("scheduled_before")
        if after and before and after >= before:
            raise serializers.ValidationError(
                {"scheduled_before": ["Must be later than scheduled_after."]}
            )
        return attrs

    def apply(self, queryset: QuerySet, values: dict[str, Any]) -> QuerySet:
        if "status" in values:
            queryset = queryset.filter(status__in=values["status"])
        if "scheduled_after" in values:
            queryset = queryset.filter(scheduled_for__gte=values["scheduled_after"])
        if "scheduled_before" in values:
            queryset = queryset.filter(scheduled_for__lt=values["scheduled_before"])
        return queryset


class AllExecutionFilters(ExecutionFilters):
    schedule = serializers.IntegerField(
        required=False, min_value=1, help_text="Executions of this schedule of yours only."
    )

    def apply(self, queryset: QuerySet, values: dict[str, Any]) -> QuerySet:
        queryset = super().apply(queryset, values)
        if "schedule" in values:
            queryset = queryset.filter(job_id=values["schedule"])
        return queryset


def query_names(filters: type[serializers.Serializer]) -> frozenset[str]:
    return frozenset(filters().fields)
