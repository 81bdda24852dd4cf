from __future__ import annotations

from django.apps import AppConfig


class KernelConfig(AppConfig):
    name = "kernel"
    verbose_name = "Kernel: users, grants, API keys, chat sessions and the tool-call audit"

    def ready(self) -> None:
        from kernel import schema  # noqa: F401  (registers the OpenAPI auth extension)
        from kernel.tools import load_builtin_tools

        load_builtin_tools()
