"""`GET /api/v1/chat/sessions[/{id}]`: the caller's own chat sessions, read-only.

Separate from the chat turn itself (`kernel.views.ChatView`): listing sessions and reading their
history never runs the agent."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import exceptions, serializers
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet

from kernel.models import ChatSession

PAGINATION_PARAMS = frozenset({"limit", "offset"})


class ChatMessageSerializer(serializers.Serializer):
    role = serializers.CharField(help_text="user, assistant or tool.")
    content = serializers.CharField(allow_null=True, allow_blank=True)
    tool_calls = serializers.ListField(
        child=serializers.CharField(),
        help_text="assistant messages: the names of the tools the model called.",
    )


class ChatSessionSummarySerializer(serializers.ModelSerializer):
    message_count = serializers.SerializerMethodField()

    class Meta:
        model = ChatSession
        fields = ("id", "capabilities", "message_count", "created_at", "updated_at")
        read_only_fields = fields

    def get_message_count(self, session: ChatSession) -> int:
        return len(session.messages) if isinstance(session.messages, list) else 0


class ChatSessionSerializer(ChatSessionSummarySerializer):
    messages = serializers.SerializerMethodField(
        help_text="The history the model sees (the most recent turns), oldest first."
    )

    class Meta(ChatSessionSummarySerializer.Meta):
        fields = (*ChatSessionSummarySerializer.Meta.fields, "messages")
        read_only_fields = fields

    @extend_schema_field(ChatMessageSerializer(many=True))
    def get_messages(self, session: ChatSession) -> list[dict[str, Any]]:
        messages = session.messages if isinstance(session.messages, list) else []
        return [_message(entry) for entry in messages if isinstance(entry, dict)]


def _message(entry: dict[str, Any]) -> dict[str, Any]:
    calls = entry.get("tool_calls") or []
    return {
        "role": str(entry.get("role", "")),
        "content": entry.get("content") if isinstance(entry.get("content"), str) else None,
        "tool_calls": [
            str((call.get("function") or {}).get("name", ""))
            for call in calls
            if isinstance(call, dict)
        ],
    }


class Pagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 100


_not_found = OpenApiResponse(
    inline_serializer("NotFound", {"detail": serializers.CharField()}),
    description="No such chat session of yours.",
    examples=[OpenApiExample("Not found", value={"detail": "No such chat session."})],
)


@extend_schema_view(
    list=extend_schema(
        operation_id="list_chat_sessions",
        summary="List your chat sessions",
        description="Most recently used first, in a limit/offset envelope, without the history.",
        responses={200: ChatSessionSummarySerializer(many=True)},
    ),
    retrieve=extend_schema(
        operation_id="get_chat_session",
        summary="Show a chat session",
        description="One of your chat sessions with its capabilities and history; continue it "
        "with POST /api/v1/chat and its `session_id`.",
        parameters=[OpenApiParameter("id", int, OpenApiParameter.PATH)],
        responses={200: ChatSessionSerializer, 404: _not_found},
    ),
)
class ChatSessionViewSet(GenericViewSet):
    """The caller's own chat sessions; another user's is a 404."""

    serializer_class = ChatSessionSerializer
    pagination_class = Pagination
    metadata_class = None
    http_method_names = ["get"]
    queryset = ChatSession.objects.none()
    lookup_value_regex = "[^/]+"

    @property
    def allowed_query_params(self) -> frozenset[str]:
        return PAGINATION_PARAMS if self.action == "list" else frozenset()

    def get_queryset(self) -> Any:
        return ChatSession.objects.filter(owner=self.request.user).order_by("-updated_at", "-id")

    def get_object(self) -> ChatSession:
        try:
            return super().get_object()
        except Http404:
            raise exceptions.NotFound("No such chat session.") from None

    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(ChatSessionSummarySerializer(page, many=True).data)

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(self.get_serializer(self.get_object()).data)
