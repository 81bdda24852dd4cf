"""The claim protocol: claiming due jobs, leases, fenced completion and recovery.

Every statement here that changes a Job a worker holds is fenced: it updates only
`WHERE id = ? AND claim_token = ?`, and only the fields the worker owns. A PATCH, a cancel or a
delete made while the run was going is therefore never undone, and a worker that lost its claim
(its lease expired and another worker recovered the job) changes nothing but its own execution
row, which it marks `superseded`.

Claimers are serialised by a short lock taken first in the claim transaction (a PostgreSQL
transaction-level advisory lock; on SQLite the writer lock that BEGIN IMMEDIATE takes), so the
global and per-user concurrency limits and the runs-per-window quota, which are counted inside
that transaction, are exact across any number of workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import BooleanField
from django.utils.dateparse import parse_datetime
from psycopg.pq import TransactionStatus

from kernel.processes import interrupt_calls, interrupt_unrecorded_calls
from schedules import metrics, quotas
from schedules.dbtime import db_now
from schedules.models import FAILURE_STATUSES, Execution, ExecutionStatus, Job, ScheduleType
from schedules.timing import (
    DuePlan,
    ScheduleSpec,
    next_after,
    plan_due,
    retry_at,
    spec_of,
    too_close_to_previous,
    within_active_hours,
)

logger = logging.getLogger("picobot.claims")

S = ExecutionStatus
# Key of the advisory lock that serialises claimers on PostgreSQL ("pico" in ASCII).
CLAIM_LOCK_KEY = 0x7069636F
# A claimer that stops between its statements while it holds the claim lock (SIGSTOPped, its
# VM paused, starved of CPU) would stop every worker's claims with it: PostgreSQL ends its
# session once it has sat this long in the transaction without sending anything, which releases
# the lock and rolls its claim back. A claim's own gaps between statements are milliseconds.
# JIT is off in the claim too: compiling a plan whose estimate looks big costs tens of
# milliseconds under the lock, for statements that run in one or two.
CLAIM_IDLE_LIMIT_MS = 2000
# Due jobs read per page of the claim's candidate scan: enough for the free slots twice over
# (reading, sending and parsing a candidate costs; the rest of a page is rarely used), at
# least MIN_CANDIDATE_PAGE, at most CANDIDATE_PAGE. A page of owners at their limits is
# followed by the next.
CANDIDATE_PAGE = 200
MIN_CANDIDATE_PAGE = 16
MAX_OUTPUT_CHARS = 20_000
MAX_ERROR_CHARS = 4_000
CANCELLED_ON_REQUEST = "cancelled on request"

RELEASE: dict[str, Any] = {
    "claim_token": None,
    "claimed_by": "",
    "claimed_at": None,
    "lease_expires_at": None,
}

_rng = random.SystemRandom()


# Workers LISTEN here (PostgreSQL) so a new or changed schedule wakes them before their tick.
WAKE_CHANNEL = "picobot_schedules"


def wake_workers() -> None:
    """Ask idle workers to look at the queue now (PostgreSQL NOTIFY, sent at commit).

    On SQLite there is no cross-process signal: workers wake on their tick (`tick_secs`).
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"NOTIFY {WAKE_CHANNEL}")


class ClaimLost(Exception):
    """The worker's claim token is no longer on the job: another worker recovered it."""


@dataclass(frozen=True)
class Claim:
    """One running execution held by this worker: what it runs and the token that fences it."""

    job_id: int
    execution_id: int
    token: UUID
    owner_id: int
    schedule_type: str
    scheduled_for: datetime
    attempt: int
    schedule_version: int
    prompt: str
    capabilities: list[str]
    timeout_secs: int
    started_at: datetime
    lag_secs: float
    # The owner row, read right after the claim commits so the run need not fetch it again
    # (None: the executor reads it).
    owner: Any = field(default=None, compare=False, repr=False)


@dataclass
class Outcome:
    """How an execution ended, as the executor (or recovery, or shutdown) saw it."""

    status: str
    output: str = ""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ClaimResult:
    """What one claim transaction did."""

    claims: list[Claim] = field(default_factory=list)
    skipped: int = 0
    deferred: int = 0


_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str, limit: int) -> str:
    """`text` safe for any database and bounded: no NUL, no lone surrogates, at most `limit`."""
    text = _SURROGATES.sub("\ufffd", (text or "").replace("\x00", ""))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


# --- claiming ----------------------------------------------------------------------------------


def claim_due(worker_id: str, limit: int, *, due_before: datetime | None = None) -> ClaimResult:
    """Claim up to `limit` due occurrences for `worker_id` in one short transaction.

    Each claimed job gets a fresh claim token, the worker id and a lease; each claimed occurrence
    gets its `running` Execution. Occurrences the misfire policy skips get a `skipped` execution
    and their job moves on without holding a claim. `due_before` narrows "due" (for --once).

    The claim lock is held from its statement to the commit, and every other claimer waits
    meanwhile. On PostgreSQL the claimer reads and plans without it (`_claim_as_looked`): the
    lock, one statement that claims the planned occurrences within the limits, counted there,
    and writes their executions, and the commit go in one round trip, so the lock is held for
    the server's work only, never for a client's answer. Occurrences that are not simply run
    (the misfire policy or the active hours skip them), SQLite and a claim inside a caller's
    transaction take the general path under the lock (`_claim_locked`).
    """
    result = ClaimResult()
    if limit <= 0:
        return result
    # Settings made for the claim's transaction hold to the end of the outermost one: inside a
    # caller's transaction they would outlive the claim, so they are made only in our own.
    own_transaction = not connection.in_atomic_block
    claims = None
    if connection.vendor == "postgresql" and own_transaction:
        claims = _claim_as_looked(worker_id, limit, due_before, result)
    if claims is None:
        claims = _claim_locked(worker_id, limit, due_before, result, own_transaction)
    # Owners the claim did not read with it are read after the commit, off the claim lock.
    missing = {claim.owner_id for claim in claims if claim.owner is None}
    owners = _owners(missing) if missing else {}
    result.claims = [c if c.owner else replace(c, owner=owners.get(c.owner_id)) for c in claims]
    for claim in result.claims:
        metrics.CLAIMS.inc()
        metrics.EXECUTION_LAG.labels(claim.schedule_type).observe(claim.lag_secs)
    if result.deferred:
        # Counted by the last look only (a claim may look more than once).
        metrics.DEFERRED.labels("max_runs_per_window").inc(result.deferred)
    return result


# How many candidates a claim planned without the lock offers per free slot once claims have
# been seen to come short (other workers took what this one planned): workers that looked at
# the same time plan the same oldest occurrences, and the claim statement takes the first
# still unclaimed, so a claimer that comes second still fills its slots. Uncontended (one
# worker), each claim offers one per slot: planning and locking more would be wasted.
CLAIM_SURPLUS = 4
CLAIM_SURPLUS_SECS = 10.0  # how long a short claim keeps the surplus on
CLAIM_ATTEMPTS = 3
_contended_until = 0.0


def _claim_as_looked(
    worker_id: str, limit: int, due_before: datetime | None, result: ClaimResult
) -> list[Claim] | None:
    """PostgreSQL, in no transaction: look and plan without the claim lock, then claim what is
    still as planned, within the limits, in one round trip (`_claim_planned`). None: a chosen
    occurrence is skipped rather than run (misfire policy, active hours, a clock change), which
    only the general path does.

    Everything planned may have been claimed by other workers meanwhile: then look again (a
    limit that holds the claim back shows in the look, which then chooses nothing), so a
    worker that lost a race does not idle while occurrences are due."""
    global _contended_until
    for _ in range(CLAIM_ATTEMPTS):
        result.deferred = 0  # counted again by each look
        surplus = CLAIM_SURPLUS if time.monotonic() < _contended_until else 1
        look = _look(False, due_before, locked=False, wanted=limit * surplus)
        chosen = _choose(look, limit, result, surplus=surplus)
        if not chosen:
            return []
        planned, general = _plan(chosen, look.now)
        if general:
            result.deferred = 0  # the general path counts them again
            return None
        system = frozenset(row.owner for row in chosen if row.system)
        claimed = _claim_planned(planned, worker_id, look.cutoff, limit=limit, system_owners=system)
        if len(claimed.rows) < min(limit, len(planned)):
            _contended_until = time.monotonic() + CLAIM_SURPLUS_SECS
        if claimed.rows:
            _move_past_conflicts(claimed.conflicts())
            return claimed.claims()
    return []


