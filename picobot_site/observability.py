"""Logs and traces for operators: JSON log lines carrying the run's ids, and OpenTelemetry
export when the standard `OTEL_*` environment asks for it.

- `PICOBOT_LOG_FORMAT=json`: one JSON object per line (time, level, logger, message, and
  `job_id`, `execution_id`, `user_id` when the line is about a run). The ids come from the run
  the thread is executing (`run_ids`), from `extra=` fields, or from the `job=… execution=…
  user=…` pairs the scheduler's messages carry.
- Traces: the code makes spans through the OpenTelemetry API (no-ops by default). With the SDK
  installed (`pip install '.[otel]'`) and `OTEL_TRACES_EXPORTER` or an `OTEL_EXPORTER_OTLP_*`
  endpoint set, `setup_tracing()` installs a tracer provider that exports them (OTLP over HTTP,
  or `console`), configured by the standard variables (`OTEL_SERVICE_NAME`, ...).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

ID_FIELDS = ("job_id", "execution_id", "user_id")
_IN_MESSAGE = re.compile(r"\b(job|execution|user)=(\d+)\b")
_run_ids: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "picobot_run_ids", default=None
)
LOG_FORMATS = ("plain", "json")


@contextlib.contextmanager
def run_ids(**ids: int) -> Iterator[None]:
    """Within this block, this thread's log lines carry these ids (job_id, execution_id, ...)."""
    token = _run_ids.set({**(_run_ids.get() or {}), **ids})
    try:
        yield
    finally:
        _run_ids.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on odd messages."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in _IN_MESSAGE.findall(message):
            entry.setdefault(f"{key}_id", int(value))
        entry.update(_run_ids.get() or {})
        for field in ID_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_format() -> str:
    """PICOBOT_LOG_FORMAT, checked: `plain` (default) or `json`."""
    from django.core.exceptions import ImproperlyConfigured

    value = os.environ.get("PICOBOT_LOG_FORMAT", "plain").strip().lower() or "plain"
    if value not in LOG_FORMATS:
        raise ImproperlyConfigured(
            f"PICOBOT_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)} (got {value!r})"
        )
    return value


def tracing_requested() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        exporter
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing() -> bool:
    """Install an exporting tracer provider when the environment asks; True if installed."""
    if not tracing_requested():
        return False
    logger = logging.getLogger("picobot.tracing")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        logger.warning(
            "OTEL_* asks for traces but the OpenTelemetry SDK is not installed: "
            "pip install 'picobot-scheduler[otel]'"
        )
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "picobot")})
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning(
                "the OTLP exporter is not installed: pip install 'picobot-scheduler[otel]'"
            )
            return False
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True
