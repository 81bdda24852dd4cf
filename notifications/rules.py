"""The rules of what is sent and when: one module, used by the writers, the tool and delivery.

- `reportable(text)`: an answer of `NOTHING_TO_REPORT` alone, or on its own line at the start or
  the end, means nothing is sent (None); anywhere else the token is removed from what is sent.
- `bounded(body, channel)`: a body longer than the channel takes is cut, with a marker saying so.
- `retry_delay_secs(attempts)`: exponential backoff with jitter from `retry_base_secs`.
"""

from __future__ import annotations

import random
import re

from django.conf import settings

NOTHING_TO_REPORT = "NOTHING_TO_REPORT"
# WhatsApp refuses bodies over 4,096 characters; the others take what the output can hold.
MAX_BODY_CHARS = {"whatsapp": 4096, "webhook": 20_000, "console": 20_000}
CUT_MARKER = "\n[… cut: the full text is in the execution history]"
MAX_BACKOFF_SECS = 3600

_rng = random.SystemRandom()
_SURROGATES = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(rf"[ \t]*{NOTHING_TO_REPORT}[ \t]*")


def reportable(text: str) -> str | None:
    """The text to send for an answer, or None when the answer says there is nothing to send."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or lines[0] == NOTHING_TO_REPORT or lines[-1] == NOTHING_TO_REPORT:
        return None
    return without_token(text)


def without_token(text: str) -> str:
    """`text` with every NOTHING_TO_REPORT removed (the token never reaches anyone)."""
    cleaned = _TOKEN.sub(" ", text).strip()
    while NOTHING_TO_REPORT in cleaned:  # removal can join halves into a new token
        cleaned = cleaned.replace(NOTHING_TO_REPORT, "")
    return cleaned


def bounded(body: str, channel: str) -> str:
    """`body` storable (no NUL, no lone surrogates) and cut to what `channel` takes."""
    body = _SURROGATES.sub("\ufffd", body.replace("\x00", ""))
    limit = MAX_BODY_CHARS.get(channel, 20_000)
    if len(body) <= limit:
        return body
    return body[: limit - len(CUT_MARKER)] + CUT_MARKER


def retry_delay_secs(attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: base * 2^(attempts-1), jittered to half..all."""
    base = settings.PICOBOT.notifications.retry_base_secs
    delay = min(MAX_BACKOFF_SECS, base * 2 ** max(0, attempts - 1))
    return delay * _rng.uniform(0.5, 1.0)
