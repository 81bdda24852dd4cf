"""The API's own pages: the index, the docs and schema pages, and readable schema names.

The rules every route shares (unknown query parameters, the 415 wording) are in
`picobot_site.api_rules`."""

from __future__ import annotations

import html
from typing import Any

from django.urls import reverse
from drf_spectacular.renderers import OpenApiYamlRenderer
from drf_spectacular.utils import extend_schema, inline_serializer
from drf_spectacular.views import SpectacularAPIView
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from picobot_site.api_rules import KnownQueryParams

# The API's routes as the index lists them: (method, path, what it does).
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/api/v1/me", "who your key belongs to, and your grant"),
    ("POST", "/api/v1/schedules", "create a schedule"),
    ("GET", "/api/v1/schedules", "list your schedules (filters: enabled, schedule_type, name)"),
    ("GET", "/api/v1/schedules/{id}", "show a schedule"),
    ("PATCH", "/api/v1/schedules/{id}", "change a schedule (the next run on)"),
    ("DELETE", "/api/v1/schedules/{id}", "delete a schedule (cancels a running execution)"),
    ("GET", "/api/v1/schedules/{id}/executions", "a schedule's executions, newest first"),
    ("POST", "/api/v1/schedules/{id}/cancel", "cancel the running execution"),
    ("GET", "/api/v1/executions", "executions of all your schedules (filters: status, time)"),
    ("GET", "/api/v1/executions/{id}", "show an execution"),
    ("POST", "/api/v1/chat", "one interactive agent turn"),
    ("GET", "/api/v1/chat/sessions", "your chat sessions, most recent first"),
    ("GET", "/api/v1/chat/sessions/{id}", "a chat session with its history"),
)


class ApiIndexView(APIView):
    """The API's front page for clients: where the docs, the schema and the routes are."""

    authentication_classes: list[Any] = []
    permission_classes = [KnownQueryParams]

    @extend_schema(
        operation_id="api_index",
        summary="The API's index",
        description="Links to the documentation, the OpenAPI schema and every route. Public.",
        responses=inline_serializer(
            "ApiIndex",
            {
                "name": serializers.CharField(),
                "version": serializers.CharField(),
                "docs": serializers.URLField(),
                "schema": serializers.URLField(),
                "authentication": serializers.CharField(),
                "routes": serializers.ListField(child=serializers.DictField()),
            },
        ),
    )
    def get(self, request: Request) -> Response:
        return Response(
            {
                "name": "PicoBot Scheduler API",
                "version": "1",
                "docs": request.build_absolute_uri(reverse("api-docs")),
                "schema": request.build_absolute_uri(reverse("schema")),
                "authentication": "Authorization: Bearer <key> (manage.py createapikey USERNAME)",
                "routes": [
                    {"method": method, "path": path, "description": text}
                    for method, path, text in ROUTES
                ],
            }
        )


class SchemaAsHtmlRenderer(OpenApiYamlRenderer):
    """The YAML schema shown in a browser (which asks for text/html) instead of downloaded."""

    media_type = "text/html"
    format = "html"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None):
        text = super().render(data, accepted_media_type, renderer_context).decode("utf-8")
        page = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<title>PicoBot Scheduler API schema</title></head><body>"
            "<p>The OpenAPI schema of this API, in YAML. Readable documentation: "
            f"<a href='{reverse('api-docs')}'>{reverse('api-docs')}</a>. Tools get YAML by default and JSON with "
            "<code>Accept: application/json</code>.</p>"
            f"<pre>{html.escape(text)}</pre></body></html>"
        )
        return page.encode("utf-8")


class SchemaView(SpectacularAPIView):
    """YAML for tools (`*/*`), JSON on `Accept: application/json`, a page for browsers."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    renderer_classes = [*SpectacularAPIView.renderer_classes, SchemaAsHtmlRenderer]

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any):
        response = super().finalize_response(request, response, *args, **kwargs)
        if getattr(getattr(request, "accepted_renderer", None), "format", None) == "html":
            response.headers.pop("Content-Disposition", None)  # a page, not a file
        return response


# Operations whose views do not name themselves: drf-spectacular's default ids read badly in
# generated clients (`chat_create`).
OPERATION_IDS = {
    "me_retrieve": "get_me",
    "chat_create": "chat",
    "contacts_list": "list_contacts",
    "contacts_create": "create_contact",
    "contacts_destroy": "delete_contact",
    "contacts_verify_create": "verify_contact",
}
SUMMARIES = {"get_me": "Who am I", "chat": "One interactive agent turn"}
DESCRIPTIONS = {
    "get_me": "The username your key belongs to and your grant.",
    "list_contacts": "Your contacts on every channel, verified or not, oldest first.",
    "create_contact": "Adds a WhatsApp number or a webhook URL and sends it a verification "
    "code; it receives nothing else until verified.",
    "delete_contact": "Removes the contact; it receives nothing more.",
    "verify_contact": "Marks the contact verified when the code it received is right.",
}


def readable_operations(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Schema postprocessing: readable operation ids and a summary for every operation."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "operationId" not in operation:
                continue
            operation_id = OPERATION_IDS.get(operation["operationId"], operation["operationId"])
            operation["operationId"] = operation_id
            if operation_id in SUMMARIES:
                operation.setdefault("summary", SUMMARIES[operation_id])
            if operation_id in DESCRIPTIONS:
                operation.setdefault("description", DESCRIPTIONS[operation_id])
    return result


def _share_field_errors(result: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Every 400 body is `{field: [reason, ...]}`: one `FieldErrors` component instead of an
    inline schema (and a generated class) per operation."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            response = (
                operation.get("responses", {}).get("400") if isinstance(operation, dict) else None
            )
            for media in (response or {}).get("content", {}).values():
                schema = media.get("schema", {})
                if schema.get("type") == "object" and "additionalProperties" in schema:
                    schemas["FieldErrors"] = schema
                    media["schema"] = {"$ref": "#/components/schemas/FieldErrors"}


def readable_component_names(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Schema postprocessing: `ChatRequestRequest` -> `ChatRequest`, `ScheduleInputRequest` ->
    `ScheduleInput`. drf-spectacular suffixes request-only components with `Request`; where no
    response component takes the plain name, the suffix only makes generated code stutter."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    _share_field_errors(result, schemas)
    renames = {
        name: name[: -len("Request")]
        for name in list(schemas)
        if name.endswith("Request") and name[: -len("Request")] not in schemas
    }
    for old, new in renames.items():
        schemas[new] = schemas.pop(old)
    refs = {
        f"#/components/schemas/{old}": f"#/components/schemas/{new}" for old, new in renames.items()
    }

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: refs.get(value, value) if key == "$ref" else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(result)
