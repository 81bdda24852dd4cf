"""`shell {command, args}`: run one allowlisted executable, never a shell.

The executable is looked up only on `SAFE_PATH` (never the environment's PATH), runs with argv
only, an empty environment, stdin closed, a fresh scratch directory as its working directory and
its own process group, which a timeout, the output cap or `RunControl.cancel` kill as a whole.
Arguments cannot be made safe (`date -f FILE`, `tar --checkpoint-action=exec`, `sed e`), so the
program is confined by the operating system through `kernel.sandbox_exec` (see
`kernel.sandbox` for what it may touch); where the kernel cannot confine, the tool refuses
unless the operator set `[kernel] allow_unconfined_shell`. Either way the program dies with the
thread that started it (PR_SET_PDEATHSIG), and confined, with every process it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from typing import IO, Any

from django.conf import settings

from kernel import sandbox, sandbox_exec
from kernel.context import ToolContext, kill_process_group
from kernel.permissions import Permission, parse_permission
from kernel.processes import record_process
from kernel.tools import Tool, ToolError, register
from kernel.tools.filesystem import project_dir, protected_paths

SAFE_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
MAX_OUTPUT_BYTES = 64 * 1024
COMMAND_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$"


def find_executable(command: str) -> str | None:
    """The executable `command` on SAFE_PATH, or None."""
    return shutil.which(command, path=os.pathsep.join(SAFE_PATH))


class _Collector:
    """Reads a pipe to the end, keeping at most `limit` bytes; calls `on_overflow` once."""

    def __init__(self, stream: IO[bytes], limit: int, on_overflow: Any) -> None:
        self.data = bytearray()
        self.overflowed = False
        self._stream = stream
        self._limit = limit
        self._on_overflow = on_overflow
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self._stream.read1(65536):  # type: ignore[attr-defined]
            room = self._limit - len(self.data)
            self.data += chunk[:room]
            if len(chunk) > room and not self.overflowed:
                self.overflowed = True
                self._on_overflow()


class Shell(Tool):
    name = "shell"
    description = (
        "Run one program with arguments (no shell: no pipes, globbing or variables). Only "
        "programs the run is allowed to use, found on the server's safe PATH. The working "
        "directory is an empty scratch directory; the environment is empty."
    )
    parameters = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "pattern": COMMAND_PATTERN},
            "args": {
                "type": "array",
                "items": {"type": "string", "maxLength": 4096},
                "maxItems": 64,
            },
        },
        "required": ["command"],
        "additionalProperties": False,
    }
    timeout_secs = 60

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [parse_permission(f"shell:{args['command']}")]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        argv_tail = list(args.get("args", []))
        if any("\x00" in arg for arg in argv_tail):
            raise ToolError("arguments must not contain NUL characters")
        executable = find_executable(args["command"])
        if executable is None:
            raise ToolError(
                f"{args['command']!r} is not installed on the safe PATH ({':'.join(SAFE_PATH)})"
            )
        control = context.control
        control.check()
        confine = _must_confine()
        with tempfile.TemporaryDirectory(prefix="picobot-shell-") as scratch:
            scratch = os.path.realpath(scratch)
            spec = _spec(context, scratch, confine)
            process = subprocess.Popen(
                sandbox.launcher_command(spec, [executable, *argv_tail]),
                env={},
                cwd=scratch,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
            assert process.stdout is not None
            with control.track(process):
                record_process(context.audit_id, process.pid)
                collector = _Collector(
                    process.stdout, MAX_OUTPUT_BYTES, lambda: kill_process_group(process)
                )
                try:
                    status = process.wait(timeout=control.remaining())
                except subprocess.TimeoutExpired:
                    kill_process_group(process)
                    process.wait()
                    status = None
                # The group is dead or done; a grandchild holding the pipe must not keep us here.
                kill_process_group_quietly(process)
                collector.thread.join(timeout=2)
                process.stdout.close()
        control.check()  # cancelled or past the deadline: the run stops, output is discarded
        output = bytes(collector.data).decode("utf-8", errors="replace")
        if status == sandbox_exec.SETUP_FAILED and output.startswith(sandbox_exec.SETUP_PREFIX):
            detail = output.removeprefix(sandbox_exec.SETUP_PREFIX).strip()
            raise ToolError(
                f"the sandbox could not be set up, so the program did not run: {detail}"
            )
        if collector.overflowed:
            return f"{output}\n[output cut at {MAX_OUTPUT_BYTES} bytes; the program was killed]"
        if status is None:  # pragma: no cover (only without a deadline, which the Kernel sets)
            raise ToolError("the program timed out")
        return f"exit status {status}\n{output}"


def _must_confine() -> bool:
    """True when the program must run confined; raises when it cannot and may not run otherwise."""
    reason = sandbox.unavailable_reason()
    if reason is None:
        return True
    if settings.PICOBOT.kernel.allow_unconfined_shell:
        return False
    raise ToolError(
        f"shell is refused: this server cannot confine programs ({reason}). The operator may "
        "allow unconfined programs with [kernel] allow_unconfined_shell = true in the config."
    )


def _spec(context: ToolContext, scratch: str, confine: bool) -> dict[str, Any]:
    if not confine:
        return {"parent": os.getpid(), "confine": False}
    try:
        return sandbox.build_spec(context.capabilities, scratch, protected_paths(), project_dir())
    except ValueError as exc:
        raise ToolError(str(exc)) from None


def kill_process_group_quietly(process: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


register(Shell)