def _move_past_conflicts(conflicts: list[tuple[Job, _Start]]) -> None:
    """After the claim committed: move each job whose occurrence had already started past it.
    An error here must not lose the claims committed with it (they are returned whatever
    happens); a job left claimed without an execution is released by recovery, and the next
    claim meets the conflict again."""
    for job, start in conflicts:
        try:
            with transaction.atomic():
                _already_started(job, start)
        except Exception:
            logger.exception("job=%s: could not move past its started occurrence", job.pk)


def _claim_locked(
    worker_id: str,
    limit: int,
    due_before: datetime | None,
    result: ClaimResult,
    own_transaction: bool,
) -> list[Claim]:
    """The general path: look, choose and claim under the claim lock."""
    claims: list[Claim] = []
    with transaction.atomic():
        look = _look(own_transaction, due_before, wanted=limit)
        chosen = _choose(look, limit, result)
        if not chosen:
            return []
        general = [row.id for row in chosen]
        claimed = _ClaimedRows([], [], worker_id)
        if connection.vendor == "postgresql":
            planned, general = _plan(chosen, look.now)
            if planned:
                claimed = _claim_planned(planned, worker_id, look.cutoff)
        if general:
            # The claim statement reads the clock again, after counting: a run that finished
            # unseen by the count (it committed before the count's snapshot) then has
            # finished_at < our started_at, so the recorded intervals show the limits exactly
            # as they were enforced.
            jobs, now = _claim_rows(general, worker_id, look.cutoff)
            starts = [(job, start) for job in jobs if (start := _start(job, now)) is not None]
            result.skipped += len(jobs) - len(starts)
            claims.extend(_insert_runs(starts, worker_id, now))
    return claimed.claims() + claims


def _lock_statement(own_transaction: bool = True) -> tuple[str, list[Any]]:
    """PostgreSQL's claim lock. `own_transaction`: the claim's transaction is the outermost
    one, so the settings it makes for itself (see CLAIM_IDLE_LIMIT_MS) end with it."""
    sql, params = "SELECT pg_advisory_xact_lock(%s)", [CLAIM_LOCK_KEY]
    if own_transaction:
        sql += (
            ", set_config('idle_in_transaction_session_timeout', %s, true), "
            "set_config('jit', 'off', true)"
        )
        params.append(str(CLAIM_IDLE_LIMIT_MS))
    return sql, params


def _page_size(wanted: int) -> int:
    return min(CANDIDATE_PAGE, max(MIN_CANDIDATE_PAGE, 2 * wanted))


def _due(cutoff: datetime) -> Any:
    return Job.objects.filter(
        enabled=True, deleted_at__isnull=True, claim_token__isnull=True, next_run_at__lte=cutoff
    )


# What planning an occurrence reads of its job (besides id, owner and next_run_at): read with
# the candidates, so the chosen ones are planned before they are claimed.
PLAN_FIELDS = (
    "schedule_type",
    "run_at",
    "interval_secs",
    "cron",
    "timezone",
    "misfire",
    "active_hours",
    "pending_scheduled_for",
    "pending_attempt",
    "schedule_version",
)


class _Due(NamedTuple):
    """A due job as the candidate pages give it."""

    id: int
    owner: int
    system: bool  # the owner is the system principal (no runs quota)
    due_at: Any  # next_run_at as the database gave it, for the next page's start
    fields: tuple[Any, ...]  # PLAN_FIELDS' values


@dataclass
class _Look:
    """What a claim reads first, under the claim lock."""

    now: datetime
    cutoff: datetime
    running: dict[int, int]  # running executions by owner
    page: list[_Due]  # the first page of candidates, of owners below their concurrency cap
    page_size: int  # how many the page could hold (a shorter page is the last)
    counted: dict[int, int]  # runs in the window of the page's owners (none: left out)


def _choose(look: _Look, limit: int, result: ClaimResult, surplus: int = 1) -> list[_Due]:
    """Pick which due jobs to claim: within the limits, round-robin across owners.

    Due jobs are read oldest first from the due index a page at a time; an owner at its
    concurrency limit or over its runs quota is left out of the pages that follow. Reading stops
    once `free` owners have a pick, so the work is bounded by the slots, not by the backlog.
    `surplus`: pick up to that many per free slot, in order (the claim statement takes the
    first it can).
    """
    config = settings.PICOBOT.scheduler
    cap = config.max_concurrent_per_user
    running, rows, counted = look.running, look.page, look.counted
    free = min(limit, config.max_concurrent - sum(running.values()))
    if free <= 0:
        return []
    closed = {owner for owner, n in running.items() if n >= cap}
    picks: dict[int, list[_Due]] = {}
    runs: dict[int, int] = {}
    while True:
        # Counted under the claim lock, once per owner the pages reach (the first page's in the
        # first look); with this claim's own picks added below, the count is exact.
        fresh = {row.owner for row in rows if not row.system and row.owner not in runs}
        runs.update({owner: counted.get(owner, 0) for owner in fresh})
        for row in rows:
            if row.owner in closed:
                continue
            mine = picks.setdefault(row.owner, [])
            if not row.system and runs[row.owner] + len(mine) >= config.max_runs_per_window:
                result.deferred += 1
                closed.add(row.owner)
                continue
            mine.append(row)
            if running.get(row.owner, 0) + len(mine) >= cap:
                closed.add(row.owner)
        if len(rows) < look.page_size or sum(1 for mine in picks.values() if mine) >= free:
            break
        rows = _due_page(look.cutoff, (rows[-1].due_at, rows[-1].id), closed, look.page_size)
        counted = quotas.runs_in_window_by_owner(
            {row.owner for row in rows if not row.system and row.owner not in runs}, look.now
        )
    return _round_robin(picks, free * surplus)


def _round_robin(picks: dict[int, list[_Due]], free: int) -> list[_Due]:
    # Rank 1 of every owner (in the order of their oldest due job) before anyone's rank 2: one
    # user's backlog cannot starve another user.
    chosen: list[_Due] = []
    rank = 0
    while len(chosen) < free and any(len(mine) > rank for mine in picks.values()):
        chosen.extend(mine[rank] for mine in picks.values() if len(mine) > rank)
        rank += 1
    return chosen[:free]


def _look(
    own_transaction: bool, due_before: datetime | None, *, locked: bool = True, wanted: int = 0
) -> _Look:
    """Take the claim lock and read what a claim needs to know, in ONE statement after the lock
    (each round trip under the claim lock costs every waiting worker; on PostgreSQL the two are
    sent together, so the lock's answer is not waited for): the clock, read once the lock is
    held; the running executions by owner; the first page of due jobs of the owners below their
    concurrency cap (as `_due_page` gives it); and the runs in the window of that page's owners
    (the system principal's are not limited, so not counted). `locked=False` (PostgreSQL): the
    same read without the lock, for a claim that counts again under it. `wanted`: how many
    candidates the claim will choose (it sizes the page)."""
    page_size = _page_size(wanted)
    config = settings.PICOBOT.scheduler
    ops = connection.ops
    if connection.vendor == "postgresql":
        bounds = (
            "SELECT now, LEAST(now, %s::timestamptz) AS cutoff, "
            "now - make_interval(secs => %s) AS window_start "
            "FROM (SELECT clock_timestamp() AS now) clock"
        )
        due = None if due_before is None else ops.adapt_datetimefield_value(due_before)
        bounds_params: list[Any] = [due, config.window_secs]
    else:
        now = db_now()
        cutoff = now if due_before is None else min(now, due_before)
        bounds = "SELECT %s AS now, %s AS cutoff, %s AS window_start"
        bounds_params = [
            ops.adapt_datetimefield_value(value)
            for value in (now, cutoff, now - timedelta(seconds=config.window_secs))
        ]
    execution = Execution._meta.db_table
    page_sql, page_params = _due_page_sql(
        "(SELECT cutoff FROM bounds)", [], None, "SELECT owner FROM running WHERE n >= %s"
    )
    runs_sql, runs_params = quotas.runs_in_window_sql(
        "SELECT owner_id FROM page WHERE NOT is_system",
        window_start_sql="(SELECT window_start FROM bounds)",
    )
    fields = ", ".join(_PLAN_COLUMNS)
    pad = ", ".join(["NULL"] * len(PLAN_FIELDS))
    sql = (
        f"WITH bounds AS ({bounds}), "  # noqa: S608 (names from the models, values bound)
        f"running AS (SELECT owner_id AS owner, COUNT(*) AS n FROM {execution} "
        "WHERE status = %s GROUP BY owner_id), "
        f"page AS ({page_sql}) "
        f"SELECT 0, owner, n, NULL, NULL, {pad} FROM running "
        f"UNION ALL SELECT 1, id, owner_id, is_system, next_run_at, {fields} FROM page "
        f"UNION ALL SELECT 2, runs.*, NULL, NULL, {pad} FROM ({runs_sql}) runs "
        f"UNION ALL SELECT 3, NULL, NULL, NULL, now, {pad} FROM bounds "
        f"UNION ALL SELECT 4, NULL, NULL, NULL, cutoff, {pad} FROM bounds"
    )
    params = [*bounds_params, S.RUNNING, *page_params]
    params += [config.max_concurrent_per_user, page_size, *runs_params]
    with connection.cursor() as lock, connection.cursor() as cursor:
        if connection.vendor == "postgresql" and locked:
            with connection.wrap_database_errors, connection.connection.pipeline():
                lock.execute(*_lock_statement(own_transaction))
                cursor.execute(sql, params)
        else:
            # SQLite: the transaction began IMMEDIATE (settings): it holds the writer lock.
            cursor.execute(sql, params)
        found = cursor.fetchall()
    look = _Look(
        now=datetime.min, cutoff=datetime.min, running={}, page=[], page_size=page_size, counted={}
    )
    for kind, a, b, c, d, *rest in found:
        if kind == 0:
            look.running[a] = int(b)
        elif kind == 1:
            look.page.append(_Due(a, b, bool(c), d, tuple(rest)))
        elif kind == 2:
            if b:
                look.counted[a] = int(b)
        elif kind == 3:
            look.now = _utc(d) or datetime.min
        else:
            look.cutoff = _utc(d) or datetime.min
    look.page.sort(key=lambda row: (row.due_at, row.id))
    return look


