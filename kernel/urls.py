"""REST routes of the kernel."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from kernel import views
from kernel.sessions_api import ChatSessionViewSet

router = SimpleRouter(trailing_slash=False)
router.register("chat/sessions", ChatSessionViewSet, basename="chat-session")

urlpatterns = [
    path("me", views.MeView.as_view(), name="me"),
    path("chat", views.ChatView.as_view(), name="chat"),
    *router.urls,
]
