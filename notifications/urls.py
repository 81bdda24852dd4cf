"""Routes of the notifications app, mounted under /api/v1/."""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from notifications.api import ContactViewSet, twilio_status

router = SimpleRouter(trailing_slash=False)
router.register("contacts", ContactViewSet, basename="contact")

urlpatterns = [
    path("notifications/twilio-status", twilio_status, name="twilio-status"),
    *router.urls,
]
