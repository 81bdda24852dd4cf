"""The shell sandbox: real programs that can read or run anything are confined by the kernel.

Every attack here works against an unconfined `shell` (each was checked with the sandbox
switched off): argument filtering cannot stop `date -f`, `tar --checkpoint-action=exec`,
`sed e` or an interpreter, so the operating system must.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.checks import run_checks
from django.db import connection

from kernel import sandbox
from kernel.context import ToolContext
from kernel.kernel import kernel
from kernel.permissions import CapabilitySet
from kernel.tools import shell

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(
        sandbox.unavailable_reason() is not None,
        reason=f"this kernel cannot confine: {sandbox.unavailable_reason()}",
    ),
]

SECRET = "TOP-SECRET-LINE"
PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture
def world(tmp_path: Path, settings) -> Path:
    """A project directory with its protected files, a granted data tree and an outside file."""
    project = tmp_path / "project"
    project.mkdir()
    for name in (".secret_key", ".admin_password", "picobot.toml", "app.py"):
        (project / name).write_text(f"{SECRET} {name}\n")
    settings.BASE_DIR = project
    settings.PICOBOT = dataclasses.replace(settings.PICOBOT, path=str(project / "picobot.toml"))
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "notes.txt").write_text("hello from the grant\n")
    (tmp_path / "data" / "sub" / "deep.txt").write_text("deep inside\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(f"{SECRET} outside\n")
    (tmp_path / "out").mkdir()
    return tmp_path


def run(user, grant: list[str], command: str, *args: str):
    context = ToolContext(user=user, capabilities=CapabilitySet(grant))
    return kernel.invoke("shell", {"command": command, "args": list(args)}, context)


def output_of(result) -> str:
    assert result.decision == "allowed", result.content
    return result.content


def secret_files(world: Path, outside: bool = True) -> list[str]:
    """The protected files (never visible), and a file outside a `data/**` grant."""
    files = [str(world / "outside" / "secret.txt")] if outside else []
    files += [
        str(world / "project" / ".secret_key"),
        str(world / "project" / ".admin_password"),
        str(world / "project" / "picobot.toml"),
        str(world / "project" / "app.py"),
    ]
    if connection.vendor == "sqlite":
        files.append(str(django_settings.DATABASES["default"]["NAME"]))
    return files


READ_GRANTS = ["filesystem:read:{w}/data/**", "filesystem:read:/**"]


@pytest.mark.parametrize("grant", READ_GRANTS)
def test_date_f_cannot_read_a_file_outside_the_grant(make_user, world, grant) -> None:
    grants = ["shell:date", grant.format(w=world)]
    for path in secret_files(world, outside=grant != "filesystem:read:/**"):
        content = output_of(run(make_user(), grants, "date", "-f", path))
        assert SECRET not in content, path
        assert "Permission denied" in content
    allowed = output_of(run(make_user(), grants, "date", "-f", str(world / "data" / "notes.txt")))
    assert "invalid date" in allowed and "hello from the grant" in allowed


def test_cat_reads_inside_the_grant_and_nothing_else(make_user, world) -> None:
    grants = ["shell:cat", f"filesystem:read:{world}/data/**"]
    assert "deep inside" in output_of(run(make_user(), grants, "cat", f"{world}/data/sub/deep.txt"))
    for path in [*secret_files(world), "/etc/shadow", "/proc/self/environ", "/proc/1/environ"]:
        content = output_of(run(make_user(), grants, "cat", path))
        assert SECRET not in content and "exit status 1" in content, path


def test_a_glob_that_is_not_a_whole_tree_gives_the_shell_nothing(make_user, world) -> None:
    grants = ["shell:cat", f"filesystem:read:{world}/data/*.txt", f"filesystem:read:{world}/*/**"]
    content = output_of(run(make_user(), grants, "cat", f"{world}/data/notes.txt"))
    assert "Permission denied" in content
    exact = ["shell:cat", f"filesystem:read:{world}/data/notes.txt"]
    assert "hello" in output_of(run(make_user(), exact, "cat", f"{world}/data/notes.txt"))
    content = output_of(run(make_user(), exact, "cat", f"{world}/data/sub/deep.txt"))
    assert "Permission denied" in content


def test_tar_checkpoint_actions_run_confined(make_user, world) -> None:
    grants = ["shell:tar", f"filesystem:read:{world}/data/**"]
    for path in secret_files(world):
        action = f"--checkpoint-action=exec=cat {path}"
        content = output_of(
            run(make_user(), grants, "tar", "-cf", "/dev/null", "--checkpoint=1", action, ".")
        )
        assert SECRET not in content, path


def test_sed_e_commands_run_confined(make_user, world) -> None:
    grants = ["shell:sed", f"filesystem:read:{world}/data/**"]
    for path in secret_files(world):
        content = output_of(
            run(make_user(), grants, "sed", f"1e cat {path}", f"{world}/data/notes.txt")
        )
        assert SECRET not in content, path
        assert "hello from the grant" in content  # sed itself ran and read its granted input


PROBE = """
import socket, sys
world, tcp_port, udp_port, unix_name = sys.argv[1:5]
for path in sys.argv[5:]:
    try: print("READ", open(path).read())
    except OSError as e: print("denied", e.errno)
