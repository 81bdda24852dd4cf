"""Configuration mistakes that don't stop start-up surface as system checks with stable ids."""

from __future__ import annotations

from django.core import checks
from django.test import override_settings


def ids(**kwargs: object) -> set[str]:
    return {message.id for message in checks.run_checks(tags=["picobot"], **kwargs)}


@override_settings(PICOBOT_MODEL_BASE_URL="", PICOBOT_MODEL="")
def test_a_missing_model_is_warned_about() -> None:
    assert "picobot.W001" in ids()


@override_settings(PICOBOT_MODEL_BASE_URL="http://127.0.0.1:9/v1", PICOBOT_MODEL="m")
def test_a_configured_model_is_not_warned_about() -> None:
    assert "picobot.W001" not in ids()


@override_settings(TWILIO_ACCOUNT_SID="AC123", PICOBOT_PUBLIC_URL="")
def test_twilio_without_a_public_url_is_warned_about_on_deploy() -> None:
    assert "picobot.W002" in ids(include_deployment_checks=True)
