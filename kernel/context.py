"""What a tool call runs with: who, with which capabilities, and until when.

`RunControl` is the deadline and cancellation switch of one run (a scheduled execution or a chat
turn). The agent loop and the Kernel call `check()` between model calls and tool calls; `cancel()`
also kills the process groups of running `shell` subprocesses, so a cancelled run stops at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kernel.permissions import CapabilitySet, InvalidPermission, Permission, parse_permission

if TYPE_CHECKING:
    from kernel.models import User


class RunStopped(Exception):
    """The run must stop now; the subclass says why."""


class Cancelled(RunStopped):
    """Someone cancelled the run (the API, the admin, shutdown, a lost claim)."""

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(reason)
        self.reason = reason


class DeadlineExceeded(RunStopped):
    """The run's deadline passed."""


class RunControl:
    """A thread-safe deadline plus a cancellation switch for one run.

    `deadline` is a `time.monotonic()` value or None (no deadline). Children made with
    `child(timeout_secs)` have an earlier-or-equal deadline and are cancelled with their parent.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._reason: str | None = None
        self._processes: set[subprocess.Popen[Any]] = set()
        self._children: list[RunControl] = []
        self._interrupts: set[Callable[[], None]] = set()

    @classmethod
    def with_timeout(cls, timeout_secs: float | None) -> RunControl:
        """A control whose deadline is `timeout_secs` from now (None: no deadline)."""
        return cls(None if timeout_secs is None else time.monotonic() + timeout_secs)

    def child(self, timeout_secs: float | None) -> RunControl:
        """A control for one step: its deadline is the earlier of ours and now + timeout_secs."""
        deadline = self.deadline
        if timeout_secs is not None:
            own = time.monotonic() + timeout_secs
            deadline = own if deadline is None else min(deadline, own)
        child = RunControl(deadline)
        with self._lock:
            reason = self._reason
            if reason is None:
                self._children.append(child)
        if reason is not None:
            child.cancel(reason)
        return child

    def release_child(self, child: RunControl) -> None:
        with self._lock:
            if child in self._children:
                self._children.remove(child)

    # --- cancellation ---------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the run: later `check()` calls raise Cancelled, subprocesses are killed."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
            processes = list(self._processes)
            children = list(self._children)
            interrupts = list(self._interrupts)
        self._event.set()
        for process in processes:
            kill_process_group(process)
        for interrupt in interrupts:
            _call_quietly(interrupt)
        for child in children:
            child.cancel(reason)

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    def remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raise Cancelled or DeadlineExceeded when the run must stop."""
        if self._event.is_set():
            raise Cancelled(self._reason or "cancelled")
        if self.expired():
            raise DeadlineExceeded("the run's deadline passed")

    def bounded(self, timeout_secs: float) -> float:
        """`timeout_secs`, shortened to the time left before the deadline."""
        remaining = self.remaining()
        return timeout_secs if remaining is None else min(timeout_secs, remaining)

    def wait(self, timeout_secs: float) -> bool:
        """Sleep up to `timeout_secs` (bounded by the deadline); True if cancelled meanwhile."""
        return self._event.wait(max(0.0, self.bounded(timeout_secs)))

    # --- blocking waits ------------------------------------------------------------------

    @contextmanager
    def interrupting(self, interrupt: Callable[[], None]) -> Iterator[None]:
        """Call `interrupt` (from another thread) if the run is cancelled or its deadline passes
        while the block runs: e.g. shut a socket down so a blocked read returns at once, however
        slowly the other end trickles bytes. The block then calls `check()` to learn why."""
        with self._lock:
            already = self._reason is not None
            self._interrupts.add(interrupt)
        timer = None
        if already:
            _call_quietly(interrupt)
        elif self.deadline is not None:
            timer = threading.Timer(self.remaining() or 0.0, _call_quietly, args=(interrupt,))
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._interrupts.discard(interrupt)

    # --- subprocesses ---------------------------------------------------------------------

    @contextmanager
    def track(self, process: subprocess.Popen[Any]) -> Iterator[None]:
        """Register `process` (started with start_new_session=True) for the duration."""
        with self._lock:
            already = self._reason is not None
            self._processes.add(process)
        if already:
            kill_process_group(process)
        try:
            yield
        finally:
            with self._lock:
                self._processes.discard(process)


