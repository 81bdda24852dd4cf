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
