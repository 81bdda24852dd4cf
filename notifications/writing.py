"""Writing notification rows: for a completed execution, and for the `notify` tool.

`write_completion_rows` is the body of `schedules.claims.write_completion_notifications`: it runs
inside the completing, fenced transaction for ONE completed execution, writes one row per
(execution, recipient, kind) with an idempotency key, and queues them for delivery when that
transaction commits. A superseded or fenced-out completion never calls it, so it writes nothing.
It may be called once per completion inside a larger transaction that completes several.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from notifications import rules
from notifications.delivery import enqueue_on_commit
from notifications.models import Contact, Kind, Notification
from schedules.dbtime import db_now

FAILURE_STATUSES = ("failed", "timed_out", "lost")


def recipients(owner_id: int, channels: list[str] | None) -> list[tuple[str, Contact | None]]:
    """(channel, contact) pairs to tell: the owner's verified contacts on `channels`; None means
    every channel where the owner has one, or the console when they have none."""
    contacts = list(
        Contact.objects.filter(owner_id=owner_id, verified_at__isnull=False).order_by("id")
    )
    if channels is None:
        channels = sorted({contact.channel for contact in contacts}) or ["console"]
    found: list[tuple[str, Contact | None]] = []
    for channel in channels:
        if channel == "console":
            found.append(("console", None))
        else:
            found.extend((channel, c) for c in contacts if c.channel == channel)
    return found


def completion_messages(
    job: Any, execution_id: int, status: str, output: str, error: str, disabled_reason: str
) -> list[tuple[str, str]]:
    """(kind, body) of what one completion tells its owner, before choosing recipients."""
    messages: list[tuple[str, str]] = []
    notify_on = job.notify_on or []
    if status == "succeeded" and "success" in notify_on:
        text = rules.reportable(output)
        notified = Notification.objects.filter(execution_id=execution_id, kind=Kind.TOOL)
        if text is not None and not notified.exists():
            messages.append((Kind.RESULT, f"{job.name}: {text}"))
    elif status in FAILURE_STATUSES and "failure" in notify_on:
        messages.append((Kind.FAILURE, f"{job.name} failed ({status}): {error}"))
    if disabled_reason and job.schedule_type != "once":
        messages.append((Kind.DISABLED, f"{job.name} is now disabled: {disabled_reason}."))
    return messages


def write_completion_rows(
    *,
    job: Any,
    execution_id: int,
    status: str,
    output: str,
    error: str,
    disabled_reason: str,
    retrying: bool = False,
    now: datetime | None = None,
) -> list[int]:
    """Write (and queue on commit) the rows of one completion; returns their ids. `now` is the
    completion's database time (read again when not given)."""
    if retrying and status in FAILURE_STATUSES:
        status = "retrying"  # the occurrence is not over: its final attempt reports
    messages = completion_messages(job, execution_id, status, output, error, disabled_reason)
    if not messages:
        return []
    rows = []
    for channel, contact in recipients(job.owner_id, job.notify_channels):
        for kind, body in messages:
            key = f"execution:{execution_id}:{kind}:{channel}:{contact.pk if contact else 0}"
            rows.append(_row(job.owner_id, channel, contact, kind, body, key))
    for row in rows:
        row.job_id, row.execution_id = job.pk, execution_id
    return write_rows(rows, now)


def _row(
    owner_id: int, channel: str, contact: Contact | None, kind: str, body: str, key: str
) -> Notification:
    return Notification(
        owner_id=owner_id,
        contact=contact,
        channel=channel,
        kind=kind,
        body=rules.bounded(rules.without_token(body), channel),
        idempotency_key=key,
    )


def write_rows(rows: list[Notification], now: datetime | None = None) -> list[int]:
    """Insert `rows` (a row whose key exists already is skipped) and queue them on commit."""
    if not rows:
        return []
    now = now or db_now()
    for row in rows:
        # Marked queued now: if queueing at commit fails, the sweep finds them a lease later.
        row.next_attempt_at = row.enqueued_at = now
    Notification.objects.bulk_create(rows, ignore_conflicts=True)
    keys = [row.idempotency_key for row in rows]
    ids = list(
        Notification.objects.filter(idempotency_key__in=keys, status="pending").values_list(
            "id", flat=True
        )
    )
    enqueue_on_commit(ids)
    return ids
