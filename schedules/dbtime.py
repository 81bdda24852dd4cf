"""The database's clock (due times, leases and claim times never use the worker host's clock),
and riding out the database's outages."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from django.db import InterfaceError, OperationalError, connection, connections

T = TypeVar("T")
logger = logging.getLogger("picobot.database")


def db_now(using: str = "default") -> datetime:
    """The current time according to the database server, as an aware UTC datetime."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # clock_timestamp(), not now(): now() is frozen at the start of the transaction.
            cursor.execute("SELECT clock_timestamp()")
            value = cursor.fetchone()[0]
            return value.astimezone(UTC)
        cursor.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")
        text = cursor.fetchone()[0]
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


def through_outage(
    step: Callable[[], T],
    what: str,
    *,
    within: float | None,
    every: float,
    errors: tuple[type[Exception], ...] = (OperationalError, InterfaceError),
) -> T:
    """Run `step`, reconnecting and running it again while the database is unreachable (a
    server restart, a dropped connection), for up to `within` seconds (None: until it answers),
    every `every` seconds; then the error goes to the caller. Only for steps that are safe to
    run again, and never inside a transaction (its work would be gone with the connection)."""
    deadline = None if within is None else time.monotonic() + within
    while True:
        try:
            return step()
        except errors as exc:
            if connection.in_atomic_block or (
                deadline is not None and time.monotonic() >= deadline
            ):
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("%s: database error (%s); retrying in %ss", what, reason, every)
            connection.close()
            time.sleep(every)
