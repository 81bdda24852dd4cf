"""The soak's verdict: every occurrence that came due ran to exactly one recorded end, and
every notification to one recorded end.

For every occurrence (job, scheduled_for): at most one `succeeded`, nothing after it, none left
`running`, `skipped` only where the misfire policy skips; for the soak's own schedules, every
occurrence due by the cutoff is covered exactly once (run, or stood for by a later run's
`missed_count`), resolved (a success, a cancel, a skip, or a failure chain the job gave up on),
and the job's `execution_count` equals the occurrences that ended (so no superseded run moved
its job on). Every tool call whose result the model received has its audit row. No "database is
locked" reaches a run or the API user; on SQLite no log line above WARNING at all.

`check_notifications`: every notification ends `sent` or `dead` with its reason, none left
`pending` or `sending`; exactly one row per (execution, recipient, kind), and each of the soak's
executions has exactly the rows its status and its job's notify settings call for; every
delivery the fake Twilio and the webhook receiver took belongs to a row, each `sent` row's was
taken, and one taken but not recorded (a duplicate, or taken for a row recorded `dead`) is
counted and must be in the documented window, else it is a violation.
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
            f"restarts, {faults.terminated} worker and {faults.clusters_terminated} qcluster "
            f"connections terminated in {faults.terminate_rounds} rounds"
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
    from notifications.models import Notification

    first_sent = Notification.objects.filter(sent_at__gt=back).order_by("sent_at").first()
    start = f"{(first_start.started_at - back).total_seconds():.1f}s" if first_start else "never"
    end = f"{(first_end.finished_at - back).total_seconds():.1f}s" if first_end else "never"
    sent = f"{(first_sent.sent_at - back).total_seconds():.1f}s" if first_sent else "never"
    return (
        f"server down {ended - began:.1f}s; after it was back, first claim in {start}, "
        f"first finished run in {end}, first notification sent in {sent}"
    )


def check(plan: Any, cutoff: datetime, drained: bool, model: Any, database: str) -> Report:
    from schedules.models import Execution, Job

    report = Report()
    if not drained:
        report.violation("the occurrences due by the cutoff did not all run before the timeout")
    rows = list(
        Execution.objects.values_list(
            "id",
            "job_id",
            "scheduled_for",
            "attempt",
            "status",
            "missed_count",
            "error",
            "schedule_version",
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
        elif "the database failed" in error:
            # Interrupted to run again; recorded failed only past the attempt limit.
            report.counts[f"runs {row[4]} by a database error"] += 1
        elif "internal error" in error:
            # A crash of our own: database faults no longer end a run this way.
            report.counts["runs failed by an internal error"] += 1
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
    if not pending and _dropped_by_a_change(job, statuses, attempts[-1][7]):
        # An API user changed the schedule (a PATCH bumps its version) between the attempts:
        # the change drops a pending retry, and the next run is the occurrence after it.
        report.counts["occurrences whose retry a schedule change dropped"] += 1
        return ""
    if scheduled_for <= cutoff:
        report.violation(f"{where}: not resolved: attempts {statuses}, pending={pending}")
    return ""


def _dropped_by_a_change(job: Any, statuses: list[str], last_version: int) -> bool:
    # (A failed or superseded last attempt with no retry pending is given up on whatever the
    # version: the rules above take it.)
    return last_version < job.schedule_version and statuses[-1] == S.INTERRUPTED


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
    """No log line above WARNING on SQLite; on PostgreSQL they are counted by kind. A fault the
    worker's loop survived (a bug) is a violation on both."""
    for path in sorted(logs.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if "database is locked" in line or "unexpected error in the loop" in line:
                report.violation(f"{path.name}: {line[:200]}")
            match = _LEVEL.match(line)
            if not match:
                continue
            kind = re.sub(r"\d+", "N", f"{match[1]} {match[2]} {match[3]}")[:90]
            report.counts[f"log {kind}"] += 1
            if database == "sqlite":
                report.violation(f"{path.name}: {line[:200]}")


# --- notifications -----------------------------------------------------------------------------

# A delivery the database did not record (the receiver took it; no `sent` was committed for
# it) is in the documented window (notifications/delivery.py) when its qcluster was killed
# between the send and the commit, or the receiver's answer came after the client's timeout.
# A database restart or a dropped connection is not: delivery reconnects through those. Seconds
# around the receiver's acceptance in which a kill must fall (the request may still be in
# flight when its cluster is killed; the commit may wait on a starved CPU).
WINDOW_BEFORE_SECS = 3.0
WINDOW_AFTER_SECS = 5.0


def check_notifications(
    report: Report,
    plan: Any,
    receivers: Any,
    clusters: Any,
    channel_faults: Any,
    delivered: bool,
) -> None:
    """Every notification `sent` once (or more only inside the documented window, counted) or
    `dead` with its reason, none left open; each completed execution whose job notifies has
    exactly its rows; every delivery the receivers took belongs to a row."""
    from notifications.models import Notification

    if not delivered:
        report.violation("notifications were still pending or sending after the drain timeout")
    rows = list(
        Notification.objects.values(
            "id",
            "channel",
            "contact_id",
            "contact__address",
            "kind",
            "body",
            "status",
            "attempts",
            "last_error",
            "provider_message_id",
            "execution_id",
            "job_id",
            "sent_at",
        )
    )
    for row in rows:
        report.counts[f"notifications {row['channel']} {row['status']}"] += 1
        if row["status"] in ("pending", "sending"):
            report.violation(f"notification {row['id']} left {row['status']}")
        if row["status"] == "dead":
            if not row["last_error"]:
                report.violation(f"notification {row['id']} dead without a reason")
            report.counts[f"notifications dead: {_reason(row['last_error'])}"] += 1
        if row["last_error"].startswith("internal error"):
            # A bug in delivery (the channels' failures are DeliveryErrors), whatever it ended.
            report.violation(f"notification {row['id']}: {row['last_error'][:200]}")
    report.counts["notifications"] = len(rows)
    report.counts["notification delivery attempts"] = sum(row["attempts"] for row in rows)
    _check_expected_rows(report, plan, rows)
    explain = _Window(channel_faults)
    _check_whatsapp(report, rows, receivers.twilio, explain)
    _check_webhooks(report, rows, receivers.webhook, explain)
    for reason, count in explain.reasons.items():
        report.counts[f"deliveries not recorded, in the window: {reason}"] += count
    report.lines.append(
        f"notifications: {len(clusters.crashed)} qclusters exited on their own, "
        f"{len(channel_faults.cluster_kills)} SIGKILLed ({clusters.started} started), "
        f"{len(channel_faults.stretches)} receiver failure stretches "
        f"({_stretch_summary(channel_faults.stretches)})"
    )
    for crash in clusters.crashed:
        report.violation(f"{crash} on its own (not killed by the soak)")


def _reason(error: str) -> str:
    return re.sub(r"\d+", "N", error)[:70]


def _stretch_summary(stretches: list[tuple[str, str, float, float]]) -> str:
    kinds = Counter(mode for _, mode, _, _ in stretches)
    secs = sum(end - start for _, _, start, end in stretches)
    return ", ".join(f"{mode} x{n}" for mode, n in sorted(kinds.items())) + f"; {secs:.0f}s"


def _check_expected_rows(report: Report, plan: Any, rows: list[dict[str, Any]]) -> None:
    """Exactly one row per (execution, recipient, kind); the soak's own jobs' executions have
    exactly the rows their status and notify settings call for, the others none."""
    from notifications import rules
    from notifications.writing import recipients
    from schedules.models import Execution, Job

    by_execution: dict[int, Counter[tuple[str, str, Any]]] = defaultdict(Counter)
    for row in rows:
        if row["execution_id"] is not None:
            key = (row["kind"], row["channel"], row["contact_id"])
            by_execution[row["execution_id"]][key] += 1
    for execution_id, keys in by_execution.items():
        for key, count in keys.items():
            if count > 1:
                report.violation(f"execution {execution_id}: {count} rows for {key}")
    jobs = {job.pk: job for job in Job.objects.filter(pk__in=list(plan.first_due))}
    to_tell = {
        owner: [(channel, c.pk if c else None) for channel, c in recipients(owner, None)]
        for owner in {job.owner_id for job in jobs.values()}
    }
    attempts: dict[tuple[int, Any], list[tuple[int, int, str]]] = defaultdict(list)
    executions = Execution.objects.filter(job_id__in=list(jobs)).values_list(
        "id", "job_id", "scheduled_for", "attempt", "status", "output"
    )
    outputs: dict[int, str] = {}
    for execution_id, job_id, scheduled_for, attempt, status, output in executions:
        attempts[(job_id, scheduled_for)].append((attempt, execution_id, status))
        outputs[execution_id] = output
    checked = 0
    for (job_id, scheduled_for), tried in attempts.items():
        job = jobs[job_id]
        tried.sort()
        statuses = [status for _, _, status in tried]
        pending = job.pending_scheduled_for == scheduled_for and job.enabled
        for i, (_, execution_id, status) in enumerate(tried):
            last = i == len(tried) - 1
            kind = None
            if status == S.SUCCEEDED and "success" in (job.notify_on or []):
                if rules.reportable(outputs[execution_id]) is not None:
                    kind = "result"
            elif "failure" in (job.notify_on or []) and last and not pending:
                gave_up = status in FAILURE_STATUSES or (
                    status == S.SUPERSEDED and _given_up_then_superseded(statuses)
                )
                kind = "failure" if gave_up else None
            expected = Counter((kind, ch, c) for ch, c in to_tell[job.owner_id]) if kind else {}
            found = by_execution.get(execution_id, Counter())
            if dict(found) != dict(expected):
                report.violation(
                    f"execution {execution_id} ({status}, job {job_id} notify_on "
                    f"{job.notify_on}): rows {sorted(found, key=str)}, expected "
                    f"{sorted(expected, key=str)}"
                )
            checked += 1
    report.counts["executions whose notification rows were checked"] = checked


class _Window:
    """Says whether a delivery the database did not record falls in the documented window."""

    def __init__(self, channel_faults: Any) -> None:
        self.kills = sorted(channel_faults.cluster_kills)
        self.reasons: Counter[str] = Counter()

    def explains(self, at: float, late: bool) -> bool:
        low, high = at - WINDOW_BEFORE_SECS, at + WINDOW_AFTER_SECS
        if late:
            reason = "the receiver answered after the client's timeout"
        elif any(low <= kill <= high for kill in self.kills):
            reason = "its qcluster was SIGKILLed"
        else:
            return False
        self.reasons[reason] += 1
        return True


def _check_whatsapp(
    report: Report, rows: list[dict[str, Any]], twilio: Any, explain: _Window
) -> None:
    """Each message the fake Twilio accepted is a row's: the one whose Sid the row recorded,
    or one the database never recorded (a duplicate, or taken for a row that went `dead`),
    which must be in the documented window. A row's message is found by its recipient and
    text (the soak's texts are unique)."""
    mine = [row for row in rows if row["channel"] == "whatsapp"]
    by_message: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in mine:
        by_message[(f"whatsapp:{row['contact__address']}", row["body"])].append(row)
    recorded = {row["provider_message_id"] for row in mine if row["provider_message_id"]}
    accepted = list(twilio.accepted)
    sids = {message["Sid"] for message in accepted}
    for row in mine:
        if row["status"] == "sent" and row["provider_message_id"] not in sids:
            report.violation(f"notification {row['id']} sent, but Twilio never accepted it")
    deliveries: Counter[tuple[str, str]] = Counter()
    for message in accepted:
        key = (message.get("To", ""), message.get("Body", ""))
        deliveries[key] += 1
        owners = by_message.get(key)
        if not owners:
            report.violation(f"Twilio accepted a message no row accounts for: {key}")
            continue
        if message["Sid"] in recorded:
            continue
        _unrecorded(report, owners, float(message["AcceptedAt"]), bool(message["Late"]), explain)
    for key, count in deliveries.items():
        _attempted(report, by_message.get(key, []), count)
    report.counts["whatsapp messages accepted by the fake Twilio"] = len(accepted)
    report.counts["whatsapp requests to the fake Twilio"] = len(twilio.requests)
    report.counts["whatsapp messages delivered more than once"] = sum(
        1 for key, n in deliveries.items() if n > len(by_message.get(key, []))
    )


def _check_webhooks(
    report: Report, rows: list[dict[str, Any]], receiver: Any, explain: _Window
) -> None:
    """Each delivery the webhook receiver took names its row (the payload's `id`); a sent row
    was taken at least once, and every taking but the one recorded is in the window."""
    mine = {row["id"]: row for row in rows if row["channel"] == "webhook"}
    taken: dict[Any, list[tuple[float, bool]]] = defaultdict(list)
    for at, payload_id, _body, late in list(receiver.accepted):
        if payload_id not in mine:
            report.violation(f"the webhook receiver took a delivery no row accounts for: {_body!r}")
            continue
        taken[payload_id].append((at, late))
    for row_id, row in mine.items():
        times = sorted(taken.get(row_id, []))
        _attempted(report, [row], len(times))
        if row["status"] == "sent":
            if not times:
                report.violation(f"notification {row_id} sent, but the receiver never took it")
                continue
            # The recorded delivery is the last one taken before `sent` was written.
            sent_at = row["sent_at"].timestamp()
            before = [t for t in times if t[0] <= sent_at + 1]
            recorded = (before or times)[-1]
            times.remove(recorded)
        for at, late in times:
            _unrecorded(report, [row], at, late, explain)
    report.counts["webhook deliveries taken by the receiver"] = len(receiver.accepted)
    report.counts["webhook requests to the receiver"] = len(receiver.received)
    report.counts["webhook notifications delivered more than once"] = sum(
        1 for row_id, times in taken.items() if len(times) > 1 and mine[row_id]["status"] == "sent"
    )


def _attempted(report: Report, owners: list[dict[str, Any]], deliveries: int) -> None:
    """Each delivery a receiver took is one attempt's (a repeat comes from a later attempt,
    after the one that sent it ended unrecorded): never more deliveries than attempts."""
    attempts = sum(row["attempts"] for row in owners)
    if owners and deliveries > attempts:
        ids = [row["id"] for row in owners]
        report.violation(f"notification {ids}: delivered {deliveries} times in {attempts} attempts")


def _unrecorded(
    report: Report, owners: list[dict[str, Any]], at: float, late: bool, explain: _Window
) -> None:
    dead = any(row["status"] == "dead" for row in owners)
    what = "taken for a row recorded dead" if dead else "duplicate deliveries"
    report.counts[f"{owners[0]['channel']} {what}"] += 1
    if not explain.explains(at, late):
        ids = [row["id"] for row in owners]
        report.violation(
            f"notification {ids} delivered at {datetime.fromtimestamp(at, UTC):%H:%M:%S.%f} "
            "without being recorded, outside the documented window"
        )
