from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from django_q.signals import post_spawn

        from kernel.tools import register
        from notifications.delivery import on_worker_spawn
        from notifications.tool import NotifyTool

        register(NotifyTool)
        post_spawn.connect(on_worker_spawn, dispatch_uid="picobot-notifications-sweep")
