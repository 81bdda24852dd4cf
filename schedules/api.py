"""The schedules REST API: thin views over `schedules.lifecycle`.

Checks run in DESIGN.md's order: 401 (authentication), 503 (scheduler disabled), 403 (the
route's `schedule:<action>` is not in the caller's grant), 404 (not the caller's, or deleted:
indistinguishable from missing), 400 (field-level reasons), 403 (capabilities beyond the grant,
listed), 429 (quota, named). Requests are also throttled per API key (429).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, status
from rest_framework.decorators import action
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet

from kernel.rest import ApiKeyThrottle, StrictJSONParser
from picobot_site.api_rules import KnownQueryParams
from schedules import lifecycle
from schedules.dbtime import db_now
from schedules.filters import (
    PAGINATION_PARAMS,
    AllExecutionFilters,
    ExecutionFilters,
    ScheduleFilters,
    query_names,
)
from schedules.models import Execution, Job, Origin
from schedules.serializers import (
    CapabilitiesDeniedSerializer,
    ErrorSerializer,
    ExecutionSerializer,
    QuotaErrorSerializer,
    ScheduleInputSerializer,
    ScheduleSerializer,
)

MAX_PAGE_LIMIT = 100

# The route's action -> the `schedule:<action>` permission it needs.
ACTION_PERMISSIONS = {
    "create": "create",
    "list": "list",
    "retrieve": "list",
    "executions": "list",
    "partial_update": "update",
    "destroy": "delete",
    "cancel": "cancel",
}


class SchedulerDisabled(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The scheduler is disabled. Set `enabled = true` under [scheduler] in picobot.toml."
    )
    default_code = "scheduler_disabled"


class QuotaExceededError(exceptions.APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "quota_exceeded"


class NoRunningExecution(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "No execution of this schedule is running."
    default_code = "not_running"


class BodyTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "too_large"


class SchedulerEnabled(BasePermission):
    """503 while `[scheduler] enabled` is false (after authentication, before anything else)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if not settings.PICOBOT.scheduler.enabled:
            raise SchedulerDisabled()
        return True


class HasScheduleAction(BasePermission):
    """The caller's grant must allow the route's `schedule:<action>`."""

    message = "Permission denied."

    def has_permission(self, request: Request, view: Any) -> bool:
        action_name = ACTION_PERMISSIONS.get(getattr(view, "action", None) or "")
        if action_name is None:
            return True  # an unsupported method: the handler answers 405
        required = f"schedule:{action_name}"
        if request.user.capability_set().allows(required):
            return True
        self.message = f"Your grant does not include {required}."
        return False


class Pagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = MAX_PAGE_LIMIT

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.limit_query_param:
                parameter["description"] = (
                    f"Number of results to return (1 to {MAX_PAGE_LIMIT}, default "
                    f"{self.default_limit}; larger values are capped)."
                )
        return parameters


class _ClosedInputSchema(OpenApiSerializerExtension):
    """The input serializer refuses unknown fields; say so in the schema."""

    target_class = "schedules.serializers.ScheduleInputSerializer"

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema = auto_schema._map_basic_serializer(self.target, direction)
        schema["additionalProperties"] = False
        return schema


_FIELD_ERRORS = {
    "type": "object",
    "description": "Field-level reasons: `{field: [reason, ...]}` "
    "(`non_field_errors` for the body as a whole).",
    "additionalProperties": {"type": "array", "items": {"type": "string"}},
}


def _example(name: str, value: dict[str, Any]) -> OpenApiExample:
    return OpenApiExample(name, value=value, response_only=True)


_ERROR_RESPONSES = {
    400: OpenApiResponse(
        _FIELD_ERRORS,
        description="Invalid input: each field named with its reasons.",
        examples=[
            _example(
                "A skipped local time",
                {
                    "run_at": [
                        "2027-03-14T02:30:00 does not exist in America/New_York (the "
                        "clocks skip it): give another time."
                    ]
                },
            ),
            _example(
                "An unknown query parameter",
                {"sort": ["Unknown query parameter. This route accepts: limit, offset."]},
            ),
        ],
    ),
    401: OpenApiResponse(
        ErrorSerializer,
        description="No valid API key.",
        examples=[_example("No key", {"detail": "Authentication credentials were not provided."})],
    ),
    403: OpenApiResponse(
        CapabilitiesDeniedSerializer,
        description="The grant lacks the route's schedule:<action>, or (create, update) "
        "the requested capabilities go beyond the grant; `missing` lists them.",
        examples=[
            _example(
                "Action not granted", {"detail": "Your grant does not include schedule:create."}
            ),
            _example(
                "Capabilities beyond the grant",
                {
                    "detail": "The requested capabilities go beyond your grant: shell:rm",
                    "missing": ["shell:rm"],
                },
            ),
        ],
    ),
    404: OpenApiResponse(
        ErrorSerializer,
        description="No such schedule of yours (another user's and deleted ones look missing).",
        examples=[_example("Not found", {"detail": "Schedule not found."})],
    ),
    409: OpenApiResponse(
        ErrorSerializer,
        description="No execution is running.",
        examples=[_example("Nothing running", {"detail": NoRunningExecution.default_detail})],
    ),
    413: OpenApiResponse(
        ErrorSerializer,
        description="The body is too large.",
        examples=[
            _example("Too large", {"detail": "The request body is larger than 2621440 bytes."})
        ],
    ),
    415: OpenApiResponse(
        ErrorSerializer,
        description="The body is not JSON.",
        examples=[
            _example(
                "A form body",
                {
                    "detail": 'Unsupported media type "application/x-www-form-urlencoded": send a '
                    "JSON body with the header `Content-Type: application/json`."
                },
            )
        ],
    ),
    429: OpenApiResponse(
        QuotaErrorSerializer,
        description="A quota (named in `quota`) or the per-key request rate was exceeded.",
        examples=[
            _example(
                "Quota",
                {
                    "detail": "You hold 50 schedules, the most allowed.",
                    "quota": "max_jobs_per_user",
                },
            )
        ],
    ),
    503: OpenApiResponse(
        ErrorSerializer,
        description="The scheduler is disabled.",
        examples=[_example("Disabled", {"detail": SchedulerDisabled.default_detail})],
    ),
}


