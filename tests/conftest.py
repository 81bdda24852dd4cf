"""Shared fixtures: users with grants and API keys, an API client, config overrides, a scripted
model server, a resolver that hangs."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from kernel.models import ApiKey, User


@pytest.fixture
def make_user(db: None) -> Callable[..., User]:
    counter = iter(range(1, 1_000_000))

    def make(username: str | None = None, grant: list[str] | None = None, **extra: Any) -> User:
        user = User(username=username or f"user{next(counter)}", grant=grant or [], **extra)
        user.set_unusable_password()
        user.save()
        return user

    return make


@pytest.fixture
def api_client_for() -> Callable[[User], APIClient]:
    def make(user: User) -> APIClient:
        _, secret = ApiKey.issue(user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        return client

    return make


@pytest.fixture
def picobot_config() -> Iterator[Callable[..., None]]:
    """Override single config values: picobot_config("scheduler", max_concurrent=1)."""
    original = settings.PICOBOT

    def override(section: str, **values: Any) -> None:
        current = settings.PICOBOT
        updated = dataclasses.replace(getattr(current, section), **values)
        settings.PICOBOT = dataclasses.replace(current, **{section: updated})

    yield override
    settings.PICOBOT = original


@pytest.fixture
def model_server(settings: Any) -> Iterator[Any]:
    """A running ScriptedModelServer; the model settings point at it for the test."""
    from kernel.testing.model_server import ScriptedModelServer

    server = ScriptedModelServer().start()
    settings.PICOBOT_MODEL_BASE_URL = server.base_url
    settings.PICOBOT_MODEL = "scripted-model"
    settings.PICOBOT_MODEL_API_KEY = "test-model-key"
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hanging_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The system resolver, for names ending in `.hang.test`, answers only once the event is
    set (or after 60 s): a DNS server that never replies."""
    real_getaddrinfo = socket.getaddrinfo
    answer = threading.Event()

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".hang.test"):
            answer.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answer
    answer.set()
