"""Contacts (where a user may be told things) and notifications (one message to one contact).

A Notification row is the durable record of a message: written `pending`, taken to `sending`
with a delivery lease by one conditional UPDATE, then `sent` or `dead`. Rows are never deleted
by delivery; every message ends in a recorded state.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class Channel(models.TextChoices):
    WHATSAPP = "whatsapp"
    WEBHOOK = "webhook"
    CONSOLE = "console"


class Contact(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="contacts"
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    address = models.CharField(max_length=2048)
    verified_at = models.DateTimeField(null=True, blank=True)
    # The current code, only as an HMAC keyed by the server's secret; "" when none is out.
    code_hmac = models.CharField(max_length=64, blank=True, default="")
    code_expires_at = models.DateTimeField(null=True, blank=True)
    code_attempts = models.PositiveIntegerField(default=0)
    # Signs webhook deliveries; shown to the owner once, at creation.
    webhook_secret = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "channel", "address"], name="contact_unique_per_owner"
            )
        ]
        indexes = [models.Index(fields=["channel", "address"], name="contact_address")]

    def __str__(self) -> str:
        return f"{self.channel}:{self.address}"

    @property
    def verified(self) -> bool:
        return self.verified_at is not None


class Kind(models.TextChoices):
    RESULT = "result"
    FAILURE = "failure"
    DISABLED = "disabled"
    TOOL = "tool"
    VERIFICATION = "verification"


class Status(models.TextChoices):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


class Notification(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    contact = models.ForeignKey(
        Contact, null=True, blank=True, on_delete=models.SET_NULL, related_name="notifications"
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    body = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # When a delivery task was last queued for the row (the sweep re-queues only stale ones).
    enqueued_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    provider_message_id = models.CharField(max_length=64, blank=True, default="")
    provider_status = models.CharField(max_length=16, blank=True, default="")
    via_template = models.BooleanField(default=False)
    idempotency_key = models.CharField(max_length=200, unique=True)
    # Rows written by one `notify` tool call share this key (the per-run/day caps count calls).
    tool_call_key = models.CharField(max_length=100, blank=True, default="")
    job = models.ForeignKey(
        "schedules.Job",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="notifications",
    )
    execution = models.ForeignKey(
        "schedules.Execution",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="notifications",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                name="notification_due_pending",
                condition=Q(status="pending"),
            ),
            models.Index(
                fields=["lease_expires_at"],
                name="notification_expired_sending",
                condition=Q(status="sending"),
            ),
            models.Index(
                fields=["provider_message_id"],
                name="notification_provider_id",
                condition=~Q(provider_message_id=""),
            ),
            models.Index(fields=["owner", "kind", "created_at"], name="notification_owner_kind"),
            models.Index(fields=["status", "-created_at"], name="notification_status_created"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} to {self.channel} ({self.status})"