def _due_page(
    cutoff: datetime, after: tuple[Any, int] | None, closed: set[int], size: int
) -> list[_Due]:
    """One page of due jobs, oldest first, from the due index."""
    marks = ", ".join(["%s"] * len(closed))
    cutoff_param = connection.ops.adapt_datetimefield_value(cutoff)
    sql, params = _due_page_sql("%s", [cutoff_param], after, marks if closed else "")
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *sorted(closed), size])
        return [_Due(a, b, bool(c), d, tuple(rest)) for a, b, c, d, *rest in cursor.fetchall()]


def _due_page_sql(
    cutoff_sql: str, cutoff_params: list[Any], after: tuple[Any, int] | None, closed_sql: str
) -> tuple[str, list[Any]]:
    """`_due_page`'s query, due at `cutoff_sql`, leaving out the owners `closed_sql` lists ("":
    none); the caller binds that list's values and then the page size, after the parameters
    returned. Columns: id, owner_id, is_system, next_run_at, then PLAN_FIELDS'."""
    table, users = Job._meta.db_table, _user_model()._meta.db_table
    fields = ", ".join(f"j.{column}" for column in _PLAN_COLUMNS)
    sql = (
        f"SELECT j.id, j.owner_id, u.is_system, j.next_run_at, {fields} FROM {table} j "  # noqa: S608 (names from the models, values bound)
        f"JOIN {users} u ON u.id = j.owner_id "
        "WHERE j.enabled AND j.deleted_at IS NULL AND j.claim_token IS NULL "
        f"AND j.next_run_at <= {cutoff_sql}"
    )
    params = list(cutoff_params)
    if after is not None:
        sql += " AND (j.next_run_at, j.id) > (%s, %s)"
        params += list(after)
    if closed_sql:
        sql += f" AND j.owner_id NOT IN ({closed_sql})"
    sql += " ORDER BY j.next_run_at, j.id LIMIT %s"
    return sql, params


_PLAN_COLUMNS = tuple(Job._meta.get_field(name).column for name in PLAN_FIELDS)


def _plan(chosen: list[_Due], now: datetime) -> tuple[list[tuple[Job, _Start]], list[int]]:
    """Plan the chosen jobs' occurrences from what the candidate page read of them (PostgreSQL,
    where the values come typed): those that simply run, and the ids of the others (skipped by
    the misfire policy, the active hours or a clock change), which take the general path."""
    planned: list[tuple[Job, _Start]] = []
    general: list[int] = []
    for row in chosen:
        job = Job(id=row.id, owner_id=row.owner, next_run_at=row.due_at)
        for name, value in zip(PLAN_FIELDS, row.fields, strict=True):
            setattr(job, name, value)
        start, _, _ = _plan_start(job, now)
        if start is None:
            general.append(row.id)
        else:
            planned.append((job, start))
    return planned, general