def _errors(*codes: int) -> dict[int, OpenApiResponse]:
    return {code: _ERROR_RESPONSES[code] for code in codes}


_ALWAYS = (401, 403, 429, 503)
_LISTS = (400, *_ALWAYS)
_ID = OpenApiParameter("id", int, OpenApiParameter.PATH, description="The schedule's id.")
_EXECUTION_ID = OpenApiParameter(
    "id", int, OpenApiParameter.PATH, description="The execution's id."
)


@extend_schema_view(
    create=extend_schema(
        operation_id="create_schedule",
        summary="Create a schedule",
        description="Schedules `prompt` to run once (`run_at`), every `interval_secs`, or on "
        "`cron` in `timezone`, with exactly `capabilities` (default none; within your grant). "
        "`run_at` may be a local time without an offset when `timezone` is given.",
        request=ScheduleInputSerializer,
        responses={201: ScheduleSerializer, **_errors(400, 413, 415, *_ALWAYS)},
    ),
    list=extend_schema(
        operation_id="list_schedules",
        summary="List your schedules",
        description="Your schedules, newest first, in a limit/offset envelope; filter by "
        "`enabled`, `schedule_type` and `name`.",
        parameters=[ScheduleFilters],
        responses={200: ScheduleSerializer(many=True), **_errors(*_LISTS)},
    ),
    retrieve=extend_schema(
        operation_id="get_schedule",
        summary="Show a schedule",
        description="One of your schedules with its next five fire times. A disabled schedule "
        "has `next_run_at: null`.",
        parameters=[_ID],
        responses={200: ScheduleSerializer, **_errors(404, *_ALWAYS)},
    ),
    partial_update=extend_schema(
        operation_id="update_schedule",
        summary="Change a schedule",
        description="Changes apply from the next run: a running execution keeps what it "
        "started with. Changing the schedule, prompt or capabilities resets the failure count.",
        parameters=[_ID],
        request=ScheduleInputSerializer,
        responses={200: ScheduleSerializer, **_errors(400, 404, 413, 415, *_ALWAYS)},
    ),
    destroy=extend_schema(
        operation_id="delete_schedule",
        summary="Delete a schedule",
        description="Cancels a running execution, then removes the schedule from the API and "
        "from the worker; its history is kept until retention purges it.",
        parameters=[_ID],
        responses={204: None, **_errors(404, *_ALWAYS)},
    ),
    executions=extend_schema(
        operation_id="list_schedule_executions",
        summary="List a schedule's executions",
        description="Newest first, in a limit/offset envelope; filter by `status` and by "
        "scheduled time (`scheduled_after`, `scheduled_before`).",
        parameters=[_ID, ExecutionFilters],
        responses={200: ExecutionSerializer(many=True), **_errors(404, *_LISTS)},
    ),
    cancel=extend_schema(
        operation_id="cancel_schedule_execution",
        summary="Cancel the running execution",
        description="Asks the worker to stop the running execution (within about a second); it "
        "ends `cancelled` and the schedule moves on. 409 when nothing runs.",
        parameters=[_ID],
        request=None,
        responses={202: ExecutionSerializer, **_errors(404, 409, *_ALWAYS)},
    ),
)
class ScheduleViewSet(GenericViewSet):
    """The caller's schedules. Another user's schedule, or a deleted one, is a 404."""

    serializer_class = ScheduleSerializer
    permission_classes = [IsAuthenticated, SchedulerEnabled, HasScheduleAction, KnownQueryParams]
    throttle_classes = [ApiKeyThrottle]
    parser_classes = [StrictJSONParser]
    pagination_class = Pagination
    metadata_class = None
    http_method_names = ["get", "post", "patch", "delete"]
    queryset = Job.objects.none()  # for the schema; get_queryset is what runs
    # Any path segment reaches the view, so a malformed id is the same JSON 404 as a missing one.
    lookup_value_regex = "[^/]+"

    @property
    def allowed_query_params(self) -> frozenset[str]:
        return {
            "list": PAGINATION_PARAMS | query_names(ScheduleFilters),
            "executions": PAGINATION_PARAMS | query_names(ExecutionFilters),
        }.get(self.action or "", frozenset())

    def get_queryset(self) -> Any:
        return lifecycle.jobs_of(self.request.user).order_by("-id")

    def get_object(self) -> Job:
        try:
            return super().get_object()
        except Http404:
            raise exceptions.NotFound("Schedule not found.") from None

    def handle_exception(self, exc: Exception) -> Response:
        return super().handle_exception(_api_exception(exc))

    def create(self, request: Request) -> Response:
        job = lifecycle.create_job(request.user, request.data, origin=Origin.API, now=db_now())
        return Response(self.get_serializer(job).data, status=status.HTTP_201_CREATED)

    def list(self, request: Request) -> Response:
        filters = ScheduleFilters()
        queryset = filters.apply(self.get_queryset(), filters.validate_query(request.query_params))
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(self.get_serializer(self.get_object()).data)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        job = self.get_object()
        job = lifecycle.update_job(job, request.data, now=db_now())
        return Response(self.get_serializer(job).data)

    def destroy(self, request: Request, pk: str | None = None) -> Response:
        lifecycle.soft_delete(self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @action(detail=True, methods=["get"], serializer_class=ExecutionSerializer)
    def executions(self, request: Request, pk: str | None = None) -> Response:
        job = self.get_object()
        filters = ExecutionFilters()
        values = filters.validate_query(request.query_params)
        page = self.paginate_queryset(
            filters.apply(Execution.objects.filter(job=job), values).order_by("-id")
        )
        return self.get_paginated_response(ExecutionSerializer(page, many=True).data)

    @action(detail=True, methods=["post"], serializer_class=ExecutionSerializer)
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        execution = lifecycle.request_cancel(self.get_object())
        if execution is None:
            raise NoRunningExecution()
        return Response(ExecutionSerializer(execution).data, status=status.HTTP_202_ACCEPTED)


@extend_schema_view(
    list=extend_schema(
        operation_id="list_executions",
        summary="List the executions of all your schedules",
        description="Newest first, in a limit/offset envelope; filter by `schedule`, `status` "
        "and scheduled time (`scheduled_after`, `scheduled_before`). Executions of deleted "
        "schedules are not shown.",
        parameters=[AllExecutionFilters],
        responses={200: ExecutionSerializer(many=True), **_errors(*_LISTS)},
    ),
    retrieve=extend_schema(
        operation_id="get_execution",
        summary="Show an execution",
        description="One execution of one of your schedules, with its output and error.",
        parameters=[_EXECUTION_ID],
        responses={200: ExecutionSerializer, **_errors(404, *_ALWAYS)},
    ),
)
class ExecutionViewSet(GenericViewSet):
    """Executions of the caller's (live) schedules."""

    serializer_class = ExecutionSerializer
    permission_classes = [IsAuthenticated, SchedulerEnabled, HasScheduleAction, KnownQueryParams]
    throttle_classes = [ApiKeyThrottle]
    pagination_class = Pagination
    metadata_class = None
    http_method_names = ["get"]
    queryset = Execution.objects.none()
    lookup_value_regex = "[^/]+"

    @property
    def allowed_query_params(self) -> frozenset[str]:
        if self.action == "list":
            return PAGINATION_PARAMS | query_names(AllExecutionFilters)
        return frozenset()

    def get_queryset(self) -> Any:
        return Execution.objects.filter(
            job__owner=self.request.user, job__deleted_at__isnull=True
        ).order_by("-id")

    def get_object(self) -> Execution:
        try:
            return super().get_object()
        except Http404:
            raise exceptions.NotFound("Execution not found.") from None

    def list(self, request: Request) -> Response:
        filters = AllExecutionFilters()
        queryset = filters.apply(self.get_queryset(), filters.validate_query(request.query_params))
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(self.get_serializer(self.get_object()).data)


def _api_exception(exc: Exception) -> Exception:
    """The lifecycle's refusals as the API's answers; other exceptions unchanged."""
    if isinstance(exc, lifecycle.ScheduleInvalid):
        return exceptions.ValidationError(exc.errors)
    if isinstance(exc, lifecycle.CapabilitiesExceeded):
        return exceptions.PermissionDenied(
            {
                "detail": "The requested capabilities go beyond your grant: "
                + ", ".join(exc.missing),
                "missing": exc.missing,
            }
        )
    if isinstance(exc, lifecycle.QuotaExceeded):
        return QuotaExceededError({"detail": exc.message, "quota": exc.quota})
    if isinstance(exc, lifecycle.JobGone):
        return exceptions.NotFound("Schedule not found.")
    if isinstance(exc, RequestDataTooBig):
        return BodyTooLarge(
            f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
        )
    if isinstance(exc, exceptions.ParseError):
        return exceptions.ValidationError({"non_field_errors": [str(exc.detail)]})
    return exc
