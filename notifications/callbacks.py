"""Provider delivery statuses from Twilio's status callbacks.

Statuses only move forward (queued < sent < delivered < read; failed and undelivered end it):
a late or repeated callback never takes a row's status back. A `failed`/`undelivered` with
error 63016 (outside WhatsApp's 24-hour window) queues the same row once more, through the
approved template, when one is configured.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from notifications.delivery import enqueue_on_commit
from notifications.models import Notification, Status
from schedules.dbtime import db_now

logger = logging.getLogger("picobot.notifications")

RANK = {
    "": 0,
    "accepted": 1,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "failed": 4,
    "undelivered": 4,
    "delivered": 5,
    "read": 6,
}
OUTSIDE_WINDOW = "63016"


def apply_status(sid: str, status: str, error_code: str = "") -> bool:
    """Record `status` for the message `sid` if it moves forward; True when something changed."""
    if not sid or status not in RANK:
        return False
    lower = [name for name, rank in RANK.items() if rank < RANK[status]]
    with transaction.atomic():
        updated = Notification.objects.filter(
            provider_message_id=sid, provider_status__in=lower
        ).update(provider_status=status)
        if updated and status in ("failed", "undelivered") and error_code == OUTSIDE_WINDOW:
            _resend_through_template(sid)
    return bool(updated)


def _resend_through_template(sid: str) -> None:
    rows = Notification.objects.filter(
        provider_message_id=sid, status=Status.SENT, via_template=False
    )
    if not settings.TWILIO_WHATSAPP_CONTENT_SID:
        rows.update(last_error="outside WhatsApp's 24-hour window and no template is configured")
        return
    ids = list(rows.values_list("id", flat=True))
    now = db_now()
    Notification.objects.filter(id__in=ids, status=Status.SENT, via_template=False).update(
        status=Status.PENDING,
        via_template=True,
        next_attempt_at=now,
        enqueued_at=now,
        last_error="outside WhatsApp's 24-hour window: resending through the template",
    )
    logger.info("message %s was outside the 24-hour window; resending through the template", sid)
    enqueue_on_commit(ids)
