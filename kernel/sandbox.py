"""What the shell tool's sandbox lets a program touch, and whether this kernel can confine.

`build_spec` turns a run's capabilities into the allow-list that `kernel.sandbox_exec` applies
with Landlock in the child before exec:

- exec (read and run): the system program and library directories (/usr, /bin, /sbin, /lib*);
- read: /etc without its secrets (shadow files, sudoers, SSH host keys, TLS private keys),
  because the dynamic loader, locales, time zones and user names live there; plus every
  `filesystem:read:` capability that is a whole tree (`/data/**` gives /data) or an exact
  file path (`/data/a.txt` gives that file). Any other glob (`/data/*.txt`) gives nothing:
  rounded down, never up;
- write: the scratch directory, plus `filesystem:write:` capabilities by the same rule;
- devices: /dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom.

Never granted, whatever a capability says: the project directory, the protected files (the
database and its side files, the config file, `.secret_key`, `.admin_password`), /proc, /sys
and the rest of /dev. A granted tree that contains one of them is split: its other entries are
granted one by one, recursively, down to the excluded path, which is left out (the split tree's
own listing is then not readable). Symbolic links are never followed into a grant: a tree whose
path is not its real path gives nothing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from kernel import sandbox_exec
from kernel.permissions import Permission, parse_permission

LAUNCHER = str(Path(sandbox_exec.__file__).resolve())
SYSTEM_EXEC_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_READ_DIRS = ("/etc",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
ETC_SECRETS = (
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/security/opasswd",
    "/etc/credstore",
    "/etc/credstore.encrypted",
)
KERNEL_INTERFACES = ("/proc", "/sys", "/dev")
MAX_RULES = 2000


def launcher_command(spec: dict[str, Any], argv: list[str]) -> list[str]:
    """The command that runs `argv` under `spec` (isolated interpreter, no site imports)."""
    return [sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec), "--", *argv]


# --- can this kernel confine? -------------------------------------------------------------------


def kernel_reason() -> str | None:
    """Why this kernel cannot confine, from its settings alone (no process started), or None.

    Cheap enough for a system check that runs at every command's start-up; the shell tool
    itself relies on `unavailable_reason`, which also runs the launcher once."""
    if sandbox_exec.landlock_abi() < 1:
        return "this kernel has no Landlock (Linux 5.13 or later with Landlock enabled is needed)"
    for path, refused in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1"),
    ):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == refused:
            return f"unprivileged user namespaces are disabled ({path} is {value})"
    return None


def unavailable_reason() -> str | None:
    """None when the sandbox works here; otherwise why not (the launcher is probed once)."""
    return kernel_reason() or _probe_reason()


@cache
def _probe_reason() -> str | None:
    spec = {"parent": os.getpid(), "confine": True, "exec": list(_system_exec_dirs([]))}
    try:
        probe = subprocess.run(
            launcher_command(spec, ["/bin/true"]),
            env={},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the sandbox launcher could not run ({exc})"
    if probe.returncode != 0:
        detail = (
            probe.stderr.decode("utf-8", "replace").strip().removeprefix(sandbox_exec.SETUP_PREFIX)
        )
        return f"the sandbox could not be set up: {detail or f'exit status {probe.returncode}'}"
    return None


# --- rounding capabilities down to paths ------------------------------------------------------


def grant_root(permission: Permission) -> tuple[str, bool] | None:
    """(path, is_tree) that a filesystem permission gives the sandbox, or None.

    `/a/b/**` gives the tree /a/b; a pattern without wildcards gives that exact file; anything
    else gives nothing.
    """
    components = [c for c in permission.value.split("/") if c]
    if components and components[-1] == "**":
        prefix = components[:-1]
        if any("*" in c for c in prefix):
            return None
        return "/" + "/".join(prefix), True
    if any("*" in c for c in components):
        return None
    return "/" + "/".join(components), False


def _members(capabilities: Any) -> list[Permission]:
    # A scheduled run's capabilities are its snapshot checked against the owner's grant; the
    # snapshot names the candidates and `allows` confirms each against both.
    source = getattr(capabilities, "snapshot", capabilities)
    try:
        return [p for p in source if isinstance(p, Permission)]
    except TypeError:
        return []


def granted_paths(capabilities: Any, action: str) -> list[tuple[str, bool]]:
    """The (real path, is_tree) pairs the run's `filesystem:<action>:` capabilities give."""
    found: list[tuple[str, bool]] = []
    for member in _members(capabilities):
        if member.kind != "filesystem" or member.action != action:
            continue
        root = grant_root(member)
        if root is None:
            continue
        path, is_tree = root
        as_permission = parse_permission(
            f"filesystem:{action}:{path.rstrip('/')}/**"
            if is_tree
            else f"filesystem:{action}:{path}"
        )
        if not capabilities.allows(as_permission):
            continue
        if os.path.realpath(path) != os.path.normpath(path):
            continue  # a symlink along the path: its target was not what was granted
        found.append((path, is_tree))
    return found