def _claim_planned(
    planned: list[tuple[Job, _Start]],
    worker_id: str,
    cutoff: datetime,
    *,
    limit: int = 0,
    system_owners: frozenset[int] = frozenset(),
) -> _ClaimedRows:
    """Claim the planned occurrences and write their `running` executions in ONE statement
    (PostgreSQL). A job is claimed only if it is still due and still as planned (a PATCH since
    the look changed it: it is left for the next claim); an occurrence whose attempt already
    started once is not run again, its job moves past it (as in `_insert_runs`).

    In the caller's transaction, which holds the claim lock and chose `planned` under it; or,
    given `limit` (the free slots), in a transaction of its own sent in one round trip with the
    lock and the commit: `planned` was then chosen from a look without the lock, in order of
    preference, so the statement counts the running executions and the runs in the window
    again under the lock, and claims the first still unclaimed occurrences within every limit,
    at most `limit`."""
    config = settings.PICOBOT.scheduler
    job_meta, execution_meta = Job._meta, Execution._meta
    guards = ["next_run_at", "schedule_version", "misfire", "pending_scheduled_for"]
    guards.append("pending_attempt")
    columns = [job_meta.pk, *(job_meta.get_field(name) for name in guards)]
    columns += [execution_meta.get_field(n) for n in ("scheduled_for", "attempt", "missed_count")]
    values = [
        (*(getattr(job, name) for name in ("pk", *guards)), s.scheduled_for, s.attempt, s.missed)
        for job, s in planned
    ]
    if limit:
        # Each candidate's place in the order of preference, its owner, and whether the owner
        # is the system principal (no runs quota).
        columns += [job_meta.pk, job_meta.pk, _BOOLEAN]
        values = [
            (*row, i, job.owner_id, job.owner_id in system_owners)
            for i, (row, (job, _)) in enumerate(zip(values, planned, strict=True))
        ]
    rows = [
        [column.get_db_prep_save(value, connection) for column, value in zip(columns, row, strict=True)]
        for row in values
    ]  # fmt: skip
    source, v, source_params = _rows_as_table(columns, rows)
    job_id, scheduled_for, attempt, missed = v[0], *v[1 + len(guards) : 4 + len(guards)]
    job_table, table = job_meta.db_table, execution_meta.db_table
    matches = " AND ".join(
        f"j.{job_meta.get_field(name).column} IS NOT DISTINCT FROM v.{alias}"
        for name, alias in zip(guards, v[1 : 1 + len(guards)], strict=True)
    )
    due = "j.enabled AND j.deleted_at IS NULL AND j.claim_token IS NULL AND j.next_run_at <= %s"
    cutoff_param = connection.ops.adapt_datetimefield_value(cutoff)
    if limit:
        pos, owner, system = v[-3:]
        runs_sql, runs_params = quotas.runs_in_window_sql(
            f"SELECT {owner} AS owner_id FROM ranked WHERE NOT {system}",  # noqa: S608 (aliases)
            window_start_sql="(SELECT window_start FROM clock)",
        )
        sql = (
            "WITH clock AS (SELECT now, now - make_interval(secs => %s) AS window_start "  # noqa: S608 (names from the models, values bound)
            "FROM (SELECT clock_timestamp() AS now) t), "
            f"v AS (SELECT * FROM {source}), "
            f"live AS (SELECT v.* FROM v JOIN {job_table} j ON j.id = v.{job_id} "
            f"WHERE {due} AND {matches} ORDER BY j.id FOR UPDATE OF j SKIP LOCKED), "
            f"running AS (SELECT owner_id, COUNT(*) AS n FROM {table} WHERE status = %s "
            "GROUP BY owner_id), "
            "ranked AS (SELECT live.*, "
            f"row_number() OVER (PARTITION BY {owner} ORDER BY {pos}) AS k FROM live), "
            f"counted(owner_id, n) AS ({runs_sql}), "
            "chosen AS (SELECT r.* FROM ranked r "
            f"LEFT JOIN running n ON n.owner_id = r.{owner} "
            f"LEFT JOIN counted c ON c.owner_id = r.{owner} "
            f"WHERE r.k + COALESCE(n.n, 0) <= %s AND (r.{system} OR r.k + COALESCE(c.n, 0) <= %s) "
            f"ORDER BY r.{pos} "
            "LIMIT (SELECT GREATEST(0, LEAST(%s, %s - COALESCE(SUM(n), 0))) FROM running)), "
            f"claimed AS (UPDATE {job_table} j SET claim_token = gen_random_uuid(), "
            "claimed_by = %s, claimed_at = clock.now, "
            "lease_expires_at = clock.now + make_interval(secs => %s) "
            f"FROM clock, chosen v WHERE j.id = v.{job_id} "
        )
        params = [config.window_secs, *source_params, cutoff_param, S.RUNNING, *runs_params]
        params += [config.max_concurrent_per_user, config.max_runs_per_window]
        params += [limit, config.max_concurrent, worker_id, config.lease_secs]
    else:
        sql = (
            "WITH clock AS (SELECT clock_timestamp() AS now), "  # noqa: S608 (names from the models, values bound)
            f"claimed AS (UPDATE {job_table} j SET claim_token = gen_random_uuid(), "
            "claimed_by = %s, claimed_at = clock.now, "
            "lease_expires_at = clock.now + make_interval(secs => %s) "
            f"FROM clock, {source} WHERE j.id = v.{job_id} AND j.id IN (SELECT j.id "
            f"FROM {job_table} j WHERE j.id = ANY(%s) AND {due} ORDER BY j.id LIMIT %s "
            f"FOR UPDATE SKIP LOCKED) AND {matches} "
        )
        params = [worker_id, config.lease_secs, *source_params]
        params += [[job.pk for job, _ in planned], cutoff_param, len(planned)]
    back = _ClaimedRows.BACK
    sql += (
        f"RETURNING j.id, {', '.join(f'j.{name}' for name in back)}, "
        f"clock.now AS now, v.{scheduled_for} AS scheduled_for, v.{attempt} AS attempt, "
        f"v.{missed} AS missed) "
    )
    from_claimed = {
        "job_id": "c.id",
        "owner_id": "c.owner_id",
        "scheduled_for": "c.scheduled_for",
        "attempt": "c.attempt",
        "started_at": "c.now",
        "claim_token": "c.claim_token",
        "schedule_version": "c.schedule_version",
        "prompt": "c.prompt",
        "capabilities": "c.capabilities",
        "missed_count": "c.missed",
    }
    given = {"status": S.RUNNING, "worker_id": worker_id}
    names, inserted = [], []
    for f in execution_meta.concrete_fields:
        if f.primary_key:
            continue
        names.append(f.column)
        if f.column in from_claimed:
            inserted.append(from_claimed[f.column])
        else:
            inserted.append("%s")
            params.append(f.get_db_prep_save(given.get(f.attname, f.get_default()), connection))
    owner_columns = ""
    if limit:
        # The owners too, so no query follows the claim (one primary-key row each).
        users = _user_model()._meta
        owner_columns = ", " + ", ".join(f"u.{f.column}" for f in users.concrete_fields)
        owner_columns += f" FROM claimed c JOIN {users.db_table} u ON u.id = c.owner_id"
    sql += (
        f", started AS (INSERT INTO {table} ({', '.join(names)}) "  # noqa: S608 (names from the models, values bound)
        f"SELECT {', '.join(inserted)} FROM claimed c "
        "ON CONFLICT (job_id, scheduled_for, attempt) DO NOTHING RETURNING job_id, id) "
        f"SELECT c.*, s.id{owner_columns or ' FROM claimed c'} "
        "LEFT JOIN started s ON s.job_id = c.id"
    )
    if limit:
        found = _in_one_round_trip(sql, params)
    else:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            found = cursor.fetchall()
    claimed = _ClaimedRows(planned, found, worker_id)
    if not limit:
        for job, start in claimed.conflicts():
            _already_started(job, start)
    return claimed


_BOOLEAN = BooleanField()


def _in_one_round_trip(sql: str, params: list[Any]) -> list[Any]:
    """Run `sql` in a transaction of its own under the claim lock, sent with the lock and the
    commit in one pipeline (PostgreSQL, the connection in autocommit): the lock is held for the
    server's work only. Returns the statement's rows."""
    lock_sql, lock_params = _lock_statement(True)
    connection.ensure_connection()
    pgconn = connection.connection
    try:
        with connection.cursor() as control, connection.cursor() as cursor:
            with connection.wrap_database_errors, pgconn.pipeline():
                # READ COMMITTED whatever the server's default: each statement's snapshot is
                # taken when it starts, so the claim statement sees every commit made before
                # the lock was granted.
                control.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                control.execute(lock_sql, lock_params)
                cursor.execute(sql, params)
                control.execute("COMMIT")
            return cursor.fetchall()
    except BaseException:
        # The pipeline stopped at the error: end the transaction it left open, if any.
        if not pgconn.closed and pgconn.info.transaction_status != TransactionStatus.IDLE:
            with contextlib.suppress(Exception):
                pgconn.execute("ROLLBACK")
        if not pgconn.closed and pgconn.info.transaction_status != TransactionStatus.IDLE:
            connection.close()  # never left holding a transaction (and the lock) Django can't see
        raise


class _ClaimedRows:
    """What `_claim_planned`'s statement returned: turned into Claims (and logged) after the
    commit, so the claim lock is not held for it."""

    BACK = (
        "owner_id",
        "claim_token",
        "schedule_type",
        "schedule_version",
        "prompt",
        "capabilities",
        "timeout_secs",
        "next_run_at",
    )

    WIDTH = 1 + len(BACK) + 5  # id, BACK, now, scheduled_for, attempt, missed, execution id

    def __init__(self, planned: list[tuple[Job, _Start]], rows: list[Any], worker_id: str):
        self.plans = {job.pk: (job, start) for job, start in planned}
        rows = sorted(rows, key=lambda row: (row[8], row[0]))  # oldest due first
        # Past the claim's own columns, the owner's when the statement read them.
        self.rows = [row[: self.WIDTH] for row in rows]
        self.owners = {row[0]: row[self.WIDTH :] for row in rows if len(row) > self.WIDTH}
        self.worker_id = worker_id

    def _jobs(self) -> Iterator[tuple[Job, _Start, int | None]]:
        capabilities = Job._meta.get_field("capabilities")
        for job_id, *row, now, _, _, _, execution_id in self.rows:
            job, start = self.plans[job_id]
            for name, value in zip(self.BACK, row, strict=True):
                setattr(job, name, value)
            job.capabilities = capabilities.from_db_value(job.capabilities, None, connection)
            job.claimed_at = now
            yield job, start, execution_id

    def conflicts(self) -> list[tuple[Job, _Start]]:
        """The occurrences whose attempt had already started (their executions not written)."""
        if all(row[-1] is not None for row in self.rows):
            return []
        return [(job, start) for job, start, execution_id in self._jobs() if execution_id is None]

    def claims(self) -> list[Claim]:
        claims = [
            _claimed(job, start, execution_id, job.claimed_at, self.worker_id)
            for job, start, execution_id in self._jobs()
            if execution_id is not None
        ]
        if not self.owners:
            return claims
        return [replace(c, owner=_user_from_row(self.owners[c.job_id])) for c in claims]


def _user_model() -> Any:
    return Job._meta.get_field("owner").related_model


@functools.cache
def _user_loading() -> tuple[Any, list[str], list[tuple[Any, list[Any]]]]:
    """The user model, its concrete fields' attribute names, and each field with its database
    converters (looked up once per process: the claim builds users on every claim)."""
    model = _user_model()
    fields = model._meta.concrete_fields
    converters = [(f, f.get_db_converters(connection)) for f in fields]
    return model, [f.attname for f in fields], converters


def _user_from_row(values: tuple[Any, ...]) -> Any:
    """A user from its columns in the order of its concrete fields, as the ORM loads one."""
    model, names, converters = _user_loading()
    converted = []
    for (f, convert_all), value in zip(converters, values, strict=True):
        for convert in convert_all:
            value = convert(value, f, connection)
        converted.append(value)
    return model.from_db(connection.alias, names, converted)


