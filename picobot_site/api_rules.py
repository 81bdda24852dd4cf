"""Rules every API route shares: unknown query parameters refused, a 415 that says what to send.

The kernel and the schedules app never import this module: settings name the exception handler
and the query-parameter check, and a view declares the query parameters it reads in
`allowed_query_params` (a set of names; none when absent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rest_framework import exceptions
from rest_framework.permissions import BasePermission

if TYPE_CHECKING:
    from rest_framework.request import Request
    from rest_framework.response import Response


class KnownQueryParams(BasePermission):
    """400 for a query parameter the view does not read, instead of silently ignoring it.

    Runs after authentication and the views' own permission checks (it is listed last)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        allowed = set(getattr(view, "allowed_query_params", ()))
        unknown = sorted(name for name in request.query_params if name not in allowed)
        if unknown:
            known = ", ".join(sorted(allowed)) or "none"
            raise exceptions.ValidationError(
                {
                    name[:50]: [f"Unknown query parameter. This route accepts: {known}."]
                    for name in unknown
                }
            )
        return True


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, with a 415 that says what to send."""
    # Imported here: DRF loads this module while rest_framework.views is still importing.
    from rest_framework.views import exception_handler

    if isinstance(exc, exceptions.UnsupportedMediaType):
        sent = context["request"].content_type.split(";")[0].strip() or "none"
        exc = exceptions.UnsupportedMediaType(
            sent,
            detail=f'Unsupported media type "{sent}": send a JSON body with the header '
            "`Content-Type: application/json`.",
        )
    return exception_handler(exc, context)