for path in [world + "/project/planted.py", world + "/outside/new.txt"]:
    try: open(path, "w").write("x"); print("WROTE", path)
    except OSError as e: print("denied", e.errno)
try: socket.create_connection(("127.0.0.1", int(tcp_port)), timeout=2); print("CONNECTED tcp")
except OSError as e: print("refused", e.errno)
try:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.sendto(b"hello", ("127.0.0.1", int(udp_port))); print("SENT udp")
except OSError as e: print("refused", e.errno)
try:
    unix = socket.socket(socket.AF_UNIX); unix.connect("\\0" + unix_name); print("CONNECTED unix")
except OSError as e: print("refused", e.errno)
print("ok", open(world + "/data/notes.txt").read())
"""


@pytest.mark.skipif(PYTHON is None, reason="python3 is not installed on the safe PATH")
def test_an_interpreter_cannot_read_write_or_reach_the_network(make_user, world) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix_name = f"picobot-test-{os.getpid()}-{id(world)}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0" + unix_name)
    unix.listen()
    for listener in (tcp, udp, unix):
        listener.settimeout(0.2)
    grants = ["shell:python3", f"filesystem:read:{world}/data/**", "filesystem:write:/**"]
    ports = [str(tcp.getsockname()[1]), str(udp.getsockname()[1]), unix_name]
    try:
        content = output_of(
            run(
                make_user(),
                grants,
                "python3",
                "-c",
                PROBE,
                str(world),
                *ports,
                *secret_files(world),
            )
        )
        for receive in (tcp.accept, lambda: udp.recv(10), unix.accept):
            with pytest.raises(TimeoutError):
                receive()
    finally:
        for listener in (tcp, udp, unix):
            listener.close()
    assert SECRET not in content and "READ" not in content
    assert f"WROTE {world}/outside/new.txt" in content  # the write grant covers it
    assert not (world / "project" / "planted.py").exists()
    assert "CONNECTED" not in content and content.count("refused") >= 2
    assert "ok hello from the grant" in content


UNIX_PROBE = """
import socket, sys
try:
    client = socket.socket(socket.AF_UNIX); client.connect(sys.argv[1]); print("CONNECTED")
