"""Logging filters: each event logged once, at the level it deserves."""

from __future__ import annotations

import logging


class ServiceUnavailableIsAWarning(logging.Filter):
    """A 503 (the scheduler is disabled, no model is configured) is the operator's setting, not a
    server fault: log it as a warning, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "status_code", None) == 503 and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
