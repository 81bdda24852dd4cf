"""`filesystem_read {path}` and `filesystem_write {path, content}`.

The permission is checked against the real path (`..` and symlinks resolved). The file is then
opened by walking that real path from `/` one component at a time with O_NOFOLLOW, so a
component swapped for a symlink after the check makes the open fail instead of escaping. The
database file, the config file, the secret key file, the admin password file and `/proc` are
refused whatever the grant, by path and by identity (device and inode, so a hard link does not
get around it). Writes anywhere in the project directory (its code, its virtualenv, a config
file dropped there) are refused too, by real path and by the identity of the directory opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from django.conf import settings

from kernel.context import ToolContext
from kernel.permissions import Permission, parse_permission
from kernel.tools import Tool, ToolError, ToolPermissionDenied, register

MAX_READ_BYTES = 256 * 1024
MAX_WRITE_BYTES = 1024 * 1024
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def real_path(raw: str) -> str:
    """The absolute real path of `raw` (`~` expanded, `..` and symlinks resolved)."""
    if "\x00" in raw:
        raise ToolError("the path must not contain NUL characters")
    if raw == "~" or raw.startswith("~/"):
        raw = os.path.expanduser("~") + raw[1:]
    if not raw.startswith("/"):
        raise ToolError("the path must be absolute (start with / or ~/)")
    return os.path.realpath(raw)


PROTECTED_MESSAGE = (
    "access to this file is always refused (database, config, secret key or admin password)"
)
PROJECT_MESSAGE = "writing in the project directory is always refused"


def project_dir() -> str:
    """The real path of the project directory (code, virtualenv, local config and secrets)."""
    return os.path.realpath(settings.BASE_DIR)


def protected_paths() -> list[str]:
    """Files no tool may touch: the database (with its SQLite side files), config, secret key,
    the admin password file that `make run` writes."""
    paths: list[str] = []
    for database in settings.DATABASES.values():
        if "sqlite" in str(database.get("ENGINE", "")):
            name = str(database.get("NAME", ""))
            if name and not name.startswith(":memory:") and "mode=memory" not in name:
                paths.extend(os.path.realpath(name + suffix) for suffix in _SQLITE_SUFFIXES)
            test_name = (database.get("TEST") or {}).get("NAME")
            if test_name:
                paths.extend(os.path.realpath(str(test_name) + s) for s in _SQLITE_SUFFIXES)
    config_path = getattr(settings.PICOBOT, "path", None)
    if config_path:
        paths.append(os.path.realpath(config_path))
    paths.append(os.path.realpath(Path(settings.BASE_DIR) / ".secret_key"))
    paths.append(os.path.realpath(Path(settings.BASE_DIR) / ".admin_password"))
    return paths


def refuse_protected_path(path: str) -> None:
    if path == "/proc" or path.startswith("/proc/"):
        raise ToolError("access to /proc is always refused")
    if path in protected_paths():
        raise ToolError(PROTECTED_MESSAGE)


def refuse_project_path(path: str) -> None:
    root = project_dir()
    if path == root or path.startswith(root.rstrip("/") + "/"):
        raise ToolError(PROJECT_MESSAGE)


def refuse_project_directory(directory_fd: int) -> None:
    """Refuse an opened directory that is the project directory (also under another name, such
    as a bind mount); called on every directory walked, so anything inside it is refused."""
    try:
        root = os.stat(project_dir())
    except OSError:
        return
    here = os.fstat(directory_fd)
    if (here.st_dev, here.st_ino) == (root.st_dev, root.st_ino):
        raise ToolError(PROJECT_MESSAGE)


def refuse_protected_file(fd: int) -> None:
    """Refuse an opened file that is one of the protected files under another name."""
    opened = os.fstat(fd)
    for path in protected_paths():
        try:
            protected = os.stat(path)
        except OSError:
            continue
        if (protected.st_dev, protected.st_ino) == (opened.st_dev, opened.st_ino):
            raise ToolError(PROTECTED_MESSAGE)


def open_without_symlinks(
    path: str,
    flags: int,
    mode: int = 0o666,
    check_directory: Callable[[int], None] | None = None,
) -> int:
    """Open the real path `path`, refusing a symlink anywhere along it (no TOCTOU escape).

    `check_directory`, when given, is called with each directory opened on the way (from `/`
    to the file's directory) before the file itself is opened or created; it raises to refuse.
    """
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ToolError("the path names a directory")
    directory = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            if check_directory is not None:
                check_directory(directory)
            next_directory = os.open(
                part,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=directory,
            )
            os.close(directory)
            directory = next_directory
        if check_directory is not None:
            check_directory(directory)
        return os.open(
            parts[-1],
            flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
            mode,
            dir_fd=directory,
        )
    except OSError as exc:
        raise ToolError(_describe(exc)) from None
    finally:
        os.close(directory)


def _describe(exc: OSError) -> str:
    import errno

    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "the path changed to a symbolic link while it was being opened; refused"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "the server may not open this file"
    if exc.errno == errno.EISDIR:
        return "the path is a directory"
    return f"cannot open the file ({os.strerror(exc.errno or 0)})"


def _require(context: ToolContext, permission: Permission) -> None:
    # The Kernel checked the same permission; checking again here, on the path actually opened,
    # keeps the tool safe if it is ever called some other way.
    if not context.capabilities.allows(permission):
        raise ToolPermissionDenied(permission)


def _path_permission(action: str, path: str) -> Permission:
    return parse_permission(f"filesystem:{action}:{path}")


class FilesystemRead(Tool):
    name = "filesystem_read"
    description = (
        "Read a UTF-8 text file on the server (at most 256 KiB are returned). "
        "`path` is absolute or starts with ~/."
    )
    parameters = {
        "type": "object",
        "properties": {"path": {"type": "string", "minLength": 1, "maxLength": 4096}},
        "required": ["path"],
        "additionalProperties": False,
    }
    timeout_secs = 10

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [_path_permission("read", real_path(args["path"]))]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        path = real_path(args["path"])
        _require(context, _path_permission("read", path))
        refuse_protected_path(path)
        fd = open_without_symlinks(path, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ToolError("only regular files can be read")
            refuse_protected_file(fd)
            os.set_blocking(fd, True)
            data = _read_up_to(fd, MAX_READ_BYTES + 1, context)
        finally:
            os.close(fd)
        text = data[:MAX_READ_BYTES].decode("utf-8", errors="replace")
        if len(data) > MAX_READ_BYTES:
            text += f"\n[truncated: the file has {info.st_size} bytes]"
        return text


def _read_up_to(fd: int, limit: int, context: ToolContext) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        context.control.check()
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class FilesystemWrite(Tool):
    name = "filesystem_write"
    description = (
        "Write `content` (UTF-8 text, at most 1 MiB) to a file on the server, replacing it. "
        "The directory must exist. `path` is absolute or starts with ~/."
    )
    parameters = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1, "maxLength": 4096},
            "content": {"type": "string", "maxLength": MAX_WRITE_BYTES},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    }
    timeout_secs = 10

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [_path_permission("write", real_path(args["path"]))]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        path = real_path(args["path"])
        _require(context, _path_permission("write", path))
        refuse_protected_path(path)
        refuse_project_path(path)
        try:
            data = args["content"].encode("utf-8", errors="strict")
        except UnicodeEncodeError:
            raise ToolError("the content is not valid UTF-8 text") from None
        if len(data) > MAX_WRITE_BYTES:
            raise ToolError(f"the content is larger than {MAX_WRITE_BYTES} bytes")
        # No O_TRUNC: nothing is changed until the opened file is known to be an ordinary,
        # unprotected file.
        fd = open_without_symlinks(
            path, os.O_WRONLY | os.O_CREAT, 0o644, check_directory=refuse_project_directory
        )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ToolError("only regular files can be written")
            refuse_protected_file(fd)
            os.set_blocking(fd, True)
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                context.control.check()
                written = os.write(fd, view[:65536])
                view = view[written:]
        finally:
            with suppress(OSError):
                os.close(fd)
        return f"wrote {len(data)} bytes to {path}"


register(FilesystemRead)
register(FilesystemWrite)
