"""Routes of the schedules API, mounted under /api/v1/."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from schedules.api import ExecutionViewSet, ScheduleViewSet

router = SimpleRouter(trailing_slash=False)
router.register("schedules", ScheduleViewSet, basename="schedule")
router.register("executions", ExecutionViewSet, basename="execution")

urlpatterns = router.urls
