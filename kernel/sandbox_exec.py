"""The shell tool's launcher: confine this process by the operating system, then exec a program.

Run as `python -I -S sandbox_exec.py SPEC_JSON -- PROGRAM ARG...` (standard library only, no
Django, so it starts fast and imports nothing from the project). It always sets
PR_SET_PDEATHSIG so it dies with the thread that started it. With `"confine": true` it then
enters new user, network, PID and IPC namespaces (no network at all: the new network namespace
has only a downed loopback; abstract Unix sockets and System V IPC are per namespace), forks
the program as PID 1 of the new PID namespace (when the launcher dies, the program and every
process it started die with the namespace), and in that child applies a Landlock ruleset
(allow-list: the spec's read, write and device paths; every other file access, TCP bind and
connect and signals outside the sandbox are denied) with PR_SET_NO_NEW_PRIVS, and a seccomp
filter that refuses Unix sockets and io_uring, before execve.

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

# seccomp (linux/seccomp.h, linux/filter.h, linux/audit.h).
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
AF_UNIX = 1
# (audit arch, socket, io_uring_setup) per machine.
SYSCALLS = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """A filter refusing Unix sockets (a socket file in a granted tree would otherwise be a way
    out: Landlock does not check connecting to one) and io_uring (which would bypass it)."""
    arch, socket_nr, io_uring_setup_nr = SYSCALLS[machine]
    errno_eacces = SECCOMP_RET_ERRNO | 13
    errno_enosys = SECCOMP_RET_ERRNO | 38
    return [
        (BPF_LD_W_ABS, 0, 0, 4),  # 0: arch
        (BPF_JEQ_K, 0, 10, arch),  # 1: another ABI (i386 on x86_64): kill
        (BPF_LD_W_ABS, 0, 0, 0),  # 2: syscall number
        (BPF_JGE_K, 8, 0, 0x40000000),  # 3: x32 numbers: kill
        (BPF_JEQ_K, 2, 0, socket_nr),  # 4: socket(): look at the family
        (BPF_JEQ_K, 5, 0, io_uring_setup_nr),  # 5: io_uring_setup(): ENOSYS
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 6
        (BPF_LD_W_ABS, 0, 0, 16),  # 7: args[0], the family (low 32 bits)
        (BPF_JEQ_K, 1, 0, AF_UNIX),  # 8
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 9
        (BPF_RET_K, 0, 0, errno_eacces),  # 10
        (BPF_RET_K, 0, 0, errno_enosys),  # 11
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),  # 12
    ]


def install_seccomp() -> None:
    """Install the filter (after PR_SET_NO_NEW_PRIVS); an unknown machine cannot be filtered."""
    machine = os.uname().machine
    if machine not in SYSCALLS:
        raise SetupError(f"no seccomp filter for this machine ({machine})")
    program = seccomp_program(machine)
    filters = (_SockFilter * len(program))(*(_SockFilter(*row) for row in program))
    prog = _SockFprog(len(program), filters)
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


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
            install_seccomp()
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
