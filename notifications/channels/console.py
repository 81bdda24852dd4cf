"""The console channel: the message goes to the notification worker's log (and stdout).

It is what a job with no verified contact uses, so `make run` shows notifications at once.
"""

from __future__ import annotations

import logging

from notifications.channels import Channel, Message

logger = logging.getLogger("picobot.notifications.console")


class ConsoleChannel(Channel):
    name = "console"

    def send(self, message: Message) -> str:
        logger.info(
            "notification %s (%s):\n%s", message.notification_id, message.kind, message.body
        )
        return ""


CHANNEL = ConsoleChannel()
