"""REST views of the kernel."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView


class MeView(APIView):
    """Who the key belongs to, and what their grant allows."""

    @extend_schema(
        responses=inline_serializer(
            "Me",
            {"username": serializers.CharField(), "grant": serializers.ListField()},
        )
    )
    def get(self, request: Request) -> Response:
        return Response({"username": request.user.username, "grant": list(request.user.grant)})
