"""shell: safe PATH only, argv only, empty environment, scratch directory, limits, cancel."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kernel.context import Cancelled, RunControl, ToolContext
from kernel.kernel import kernel
from kernel.permissions import CapabilitySet
from kernel.tools import shell

pytestmark = pytest.mark.django_db


def run(user, grant: list[str], command: str, *args: str, control: RunControl | None = None):
    context = ToolContext(
        user=user, capabilities=CapabilitySet(grant), control=control or RunControl()
    )
    return kernel.invoke("shell", {"command": command, "args": list(args)}, context)


def test_an_allowed_command_runs_with_its_arguments(make_user) -> None:
    result = run(make_user(), ["shell:echo"], "echo", "hello", "$HOME", "; rm -rf /")
    assert result.decision == "allowed"
    assert "exit status 0" in result.content
    assert "hello $HOME ; rm -rf /" in result.content  # argv only: no shell expansion


def test_a_command_outside_the_grant_is_denied_and_never_runs(make_user, tmp_path) -> None:
    marker = tmp_path / "ran"
    result = run(make_user(), ["shell:echo"], "touch", str(marker))
    assert result.decision == "denied"
    assert "shell:touch" in result.content
    assert not marker.exists()


def test_a_binary_outside_the_safe_path_cannot_be_reached(make_user, tmp_path, monkeypatch) -> None:
    evil = tmp_path / "evil"
    marker = tmp_path / "ran"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    result = run(make_user(), ["shell:*"], "evil")
    assert result.decision == "error"
    assert "safe PATH" in result.content
    assert not marker.exists()


def test_a_path_as_the_command_is_invalid(make_user, tmp_path) -> None:
    result = run(make_user(), ["shell:*"], "/bin/echo", "hi")
    assert result.decision == "invalid"
    result = run(make_user(), ["shell:*"], "../../bin/echo", "hi")
    assert result.decision == "invalid"


def test_the_command_sees_no_secrets_in_its_environment(make_user, monkeypatch) -> None:
    monkeypatch.setenv("PICOBOT_MODEL_API_KEY", "sk-very-secret")
    monkeypatch.setenv("SECRET_KEY", "django-secret")
    result = run(make_user(), ["shell:env"], "env")
    assert result.decision == "allowed"
    assert "sk-very-secret" not in result.content
    assert "django-secret" not in result.content
    assert result.content.split("exit status 0\n", 1)[1].split("\n<<<END")[0] == ""


def test_the_command_runs_in_an_empty_scratch_directory(make_user) -> None:
    result = run(make_user(), ["shell:pwd", "shell:ls"], "pwd")
    scratch = result.content.split("exit status 0\n", 1)[1].splitlines()[0]
    assert "picobot-shell-" in scratch
    assert scratch != os.getcwd()
    assert not Path(scratch).exists()  # removed afterwards


def test_a_failing_command_reports_its_exit_status(make_user) -> None:
    result = run(make_user(), ["shell:false"], "false")
    assert result.decision == "allowed"
    assert "exit status 1" in result.content


def test_output_is_capped_and_the_program_killed(make_user) -> None:
    started = time.monotonic()
    result = run(make_user(), ["shell:yes"], "yes")
    assert time.monotonic() - started < 10
    assert "output cut" in result.content
    assert len(result.content) < shell.MAX_OUTPUT_BYTES + 1000


def test_a_command_past_its_timeout_is_killed(make_user, monkeypatch) -> None:
    monkeypatch.setattr(shell.Shell, "timeout_secs", 0.5)
    started = time.monotonic()
    result = run(make_user(), ["shell:sleep"], "sleep", "30")
    assert time.monotonic() - started < 15  # far below the 30 s sleep: a load-proof bound
    assert result.decision == "error"
    assert "timed out" in result.content


def test_cancelling_the_run_kills_the_running_command(make_user) -> None:
    control = RunControl.with_timeout(60)
    threading.Timer(0.3, control.cancel, args=("cancelled by the owner",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        run(make_user(), ["shell:sleep"], "sleep", "30", control=control)
    assert time.monotonic() - started < 15  # far below the 30 s sleep: a load-proof bound


def test_a_nul_in_an_argument_is_refused(make_user) -> None:
    result = run(make_user(), ["shell:echo"], "echo", "a\x00b")
    assert result.decision == "error"
