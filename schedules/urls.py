"""Routes of the schedules API, mounted under /api/v1/."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from schedules.api import ScheduleViewSet

router = SimpleRouter(trailing_slash=False)
router.register("schedules", ScheduleViewSet, basename="schedule")

urlpatterns = router.urls
