"""URL routes: the admin, the versioned REST API and its OpenAPI schema."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

urlpatterns = [
    path("admin/", admin.site.urls),
    path(
        "api/v1/schema",
        SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]),
        name="schema",
    ),
    path("api/v1/", include("kernel.urls")),
    path("api/v1/", include("schedules.urls")),
    path("api/v1/", include("notifications.urls")),
]
