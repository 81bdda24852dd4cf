"""How many chat turns one user may have running at once, exactly, across every web process.

`begin(user_id)` takes a turn slot or returns None when the user already has
MAX_TURNS_PER_USER live turns; `end(turn_id)` gives it back. The count and the insert happen in
one transaction that first locks the user's row (PostgreSQL `SELECT ... FOR UPDATE`; SQLite's
IMMEDIATE transaction already holds the writer lock), so two processes cannot both see a free
slot. A slot left by a process that died expires after TURN_LEASE_SECS; the tool calls such a
process left `started` are marked interrupted by the next `begin` in any web process, once they
are that old (`processes.interrupt_abandoned_chat_calls`; looked for at most every
ABANDONED_CALLS_EVERY_SECS per process).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from django.db import DatabaseError, transaction
from django.utils import timezone

from kernel import processes
from kernel.models import ChatTurn, User

logger = logging.getLogger(__name__)

MAX_TURNS_PER_USER = 2
# Longer than a turn may last (the chat view's deadline), so a live turn never expires.
TURN_LEASE_SECS = 600
ABANDONED_CALLS_EVERY_SECS = 300.0

_next_look = 0.0
_look_lock = threading.Lock()


def begin(user_id: int) -> int | None:
    """A new turn slot's id, or None when the user is at MAX_TURNS_PER_USER."""
    interrupt_abandoned_calls()
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


def interrupt_abandoned_calls() -> int:
    """Mark chat calls left `started` by a dead web process as interrupted (older than
    TURN_LEASE_SECS, so no live turn's); does nothing if this process looked recently."""
    global _next_look
    with _look_lock:
        now = time.monotonic()
        if now < _next_look:
            return 0
        _next_look = now + ABANDONED_CALLS_EVERY_SECS
    try:
        return processes.interrupt_abandoned_chat_calls(TURN_LEASE_SECS)
    except DatabaseError:
        # A chore, not the turn's business: the turn goes on, and a later one looks again.
        logger.warning("could not look for abandoned chat tool calls", exc_info=True)
        return 0
