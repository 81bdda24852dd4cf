"""The shell tool's launcher: confine this process by the operating system, then exec a program.

Run as `python -I -S sandbox_exec.py SPEC_JSON -- PROGRAM ARG...` (standard library only, no
Django, so it starts fast and imports nothing from the project). It always sets
PR_SET_PDEATHSIG so it dies with the thread that started it. With `"confine": true` it then
enters new user, network, PID and IPC namespaces (no network at all: the new network namespace
has only a downed loopback; abstract Unix sockets and System V IPC are per namespace), forks
the program as PID 1 of the new PID namespace (when the launcher dies, the program and every
process it started die with the namespace), and in that child applies a Landlock ruleset
(allow-list: the spec's read, write and device paths; every other file access, TCP bind and
connect and signals outside the sandbox are denied) with PR_SET_NO_NEW_PRIVS before execve.

A setup failure exits with SETUP_FAILED after printing one line starting with SETUP_PREFIX.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import stat
import sys
from typing import Any

SETUP_FAILED = 125
SETUP_PREFIX = "picobot-sandbox: "

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# Landlock (linux/landlock.h). The syscall numbers are the same on x86_64 and arm64.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

FILE_ONLY_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
# What each kind of spec entry may do. REFER (moving or linking across directories) and
# device creation are never granted.
RIGHTS = {
    "exec": FS_EXECUTE | FS_READ_FILE | FS_READ_DIR,
    "read": FS_READ_FILE | FS_READ_DIR,
    "write": FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SYM
    | FS_MAKE_FIFO
    | FS_MAKE_SOCK
    | FS_TRUNCATE,
    "device": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise SetupError(f"{what} failed: {os.strerror(error)}")
    return result


def landlock_abi() -> int:
    """The Landlock ABI version of the running kernel, 0 when it has none (or it is off)."""
    result = _libc.syscall(
        SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(0, int(result))


def handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _create_ruleset(abi: int) -> int:
    attr = _RulesetAttr(handled_fs(abi), 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # no rule: all TCP denied
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    return _check(
        _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )


def _add_path_rule(ruleset: int, path: str, rights: int, abi: int) -> None:
    """Allow `rights` beneath `path`; a path that is missing or not what it says is skipped."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # rounded down: what is not there is not granted
    try:
        # The spec names real paths; if a component was swapped for a symlink since, the
        # opened inode is somewhere else: grant nothing rather than that place.
        if os.readlink(f"/proc/self/fd/{fd}") != path:
            return
        mode = os.fstat(fd).st_mode
        if stat.S_ISLNK(mode):
            return
        rights &= handled_fs(abi)
        if not stat.S_ISDIR(mode):
            rights &= FILE_ONLY_RIGHTS
        if not rights:
            return
        attr = _PathBeneathAttr(rights, fd)
        _check(
            _libc.syscall(
                SYS_LANDLOCK_ADD_RULE,
                ctypes.c_int(ruleset),
                LANDLOCK_RULE_PATH_BENEATH,
                ctypes.byref(attr),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)


def restrict(spec: dict[str, Any]) -> None:
    """Apply the spec's Landlock ruleset to this process (irreversible, inherited)."""
    abi = landlock_abi()
    if abi < 1:
        raise SetupError("this kernel has no Landlock")
    ruleset = _create_ruleset(abi)
    try:
        for kind in ("exec", "read", "write", "device"):
            for path in spec.get(kind, []):
                _add_path_rule(ruleset, path, RIGHTS[kind], abi)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(
            _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset)


def _enter_namespaces() -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    _check(_libc.unshare(flags), "unshare(user, network, PID and IPC namespaces)")
    # The same ids inside as outside, so files keep their owners and programs their user.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
        with open(f"/proc/self/{name}", "w") as stream:
            stream.write(text)


def _die_with_parent(expected_parent: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != expected_parent:  # the parent died before the line above
        os._exit(SETUP_FAILED)


def _exec(program: list[str]) -> None:
    os.execve(program[0], program, {})  # noqa: S606 (argv only, by design)


def _run_confined(spec: dict[str, Any], program: list[str]) -> int:
    _enter_namespaces()
    alive_read, alive_write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(alive_write)
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            # The launcher may have died before the line above: then its end of the pipe is
            # closed and this end reads as ready (end of file).
            if select.select([alive_read], [], [], 0)[0]:
                os._exit(SETUP_FAILED)
            os.close(alive_read)
            restrict(spec)
            _exec(program)
        except (SetupError, OSError) as exc:
            _fail(exc)
        os._exit(SETUP_FAILED)  # pragma: no cover
    os.close(alive_read)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _fail(exc: BaseException) -> None:
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.filename:
        message = f"{message}: {exc.filename}"
    os.write(2, f"{SETUP_PREFIX}{message}\n".encode())
    os._exit(SETUP_FAILED)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        os.write(2, f"{SETUP_PREFIX}usage: sandbox_exec SPEC -- PROGRAM [ARG...]\n".encode())
        return SETUP_FAILED
    spec = json.loads(argv[1])
    program = argv[3:]
    try:
        _die_with_parent(int(spec["parent"]))
        if not spec.get("confine"):
            _exec(program)
        return _run_confined(spec, program)
    except (SetupError, OSError) as exc:
        _fail(exc)
    return SETUP_FAILED  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main(sys.argv))
