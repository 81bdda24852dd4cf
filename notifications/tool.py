"""The agent's `notify` tool: `notify{message, channel?}` to the run's owner's verified contacts.

Each channel it sends on needs `notify:<channel>` (the Kernel checks `required_permissions`);
without `channel` it sends on every channel where the owner has a verified contact (the console
when there is none). Calls are capped by `notify_max_per_run` and `notify_max_per_user_per_day`,
counted under a lock on the owner's row so parallel runs cannot exceed them. The same message to
the same channel twice in one run is one call (idempotent: a repeated or retried call sends
nothing new). A scheduled run that notified through the tool does not send its result as well.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction

from kernel.models import User
from kernel.permissions import Permission, parse_permission
from kernel.tools import Tool, ToolError
from notifications import rules
from notifications.models import Contact, Kind, Notification
from notifications.writing import recipients, write_rows
from schedules.dbtime import db_now

if TYPE_CHECKING:
    from kernel.context import ToolContext

CHANNELS = ("whatsapp", "webhook", "console")
MAX_MESSAGE_CHARS = 4000


def _channels(args: dict[str, Any], owner_id: int) -> list[str]:
    if "channel" in args:
        return [args["channel"]]
    found = Contact.objects.filter(owner_id=owner_id, verified_at__isnull=False)
    return sorted(set(found.values_list("channel", flat=True))) or ["console"]


class NotifyTool(Tool):
    name = "notify"
    description = (
        "Send a short message to your user's verified contacts (WhatsApp, webhook or the "
        "console). Give `channel` to use one channel only. Limited per run and per day."
    )
    parameters = {
        "type": "object",
        "properties": {
            "message": {"type": "string", "minLength": 1, "maxLength": MAX_MESSAGE_CHARS},
            "channel": {"type": "string", "enum": list(CHANNELS)},
        },
        "required": ["message"],
        "additionalProperties": False,
    }
    timeout_secs = 15

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [parse_permission(f"notify:{c}") for c in _channels(args, context.user.pk)]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        text = rules.without_token(args["message"])
        if not text:
            raise ToolError("the message is empty")
        channels = _channels(args, context.user.pk)
        targets = recipients(context.user.pk, channels)
        if not targets:
            raise ToolError(f"your user has no verified contact on {', '.join(channels)}")
        scope = (
            f"execution:{context.execution_id}"
            if context.execution_id
            else f"session:{context.session_id}"
        )
        digest = hashlib.sha256(f"{channels}\x00{text}".encode()).hexdigest()[:32]
        call_key = f"{scope}:{digest}"
        with transaction.atomic():
            User.objects.select_for_update().filter(pk=context.user.pk).first()
            if Notification.objects.filter(tool_call_key=call_key).exists():
                return json.dumps({"sent": False, "detail": "this message was already sent"})
            _check_caps(context.user.pk, scope)
            rows = [_row(context, channel, contact, text, call_key) for channel, contact in targets]
            write_rows(rows)
        return json.dumps({"sent": True, "recipients": len(rows), "channels": channels})


def _check_caps(owner_id: int, scope: str) -> None:
    config = settings.PICOBOT.notifications
    calls = Notification.objects.filter(owner_id=owner_id, kind=Kind.TOOL)
    in_run = calls.filter(tool_call_key__startswith=f"{scope}:")
    if in_run.values("tool_call_key").distinct().count() >= config.notify_max_per_run:
        raise ToolError(
            f"limit reached: at most {config.notify_max_per_run} notify calls per run "
            "([notifications] notify_max_per_run)"
        )
    today = calls.filter(created_at__gte=db_now() - timedelta(days=1))
    if today.values("tool_call_key").distinct().count() >= config.notify_max_per_user_per_day:
        raise ToolError(
            f"limit reached: at most {config.notify_max_per_user_per_day} notify calls per day "
            "([notifications] notify_max_per_user_per_day)"
        )


def _row(
    context: ToolContext, channel: str, contact: Contact | None, text: str, call_key: str
) -> Notification:
    return Notification(
        owner_id=context.user.pk,
        contact=contact,
        channel=channel,
        kind=Kind.TOOL,
        body=rules.bounded(text, channel),
        idempotency_key=f"{call_key}:{channel}:{contact.pk if contact else 0}",
        tool_call_key=call_key,
        job_id=context.job_id,
        execution_id=context.execution_id,
    )
