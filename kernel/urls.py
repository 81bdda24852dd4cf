"""REST routes of the kernel."""

from __future__ import annotations

from django.urls import path

from kernel import views

urlpatterns = [
    path("me", views.MeView.as_view(), name="me"),
    path("chat", views.ChatView.as_view(), name="chat"),
]
