"""Tool subprocesses recorded on their audit rows, and reaped when their worker is gone.

A tool that starts a process group records its id and the leader's start time (clock ticks
since boot, from /proc) with this host's identity (host name and boot id) on the `ToolCall`
row. When recovery finds a run whose worker stopped, `interrupt_calls` marks the run's calls
that never completed `interrupted` and, on the same host and boot, kills what is left of their
groups; `interrupt_abandoned_chat_calls` does the same for chat calls still `started` long after
any turn could have ended (their web process died mid-turn). A recorded id is trusted only as far as it can be proven ours: the leader, if it still
exists, must have the recorded start time; members must belong to the group, have started no
earlier than the leader did, and run as our user (so a reused id is never killed).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Iterable
from datetime import timedelta
from functools import cache

from django.utils import timezone

from kernel.models import ToolCall, ToolCallStatus

logger = logging.getLogger(__name__)


@cache
def host_id() -> str:
    """This host and boot: process ids and start times mean something only within one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as stream:
            boot = stream.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()[:150]}/{boot}"


def _stat(pid: int) -> tuple[int, int] | None:
    """(process group, start time in ticks) of `pid`, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            text = stream.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[2]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    found = _stat(pid)
    return None if found is None else found[1]


def record_process(audit_id: int | None, pid: int) -> None:
    """Write the process group led by `pid` (started with its own session) on the audit row."""
    if audit_id is None:
        return
    ToolCall.objects.filter(pk=audit_id).update(
        process_group=pid, process_started_ticks=start_ticks(pid), process_host=host_id()
    )


def group_members(group: int, leader_started: int) -> list[int]:
    """Our processes still in `group` (see the module docstring for what proves them ours)."""
    leader = _stat(group)
    if leader is not None and (leader[0] != group or leader[1] != leader_started):
        return []  # the id now belongs to another process: the group is not ours
    uid = os.getuid()
    members: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        found = _stat(int(name))
        if found is None or found[0] != group or found[1] < leader_started:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
        except OSError:
            continue
        members.append(int(name))
    return members


def reap_group(group: int, leader_started: int) -> int:
    """SIGKILL what is left of a recorded group on this host; returns how many were killed."""
    killed = 0
    for pid in group_members(group, leader_started):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def interrupt_calls(execution_id: int) -> int:
    """Mark the execution's calls still `started` as interrupted, reaping their processes."""
    rows = ToolCall.objects.filter(execution_id=execution_id, status=ToolCallStatus.STARTED)
    return _interrupt(rows, "its worker stopped during the call", f"of execution {execution_id}")


def interrupt_unrecorded_calls(execution_ids: list[int]) -> int:
    """Mark the calls still `started` of runs that have ended (their result could not be
    written: the database failed just after the tool ran) as interrupted, reaping what is left
    of their processes; called with the runs' completion, inside its transaction."""
    rows = ToolCall.objects.filter(execution_id__in=execution_ids, status=ToolCallStatus.STARTED)
    return _interrupt(
        rows, "the run ended before the call's result was recorded", "of an ended run"
    )


def interrupt_abandoned_chat_calls(older_than_secs: float, limit: int = 100) -> int:
    """Mark chat calls still `started` after `older_than_secs` (longer than any turn lasts) as
    interrupted, reaping their processes on this host; at most `limit` at a time."""
    cutoff = timezone.now() - timedelta(seconds=older_than_secs)
    rows = ToolCall.objects.filter(
        status=ToolCallStatus.STARTED, session__isnull=False, created_at__lt=cutoff
    ).order_by("created_at")[:limit]
    return _interrupt(rows, "its web process stopped during the call", "of a chat turn")


def _interrupt(rows: Iterable[ToolCall], why: str, whose: str) -> int:
    count = 0
    for row in list(rows):
        reaped = 0
        if row.process_group and row.process_started_ticks and row.process_host == host_id():
            reaped = reap_group(row.process_group, row.process_started_ticks)
        note = f"interrupted: {why}"
        if reaped:
            note += f" (killed {reaped} leftover process{'es' if reaped > 1 else ''})"
        count += ToolCall.objects.filter(pk=row.pk, status=ToolCallStatus.STARTED).update(
            status=ToolCallStatus.INTERRUPTED, error=note
        )
        logger.warning("tool call %s %s: %s", row.pk, whose, note)
    return count
