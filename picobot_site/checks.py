"""System checks for configuration mistakes that do not stop start-up but deserve a word.

Ids are stable: picobot.W001 and up.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Warning, register


@register("picobot")
def check_model_configured(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    if settings.PICOBOT_MODEL_BASE_URL and settings.PICOBOT_MODEL:
        return []
    return [
        Warning(
            "No model is configured: every scheduled run and chat turn will fail.",
            hint="Set PICOBOT_MODEL_BASE_URL and PICOBOT_MODEL (and PICOBOT_MODEL_API_KEY "
            "if the endpoint needs one) to an OpenAI-compatible Chat Completions API.",
            id="picobot.W001",
        )
    ]


@register("picobot", deploy=True)
def check_public_url(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    if settings.TWILIO_ACCOUNT_SID and not settings.PICOBOT_PUBLIC_URL:
        return [
            Warning(
                "Twilio is configured but PICOBOT_PUBLIC_URL is not: status callbacks "
                "cannot be verified.",
                hint="Set PICOBOT_PUBLIC_URL to the public https base URL of this site.",
                id="picobot.W002",
            )
        ]
    return []


@register("picobot")
def check_shell_sandbox(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    from kernel import sandbox

    # The kernel's settings only: this runs at every command's start-up, where starting a
    # process would slow (and widen the signal window of) every worker start.
    reason = sandbox.kernel_reason()
    if reason is None:
        return []
    if settings.PICOBOT.kernel.allow_unconfined_shell:
        message = (
            f"The shell tool runs programs UNCONFINED: this kernel cannot sandbox them ({reason}) "
            "and [kernel] allow_unconfined_shell is true. A program's arguments can then read "
            "any file the server can (date -f FILE) and reach the network."
        )
    else:
        message = f"The shell tool is refused: this kernel cannot sandbox programs ({reason})."
    return [
        Warning(
            message,
            hint="Run on Linux 5.13 or later with Landlock enabled and unprivileged user "
            "namespaces allowed (kernel.unprivileged_userns_clone=1).",
            id="picobot.W003",
        )
    ]
