"""Test settings: the project's settings with a fixed config file, whatever ./picobot.toml says."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["PICOBOT_CONFIG"] = os.environ.get(
    "PICOBOT_TEST_CONFIG", str(Path(__file__).with_name("picobot.test.toml"))
)

from picobot_site.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
