"""How many chat turns one user may have running at once, exactly, across every web process.

`begin(user_id)` takes a turn slot or returns None when the user already has
MAX_TURNS_PER_USER live turns; `end(turn_id)` gives it back. The count and the insert happen in
one transaction that first locks the user's row (PostgreSQL `SELECT ... FOR UPDATE`; SQLite's
IMMEDIATE transaction already holds the writer lock), so two processes cannot both see a free
slot. A slot left by a process that died expires after TURN_LEASE_SECS.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from kernel.models import ChatTurn, User

MAX_TURNS_PER_USER = 2
# Longer than a turn may last (the chat view's deadline), so a live turn never expires.
TURN_LEASE_SECS = 600


def begin(user_id: int) -> int | None:
    """A new turn slot's id, or None when the user is at MAX_TURNS_PER_USER."""
    with transaction.atomic():
        list(User.objects.select_for_update().filter(pk=user_id).values_list("pk"))
        now = timezone.now()
        turns = ChatTurn.objects.filter(user_id=user_id)
        turns.filter(expires_at__lte=now).delete()
        if turns.count() >= MAX_TURNS_PER_USER:
            return None
        turn = ChatTurn.objects.create(
            user_id=user_id, expires_at=now + timedelta(seconds=TURN_LEASE_SECS)
        )
        return turn.pk


def end(turn_id: int) -> None:
    ChatTurn.objects.filter(pk=turn_id).delete()
