from __future__ import annotations

from django.apps import AppConfig


class PicobotSiteConfig(AppConfig):
    name = "picobot_site"
    verbose_name = "PicoBot site"

    def ready(self) -> None:
        from picobot_site import checks  # noqa: F401  (registers the system checks)
        from picobot_site.observability import setup_tracing

        setup_tracing()
