"""What every JSON API of the project shares: the strict parser and the per-key throttle."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

DEFAULT_THROTTLE_RATE = "300/minute"
CHAT_THROTTLE_RATE = "30/minute"


class ApiKeyThrottle(SimpleRateThrottle):
    """Requests per API key; the rate is REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["api_key"]."""

    scope = "api_key"

    def get_rate(self) -> str:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope) or DEFAULT_THROTTLE_RATE

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        digest = getattr(request.auth, "digest", None)
        if not digest:
            return None
        return self.cache_format % {"scope": self.scope, "ident": digest}


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

    def get_rate(self) -> str:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope) or CHAT_THROTTLE_RATE
