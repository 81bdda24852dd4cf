"""Delivery: django-q2 runs `deliver(id)` for each row, and `sweep()` now and then.

A row is queued with `async_task` when the transaction that wrote it commits. `deliver` takes
it `pending` -> `sending` with one conditional UPDATE (attempts + 1, a lease of
`delivery_lease_secs`), so two tasks for one row never both send; then it calls the channel and
records `sent`, the next attempt (backoff with jitter, up to `max_attempts`) or `dead`. Every
write after the take is fenced on (`sending`, attempts), so a task that outlived its lease
changes nothing. `sweep` re-queues due `pending` rows that no live task holds (never queued,
or queued a lease ago once the queue has drained: in a backlog their tasks are still waiting)
and puts `sending` rows whose lease expired (their cluster was killed) back to `pending`.

Every database step of a delivery is retried through an outage (a server restart, a dropped
connection) of up to OUTAGE_MAX_SECS, so a message the provider accepted is recorded `sent` even
when the connection broke meanwhile: the writes are fenced, so a retry after a commit that did
happen changes nothing.

The duplicate window: the provider accepted a message and we never recorded it: the process
died (or the database stayed unreachable past OUTAGE_MAX_SECS) before `sent` was committed, or
the provider's answer never reached us (a timeout or a dropped connection after it had taken
the message), so the attempt counts as failed. The message is then sent again. Nothing else
sends a row twice. A webhook receiver can tell a repeat by the payload's `id`, the same on
every attempt.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.crypto import salted_hmac

from notifications import metrics, rules
from notifications.channels import DeliveryError, Message, get_channel
from notifications.models import Contact, Kind, Notification, Status
from schedules.dbtime import db_now, through_outage

logger = logging.getLogger("picobot.notifications")

TASK = "notifications.delivery.deliver"
SWEEP_TASK = "notifications.delivery.sweep"
SWEEP_SCHEDULE_NAME = "picobot notifications sweep"
# A retry due this soon is queued at once and its task waits; a later one is the sweep's.
INLINE_WAIT_MAX_SECS = 5.0
SWEEP_BATCH = 1000
# How long a delivery's database steps are retried through an outage, and how often. Well under
# django-q2's task timeout (60 s) with the channels' 10 s timeout and a retry's 5 s wait.
OUTAGE_MAX_SECS = 20.0
OUTAGE_RETRY_SECS = 0.5
CODE_KEY_SALT = "picobot.notifications.verification-code"


def code_hmac(contact_id: int, code: str) -> str:
    """The stored form of a verification code: an HMAC keyed by the server's secret."""
    return salted_hmac(CODE_KEY_SALT, f"{contact_id}:{code}", algorithm="sha256").hexdigest()


# --- queueing ----------------------------------------------------------------------------------


def enqueue_on_commit(ids: list[int]) -> None:
    """Queue delivery of `ids` once the current transaction commits (at once outside one).
    The rows must carry `enqueued_at` already (written with them)."""
    if ids:
        transaction.on_commit(lambda: enqueue(ids, mark=False))


def enqueue(ids: list[int], *, mark: bool = True) -> None:
    """Queue one delivery task per row (and, with `mark`, record when). A row left unqueued
    (an error here) is the sweep's once its `enqueued_at` is a lease old."""
    from django_q.tasks import async_task

    # One transaction for the batch: one commit for all its tasks, and django-q2's ORM broker,
    # which closes the thread's connection before each task when it runs outside a transaction
    # (`close_old_connections`: a reconnect per completion otherwise), keeps ours open. All or
    # none: rows left unqueued by an error are the sweep's.
    queued: list[int] = []
    try:
        with transaction.atomic():
            broker = _TaskBatch.for_configured_broker()
            for notification_id in ids:
                name = f"notification {notification_id}"
                async_task(TASK, notification_id, task_name=name, broker=broker)
                queued.append(notification_id)
            if isinstance(broker, _TaskBatch):
                broker.flush()
    except Exception:
        logger.exception("could not queue notifications %s; the sweep will", ids)
        return
    if queued and mark:
        Notification.objects.filter(id__in=queued, status=Status.PENDING).update(
            enqueued_at=db_now()
        )


class _TaskBatch:
    """django-q2's ORM broker for one batch of tasks: `async_task(..., broker=)` signs each task
    as usual and hands it here, and `flush` writes them all with one INSERT (the ORM broker
    writes one row per task, each after constructing a broker)."""

    def __init__(self, broker: Any) -> None:
        self.list_key = broker.list_key
        self.payloads: list[str] = []

    @classmethod
    def for_configured_broker(cls) -> Any:
        from django_q.brokers import get_broker
        from django_q.brokers.orm import ORM

        broker = get_broker()
        return cls(broker) if type(broker) is ORM else broker

    def enqueue(self, task: str) -> int:
        self.payloads.append(task)
        return len(self.payloads)

    def flush(self) -> None:
        from django_q.conf import Conf
        from django_q.models import OrmQ

        now = timezone.now()
        OrmQ.objects.using(Conf.ORM).bulk_create(
            OrmQ(key=self.list_key, payload=payload, lock=now) for payload in self.payloads
        )


