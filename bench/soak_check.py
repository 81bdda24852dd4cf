"""The soak's verdict: every occurrence that came due ran to exactly one recorded end.

For every occurrence (job, scheduled_for): at most one `succeeded`, nothing after it, none left
`running`, `skipped` only where the misfire policy skips; for the soak's own schedules, every
occurrence due by the cutoff is covered exactly once (run, or stood for by a later run's
`missed_count`), resolved (a success, a cancel, a skip, or a failure chain the job gave up on),
and the job's `execution_count` equals the occurrences that ended (so no superseded run moved
its job on). Every tool call whose result the model received has its audit row. No "database is
locked" reaches a run or the API user; on SQLite no log line above WARNING at all.
"""

from __future__ import annotations

import re
import signal
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schedules.models import FAILURE_STATUSES, ExecutionStatus

S = ExecutionStatus
MAX_SHOWN = 40
COUNTED = {S.SUCCEEDED, S.CANCELLED, *FAILURE_STATUSES}


@dataclass
class Report:
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def violation(self, message: str) -> None:
        self.violations.append(message)

    def add_faults(
        self, faults: Any, api: Any, codes: list[int], pool: Any, logs: Path, database: str
    ) -> None:
        self.lines.append(
            f"faults: {faults.kills} workers SIGKILLed ({pool.started} started), "
            f"{faults.pauses} SIGSTOPped past their lease, {len(faults.restarts)} PostgreSQL "
            f"restarts, {faults.terminated} connections terminated in "
            f"{faults.terminate_rounds} rounds"
        )
        for mode, began, ended in faults.restarts:
            self.lines.append(f"restart -m {mode}: {recovery(began, ended)}")
        self.lines.append(
            f"API user: {api.requests} requests {dict(sorted(api.by_status.items()))}"
        )
        for refused in api.refused:
            self.lines.append(f"API user refused: {refused}")
        for failure in api.failures:
            tolerated = database == "postgres" and _connection_error(failure)
            if tolerated:
                self.counts["API errors while the database was down"] += 1
            else:
                self.violation(f"API user got {failure}")
        for crash in pool.crashed:
            self.violation(f"worker {crash} on its own (not killed by the soak)")
        # -SIGTERM: the signal came while the worker was still starting, before it installed
        # its handler (so before it could claim anything). Anything else but 0 is a failure.
        self.counts["workers stopped while starting"] = codes.count(-signal.SIGTERM)
        if any(code not in (0, -signal.SIGTERM) for code in codes):
            self.violation(f"workers exited with {codes} on SIGTERM")
        check_logs(self, logs, database)

    def print(self, options: Any, elapsed: float) -> None:
        print("\n== soak results ==")
        print(
            f"database {options.database}, {options.workers} workers x {options.concurrency} "
            f"slots, seed {options.seed}, {options.duration_secs:.0f}s of faults, "
            f"{elapsed:.0f}s in all"
        )
        for line in self.lines:
            print(line)
        for name, value in sorted(self.counts.items()):
            print(f"  {name}: {value}")
        print(f"violations: {len(self.violations)}")
        for message in self.violations[:MAX_SHOWN]:
            print(f"  VIOLATION {message}")
        if len(self.violations) > MAX_SHOWN:
            print(f"  ... and {len(self.violations) - MAX_SHOWN} more")


def _connection_error(failure: str) -> bool:
    return bool(re.search(r"OperationalError|InterfaceError|connection", failure)) and (
        "database is locked" not in failure
    )


def recovery(began: float, ended: float) -> str:
    """How long the server was down and how soon after it was back executions ran again."""
    from schedules.models import Execution

    back = datetime.fromtimestamp(ended, UTC)
    first_start = Execution.objects.filter(started_at__gt=back).order_by("started_at").first()
    first_end = (
        Execution.objects.filter(finished_at__gt=back)
        .exclude(status=S.SKIPPED)
        .order_by("finished_at")
        .first()
    )
    start = f"{(first_start.started_at - back).total_seconds():.1f}s" if first_start else "never"
    end = f"{(first_end.finished_at - back).total_seconds():.1f}s" if first_end else "never"
    return (
        f"server down {ended - began:.1f}s; after it was back, first claim in {start}, "
        f"first finished run in {end}"
    )


