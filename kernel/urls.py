"""REST routes of the kernel (chat arrives with its issue) and the other apps' routes."""

from __future__ import annotations

from django.urls import path

from kernel import views

urlpatterns = [
    path("me", views.MeView.as_view(), name="me"),
]