def _claim_rows(job_ids: list[int], worker_id: str, cutoff: datetime) -> tuple[list[Job], datetime]:
    """The claim statement: one UPDATE that re-checks "due", writes token, worker, the clock and
    the lease, and returns the claimed jobs (oldest first) with the clock it wrote."""
    table = Job._meta.db_table
    lease_secs = settings.PICOBOT.scheduler.lease_secs
    columns = ", ".join(f"{table}.{f.column}" for f in Job._meta.concrete_fields)
    due = "enabled AND deleted_at IS NULL AND claim_token IS NULL AND next_run_at <= %s"
    if connection.vendor == "postgresql":
        sql = (
            f"WITH clock AS (SELECT clock_timestamp() AS now) "  # noqa: S608 (table name from the model, values bound)
            f"UPDATE {table} SET claim_token = gen_random_uuid(), claimed_by = %s, "
            f"claimed_at = clock.now, lease_expires_at = clock.now + make_interval(secs => %s) "
            f"FROM clock WHERE {table}.id IN (SELECT id FROM {table} WHERE id = ANY(%s) AND {due} "
            f"ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {columns}"
        )
        params = [worker_id, lease_secs, job_ids, cutoff, len(job_ids)]
    else:
        ops = connection.ops
        now = db_now()
        lease = ops.adapt_datetimefield_value(now + timedelta(seconds=lease_secs))
        marks = ", ".join(["%s"] * len(job_ids))
        sql = (
            f"UPDATE {table} SET claim_token = lower(hex(randomblob(16))), claimed_by = %s, "  # noqa: S608 (table name from the model, values bound)
            f"claimed_at = %s, lease_expires_at = %s "
            f"WHERE id IN (SELECT id FROM {table} WHERE id IN ({marks}) AND {due} "
            f"ORDER BY id LIMIT %s) RETURNING {columns}"
        )
        params = [worker_id, ops.adapt_datetimefield_value(now), lease, *job_ids]
        params += [ops.adapt_datetimefield_value(cutoff), len(job_ids)]
    jobs = list(Job.objects.raw(sql, params))
    if not jobs:
        return [], db_now()
    jobs.sort(key=lambda job: (job.next_run_at, job.pk))
    return jobs, jobs[0].claimed_at


def _owners(ids: set[int]) -> dict[int, Any]:
    return _user_model().objects.in_bulk(ids)


@dataclass
class _Start:
    """The occurrence a claimed job runs now, planned before its execution row is written."""

    scheduled_for: datetime
    attempt: int
    missed: int


def _plan_start(job: Job, now: datetime) -> tuple[_Start | None, DuePlan | None, str]:
    """The occurrence `job` runs now; or None with the plan and the reason it is skipped."""
    assert job.next_run_at is not None
    if job.pending_scheduled_for is not None:
        return _Start(job.pending_scheduled_for, job.pending_attempt, 0), None, ""
    spec = spec_of(job)
    plan = plan_due(spec, job.next_run_at, now, job.misfire)
    reason = MISFIRE_SKIP_REASON if plan.skip else skip_reason(job, spec, plan)
    return (None if reason else _Start(plan.scheduled_for, 1, plan.missed_count)), plan, reason


def _start(job: Job, now: datetime) -> _Start | None:
    """Plan the execution for a job this transaction just claimed (None: nothing to run, and
    the job has moved on)."""
    assert job.claim_token is not None
    start, plan, reason = _plan_start(job, now)
    if start is None:
        assert plan is not None
        _skip(job, plan, now, reason)
    return start


def _insert_runs(planned: list[tuple[Job, _Start]], worker_id: str, now: datetime) -> list[Claim]:
    """Write the `running` executions of the planned occurrences in one statement; an
    occurrence whose attempt already started once (UNIQUE (job, scheduled_for, attempt)) is not
    run again: its job moves past it instead."""
    rows = [
        _execution_row(
            job,
            start.scheduled_for,
            now,
            attempt=start.attempt,
            status=S.RUNNING,
            worker_id=worker_id,
            claim_token=job.claim_token,
            missed_count=start.missed,
        )
        for job, start in planned
    ]
    ids = _insert_executions(rows)
    claims: list[Claim] = []
    for job, start in planned:
        execution_id = ids.get(job.pk)
        if execution_id is None:
            _already_started(job, start)
        else:
            claims.append(_claimed(job, start, execution_id, now, worker_id))
    return claims


def _claimed(job: Job, start: _Start, execution_id: int, now: datetime, worker_id: str) -> Claim:
    logger.info(
        "claimed job=%s execution=%s user=%s scheduled_for=%s attempt=%s worker=%s",
        job.pk,
        execution_id,
        job.owner_id,
        start.scheduled_for.isoformat(),
        start.attempt,
        worker_id,
    )
    return _claim_of(job, start, execution_id, now)


def _already_started(job: Job, start: _Start) -> None:
    # Running it again would be a duplicate, so the job moves past the occurrence instead.
    assert job.claim_token is not None
    logger.error(
        "job=%s user=%s occurrence %s attempt %s already started; moving on",
        job.pk,
        job.owner_id,
        start.scheduled_for.isoformat(),
        start.attempt,
    )
    following = next_after(spec_of(job), start.scheduled_for)
    changes: dict[str, Any] = {
        **RELEASE,
        "next_run_at": following,
        "pending_scheduled_for": None,
        "pending_attempt": 1,
    }
    if following is None:
        changes["enabled"] = False
    _fenced_job_update(job.pk, job.claim_token, changes)


def _claim_of(job: Job, start: _Start, execution_id: int, now: datetime) -> Claim:
    assert job.claim_token is not None and job.next_run_at is not None
    return Claim(
        job_id=job.pk,
        execution_id=execution_id,
        token=job.claim_token,
        owner_id=job.owner_id,
        schedule_type=job.schedule_type,
        scheduled_for=start.scheduled_for,
        attempt=start.attempt,
        schedule_version=job.schedule_version,
        prompt=job.prompt,
        capabilities=list(job.capabilities or []),
        timeout_secs=job.timeout_secs,
        started_at=now,
        lag_secs=max(0.0, (now - job.next_run_at).total_seconds()),
    )


def _execution_row(job: Job, scheduled_for: datetime, now: datetime, **fields: Any) -> Execution:
    """An unsaved execution of `job`'s occurrence at `scheduled_for`, with the prompt,
    capabilities and version the job has now (what that occurrence runs with, whatever a later
    PATCH says)."""
    return Execution(
        job_id=job.pk,
        owner_id=job.owner_id,
        scheduled_for=scheduled_for,
        started_at=now,
        schedule_version=job.schedule_version,
        prompt=job.prompt,
        capabilities=list(job.capabilities or []),
        **fields,
    )


MISFIRE_SKIP_REASON = "skipped by the misfire policy: later occurrences were already due"


def skip_reason(job: Job, spec: ScheduleSpec, plan: DuePlan) -> str:
    """Why the occurrence `plan` would run must be recorded `skipped` instead ("" to run it).

    Outside the job's active hours (heartbeats); or closer than the minimum interval to the
    occurrence before it, which only a clock change can make so (see `too_close_to_previous`).
    An occurrence standing for missed ones is not checked for closeness: the one before it did
    not run.
    """
    when = plan.scheduled_for
    if job.active_hours and not within_active_hours(job.active_hours, job.timezone, when):
        local = when.astimezone(ZoneInfo(job.timezone))
        return (
            f"outside active hours {job.active_hours} ({job.timezone}): "
            f"the occurrence falls at {local:%H:%M:%S} local time"
        )
    if plan.missed_count == 0:
        minimum = settings.PICOBOT.scheduler.min_interval_secs
        earlier = too_close_to_previous(spec, when, minimum)
        if earlier is not None:
            return (
                f"only {(when - earlier).total_seconds():g} s after the occurrence at "
                f"{earlier.isoformat()}: a clock change brought them closer than the minimum "
                f"interval ({minimum} s)"
            )
    return ""


