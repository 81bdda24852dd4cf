from __future__ import annotations

from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "schedules"
    verbose_name = "Schedules"

    def ready(self) -> None:
        from kernel.tools import register
        from schedules.tool import ScheduleTool

        register(ScheduleTool)