# --- one delivery ------------------------------------------------------------------------------


def deliver(notification_id: int) -> str:
    """Deliver one row if it is due and nobody holds it; returns the status it was left in."""
    row = _through_outage(lambda: _take(notification_id), notification_id)
    if row is None:
        return "skipped"
    try:
        message = _through_outage(lambda: _message(row), notification_id)
        provider_id = get_channel(row.channel).send(message)
    except DeliveryError as exc:
        error = exc
    except DatabaseError:
        raise  # the database stayed unreachable: the sweep takes the row over
    except Exception as exc:
        # A bug must not strand the row: it is recorded and retried like a transient failure.
        logger.exception("notification=%s: unexpected error in delivery", row.pk)
        error = DeliveryError(f"internal error: {type(exc).__name__}", permanent=False)
    else:
        # The provider has the message: recording it is what keeps it from being sent again.
        return _through_outage(lambda: _sent(row, provider_id), notification_id)
    return _through_outage(lambda: _failed(row, error), notification_id)


def _through_outage(step: Any, notification_id: int) -> Any:
    """Run a delivery's database `step`, reconnecting through an outage of up to
    OUTAGE_MAX_SECS (then the error goes to django-q2, and the sweep takes the row over)."""
    return through_outage(
        step, f"notification={notification_id}", within=OUTAGE_MAX_SECS, every=OUTAGE_RETRY_SECS
    )


def _take(notification_id: int) -> Notification | None:
    for _ in range(2):
        now = db_now()
        lease = timedelta(seconds=settings.PICOBOT.notifications.delivery_lease_secs)
        taken = Notification.objects.filter(
            pk=notification_id, status=Status.PENDING, next_attempt_at__lte=now
        ).update(
            status=Status.SENDING,
            attempts=F("attempts") + 1,
            lease_expires_at=now + lease,
            updated_at=now,
        )
        if taken:
            return Notification.objects.select_related("contact", "owner").get(pk=notification_id)
        wait = _soon(notification_id, now)
        if wait is None:
            return None
        time.sleep(wait)
    return None


def _soon(notification_id: int, now: datetime) -> float | None:
    due = (
        Notification.objects.filter(pk=notification_id, status=Status.PENDING)
        .values_list("next_attempt_at", flat=True)
        .first()
    )
    if due is None:
        return None
    wait = (due - now).total_seconds()
    return max(0.0, wait) if wait <= INLINE_WAIT_MAX_SECS else None


def _message(row: Notification) -> Message:
    contact: Contact | None = row.contact
    if contact is None and row.channel != "console":
        raise DeliveryError("the contact was deleted", permanent=True)
    code = ""
    body = row.body
    if row.kind == Kind.VERIFICATION:
        code = _new_code(contact)
        body = f"{row.body}: {code}"
    elif contact is not None and not contact.verified:
        raise DeliveryError("the contact is not verified", permanent=True)
    return Message(
        notification_id=row.pk,
        kind=row.kind,
        body=rules.without_token(body) if row.kind != Kind.VERIFICATION else body,
        address=contact.address if contact else "",
        secret=contact.webhook_secret if contact else "",
        via_template=row.via_template,
        grant=tuple(row.owner.grant or ()),
        code=code,
    )


def _new_code(contact: Contact | None) -> str:
    """A fresh code for an unverified contact; only its HMAC is stored, never the code."""
    if contact is None:
        raise DeliveryError("the contact was deleted", permanent=True)
    code = f"{secrets.randbelow(10**6):06d}"
    ttl = timedelta(seconds=settings.PICOBOT.notifications.code_ttl_secs)
    updated = Contact.objects.filter(pk=contact.pk, verified_at__isnull=True).update(
        code_hmac=code_hmac(contact.pk, code),
        code_expires_at=db_now() + ttl,
        code_attempts=0,
    )
    if not updated:
        raise DeliveryError("the contact is already verified", permanent=True)
    return code


def _fenced(row: Notification) -> Any:
    return Notification.objects.filter(pk=row.pk, status=Status.SENDING, attempts=row.attempts)


