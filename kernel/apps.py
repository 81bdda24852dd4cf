from __future__ import annotations

from django.apps import AppConfig


class KernelConfig(AppConfig):
    name = "kernel"
    verbose_name = "Kernel: users, grants and API keys"

    def ready(self) -> None:
        from kernel import schema  # noqa: F401  (registers the OpenAPI auth extension)
