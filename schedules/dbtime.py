"""The database's clock. Due times, leases and claim times never use the worker host's clock."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db import connections


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
