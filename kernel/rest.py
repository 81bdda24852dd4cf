"""What every JSON API of the project shares: the strict parser and the per-key throttle.

The throttle counts each API key's requests per scope in fixed windows aligned to the Unix epoch
(a "30/minute" rate allows 30 requests in each clock minute), in a `ThrottleWindow` row of the
database, so every web process and host shares the count and a restart does not reset it. One
conditional upsert per request counts the request only while the window has room and says
whether it did, so concurrent requests never pass more than the rate.
"""

from __future__ import annotations

import time
from typing import Any

from django.db import connection
from rest_framework import exceptions
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from kernel.models import ApiKey, ThrottleWindow

DEFAULT_THROTTLE_RATE = "300/minute"
CHAT_THROTTLE_RATE = "30/minute"
_PERIOD_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    """DRF's rate format: "300/minute" (or /m, /second, /hour, /day) as (requests, window_secs)."""
    count, period = rate.split("/")
    return int(count), _PERIOD_SECS[period[0]]


def count_request(api_key_id: int, scope: str, window_start_secs: int, limit: int) -> bool:
    """Count one request of `api_key_id` in `scope`'s window beginning at `window_start_secs`;
    False, counting nothing, when that window already holds `limit` requests.

    A single statement, so it is atomic on both databases (PostgreSQL locks the row for the
    upsert; SQLite has one writer at a time). A window older than the stored one (a host whose
    clock lags) counts in the stored window rather than starting it again."""
    if limit <= 0:
        return False
    table = connection.ops.quote_name(ThrottleWindow._meta.db_table)
    newer = f"excluded.window_start_secs > {table}.window_start_secs"
    sql = (
        f"INSERT INTO {table} (api_key_id, scope, window_start_secs, hits) VALUES (%s, %s, %s, 1) "  # noqa: S608 (table name from the model, values bound)
        f"ON CONFLICT (api_key_id, scope) DO UPDATE SET "
        f"hits = CASE WHEN {newer} THEN 1 ELSE {table}.hits + 1 END, "
        f"window_start_secs = CASE WHEN {newer} THEN excluded.window_start_secs "
        f"ELSE {table}.window_start_secs END "
        f"WHERE {newer} OR {table}.hits < %s "
        f"RETURNING hits"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [api_key_id, scope, window_start_secs, limit])
        return cursor.fetchone() is not None


class ApiKeyThrottle(BaseThrottle):
    """Requests per API key; the rate is REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["api_key"],
    by default DEFAULT_THROTTLE_RATE. Requests not made with an API key are not throttled."""

    scope = "api_key"
    default_rate = DEFAULT_THROTTLE_RATE
    timer = staticmethod(time.time)

    def __init__(self) -> None:
        self.wait_secs: float | None = None

    def get_rate(self) -> str:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope) or self.default_rate

    def allow_request(self, request: Request, view: Any) -> bool:
        key = request.auth
        if not isinstance(key, ApiKey):
            return True
        limit, window_secs = parse_rate(self.get_rate())
        now = self.timer()
        window_start_secs = int(now // window_secs) * window_secs
        if count_request(key.pk, self.scope, window_start_secs, limit):
            return True
        self.wait_secs = window_start_secs + window_secs - now
        return False

    def wait(self) -> float | None:
        """Seconds until the window ends (DRF rounds it up into Retry-After)."""
        return self.wait_secs


class StrictJSONParser(JSONParser):
    """JSON whose nesting is too deep for the parser is a 400, not a 500."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None


class ChatThrottle(ApiKeyThrottle):
    """Chat turns per API key (each runs the model): REST_FRAMEWORK's "chat" rate, by default
    CHAT_THROTTLE_RATE."""

    scope = "chat"
    default_rate = CHAT_THROTTLE_RATE