def _call_quietly(interrupt: Callable[[], None]) -> None:
    # An interrupt races the block it interrupts (a socket already closed): nothing to report.
    try:
        interrupt()
    except Exception:  # noqa: S110
        pass


def kill_process_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL the whole process group led by `process` (it was started in a new session)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        process.kill()


class Capabilities(Protocol):
    def allows(self, required: Permission) -> bool: ...


@dataclass
class ToolContext:
    """Everything a tool call runs with.

    `capabilities` is anything with `allows(Permission) -> bool`; if it also has
    `allows_exactly(Permission) -> bool`, tools use it for rules that need an exact grant
    (http_fetch to a private address). `before_tool_call`, when set, runs before each call; if it
    raises, the call does not run (the worker uses it to check it still holds its claim).
    `audit_id` is the running call's audit row (a tool records its subprocess there).
    """

    user: User
    capabilities: Capabilities
    control: RunControl = field(default_factory=RunControl)
    execution_id: int | None = None
    session_id: int | None = None
    job_id: int | None = None
    before_tool_call: Callable[[], None] | None = None
    in_scheduled_run: bool = False
    # Set by the Kernel while a tool runs: the id of the call's `started` audit row.
    audit_id: int | None = None

    def allows_exactly(self, required: Permission) -> bool:
        exact = getattr(self.capabilities, "allows_exactly", None)
        return bool(exact(required)) if exact is not None else False


def lenient_capability_set(permissions: Iterable[object]) -> CapabilitySet:
    # A malformed stored entry narrows the set (it is skipped); it never widens it.
    parsed: list[Permission] = []
    for item in permissions:
        try:
            parsed.append(parse_permission(item))
        except InvalidPermission:
            continue
    return CapabilitySet(parsed)


class ScheduledRunCapabilities:
    """Allows a permission only if the snapshot allows it and the owner's current grant does.

    `allows_exactly` (the exact-host rule of http_fetch) needs the permission itself as a member
    of both the snapshot and the current grant. Chat sessions use this class too.

    The grant is re-read from the database on every check, so revoking a grant (or deactivating
    the owner) takes effect at the next tool call of a run that is already going.
    """

    def __init__(self, snapshot: CapabilitySet | Iterable[object], owner: User | int) -> None:
        self.snapshot = (
            snapshot if isinstance(snapshot, CapabilitySet) else lenient_capability_set(snapshot)
        )
        self.owner_id: int = owner if isinstance(owner, int) else owner.pk

    def current_grant(self) -> CapabilitySet:
        from kernel.models import User

        row = User.objects.filter(pk=self.owner_id).values_list("grant", "is_active").first()
        if row is None or not row[1]:
            return CapabilitySet()
        grant = row[0] if isinstance(row[0], list) else []
        return lenient_capability_set(grant)

    def allows(self, required: Permission) -> bool:
        return self.snapshot.allows(required) and self.current_grant().allows(required)

    def narrowed_by_grant(self, required: Permission) -> bool:
        """True when the snapshot allows `required` and only the owner's current grant (narrowed
        or revoked since, or the owner deactivated) refuses it."""
        return self.snapshot.allows(required) and not self.current_grant().allows(required)

    def allows_exactly(self, required: Permission) -> bool:
        # Both must name the permission itself: a wildcard in the grant (`net:*`) does not let
        # the snapshot or a chat session unlock a private host by naming it exactly.
        return self.snapshot.allows_exactly(required) and self.current_grant().allows_exactly(
            required
        )

    def __repr__(self) -> str:
        return f"ScheduledRunCapabilities({self.snapshot.as_strings()!r}, owner={self.owner_id})"
