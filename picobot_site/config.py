"""The strict loader for `picobot.toml`.

Every key is declared here with its type and default. An unknown key, a value of the wrong type
or a value out of range raises `ConfigError` naming the key, so a typo stops start-up instead of
silently running with a default.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from kernel.permissions import InvalidPermission, parse_permission


class ConfigError(ImproperlyConfigured):
    """A configuration mistake; the message names the file, the key and the reason.

    `manage.py` prints it as one line and exits 2 (no traceback)."""


# The notification channels a heartbeat's `notify` may name (the schedules API's notify_channels).
NOTIFY_CHANNELS = ("whatsapp", "webhook", "console")
# `notify`: false (nothing), true (every channel where the system principal has a verified
# contact), or the channels to use: one name or a list of names.
Notify = bool | tuple[str, ...]


@dataclass(frozen=True)
class SchedulerConfig:
    enabled: bool = False
    tick_secs: float = 1
    lease_secs: int = 60
    max_concurrent: int = 4
    max_concurrent_per_user: int = 2
    max_jobs_per_user: int = 50
    max_created_per_window: int = 100
    max_runs_per_window: int = 500
    window_secs: int = 3600
    min_interval_secs: int = 60
    default_timeout_secs: int = 300
    max_timeout_secs: int = 3600
    max_retries: int = 3
    backoff_base_secs: int = 10
    backoff_max_secs: int = 3600
    max_consecutive_failures: int = 10
    history_days: int = 30


@dataclass(frozen=True)
class HeartbeatPrompt:
    name: str
    prompt: str
    interval_secs: int | None = None
    cron: str | None = None
    timezone: str = "UTC"
    capabilities: tuple[str, ...] | None = None
    active_hours: str | None = None
    enabled: bool = True
    notify: Notify | None = None  # None: the section's


@dataclass(frozen=True)
class HeartbeatsConfig:
    enabled: bool = False
    default_interval_secs: int = 300
    capabilities: tuple[str, ...] = ()
    notify: Notify = False
    prompts: tuple[HeartbeatPrompt, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    max_turns: int = 10
    max_tokens_per_run: int = 50_000
    request_timeout_secs: int = 60


@dataclass(frozen=True)
class NotificationsConfig:
    max_attempts: int = 5
    retry_base_secs: int = 30
    delivery_lease_secs: int = 120
    sweep_secs: int = 30
    notify_max_per_run: int = 5
    notify_max_per_user_per_day: int = 50
    code_ttl_secs: int = 600
    code_max_attempts: int = 5
    max_codes_per_hour: int = 5


@dataclass(frozen=True)
class KernelConfig:
    # Run `shell` without the operating-system sandbox where this kernel cannot provide one.
    allow_unconfined_shell: bool = False


@dataclass(frozen=True)
class Config:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    heartbeats: HeartbeatsConfig = field(default_factory=HeartbeatsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    path: str | None = None


def _positive_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, not {type(value).__name__}")
    if value < 1:
        raise ConfigError(f"{key} must be at least 1 (got {value})")
    return value


def _non_negative_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, not {type(value).__name__}")
    if value < 0:
        raise ConfigError(f"{key} must be 0 or more (got {value})")
    return value


def _positive_number(key: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, not {type(value).__name__}")
    if not value > 0:
        raise ConfigError(f"{key} must be greater than 0 (got {value})")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {type(value).__name__}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string")
    if "\x00" in value:
        raise ConfigError(f"{key} must not contain NUL characters")
    return value


def _permissions(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of permission strings")
    for item in value:
        try:
            parse_permission(item)
        except InvalidPermission as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return tuple(value)


def _notify(key: str, value: Any) -> Notify:
    if isinstance(value, bool):
        return value
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{key} must be true, false, a channel name or a non-empty list of channel names"
        )
    for name in names:
        if name not in NOTIFY_CHANNELS:
            raise ConfigError(f"{key}: unknown channel {name!r} (use {', '.join(NOTIFY_CHANNELS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names a channel twice")
    return tuple(names)


Validator = Callable[[str, Any], Any]

_SCHEDULER_KEYS: dict[str, Validator] = {
    "enabled": _bool,
    "tick_secs": _positive_number,
    "lease_secs": _positive_int,
    "max_concurrent": _positive_int,
    "max_concurrent_per_user": _positive_int,
    "max_jobs_per_user": _positive_int,
    "max_created_per_window": _positive_int,
    "max_runs_per_window": _positive_int,
    "window_secs": _positive_int,
    "min_interval_secs": _positive_int,
    "default_timeout_secs": _positive_int,
    "max_timeout_secs": _positive_int,
    "max_retries": _non_negative_int,
    "backoff_base_secs": _positive_int,
    "backoff_max_secs": _positive_int,
    "max_consecutive_failures": _positive_int,
    "history_days": _positive_int,
}

_MODEL_KEYS: dict[str, Validator] = {
    "max_turns": _positive_int,
    "max_tokens_per_run": _positive_int,
    "request_timeout_secs": _positive_int,
}

_NOTIFICATIONS_KEYS: dict[str, Validator] = {
    name: _positive_int for name in NotificationsConfig.__dataclass_fields__
}

_KERNEL_KEYS: dict[str, Validator] = {"allow_unconfined_shell": _bool}

_HEARTBEAT_KEYS: dict[str, Validator] = {
    "enabled": _bool,
    "default_interval_secs": _positive_int,
    "capabilities": _permissions,
    "notify": _notify,
}

_PROMPT_KEYS: dict[str, Validator] = {
    "name": _string,
    "prompt": _string,
    "interval_secs": _positive_int,
    "cron": _string,
    "timezone": _string,
    "capabilities": _permissions,
    "active_hours": _string,
    "enabled": _bool,
    "notify": _notify,
}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ "; did you mean `x`?" when a known name is close to `name`, else ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _section(prefix: str, raw: Any, keys: dict[str, Validator]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{prefix}] must be a table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        validator = keys.get(key)
        if validator is None:
            raise ConfigError(f"unknown key {prefix}.{key}{did_you_mean(str(key), keys)}")
        values[key] = validator(f"{prefix}.{key}", value)
    return values


def _scheduler(raw: Any) -> SchedulerConfig:
    config = SchedulerConfig(**_section("scheduler", raw, _SCHEDULER_KEYS))
    if config.default_timeout_secs > config.max_timeout_secs:
        raise ConfigError(
            "scheduler.default_timeout_secs must not exceed scheduler.max_timeout_secs"
        )
    if config.backoff_base_secs > config.backoff_max_secs:
        raise ConfigError("scheduler.backoff_base_secs must not exceed scheduler.backoff_max_secs")
    return config


def _heartbeats(raw: Any) -> HeartbeatsConfig:
    if not isinstance(raw, dict):
        raise ConfigError("[heartbeats] must be a table")
    raw = dict(raw)
    raw_prompts = raw.pop("prompts", [])
    values = _section("heartbeats", raw, _HEARTBEAT_KEYS)
    if not isinstance(raw_prompts, list):
        raise ConfigError("heartbeats.prompts must be an array of tables ([[heartbeats.prompts]])")
    prompts: list[HeartbeatPrompt] = []
    names: set[str] = set()
    for index, raw_prompt in enumerate(raw_prompts):
        prefix = f"heartbeats.prompts[{index}]"
        prompt_values = _section(prefix, raw_prompt, _PROMPT_KEYS)
        for required in ("name", "prompt"):
            if required not in prompt_values:
                raise ConfigError(f"{prefix}.{required} is required")
        if "interval_secs" in prompt_values and "cron" in prompt_values:
            raise ConfigError(f"{prefix}: give interval_secs or cron, not both")
        if prompt_values["name"] in names:
            raise ConfigError(f"{prefix}.name {prompt_values['name']!r} is used twice")
        names.add(prompt_values["name"])
        prompts.append(HeartbeatPrompt(**prompt_values))
    return HeartbeatsConfig(**values, prompts=tuple(prompts))


_SECTIONS: dict[str, Callable[[Any], Any]] = {
    "scheduler": _scheduler,
    "heartbeats": _heartbeats,
    "model": lambda raw: ModelConfig(**_section("model", raw, _MODEL_KEYS)),
    "notifications": lambda raw: NotificationsConfig(
        **_section("notifications", raw, _NOTIFICATIONS_KEYS)
    ),
    "kernel": lambda raw: KernelConfig(**_section("kernel", raw, _KERNEL_KEYS)),
}


def parse_config(data: dict[str, Any], path: str | None = None) -> Config:
    """Build a Config from parsed TOML, refusing anything undeclared or malformed."""
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        builder = _SECTIONS.get(name)
        if builder is None:
            raise ConfigError(f"unknown section [{name}]{did_you_mean(str(name), _SECTIONS)}")
        sections[name] = builder(raw)
    return Config(**sections, path=path)


def load_config(path: str | Path | None) -> Config:
    """Read and validate the TOML file at `path`; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_config(data, str(path.resolve()))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