def _is_within(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root.rstrip("/") + "/")


def split_tree(root: str, excluded: list[str]) -> list[str]:
    """`root` as a list of paths whose trees together hold everything under it except the
    excluded paths (and nothing else): `root` itself when nothing excluded is inside it."""
    if any(_is_within(root, e) for e in excluded):
        return []
    inside = [e for e in excluded if _is_within(e, root)]
    if not inside:
        return [root]
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    paths: list[str] = []
    for name in names:
        child = os.path.join(root, name)
        try:
            info = os.lstat(child)
        except OSError:
            continue
        if stat.S_ISLNK(info.st_mode):
            continue  # followed, a link could lead anywhere; not granted
        if stat.S_ISDIR(info.st_mode):
            paths.extend(split_tree(child, inside))
        elif not any(_is_within(child, e) for e in inside):
            paths.append(child)
    return paths


def _narrow(paths: list[tuple[str, bool]], excluded: list[str]) -> list[str]:
    result: list[str] = []
    for path, is_tree in paths:
        if is_tree:
            result.extend(split_tree(path, excluded))
        elif not any(_is_within(path, e) for e in excluded) and _is_regular_file(path):
            result.append(path)
    return result


def _is_regular_file(path: str) -> bool:
    # An exact path that is a directory would give its whole tree: it gives nothing instead.
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _system_exec_dirs(excluded: list[str]) -> list[str]:
    real: list[str] = []
    for path in SYSTEM_EXEC_DIRS:
        resolved = os.path.realpath(path)
        if os.path.isdir(resolved) and not any(_is_within(resolved, r) for r in real):
            real = [r for r in real if not _is_within(r, resolved)] + [resolved]
    return [p for path in real for p in split_tree(path, excluded)]


def build_spec(
    capabilities: Any, scratch: str, protected: list[str], project_dir: str
) -> dict[str, Any]:
    """The launcher spec for one shell call of a run holding `capabilities`."""
    never = sorted({os.path.realpath(p) for p in [*protected, project_dir]})
    never += list(KERNEL_INTERFACES)
    system_never = [*never, *ETC_SECRETS]
    spec: dict[str, Any] = {
        "parent": os.getpid(),
        "confine": True,
        "exec": _system_exec_dirs(never),
        "read": [
            *(p for d in SYSTEM_READ_DIRS for p in split_tree(d, system_never)),
            *_narrow(granted_paths(capabilities, "read"), system_never),
            scratch,
        ],
        "write": [scratch, *_narrow(granted_paths(capabilities, "write"), system_never)],
        "device": list(DEVICES),
    }
    rules = sum(len(spec[k]) for k in ("exec", "read", "write", "device"))
    if rules > MAX_RULES:
        raise ValueError(
            f"the run's filesystem capabilities need {rules} sandbox rules (at most {MAX_RULES})"
        )
    return spec
