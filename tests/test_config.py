"""The TOML config is parsed strictly: every mistake stops start-up and names its key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from picobot_site.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_design() -> None:
    config = parse_config({})
    assert config.scheduler.enabled is False
    assert config.scheduler.tick_secs == 1
    assert config.scheduler.lease_secs == 60
    assert config.scheduler.max_concurrent == 4
    assert config.scheduler.max_concurrent_per_user == 2
    assert config.scheduler.min_interval_secs == 60
    assert config.scheduler.max_retries == 3
    assert config.scheduler.history_days == 30


def test_an_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key scheduler\.max_concurent"):
        parse_config({"scheduler": {"max_concurent": 3}})


def test_unconfined_shell_is_off_unless_the_operator_opts_in() -> None:
    assert parse_config({}).kernel.allow_unconfined_shell is False
    assert parse_config({"kernel": {}}).kernel.allow_unconfined_shell is False
    opted_in = parse_config({"kernel": {"allow_unconfined_shell": True}})
    assert opted_in.kernel.allow_unconfined_shell is True
    with pytest.raises(ConfigError, match=r"unknown key kernel\.allow_unconfined"):
        parse_config({"kernel": {"allow_unconfined": True}})


def test_an_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[shceduler\]"):
        parse_config({"shceduler": {}})


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("scheduler", "enabled", "yes", "must be true or false"),
        ("scheduler", "lease_secs", "60", "must be an integer"),
        ("scheduler", "lease_secs", True, "must be an integer"),
        ("scheduler", "max_concurrent", 1.5, "must be an integer"),
        ("model", "max_turns", [], "must be an integer"),
        ("kernel", "allow_unconfined_shell", "true", "must be true or false"),
        ("kernel", "allow_unconfined_shell", 1, "must be true or false"),
    ],
)
def test_a_value_of_the_wrong_type_is_named(
    section: str, key: str, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key} {reason}"):
        parse_config({section: {key: value}})


@pytest.mark.parametrize(
    ("key", "value"),
    [("lease_secs", 0), ("min_interval_secs", -5), ("tick_secs", 0), ("max_retries", -1)],
)
def test_a_value_out_of_range_is_named(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"scheduler\.{key} must be"):
        parse_config({"scheduler": {key: value}})


def test_inconsistent_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="default_timeout_secs must not exceed"):
        parse_config({"scheduler": {"default_timeout_secs": 600, "max_timeout_secs": 300}})


def test_heartbeats_in_the_seed_format_parse() -> None:
    config = parse_config(
        {
            "heartbeats": {
                "enabled": True,
                "default_interval_secs": 300,
                "capabilities": ["net:status.example.com"],
                "prompts": [
                    {"name": "health_check", "prompt": "Check", "interval_secs": 60},
                    {
                        "name": "daily_summary",
                        "prompt": "Summarise",
                        "cron": "0 0 18 * * *",
                        "timezone": "America/New_York",
                    },
                ],
            }
        }
    )
    assert [p.name for p in config.heartbeats.prompts] == ["health_check", "daily_summary"]
    assert config.heartbeats.prompts[1].cron == "0 0 18 * * *"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"prompt": "x"}, r"heartbeats\.prompts\[0\]\.name is required"),
        (
            {"name": "a", "prompt": "x", "colour": 1},
            r"unknown key heartbeats\.prompts\[0\]\.colour",
        ),
        ({"name": "a", "prompt": "x", "interval_secs": 60, "cron": "* * * * *"}, "not both"),
        ({"name": "a", "prompt": "x", "capabilities": ["disk:all"]}, r"capabilities: 'disk:all'"),
    ],
)
def test_a_bad_heartbeat_prompt_is_named(prompt: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"heartbeats": {"prompts": [prompt]}})


def test_a_malformed_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "picobot.toml"
    path.write_text("[scheduler\nenabled = true\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)


def test_a_bad_config_stops_manage_py_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "picobot.toml"
    path.write_text("[scheduler]\nlease_secs = 'long'\n")
    env = {
        **os.environ,
        "PICOBOT_CONFIG": str(path),
        "DJANGO_SETTINGS_MODULE": "picobot_site.settings",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "scheduler.lease_secs must be an integer" in result.stderr
