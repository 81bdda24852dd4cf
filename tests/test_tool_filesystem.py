"""filesystem_read and filesystem_write: real-path checks, no symlink escapes, refused files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from kernel.context import ToolContext
from kernel.kernel import kernel
from kernel.models import ToolCall
from kernel.permissions import CapabilitySet
from kernel.tools import filesystem

pytestmark = pytest.mark.django_db


@pytest.fixture
def area(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "note.txt").write_text("hello notes")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    return tmp_path


def invoke(user, grant: list[str], tool: str, **args: str):
    return kernel.invoke(tool, args, ToolContext(user=user, capabilities=CapabilitySet(grant)))


def test_a_file_inside_the_grant_can_be_read(make_user, area) -> None:
    result = invoke(
        make_user(),
        [f"filesystem:read:{area}/allowed/**"],
        "filesystem_read",
        path=f"{area}/allowed/note.txt",
    )
    assert result.decision == "allowed"
    assert "hello notes" in result.content


def test_a_file_outside_the_grant_is_denied_and_never_read(make_user, area) -> None:
    result = invoke(
        make_user(),
        [f"filesystem:read:{area}/allowed/**"],
        "filesystem_read",
        path=f"{area}/secret.txt",
    )
    assert result.decision == "denied"
    assert "TOP SECRET" not in result.content
    assert f"filesystem:read:{area}/secret.txt" in result.content


def test_dot_dot_is_resolved_before_the_check(make_user, area) -> None:
    result = invoke(
        make_user(),
        [f"filesystem:read:{area}/allowed/**"],
        "filesystem_read",
        path=f"{area}/allowed/../secret.txt",
    )
    assert result.decision == "denied"
    assert "TOP SECRET" not in result.content


def test_a_symlink_pointing_outside_the_grant_is_refused(make_user, area) -> None:
    (area / "allowed" / "link.txt").symlink_to(area / "secret.txt")
    result = invoke(
        make_user(),
        [f"filesystem:read:{area}/allowed/**"],
        "filesystem_read",
        path=f"{area}/allowed/link.txt",
    )
    assert result.decision == "denied"
    assert "TOP SECRET" not in result.content


def test_a_symlinked_directory_pointing_outside_is_refused_for_writes(make_user, area) -> None:
    (area / "allowed" / "out").symlink_to(area)
    result = invoke(
        make_user(),
        [f"filesystem:write:{area}/allowed/**"],
        "filesystem_write",
        path=f"{area}/allowed/out/secret.txt",
        content="overwritten",
    )
    assert result.decision == "denied"
    assert (area / "secret.txt").read_text() == "TOP SECRET"


def test_a_symlink_swapped_in_after_the_check_is_not_followed(make_user, area, monkeypatch) -> None:
    """The attacker replaces a checked directory with a symlink between check and open."""
    (area / "allowed" / "sub").mkdir()
    (area / "allowed" / "sub" / "secret.txt").write_text("harmless")
    original = filesystem.open_without_symlinks

    def swap_then_open(path: str, flags: int, mode: int = 0o666) -> int:
        os.rename(area / "allowed" / "sub", area / "allowed" / "sub.old")
        os.symlink(area, area / "allowed" / "sub")
        return original(path, flags, mode)

    monkeypatch.setattr(filesystem, "open_without_symlinks", swap_then_open)
    result = invoke(
        make_user(),
        [f"filesystem:read:{area}/allowed/**"],
        "filesystem_read",
        path=f"{area}/allowed/sub/secret.txt",
    )
    assert "TOP SECRET" not in result.content
    assert result.decision == "error"
    assert "symbolic link" in result.content


def test_a_final_component_swapped_for_a_symlink_is_not_followed(
    make_user, area, monkeypatch
) -> None:
    original = filesystem.open_without_symlinks

    def swap_then_open(path: str, flags: int, mode: int = 0o666) -> int:
        os.unlink(area / "allowed" / "note.txt")
        os.symlink(area / "secret.txt", area / "allowed" / "note.txt")
        return original(path, flags, mode)

    monkeypatch.setattr(filesystem, "open_without_symlinks", swap_then_open)
    result = invoke(
        make_user(),
        [f"filesystem:write:{area}/allowed/**"],
        "filesystem_write",
        path=f"{area}/allowed/note.txt",
        content="pwned",
    )
    assert result.decision == "error"
    assert (area / "secret.txt").read_text() == "TOP SECRET"


def test_the_database_file_is_refused_even_under_a_broad_grant(make_user) -> None:
    if connection.vendor != "sqlite":
        pytest.skip("only SQLite keeps the database in a file")
    database = settings.DATABASES["default"]["NAME"]
    assert os.path.exists(database)
    for tool, extra in (("filesystem_read", {}), ("filesystem_write", {"content": "x"})):
        result = invoke(
            make_user(),
            ["filesystem:read:/**", "filesystem:write:/**"],
            tool,
            path=str(database),
            **extra,
        )
        assert result.decision == "error", tool
        assert "always refused" in result.content
    assert os.path.getsize(database) > 0


def test_a_hard_link_to_a_protected_file_is_refused(make_user, area, settings) -> None:
    config = area / "allowed" / "picobot.toml"
    config.write_text("[scheduler]\nenabled = true\n")
    settings.PICOBOT = type(settings.PICOBOT)(path=str(config))
    os.link(config, area / "allowed" / "innocent.txt")
    result = invoke(
        make_user(), ["filesystem:read:/**"], "filesystem_read", path=f"{area}/allowed/innocent.txt"
    )
    assert result.decision == "error"
    assert "enabled" not in result.content


def test_the_config_file_is_refused_even_under_a_broad_grant(make_user, area, settings) -> None:
    config = area / "picobot.toml"
    config.write_text("[scheduler]\nenabled = true\n")
    settings.PICOBOT = type(settings.PICOBOT)(path=str(config))
    result = invoke(
        make_user(),
        ["filesystem:read:/**", "filesystem:write:/**"],
        "filesystem_read",
        path=str(config),
    )
    assert result.decision == "error"
    assert "enabled" not in result.content
    result = invoke(
        make_user(),
        ["filesystem:write:/**"],
        "filesystem_write",
        path=str(config),
        content="[scheduler]\nenabled = false\n",
    )
    assert result.decision == "error"
    assert "enabled = true" in config.read_text()


def test_proc_is_refused_even_under_a_broad_grant(make_user, area) -> None:
    (area / "allowed" / "env").symlink_to("/proc/self/environ")
    for path in ("/proc/self/environ", "/proc/1/cmdline", f"{area}/allowed/env"):
        result = invoke(make_user(), ["filesystem:read:/**"], "filesystem_read", path=path)
        assert result.decision == "error"
        assert "/proc is always refused" in result.content


def test_a_written_file_has_the_content(make_user, area) -> None:
    result = invoke(
        make_user(),
        [f"filesystem:write:{area}/allowed/*.txt"],
        "filesystem_write",
        path=f"{area}/allowed/new.txt",
        content="fresh ✓",
    )
    assert result.decision == "allowed"
    assert (area / "allowed" / "new.txt").read_text() == "fresh ✓"


def test_write_permission_does_not_grant_reading(make_user, area) -> None:
    result = invoke(
        make_user(),
        [f"filesystem:write:{area}/**"],
        "filesystem_read",
        path=f"{area}/allowed/note.txt",
    )
    assert result.decision == "denied"


def test_relative_paths_are_invalid(make_user) -> None:
    result = invoke(make_user(), ["filesystem:read:/**"], "filesystem_read", path="notes.txt")
    assert result.decision == "invalid"
    assert ToolCall.objects.get().decision == "invalid"


def test_a_fifo_is_refused_without_blocking(make_user, area) -> None:
    os.mkfifo(area / "allowed" / "pipe")
    result = invoke(
        make_user(), [f"filesystem:read:{area}/**"], "filesystem_read", path=f"{area}/allowed/pipe"
    )
    assert result.decision == "error"
    assert "regular files" in result.content


def test_large_files_are_truncated(make_user, area) -> None:
    (area / "allowed" / "big.txt").write_text("a" * (filesystem.MAX_READ_BYTES + 10))
    result = invoke(
        make_user(),
        [f"filesystem:read:{area}/**"],
        "filesystem_read",
        path=f"{area}/allowed/big.txt",
    )
    assert "truncated" in result.content


@pytest.fixture
def project(tmp_path: Path, settings) -> Path:
    """A project directory like `make run` leaves it: code, a virtualenv, secret files."""
    root = tmp_path / "project"
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / "kernel").mkdir()
    (root / "kernel" / "tools.py").write_text("SAFE = True\n")
    (root / ".venv" / "lib" / "site.py").write_text("SAFE = True\n")
    (root / ".secret_key").write_text("django-secret\n")
    (root / ".admin_password").write_text("admin-password\n")
    settings.BASE_DIR = root
    return root


def test_the_admin_password_file_is_refused_like_the_secret_key(make_user, project) -> None:
    os.link(project / ".admin_password", project.parent / "innocent.txt")
    os.symlink(project / ".admin_password", project.parent / "link.txt")
    for name in (".admin_password", ".secret_key"):
        path = str(project / name)
        result = invoke(make_user(), ["filesystem:read:/**"], "filesystem_read", path=path)
        assert result.decision == "error" and "always refused" in result.content, name
        assert "password" not in result.content.split("error:")[-1].replace("admin password", "")
    for path in (project.parent / "innocent.txt", project.parent / "link.txt"):
        result = invoke(make_user(), ["filesystem:read:/**"], "filesystem_read", path=str(path))
        assert result.decision == "error", path
        assert "admin-password" not in result.content


@pytest.mark.parametrize(
    "relative", ["kernel/tools.py", ".venv/lib/site.py", "picobot.toml", "new/../evil.py"]
)
def test_writes_anywhere_in_the_project_directory_are_refused(make_user, project, relative) -> None:
    target = project / relative
    before = target.read_text() if target.exists() else None
    result = invoke(
        make_user(), ["filesystem:write:/**"], "filesystem_write", path=str(target), content="X"
    )
    assert result.decision == "error" and "project directory" in result.content
    assert (target.read_text() if target.exists() else None) == before
    assert not (project / "picobot.toml").exists() and not (project / "evil.py").exists()


def test_a_symlink_into_the_project_directory_is_refused_for_writes(make_user, project) -> None:
    (project.parent / "elsewhere").symlink_to(project / "kernel")
    result = invoke(
        make_user(),
        ["filesystem:write:/**"],
        "filesystem_write",
        path=str(project.parent / "elsewhere" / "tools.py"),
        content="X",
    )
    assert result.decision == "error"
    assert (project / "kernel" / "tools.py").read_text() == "SAFE = True\n"


def test_the_project_directory_is_refused_by_identity_too(make_user, project, monkeypatch) -> None:
    # The path check alone is not trusted: a second name for the directory (a bind mount) has
    # another path but the same device and inode, which the walk checks before creating a file.
    monkeypatch.setattr(filesystem, "refuse_project_path", lambda path: None)
    result = invoke(
        make_user(),
        ["filesystem:write:/**"],
        "filesystem_write",
        path=str(project / "kernel" / "planted.py"),
        content="X",
    )
    assert result.decision == "error" and "project directory" in result.content
    assert not (project / "kernel" / "planted.py").exists()


def test_writes_beside_the_project_directory_still_work(make_user, project) -> None:
    target = project.parent / "project-notes.txt"  # a name that starts like the project's
    result = invoke(
        make_user(), ["filesystem:write:/**"], "filesystem_write", path=str(target), content="ok"
    )
    assert result.decision == "allowed" and target.read_text() == "ok"


def test_the_project_directory_is_refused_by_path_alone_too(
    make_user, project, monkeypatch
) -> None:
    monkeypatch.setattr(filesystem, "refuse_project_directory", lambda fd: None)
    result = invoke(
        make_user(),
        ["filesystem:write:/**"],
        "filesystem_write",
        path=str(project / "picobot.toml"),
        content="[scheduler]\nenabled = true\n",
    )
    assert result.decision == "error" and "project directory" in result.content
    assert not (project / "picobot.toml").exists()
