"""URL routes: the admin and its dashboard, /metrics, the versioned REST API, its index, docs
page and OpenAPI schema.

API routes are declared without a trailing slash; `ApiTrailingSlash` makes both forms work."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularSwaggerView

from picobot_site.api import ApiIndexView, SchemaView
from picobot_site.metrics import metrics_view
from schedules.dashboard import dashboard

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="api-docs"), name="home"),
    path("admin/dashboard/", admin.site.admin_view(dashboard), name="picobot-dashboard"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    re_path(r"^api/v1/?$", ApiIndexView.as_view(), name="api-index"),
    path("api/v1/schema", SchemaView.as_view(), name="schema"),
    path(
        "api/v1/docs",
        SpectacularSwaggerView.as_view(
            url_name="schema", authentication_classes=[], permission_classes=[]
        ),
        name="api-docs",
    ),
    path("api/v1/", include("kernel.urls")),
    path("api/v1/", include("schedules.urls")),
    path("api/v1/", include("notifications.urls")),
]
