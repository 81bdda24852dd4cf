"""Writing notification rows: for completed executions, and for the `notify` tool.

`write_completions` runs inside the completing, fenced transaction (through
`schedules.claims`): it writes one row per (execution, recipient, kind) with an idempotency key,
and queues them for delivery when that transaction commits. A transaction that completes
several executions (`claims.complete_many`) writes all their rows with one call, in a fixed
number of statements. A superseded or fenced-out completion never gets here, so it writes
nothing."""

from __future__ import annotations

from dataclasses import dataclass
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
    return _recipients_among(_verified_contacts([owner_id]).get(owner_id, []), channels)


def _verified_contacts(owner_ids: list[int]) -> dict[int, list[Contact]]:
    """The verified contacts of each owner (one query), in id order."""
    found: dict[int, list[Contact]] = {}
    verified = Contact.objects.filter(owner_id__in=owner_ids, verified_at__isnull=False)
    for contact in verified.order_by("id"):
        found.setdefault(contact.owner_id, []).append(contact)
    return found


def _recipients_among(
    contacts: list[Contact], channels: list[str] | None
) -> list[tuple[str, Contact | None]]:
    if channels is None:
        channels = sorted({contact.channel for contact in contacts}) or ["console"]
    found: list[tuple[str, Contact | None]] = []
    for channel in channels:
        if channel == "console":
            found.append(("console", None))
        else:
            found.extend((channel, c) for c in contacts if c.channel == channel)
    return found


@dataclass(frozen=True)
class Completion:
    """One completed execution, as its notifications need it. `retrying`: a failed attempt
    will be retried, so only the occurrence's final attempt reports a failure."""

    job: Any
    execution_id: int
    status: str
    output: str
    error: str
    disabled_reason: str
    retrying: bool = False

    @property
    def reported_status(self) -> str:
        if self.retrying and self.status in FAILURE_STATUSES:
            return "retrying"  # the occurrence is not over: its final attempt reports
        return self.status

    @property
    def may_report_result(self) -> bool:
        return self.reported_status == "succeeded" and "success" in (self.job.notify_on or [])


def completion_messages(completion: Completion, told_by_tool: bool) -> list[tuple[str, str]]:
    """(kind, body) of what one completion tells its owner, before choosing recipients.
    `told_by_tool`: the run already sent a message with the notify tool (then its result is not
    sent again)."""
    job, status = completion.job, completion.reported_status
    messages: list[tuple[str, str]] = []
    notify_on = job.notify_on or []
    if completion.may_report_result:
        text = rules.reportable(completion.output)
        if text is not None and not told_by_tool:
            messages.append((Kind.RESULT, f"{job.name}: {text}"))
    elif status in FAILURE_STATUSES and "failure" in notify_on:
        messages.append((Kind.FAILURE, f"{job.name} failed ({status}): {completion.error}"))
    if completion.disabled_reason and job.schedule_type != "once":
        messages.append(
            (Kind.DISABLED, f"{job.name} is now disabled: {completion.disabled_reason}.")
        )
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
    completion = Completion(job, execution_id, status, output, error, disabled_reason, retrying)
    return write_completions([completion], now)


def write_completions(completions: list[Completion], now: datetime | None = None) -> list[int]:
    """The rows of several completions of one transaction, with at most four statements
    whatever their number: one read of the runs' own notify-tool messages, one of the owners'
    contacts, one insert, one read of the ids (queued once the transaction commits)."""
    asked = [c.execution_id for c in completions if c.may_report_result]
    told_by_tool = (
        set(
            Notification.objects.filter(execution_id__in=asked, kind=Kind.TOOL).values_list(
                "execution_id", flat=True
            )
        )
        if asked
        else set()
    )
    messages = {
        c.execution_id: completion_messages(c, c.execution_id in told_by_tool) for c in completions
    }
    owners = sorted({c.job.owner_id for c in completions if messages[c.execution_id]})
    if not owners:
        return []
    contacts = _verified_contacts(owners)
    rows = []
    for completion in completions:
        job, execution_id = completion.job, completion.execution_id
        targets = _recipients_among(contacts.get(job.owner_id, []), job.notify_channels)
        for channel, contact in targets:
            for kind, body in messages[execution_id]:
                key = f"execution:{execution_id}:{kind}:{channel}:{contact.pk if contact else 0}"
                row = _row(job.owner_id, channel, contact, kind, body, key)
                row.job_id, row.execution_id = job.pk, execution_id
                rows.append(row)
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