def check(plan: Any, cutoff: datetime, drained: bool, model: Any, database: str) -> Report:
    from schedules.models import Execution, Job

    report = Report()
    if not drained:
        report.violation("the occurrences due by the cutoff did not all run before the timeout")
    rows = list(
        Execution.objects.values_list(
            "id", "job_id", "scheduled_for", "attempt", "status", "missed_count", "error"
        )
    )
    jobs = {job.pk: job for job in Job.objects.all()}
    occurrences: dict[tuple[int, datetime], list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        occurrences[(row[1], row[2])].append(row)
        report.counts[f"executions {row[4]}"] += 1
        error = row[6] or ""
        if "database is locked" in error:
            report.violation(f"execution {row[0]} saw 'database is locked': {error[:200]}")
        elif "internal error" in error:
            report.counts["runs failed by an internal error"] += 1
            if database == "sqlite":
                report.violation(f"execution {row[0]} failed internally: {error[:200]}")
    report.counts["executions"] = len(rows)
    report.counts["occurrences"] = len(occurrences)
    ended: Counter[int] = Counter()
    for (job_id, scheduled_for), attempts in occurrences.items():
        attempts.sort(key=lambda row: row[3])
        job = jobs[job_id]
        state = check_occurrence(report, job, scheduled_for, attempts, cutoff)
        if state in COUNTED:
            ended[job_id] += 1
    by_job: dict[int, dict[datetime, list[tuple[Any, ...]]]] = defaultdict(dict)
    for (job_id, scheduled_for), attempts in occurrences.items():
        by_job[job_id][scheduled_for] = attempts
    for job_id, first_due in plan.first_due.items():
        job = jobs[job_id]
        check_coverage(report, job, first_due, cutoff, by_job[job_id])
        if job.execution_count != ended[job_id]:
            report.violation(
                f"job {job_id}: execution_count {job.execution_count} but {ended[job_id]} "
                "occurrences ended"
            )
    check_audit(report, model)
    return report


def check_occurrence(
    report: Report, job: Any, scheduled_for: datetime, attempts: list[tuple[Any, ...]], cutoff: Any
) -> str:
    """The general rules for one occurrence; returns how it ended ("" if it has not)."""
    where = f"job {job.pk} occurrence {scheduled_for.isoformat()}"
    statuses = [row[4] for row in attempts]
    if statuses.count(S.SUCCEEDED) > 1:
        report.violation(f"{where}: {statuses.count(S.SUCCEEDED)} successes {statuses}")
    if S.SUCCEEDED in statuses and statuses.index(S.SUCCEEDED) != len(statuses) - 1:
        report.violation(f"{where}: ran again after its success {statuses}")
    for row in attempts:
        if row[4] == S.RUNNING:
            report.violation(f"{where}: execution {row[0]} left running")
        if row[4] == S.SKIPPED and (job.misfire != "skip" or row[5] < 1):
            report.violation(
                f"{where}: skipped though the policy is {job.misfire} with {row[5]} missed"
            )
    last = statuses[-1]
    pending = job.pending_scheduled_for == scheduled_for and job.enabled and not job.deleted_at
    if last in (S.SUCCEEDED, S.CANCELLED, S.SKIPPED):
        return last
    if last in FAILURE_STATUSES and not pending:
        report.counts["occurrences given up after failures"] += 1
        return last
    if last == S.SUPERSEDED and not pending and _given_up_then_superseded(statuses):
        # Recovery recorded the last attempt `lost` and the job gave up on the occurrence; then
        # its paused worker came back and recorded it `superseded`.
        report.counts["occurrences given up on a lost attempt later superseded"] += 1
        return S.LOST
    if scheduled_for <= cutoff:
        report.violation(f"{where}: not resolved: attempts {statuses}, pending={pending}")
    return ""


def _given_up_then_superseded(statuses: list[str]) -> bool:
    return all(s in (*FAILURE_STATUSES, S.SUPERSEDED, S.INTERRUPTED) for s in statuses)


def check_coverage(
    report: Report,
    job: Any,
    first_due: datetime,
    cutoff: datetime,
    mine: dict[datetime, list[tuple[Any, ...]]],
) -> None:
    """Each occurrence of the schedule due by `cutoff` is run or stood for exactly once
    (`mine`: the job's executions by occurrence)."""
    from schedules.timing import next_after, spec_of

    spec = spec_of(job)
    # A run after the cutoff may stand for occurrences before it: walk the schedule that far.
    horizon = max([cutoff, *mine])
    expected: list[datetime] = []
    current: datetime | None = first_due
    while current is not None and current <= horizon:
        expected.append(current)
        current = next_after(spec, current)
    index = {when: i for i, when in enumerate(expected)}
    covered = [0] * len(expected)
    for scheduled_for, attempts in mine.items():
        if scheduled_for not in index:
            report.violation(f"job {job.pk}: ran {scheduled_for.isoformat()}, not in its schedule")
            continue
        at = index[scheduled_for]
        missed = max(row[5] for row in attempts)
        if missed:
            report.counts["occurrences stood for by a later run (missed_count)"] += missed
        for i in range(max(0, at - missed), at + 1):
            covered[i] += 1
    due = sum(1 for when in expected if when <= cutoff)
    for i in range(due):
        if covered[i] != 1:
            what = "never ran" if covered[i] == 0 else f"covered {covered[i]} times"
            report.violation(f"job {job.pk}: occurrence {expected[i].isoformat()} {what}")
    report.counts["occurrences due by the cutoff (soak schedules)"] += due


def check_audit(report: Report, model: Any) -> None:
    """Every tool call the model saw answered has an audit row, found by its nonce."""
    from kernel.models import ToolCall

    audited: set[str] = set()
    for arguments in ToolCall.objects.filter(tool="shell").values_list("arguments", flat=True):
        args = (arguments or {}).get("args") or []
        if args:
            audited.add(f"call_{args[0]}")
    missing = model.answered - audited
    for call_id in sorted(missing)[:MAX_SHOWN]:
        report.violation(f"tool call {call_id} answered to the model but has no audit row")
    if len(missing) > MAX_SHOWN:
        report.violation(f"... {len(missing) - MAX_SHOWN} more tool calls without audit rows")
    report.counts["tool calls issued by the model"] = len(model.issued)
    report.counts["tool calls answered to the model"] = len(model.answered)
    report.counts["tool call audit rows"] = len(audited)
    report.counts["model requests"] = model.requests
    for kind, value in model.counts.items():
        report.counts[f"model answers: {kind}"] = value


_LEVEL = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) (\S+) (.*)$")


def check_logs(report: Report, logs: Path, database: str) -> None:
    """No log line above WARNING on SQLite; on PostgreSQL they are counted by kind."""
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "database is locked" in line:
                report.violation(f"{path.name}: {line[:200]}")
            match = _LEVEL.match(line)
            if not match:
                continue
            kind = re.sub(r"\d+", "N", f"{match[1]} {match[2]} {match[3]}")[:90]
            report.counts[f"log {kind}"] += 1
            if database == "sqlite":
                report.violation(f"{path.name}: {line[:200]}")
