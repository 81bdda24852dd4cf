"""Notification channels: one small interface, a registry, one module per channel.

A channel's `send(message)` returns the provider's message id ("" when there is none) or raises
`DeliveryError`, which says whether the failure is permanent (the row goes `dead` at once) or
transient (retried with backoff). `public` is what may be shown to the owner: for webhooks it
never repeats what the remote host answered, so `last_error` cannot be used to scan ports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar


class DeliveryError(Exception):
    def __init__(self, message: str, *, permanent: bool, public: str = "") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.public = public or message


@dataclass(frozen=True)
class Message:
    """What a channel needs to send one notification."""

    notification_id: int
    kind: str
    body: str
    address: str
    secret: str = ""
    via_template: bool = False
    # The owner's grant: a webhook to a non-public IP literal needs `net:<that IP>` in it.
    grant: tuple[str, ...] = ()
    code: str = ""


class Channel:
    name: ClassVar[str]

    def send(self, message: Message) -> str:
        raise NotImplementedError


_MODULES = {
    "console": "notifications.channels.console",
    "whatsapp": "notifications.channels.whatsapp",
    "webhook": "notifications.channels.webhook",
}
_instances: dict[str, Channel] = {}


def get_channel(name: str) -> Channel:
    """The channel registered under `name` (its module is imported on first use)."""
    channel = _instances.get(name)
    if channel is None:
        module = importlib.import_module(_MODULES[name])
        channel = _instances[name] = module.CHANNEL
    return channel


def channel_names() -> tuple[str, ...]:
    return tuple(_MODULES)
