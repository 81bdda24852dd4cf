"""Request middleware of the site."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

API_PREFIX = "/api/v1/"


class ApiTrailingSlash:
    """Every API route answers with and without a trailing slash (`/api/v1/schedules/` is
    `/api/v1/schedules`), so the routes are declared once, without one, and the schema lists
    each path once."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        if path.startswith(API_PREFIX) and len(path) > len(API_PREFIX) and path.endswith("/"):
            request.path_info = path.rstrip("/") or "/"
        return self.get_response(request)
