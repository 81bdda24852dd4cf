"""Users with their grants, and API keys."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.contrib.auth.models import AbstractUser, UserManager
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from kernel.permissions import CapabilitySet, InvalidPermission, parse_permission

API_KEY_PREFIX = "pbk_"
LAST_USED_RESOLUTION = timedelta(minutes=1)


def validate_permission_list(value: object) -> None:
    if not isinstance(value, list):
        raise ValidationError("must be a list of permission strings")
    for item in value:
        try:
            parse_permission(item)
        except InvalidPermission as exc:
            raise ValidationError(str(exc)) from None


class User(AbstractUser):
    """A person (or the system principal) who can own schedules.

    `grant` is the most this user may give to anything they run or schedule. The system principal
    owns heartbeats; it cannot log in and cannot hold API keys.
    """

    grant = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_permission_list],
        help_text="Permission strings: the most this user may give to what they run or schedule.",
    )
    is_system = models.BooleanField(
        default=False,
        help_text="The system principal (owner of heartbeats). Cannot log in or hold API keys.",
    )

    objects = UserManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_system"], condition=Q(is_system=True), name="one_system_principal"
            )
        ]

    def capability_set(self) -> CapabilitySet:
        return CapabilitySet.parse(self.grant)

    def add_to_grant(self, permissions: list[str]) -> list[str]:
        """Append the canonical forms of `permissions` not already present; returns the grant."""
        current = list(self.grant)
        for text in permissions:
            canonical = parse_permission(text).text
            if canonical not in current:
                current.append(canonical)
        self.grant = current
        return current


SYSTEM_USERNAME = "picobot-system"


def system_principal() -> User:
    """The one system principal, created on first use with an unusable password."""
    user = User.objects.filter(is_system=True).first()
    if user is not None:
        return user
    user, _ = User.objects.get_or_create(
        username=SYSTEM_USERNAME, defaults={"is_system": True, "is_active": True}
    )
    if not user.is_system:
        raise ValidationError(f"user {SYSTEM_USERNAME!r} exists and is not the system principal")
    if user.has_usable_password():
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def digest_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKey(models.Model):
    """A bearer key. Only its SHA-256 digest is stored; the key itself is shown once."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(
        max_length=16, editable=False, help_text="The first characters, to tell keys apart."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        state = "revoked" if self.revoked_at else "active"
        return f"{self.prefix}… ({self.user}, {state})"

    @classmethod
    def issue(cls, user: User, name: str = "") -> tuple[ApiKey, str]:
        """Create a key for `user`; returns the row and the secret, which is not kept."""
        if user.is_system:
            raise ValidationError("the system principal cannot hold API keys")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
        key = cls.objects.create(
            user=user, name=name, digest=digest_key(secret), prefix=secret[:12]
        )
        return key, secret

    def revoke(self) -> None:
        ApiKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=Now())
        self.refresh_from_db(fields=["revoked_at"])

    def touch(self) -> bool:
        """Record use, at most once a minute (a conditional update, so no write storm)."""
        cutoff = timezone.now() - LAST_USED_RESOLUTION
        if self.last_used_at is not None and self.last_used_at >= cutoff:
            return False  # the row we just read is recent enough: no query at all
        updated = (
            ApiKey.objects.filter(pk=self.pk)
            .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff))
            .update(last_used_at=timezone.now())
        )
        return updated == 1


class ThrottleWindow(models.Model):
    """How many requests one API key made in the current window of one throttle scope
    (`kernel.rest`). A new window overwrites the row, so there is at most one row per key and
    scope, whatever the traffic."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    scope = models.CharField(max_length=32)
    window_start_secs = models.BigIntegerField(help_text="Unix time the window began.")
    hits = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "scope"], name="throttle_window_key_scope")
        ]

    def __str__(self) -> str:
        return f"{self.scope} throttle of key {self.api_key_id}: {self.hits}"


class ChatSession(models.Model):
    """An interactive conversation: its capabilities are fixed when it is created.

    `messages` is the Chat Completions history without the system prompt. `version` is bumped by
    a conditional UPDATE on each turn, so two concurrent turns cannot overwrite each other.
    """

    owner = models.ForeignKey(User, on_delete=models.CASCADE, related_name="chat_sessions")
    capabilities = models.JSONField(default=list, blank=True)
    messages = models.JSONField(default=list, blank=True)
    version = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["owner", "-updated_at"], name="chat_owner_recent_idx")]

    def __str__(self) -> str:
        return f"chat {self.pk} ({self.owner})"


class ChatTurn(models.Model):
    """A chat turn in progress: at most `kernel.turns.MAX_TURNS_PER_USER` live rows per user.

    A row is deleted when its turn ends; one left by a process that died expires at
    `expires_at` (after the longest a turn may take) and stops counting."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="chat_turns")
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["user", "expires_at"], name="chat_turn_user_idx")]

    def __str__(self) -> str:
        return f"chat turn {self.pk} ({self.user_id})"


class ToolDecision(models.TextChoices):
    ALLOWED = "allowed"
    DENIED = "denied"
    INVALID = "invalid"
    ERROR = "error"


class ToolCallStatus(models.TextChoices):
    STARTED = "started"  # written before the tool runs: no effect happens without a row
    FINISHED = "finished"
    INTERRUPTED = "interrupted"  # its worker stopped during the call (found by recovery)


class ToolCall(models.Model):
    """The audit row of one tool call, whatever its outcome. Arguments are stored redacted.

    An allowed call's row is written with status `started` before the tool runs and completed
    after; a refused call's row is written once, `finished`. A tool that starts a process
    records its process group and start time here, so recovery can reap it on the same host.
    """

    execution = models.ForeignKey(
        "schedules.Execution",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="tool_calls",
    )
    session = models.ForeignKey(
        ChatSession, null=True, blank=True, on_delete=models.CASCADE, related_name="tool_calls"
    )
    user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="tool_calls"
    )
    tool = models.CharField(max_length=100)
    decision = models.CharField(max_length=16, choices=ToolDecision.choices)
    missing_permission = models.TextField(blank=True, default="")
    arguments = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    status = models.CharField(
        max_length=16, choices=ToolCallStatus.choices, default=ToolCallStatus.FINISHED
    )
    process_group = models.IntegerField(null=True, blank=True)
    process_started_ticks = models.BigIntegerField(null=True, blank=True)
    process_host = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["execution", "id"], name="toolcall_execution_idx"),
            models.Index(fields=["session", "id"], name="toolcall_session_idx"),
            models.Index(fields=["created_at"], name="toolcall_created_idx"),
            # The few calls in progress, for finding those a dead process left behind.
            models.Index(
                fields=["created_at"],
                condition=models.Q(status="started"),
                name="toolcall_started_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tool}: {self.decision}"