def _sent(row: Notification, provider_id: str) -> str:
    now = db_now()
    updated = _fenced(row).update(
        status=Status.SENT,
        sent_at=now,
        lease_expires_at=None,
        provider_message_id=provider_id,
        provider_status="",
        last_error="",
        updated_at=now,
    )
    if not updated:
        if Notification.objects.filter(
            pk=row.pk, status=Status.SENT, attempts=row.attempts, provider_message_id=provider_id
        ).exists():
            return Status.SENT  # an earlier try of this write committed; its answer was lost
        logger.warning("notification=%s sent after losing its lease", row.pk)
        return "superseded"
    metrics.record(row.channel, Status.SENT, seconds=(now - row.created_at).total_seconds())
    logger.info("notification=%s sent channel=%s provider_id=%s", row.pk, row.channel, provider_id)
    return Status.SENT


def _failed(row: Notification, exc: DeliveryError) -> str:
    now = db_now()
    config = settings.PICOBOT.notifications
    logger.warning("notification=%s attempt %s failed: %s", row.pk, row.attempts, exc)
    if exc.permanent or row.attempts >= config.max_attempts:
        status, changes = Status.DEAD, {"next_attempt_at": now}
    else:
        delay = rules.retry_delay_secs(row.attempts)
        status = Status.PENDING
        changes = {"next_attempt_at": now + timedelta(seconds=delay), "enqueued_at": None}
    updated = _fenced(row).update(
        status=status,
        lease_expires_at=None,
        last_error=exc.public[:1000],
        updated_at=now,
        **changes,
    )
    if not updated:
        return "superseded"
    metrics.record(row.channel, "retry" if status == Status.PENDING else status)
    if status == Status.PENDING and delay <= INLINE_WAIT_MAX_SECS:
        enqueue([row.pk])
    return status


# --- the sweep ---------------------------------------------------------------------------------


def sweep() -> int:
    """Re-queue what no task holds: `sending` rows whose lease expired and due `pending` rows
    never queued, or queued a lease ago when the queue has drained. Returns how many rows
    were queued."""
    now = db_now()
    config = settings.PICOBOT.notifications
    expired = Notification.objects.filter(status=Status.SENDING, lease_expires_at__lt=now)
    for pk, attempts in expired.values_list("id", "attempts")[:SWEEP_BATCH]:
        last = attempts >= config.max_attempts
        Notification.objects.filter(pk=pk, status=Status.SENDING, attempts=attempts).update(
            status=Status.DEAD if last else Status.PENDING,
            lease_expires_at=None,
            next_attempt_at=now,
            enqueued_at=None,
            last_error="delivery was interrupted (its worker stopped)",
            updated_at=now,
        )
    unqueued = Q(enqueued_at__isnull=True)
    # A row queued a lease ago has lost its task only if the queue has drained: in a backlog
    # its task is still waiting, and queueing it again only lengthens the queue (the 100,000-
    # execution soak's sweeps, each adding a task per such row, grew it to 386k tasks for 32k
    # rows, and delivery stopped keeping up). So those rows are queued again only once fewer
    # than a batch of tasks wait.
    if _waiting_tasks() < SWEEP_BATCH:
        unqueued |= Q(enqueued_at__lt=now - timedelta(seconds=config.delivery_lease_secs))
    due = list(
        Notification.objects.filter(status=Status.PENDING, next_attempt_at__lte=now)
        .filter(unqueued)
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:SWEEP_BATCH]
    )
    enqueue(due)
    return len(due)


def _waiting_tasks() -> int:
    """Tasks waiting in the broker's queue (not those a cluster holds)."""
    from django_q.brokers import get_broker

    return get_broker().queue_size() or 0


def sweep_schedule_fields() -> dict[str, Any]:
    """The django-q2 schedule fields for a sweep every `sweep_secs` (django-q2 looks at its
    schedules about every 30 s, so that is the shortest period that takes effect)."""
    from django_q.models import Schedule

    secs = settings.PICOBOT.notifications.sweep_secs
    if secs < 60:
        return {"schedule_type": Schedule.CRON, "cron": f"* * * * * */{secs}", "minutes": None}
    return {"schedule_type": Schedule.MINUTES, "minutes": secs // 60, "cron": None}


def ensure_sweep_schedule() -> None:
    """Make the sweep's django-q2 schedule match the config (the migration created it)."""
    from django_q.models import Schedule

    fields = {"func": SWEEP_TASK, "repeats": -1, **sweep_schedule_fields()}
    if not Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).update(**fields):
        Schedule.objects.create(name=SWEEP_SCHEDULE_NAME, **fields)


def on_worker_spawn(**kwargs: Any) -> None:
    """django-q2 `post_spawn`: a cluster worker starting up sweeps once, so a restart after a
    crash picks up at once what the crash left behind."""
    try:
        ensure_sweep_schedule()
        sweep()
    except Exception:
        logger.exception("start-up sweep failed; the scheduled sweep will retry")