except OSError as e: print("refused", e.errno)
"""


@pytest.mark.skipif(PYTHON is None, reason="python3 is not installed on the safe PATH")
def test_a_unix_socket_file_inside_a_granted_tree_cannot_be_reached(make_user, world) -> None:
    # Landlock does not check connecting to a socket file, so a `filesystem:read:/**` grant
    # would otherwise reach every local service listening on one (a database, dbus, docker).
    path = str(world / "data" / "service.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    server.settimeout(0.2)
    grants = ["shell:python3", "filesystem:read:/**", f"filesystem:write:{world}/data/**"]
    try:
        content = output_of(run(make_user(), grants, "python3", "-c", UNIX_PROBE, path))
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert "CONNECTED" not in content and "refused 13" in content


def test_writes_reach_only_the_scratch_and_write_trees(make_user, world) -> None:
    grants = ["shell:cp", f"filesystem:read:{world}/data/**", f"filesystem:write:{world}/out/**"]
    source = f"{world}/data/notes.txt"
    output_of(run(make_user(), grants, "cp", source, f"{world}/out/copy.txt"))
    assert (world / "out" / "copy.txt").read_text() == "hello from the grant\n"
    output_of(run(make_user(), grants, "cp", source, "copy-in-scratch.txt"))
    for target in (f"{world}/outside/x.txt", f"{world}/data/x.txt", "/tmp/picobot-escape.txt"):
        content = output_of(run(make_user(), grants, "cp", source, target))
        assert "Permission denied" in content and not os.path.exists(target), target


def test_the_project_directory_is_never_writable(make_user, world) -> None:
    grants = ["shell:cp,touch", "filesystem:write:/**", "filesystem:read:/**"]
    for target in ("picobot.toml", ".secret_key", "new.py", ".venv-planted"):
        path = world / "project" / target
        before = path.read_text() if path.exists() else None
        output_of(run(make_user(), grants, "cp", f"{world}/data/notes.txt", str(path)))
        assert (path.read_text() if path.exists() else None) == before, target
    output_of(run(make_user(), grants, "touch", f"{world}/outside/fine.txt"))
    assert (world / "outside" / "fine.txt").exists()  # the rest of the write grant works


def test_common_programs_still_work(make_user, world) -> None:
    grants = ["shell:*", f"filesystem:read:{world}/data/**"]
    data = f"{world}/data"
    for command, args, expected in (
        ("date", ["-u", "+%Y"], "20"),
        ("echo", ["plain"], "plain"),
        ("ls", [data], "notes.txt"),
        ("grep", ["-r", "deep", data], "deep inside"),
        ("sed", ["s/hello/bye/", f"{data}/notes.txt"], "bye from the grant"),
        ("tar", ["-cf", "archive.tar", "-C", data, "notes.txt"], "exit status 0"),
        ("id", ["-u"], str(os.getuid())),
    ):
        content = output_of(run(make_user(), grants, command, *args))
        assert "exit status 0" in content and expected in content, (command, content)


def test_the_shell_refuses_where_the_kernel_cannot_confine(
    make_user, monkeypatch, picobot_config, tmp_path
) -> None:
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "this kernel has no Landlock")
    monkeypatch.setattr(sandbox, "kernel_reason", lambda: "this kernel has no Landlock")
    picobot_config("kernel", allow_unconfined_shell=False)
    marker = tmp_path / "ran"
    result = run(make_user(), ["shell:touch"], "touch", str(marker))
    assert result.decision == "error"
    assert "cannot confine" in result.content and "allow_unconfined_shell" in result.content
    assert not marker.exists()
    warnings = [w for w in run_checks() if w.id == "picobot.W003"]
    assert warnings and "no Landlock" in warnings[0].msg

    picobot_config("kernel", allow_unconfined_shell=True)
    result = run(make_user(), ["shell:touch"], "touch", str(marker))
    assert result.decision == "allowed" and marker.exists()
    assert [w for w in run_checks() if w.id == "picobot.W003"]  # the warning stays


def test_no_warning_where_the_kernel_confines() -> None:
    assert not [w for w in run_checks() if w.id == "picobot.W003"]


def test_the_launcher_is_run_isolated_from_the_environment(make_user, monkeypatch) -> None:
    # The launcher imports nothing from the environment's PYTHONPATH or site-packages.
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    command = sandbox.launcher_command({"parent": 1}, ["/bin/true"])
    assert command[:3] == [sys.executable, "-I", "-S"]
    content = output_of(run(make_user(), ["shell:echo"], "echo", "ok"))
    assert "exit status 0" in content and shell.SAFE_PATH


def test_a_granted_tree_holding_a_protected_file_is_split_around_it(world) -> None:
    protected = [str(world / "data" / "sub" / "deep.txt")]
    paths = sandbox.split_tree(str(world / "data"), protected)
    assert sorted(paths) == [str(world / "data" / "notes.txt")]
    assert sandbox.split_tree(str(world / "data" / "sub"), [str(world / "data")]) == []
    assert sandbox.split_tree(str(world / "data"), [str(world / "x")]) == [str(world / "data")]