def _insert_executions(rows: list[Execution]) -> dict[int, int]:
    """INSERT the rows in one statement, skipping any that collide with an existing attempt;
    returns {job id: new execution id} for the rows written."""
    if not rows:
        return {}
    fields = [f for f in Execution._meta.concrete_fields if not f.primary_key]
    table = Execution._meta.db_table
    one = f"({', '.join(['%s'] * len(fields))})"
    sql = (
        f"INSERT INTO {table} ({', '.join(f.column for f in fields)}) "  # noqa: S608 (names from the model, values bound)
        f"VALUES {', '.join([one] * len(rows))} "
        "ON CONFLICT (job_id, scheduled_for, attempt) DO NOTHING RETURNING job_id, id"
    )
    params = [
        f.get_db_prep_save(f.pre_save(row, add=True), connection) for row in rows for f in fields
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return dict(cursor.fetchall())


def _create_execution(job: Job, scheduled_for: datetime, now: datetime, **fields: Any) -> Execution:
    """`_execution_row`, saved."""
    execution = _execution_row(job, scheduled_for, now, **fields)
    execution.save(force_insert=True)
    return execution


def _skip(job: Job, plan: DuePlan, now: datetime, reason: str) -> None:
    """Record the occurrence `plan` as skipped (misfire policy, active hours, a clock change
    closer than the minimum) and move to the next future occurrence, releasing the claim."""
    assert job.claim_token is not None
    try:
        with transaction.atomic():
            _create_execution(
                job,
                plan.scheduled_for,
                now,
                status=S.SKIPPED,
                finished_at=now,
                missed_count=plan.missed_count,
                error=reason,
            )
    except IntegrityError:
        logger.warning("job=%s skipped occurrence was already recorded", job.pk)
    changes: dict[str, Any] = {**RELEASE, "next_run_at": plan.next_run_at}
    if plan.next_run_at is None:
        changes["enabled"] = False
    _fenced_job_update(job.pk, job.claim_token, changes)
    metrics.EXECUTIONS.labels(S.SKIPPED, job.schedule_type).inc()
    logger.info(
        "job=%s user=%s skipped %s (%s missed): %s",
        job.pk,
        job.owner_id,
        plan.scheduled_for.isoformat(),
        plan.missed_count,
        reason,
    )


def _fenced_job_update(job_id: int, token: UUID, changes: dict[str, Any]) -> None:
    if Job.objects.filter(id=job_id, claim_token=token).update(**changes) != 1:
        raise ClaimLost(f"job {job_id} is no longer held with this claim token")


def _fenced_job_updates(updates: list[tuple[int, UUID, dict[str, Any]]]) -> None:
    """`_fenced_job_update` for several jobs: one set-based statement per set of fields changed
    (a batch of similar runs changes the same fields), each fenced on its job's claim token.
    Raises ClaimLost, writing nothing, if any job is no longer held."""
    if len(updates) == 1:
        _fenced_job_update(*updates[0])
        return
    groups: dict[tuple[str, ...], list[tuple[int, UUID, dict[str, Any]]]] = {}
    for update in updates:
        groups.setdefault(tuple(sorted(update[2])), []).append(update)
    for names, group in groups.items():
        updated = _update_jobs(names, group)
        if updated != {job_id for job_id, _, _ in group}:
            missing = sorted({job_id for job_id, _, _ in group} - updated)
            raise ClaimLost(f"jobs {missing} are no longer held with their claim tokens")


def _rows_as_table(columns: list[Any], rows: list[list[Any]]) -> tuple[str, list[str], list[Any]]:
    """`rows` (values already prepared for the database, one per model field in `columns`) as a
    relation `v` for `UPDATE … FROM`: typed arrays through unnest on PostgreSQL (one statement
    text whatever the number of rows), VALUES on SQLite. Returns (source, v's column names,
    params)."""
    if connection.vendor == "postgresql":
        names = [f"c{n}" for n in range(len(columns))]
        casts = ", ".join(f"%s::{column.cast_db_type(connection)}[]" for column in columns)
        arrays = [list(column) for column in zip(*rows, strict=True)]
        return f"unnest({casts}) AS v({', '.join(names)})", names, arrays
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    names = [f"column{n}" for n in range(1, len(columns) + 1)]
    return f"(VALUES {', '.join([one] * len(rows))}) AS v", names, [v for row in rows for v in row]


def _update_jobs(names: tuple[str, ...], group: list[tuple[int, UUID, dict[str, Any]]]) -> set[int]:
    meta = Job._meta
    columns = [meta.pk, meta.get_field("claim_token"), *(meta.get_field(n) for n in names)]
    rows = [
        [
            column.get_db_prep_save(value, connection)
            for column, value in zip(
                columns, (job_id, token, *(changes[n] for n in names)), strict=True
            )
        ]
        for job_id, token, changes in group
    ]
    table = meta.db_table
    source, aliases, params = _rows_as_table(columns, rows)
    assignments = ", ".join(
        f"{column.column} = v.{alias}"
        for column, alias in zip(columns[2:], aliases[2:], strict=True)
    )
    sql = (
        f"UPDATE {table} SET {assignments} FROM {source} "  # noqa: S608 (names from the model)
        f"WHERE {table}.id = v.{aliases[0]} AND {table}.claim_token = v.{aliases[1]} "
        f"RETURNING {table}.id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


# --- while running -----------------------------------------------------------------------------


def renew_lease(job_id: int, token: UUID) -> bool:
    """Push the lease out by lease_secs from the database's now; False if the claim is lost."""
    lease = timedelta(seconds=settings.PICOBOT.scheduler.lease_secs)
    return (
        Job.objects.filter(id=job_id, claim_token=token).update(lease_expires_at=db_now() + lease)
        == 1
    )


def holds_claim(job_id: int, token: UUID) -> bool:
    """A fenced read: does this token still hold the job?"""
    return Job.objects.filter(id=job_id, claim_token=token).exists()


def cancel_requested(execution_ids: list[int]) -> set[int]:
    """Which of these executions someone asked to cancel (one primary-key read)."""
    if not execution_ids:
        return set()
    return set(
        Execution.objects.filter(
            id__in=execution_ids, cancel_requested_at__isnull=False
        ).values_list("id", flat=True)
    )


def anything_due(due_before: datetime | None = None) -> bool:
    """A read-only check, so an idle worker never takes the claim lock for nothing."""
    now = db_now()
    cutoff = now if due_before is None else min(now, due_before)
    return _due(cutoff).exists()


@dataclass(frozen=True)
class Agenda:
    """What an idle worker needs to know, read in one statement (`agenda()`)."""

    now: datetime  # the database's clock
    next_due: datetime | None  # the earliest next_run_at of an unclaimed, enabled, live job
    next_lease_expiry: datetime | None  # the earliest lease expiry of a claimed job

    def due(self, due_before: datetime | None = None) -> bool:
        """Is a job due (at `due_before` at the latest)? The same test as `anything_due`."""
        cutoff = self.now if due_before is None else min(self.now, due_before)
        return self.next_due is not None and self.next_due <= cutoff

    def leases_expired(self) -> bool:
        """Has a lease run out, so `recover_expired` has something to do?"""
        return self.next_lease_expiry is not None and self.next_lease_expiry < self.now

    def next_wakeup(self) -> datetime | None:
        """As `next_wakeup()`: the earliest due time or lease expiry."""
        times = [t for t in (self.next_due, self.next_lease_expiry) if t is not None]
        return min(times) if times else None


def agenda() -> Agenda:
    """The database's now, the earliest due time and the earliest lease expiry, in one query:
    a worker's whole question per idle tick, instead of one query for each."""
    due = _next_due_times().values("next_run_at")[:1]
    lease = _lease_expiry_times().values("lease_expires_at")[:1]
    due_sql, due_params = due.query.sql_with_params()
    lease_sql, lease_params = lease.query.sql_with_params()
    # The same clock as `db_now` (clock_timestamp(), not the frozen now(), on PostgreSQL).
    if connection.vendor == "postgresql":
        now_sql = "clock_timestamp()"
    else:
        now_sql = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {now_sql}, ({due_sql}), ({lease_sql})",
            [*due_params, *lease_params],
        )
        now, next_due, next_lease_expiry = cursor.fetchone()
    return Agenda(_utc(now), _utc(next_due), _utc(next_lease_expiry))  # type: ignore[arg-type]


def _utc(value: datetime | str | None) -> datetime | None:
    # PostgreSQL answers aware datetimes; SQLite answers the UTC text Django stores.
    if value is None:
        return None
    if isinstance(value, str):
        parsed = parse_datetime(value)
        assert parsed is not None, value
        value = parsed
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _next_due_times() -> Any:
    return Job.objects.filter(
        enabled=True, deleted_at__isnull=True, claim_token__isnull=True, next_run_at__isnull=False
    ).order_by("next_run_at")


def _lease_expiry_times() -> Any:
    return Job.objects.filter(claim_token__isnull=False, lease_expires_at__isnull=False).order_by(
        "lease_expires_at"
    )


def next_wakeup() -> datetime | None:
    """The earliest time something may need a worker: a due job or an expiring lease."""
    due = _next_due_times().values_list("next_run_at", flat=True).first()
    lease = _lease_expiry_times().values_list("lease_expires_at", flat=True).first()
    times = [t for t in (due, lease) if t is not None]
    return min(times) if times else None


# --- completion --------------------------------------------------------------------------------


def complete(claim: Claim, outcome: Outcome) -> str:
    """Record how the execution ended and move the job on, in ONE fenced transaction.

    Returns the status recorded: `outcome.status`, or `superseded` when the claim was lost (then
    only the execution row changes, and only if it is still `running` or `lost`).
    """
    return complete_many([(claim, outcome)])[0]


def complete_many(done: list[tuple[Claim, Outcome]]) -> list[str]:
    """`complete` for several executions in ONE transaction: the held jobs are locked in one
    statement and the executions finished in one set-based statement, both fenced on the claim
    token as `complete` is. Returns the status recorded for each, in order.

    A lost claim (its job or its execution row is no longer held) changes nothing in that
    transaction; it is recorded `superseded` afterwards, exactly as `complete` records it.
    """
    lost: list[int] = []
    writes = _Writes()
    with transaction.atomic():
        now = db_now()
        jobs = _lock_held_jobs([claim for claim, _ in done])
        held = [i for i, (claim, _) in enumerate(done) if claim.job_id in jobs]
        finished = _finish_executions([done[i] for i in held], now)
        # A run that succeeded recorded all of its calls; one that did not may have left one
        # `started` whose result it could not write.
        ended = [i for i, status in finished.items() if status != S.SUCCEEDED]
        if ended:
            interrupt_unrecorded_calls(ended)
        statuses = [outcome.status for _, outcome in done]
        for i, (claim, outcome) in enumerate(done):
            if claim.execution_id not in finished:
                lost.append(i)
                continue
            if finished[claim.execution_id] != outcome.status:
                # The UPDATE found a cancel request on the row: it wrote `cancelled`.
                outcome = replace(outcome, status=S.CANCELLED, error=CANCELLED_ON_REQUEST)
                statuses[i] = outcome.status
            move_on(jobs[claim.job_id], _execution_of(claim), claim.token, outcome, now, writes)
        # Still inside the transaction, with the jobs locked under these tokens: the fenced job
        # updates cannot miss.
        writes.flush(now)
    for i in lost:
        record_superseded(*done[i])
        statuses[i] = S.SUPERSEDED
    return statuses


def _lock_held_jobs(claims: list[Claim]) -> dict[int, Job]:
    """The jobs still held under these claims' tokens, read and locked in one statement.

    FOR UPDATE (PostgreSQL) so a concurrent PATCH or recovery waits for us, and we read the
    jobs' current versions; SQLite's IMMEDIATE transaction already excludes other writers."""
    table = Job._meta.db_table
    columns = ", ".join(f"{table}.{f.column}" for f in Job._meta.concrete_fields)
    token_field = Job._meta.get_field("claim_token")
    tokens = [token_field.get_db_prep_value(claim.token, connection) for claim in claims]
    if connection.vendor == "postgresql":
        sql = (
            f"SELECT {columns} FROM {table} "  # noqa: S608 (names from the model, values bound)
            "JOIN unnest(%s::bigint[], %s::uuid[]) AS held(id, token) "
            f"ON {table}.id = held.id AND {table}.claim_token = held.token "
            f"ORDER BY {table}.id FOR UPDATE OF {table}"
        )
        params: list[Any] = [[claim.job_id for claim in claims], tokens]
    else:
        pairs = ", ".join(["(%s, %s)"] * len(claims))
        sql = (
            f"SELECT {columns} FROM {table} "  # noqa: S608 (names from the model, values bound)
            f"WHERE (id, claim_token) IN (VALUES {pairs}) ORDER BY id"
        )
        params = [
            value
            for claim, token in zip(claims, tokens, strict=True)
            for value in (claim.job_id, token)
        ]
    return {job.pk: job for job in Job.objects.raw(sql, params)}


def _finish_executions(done: list[tuple[Claim, Outcome]], now: datetime) -> dict[int, str]:
    """One fenced UPDATE finalising the executions still `running` under their tokens; returns
    the status it wrote for each id it finalised (the others were lost).

    A run whose cancel was requested never ends `succeeded`: in the same statement, so a request
    committed meanwhile is seen, a success on a row with `cancel_requested_at` set is written
    `cancelled`."""
    if not done:
        return {}
    meta = Execution._meta
    columns = [meta.pk, meta.get_field("claim_token")]
    columns += [meta.get_field(n) for n in ("status", "output", "error")]
    columns += [meta.get_field(n) for n in ("prompt_tokens", "completion_tokens")]
    values = [
        [
            claim.execution_id,
            columns[1].get_db_prep_value(claim.token, connection),
            outcome.status,
            clean_text(outcome.output, MAX_OUTPUT_CHARS),
            clean_text(outcome.error, MAX_ERROR_CHARS),
            outcome.prompt_tokens,
            outcome.completion_tokens,
        ]
        for claim, outcome in done
    ]
    table = meta.db_table
    stamp = connection.ops.adapt_datetimefield_value(now)
    source, names, params = _rows_as_table(columns, values)
    succeeded, cancelled = S.SUCCEEDED.value, S.CANCELLED.value
    requested = f"v.{names[2]} = '{succeeded}' AND {table}.cancel_requested_at IS NOT NULL"
    sql = (
        f"UPDATE {table} SET "  # noqa: S608 (names from the model, values bound)
        f"status = CASE WHEN {requested} THEN '{cancelled}' ELSE v.{names[2]} END, "
        f"finished_at = %s, output = v.{names[3]}, "
        f"error = CASE WHEN {requested} THEN %s ELSE v.{names[4]} END, "
        f"prompt_tokens = v.{names[5]}, completion_tokens = v.{names[6]} FROM {source} "
        f"WHERE {table}.id = v.{names[0]} AND {table}.claim_token = v.{names[1]} "
        f"AND {table}.status = 'running' RETURNING {table}.id, {table}.status"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [stamp, CANCELLED_ON_REQUEST, *params])
        return dict(cursor.fetchall())


def _execution_of(claim: Claim) -> Execution:
    """The claim's execution row as `_start` wrote it (the fields completion reads), unread."""
    return Execution(
        pk=claim.execution_id,
        job_id=claim.job_id,
        scheduled_for=claim.scheduled_for.astimezone(UTC),
        attempt=claim.attempt,
        status=S.RUNNING,
        started_at=claim.started_at.astimezone(UTC),
        claim_token=claim.token,
        schedule_version=claim.schedule_version,
    )


def record_superseded(claim: Claim, outcome: Outcome) -> None:
    error = "finished after its lease had expired and another worker had taken over; discarded"
    if outcome.error:
        error = f"{error} (its own result: {outcome.status}: {outcome.error})"
    updated = Execution.objects.filter(
        id=claim.execution_id, claim_token=claim.token, status__in=[S.RUNNING, S.LOST]
    ).update(
        status=S.SUPERSEDED,
        finished_at=db_now(),
        output=clean_text(outcome.output, MAX_OUTPUT_CHARS),
        error=clean_text(error, MAX_ERROR_CHARS),
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
    )
    logger.warning(
        "job=%s execution=%s user=%s superseded (claim lost; %s row updated)",
        claim.job_id,
        claim.execution_id,
        claim.owner_id,
        updated,
    )
    if updated:
        metrics.EXECUTIONS.labels(S.SUPERSEDED, claim.schedule_type).inc()


def finish(job: Job, execution: Execution, token: UUID, outcome: Outcome, now: datetime) -> None:
    """Inside a transaction that holds `job` (locked, claimed with `token`): finalise the
    execution, move the job on and release the claim. Raises ClaimLost if a fence fails."""
    updated = Execution.objects.filter(id=execution.pk, claim_token=token, status=S.RUNNING).update(
        status=outcome.status,
        finished_at=now,
        output=clean_text(outcome.output, MAX_OUTPUT_CHARS),
        error=clean_text(outcome.error, MAX_ERROR_CHARS),
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
    )
    if updated != 1:
        raise ClaimLost(f"execution {execution.pk} is no longer running under this token")
    move_on(job, execution, token, outcome, now)


@dataclass
class _Writes:
    """What `move_on` leaves to be written together for the executions one transaction
    completes: the fenced job updates and the completions' notifications."""

    jobs: list[tuple[int, UUID, dict[str, Any]]] = field(default_factory=list)
    completions: list[Any] = field(default_factory=list)

    def flush(self, now: datetime) -> None:
        _fenced_job_updates(self.jobs)
        # Exactly once per completion, in the transaction that records them all.
        write_completion_notifications(self.completions, now)


def move_on(
    job: Job,
    execution: Execution,
    token: UUID,
    outcome: Outcome,
    now: datetime,
    writes: _Writes | None = None,
) -> None:
    """Inside a transaction that holds `job` and has just finalised `execution`: move the job on,
    release the claim and write the completion's notifications — or, given `writes`, leave
    both to it, to be written with the rest of the transaction's."""
    from notifications.writing import Completion

    changes, disabled_reason = job_changes(job, execution, outcome, now)
    completion = Completion(
        job=job,
        execution_id=execution.pk,
        status=outcome.status,
        output=outcome.output,
        error=outcome.error,
        disabled_reason=disabled_reason,
        retrying=changes.get("pending_scheduled_for") is not None,
    )
    if writes is None:
        _fenced_job_update(job.pk, token, {**RELEASE, **changes})
        write_completion_notifications([completion], now)
    else:
        writes.jobs.append((job.pk, token, {**RELEASE, **changes}))
        writes.completions.append(completion)
    metrics.EXECUTIONS.labels(outcome.status, job.schedule_type).inc()
    logger.info(
        "finished job=%s execution=%s user=%s status=%s%s",
        job.pk,
        execution.pk,
        job.owner_id,
        outcome.status,
        f" ({disabled_reason})" if disabled_reason else "",
    )


def job_changes(
    job: Job, execution: Execution, outcome: Outcome, now: datetime
) -> tuple[dict[str, Any], str]:
    """The worker-owned job fields to write when `execution` ends, and why the job is being
    disabled ("" when it is not). `next_run_at`, retries and the failure count are written only
    if the schedule is the version the execution ran, or, for a once job, if a PATCH since left
    its one occurrence in place (a change of what it runs applies to its next attempt)."""
    config = settings.PICOBOT.scheduler
    status = outcome.status
    same_version = job.schedule_version == execution.schedule_version or (
        job.schedule_type == ScheduleType.ONCE
        and execution.scheduled_for in (job.next_run_at, job.pending_scheduled_for)
    )
    if job.deleted_at is not None:
        return {}, ""
    if status == S.INTERRUPTED:
        # Released at shutdown: the occurrence is still due (next_run_at untouched), and the
        # next attempt gets a new number so UNIQUE (job, scheduled_for, attempt) holds.
        if not same_version:
            return {}, ""
        return {
            "pending_scheduled_for": execution.scheduled_for,
            "pending_attempt": execution.attempt + 1,
        }, ""
    changes: dict[str, Any] = {"last_run_at": execution.started_at or now}
    failed = status in FAILURE_STATUSES
    following = next_after(spec_of(job), execution.scheduled_for) if same_version else None
    if failed and same_version:
        # A `superseded` attempt was recovered as `lost` (only recovery takes a running claim
        # away) before its worker came back and recorded itself: it was a failed attempt, and
        # not counting it would allow one retry more than max_retries.
        # Of this version: a PATCH resets the failure count, so a once job whose prompt was
        # fixed after its attempts failed gets its retries with the fix (a recurring job's
        # retries never span a version: the PATCH dropped them).
        failures = Execution.objects.filter(
            job_id=job.pk,
            scheduled_for=execution.scheduled_for,
            schedule_version=job.schedule_version,
            status__in=[*FAILURE_STATUSES, S.SUPERSEDED],
        ).count()
        if failures <= config.max_retries:
            retry = retry_at(
                attempt=failures,
                failed_at=now,
                next_occurrence=following,
                base_secs=config.backoff_base_secs,
                max_secs=config.backoff_max_secs,
                rng=_rng,
            )
            if retry is not None:
                changes.update(
                    next_run_at=retry,
                    pending_scheduled_for=execution.scheduled_for,
                    pending_attempt=execution.attempt + 1,
                    last_error=clean_text(outcome.error, MAX_ERROR_CHARS),
                )
                return changes, ""
    # The occurrence is final: it counts once, whatever number of attempts it took.
    count = job.execution_count + 1
    changes["execution_count"] = count
    disabled_reason = ""
    if same_version:
        changes.update(pending_scheduled_for=None, pending_attempt=1, next_run_at=following)
        if following is None:
            disabled_reason = "a once job is disabled after its run"
        if failed:
            failures_in_row = job.consecutive_failures + 1
            changes["consecutive_failures"] = failures_in_row
            changes["last_error"] = clean_text(outcome.error, MAX_ERROR_CHARS)
            if failures_in_row >= config.max_consecutive_failures:
                disabled_reason = (
                    f"disabled after {failures_in_row} consecutive failed runs "
                    f"([scheduler] max_consecutive_failures = {config.max_consecutive_failures})"
                )
                changes["last_error"] = clean_text(
                    f"Disabled after {failures_in_row} consecutive failed runs. "
                    f"Last error: {outcome.error}",
                    MAX_ERROR_CHARS,
                )
        elif status == S.SUCCEEDED:
            changes.update(consecutive_failures=0, last_error="")
    elif failed:
        changes["last_error"] = clean_text(outcome.error, MAX_ERROR_CHARS)
    if job.max_executions is not None and count >= job.max_executions and not disabled_reason:
        disabled_reason = f"max_executions ({job.max_executions}) reached"
    if disabled_reason:
        changes.update(enabled=False, next_run_at=None)
    return changes, disabled_reason


def write_completion_notifications(completions: list[Any], now: datetime) -> None:
    """Write the notification rows of completions (`notifications.writing.Completion`), inside
    their fenced transaction, after the execution and job rows are written and before it
    commits, so a message exists exactly when its completion does: once per completed
    execution, however many one transaction completes. Delivery is queued when it commits."""
    from notifications.writing import write_completions

    write_completions(completions, now)


# --- recovery and retention --------------------------------------------------------------------


def recover_expired(limit: int = 50) -> int:
    """Recover up to `limit` jobs whose lease expired: the orphaned execution becomes `lost`
    (`cancelled` if a cancel was requested) and the occurrence goes to the retry policy."""
    expired = list(
        Job.objects.filter(claim_token__isnull=False, lease_expires_at__lt=db_now())
        .order_by("lease_expires_at")
        .values_list("id", "claim_token")[:limit]
    )
    return sum(1 for job_id, token in expired if _recover_one(job_id, token))


def _recover_one(job_id: int, token: UUID) -> bool:
    with transaction.atomic():
        now = db_now()
        job = (
            Job.objects.select_for_update(skip_locked=True)
            .filter(id=job_id, claim_token=token, lease_expires_at__lt=now)
            .first()
        )
        if job is None:
            return False
        execution = Execution.objects.filter(
            job_id=job_id, claim_token=token, status=S.RUNNING
        ).first()
        if execution is None:
            _fenced_job_update(job_id, token, dict(RELEASE))
            return True
        if execution.cancel_requested_at is not None:
            outcome = Outcome(S.CANCELLED, error="cancelled (its worker stopped before finishing)")
        else:
            outcome = Outcome(
                S.LOST,
                error=(
                    f"lost: worker {execution.worker_id or '?'} stopped renewing its lease "
                    "(killed, paused or its host lost)"
                ),
            )
        finish(job, execution, token, outcome, now)
    # After the commit: the run's unfinished tool calls are marked and their processes reaped.
    interrupt_calls(execution.pk)
    metrics.EXPIRED_LEASES.labels(outcome.status).inc()
    logger.warning(
        "recovered expired lease job=%s execution=%s user=%s -> %s",
        job_id,
        execution.pk,
        job.owner_id,
        outcome.status,
    )
    return True


def purge_history(batch: int = 1000) -> tuple[int, int]:
    """Delete finished executions and soft-deleted jobs older than [scheduler] history_days.

    Returns (executions, jobs) deleted. Deleting in batches keeps each transaction short.
    """
    cutoff = db_now() - timedelta(days=settings.PICOBOT.scheduler.history_days)
    executions = jobs = 0
    while True:
        ids = list(
            Execution.objects.filter(finished_at__lt=cutoff)
            .exclude(status=S.RUNNING)
            .values_list("id", flat=True)[:batch]
        )
        if not ids:
            break
        executions += Execution.objects.filter(id__in=ids).delete()[1].get(Execution._meta.label, 0)
    while True:
        ids = list(
            Job.objects.filter(deleted_at__lt=cutoff, claim_token__isnull=True).values_list(
                "id", flat=True
            )[:batch]
        )
        if not ids:
            break
        jobs += Job.objects.filter(id__in=ids).delete()[1].get(Job._meta.label, 0)
    return executions, jobs
