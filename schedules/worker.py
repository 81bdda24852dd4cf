"""The worker: a thin loop around small steps, a thread per running execution, a monitor.

- The main loop recovers expired leases, claims due occurrences into free slots, and otherwise
  sleeps until the next due time (at most `tick_secs`); the sleep is a self-pipe `select`, woken
  by a signal, by a finishing execution, or by a PostgreSQL NOTIFY on `picobot_schedules`.
- Each claimed execution runs on an execution slot (a daemon thread, at most `concurrency`)
  through `executor.execute`, then hands its outcome to the completer thread, which writes
  finished runs in batches (`claims.complete_many`: one fenced transaction for every run that
  finished within a few milliseconds of the first). Slots outlive their runs, so a run reuses
  the slot's database connection instead of opening one. A claim waits a few milliseconds for
  more free slots when only a few are free, so one claim transaction serves several runs.
- The monitor thread, every half second, reads cancellation requests for this worker's running
  executions (one primary-key read), enforces deadlines (cancelling the RunControl kills shell
  subprocesses), and every third of `lease_secs` renews the leases; a renewal that finds the
  token gone stops that run (it will be recorded `superseded`). A run stuck well past its
  deadline is no longer renewed, so another worker recovers its occurrence.
- SIGTERM/SIGINT: stop claiming, let running executions finish within the grace period, then
  cancel the rest, record them `interrupted` and release them for another worker at once. A
  second signal exits immediately (the leases then expire and another worker recovers them),
  except a *different* signal within SAME_REQUEST_SECS of the first: a terminal's SIGINT to the
  process group and a supervisor's SIGTERM arrive together for one Ctrl-C, and are one request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, connection

from kernel.context import RunControl
from kernel.processes import interrupt_abandoned_chat_calls
from kernel.turns import TURN_LEASE_SECS
from schedules import claims, executor, metrics, workers
from schedules.dbtime import db_now, through_outage
from schedules.models import ExecutionStatus

T = TypeVar("T")

logger = logging.getLogger("picobot.worker")

S = ExecutionStatus
MONITOR_POLL_SECS = 0.5
# A different signal this soon after the first is the same stop request (see the docstring).
SAME_REQUEST_SECS = 2.0
# A run still going this long after its deadline is stuck (the monitor cancelled it at the
# deadline): its lease is no longer renewed, so another worker recovers the occurrence.
STUCK_AFTER_DEADLINE_SECS = 10.0
PURGE_EVERY_SECS = 3600.0
# After the grace period, how long cancelled runs get to record themselves `interrupted`
# before the main thread releases them itself.
CANCEL_SETTLE_SECS = 3.0
NOTIFY_CHANNEL = claims.WAKE_CHANNEL
# A slot's database connection left idle longer than this is checked before a run uses it, so a
# server restart or an idle timeout costs a reconnect, not the run's result.
CONNECTION_CHECK_AFTER_SECS = 10.0
# A lost LISTEN connection is opened again at most this often (the tick still wakes the loop).
RELISTEN_SECS = 5.0
# Pause between attempts to record a finished run while the database is unreachable.
COMPLETION_RETRY_SECS = 0.5
# How long a claim waits for more slots to free when only a few are (see `handle_one_claim`).
CLAIM_GATHER_SECS = 0.005
# Completion batches (see `Completer`): at most this many runs; written once no other run has
# finished for COMPLETION_GAP_SECS, and the first never waits more than COMPLETION_FLUSH_SECS.
COMPLETION_BATCH = 32
# How soon a thread waiting for the GIL gets it from a busy one (Python's default: 5 ms).
GIL_SWITCH_SECS = 0.0005
COMPLETION_GAP_SECS = 0.003
COMPLETION_FLUSH_SECS = 0.025
# A busy worker whose claims fill its slots reads the agenda (whether anything is due, whether
# a lease expired) at least this often; claims in between go straight to the look.
AGENDA_EVERY_SECS = 1.0


def _keep_connection_if_clean() -> None:
    """After a run: keep this thread's connection for the next run unless a database error may
    have broken it or a transaction was left open."""
    if connection.connection is None:
        return
    if connection.errors_occurred or connection.in_atomic_block or not connection.get_autocommit():
        connection.close()


def _drop_unusable_connection() -> None:
    with contextlib.suppress(DatabaseError):
        if connection.connection is not None and not connection.is_usable():
            connection.close()


def _through_outage(write: Callable[[], T], what: str) -> T:
    """Write how runs ended, through a database outage (a server restart, a dropped connection)
    of up to `lease_secs`: a result lost here would make the occurrence run again once its lease
    expired. Retrying is safe because the writes are fenced: if the first attempt did commit, or
    another worker took the job over, it changes nothing."""
    return through_outage(
        write,
        what,
        within=settings.PICOBOT.scheduler.lease_secs,
        every=COMPLETION_RETRY_SECS,
        errors=(DatabaseError,),
    )


class Waker:
    """An interruptible sleep: `sleep()` returns early once anyone (a thread, a signal handler)
    calls `wake()`. A self-pipe, because os.write is safe inside a signal handler."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"!")

    def sleep(self, secs: float, extra: list[Any] | None = None) -> list[Any]:
        """Sleep up to `secs`; returns the extra file objects that became readable."""
        ready, _, _ = select.select([self._read, *(extra or [])], [], [], max(0.0, secs))
        if self._read in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass
        return [item for item in ready if item != self._read]

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


@dataclass
class Running:
    claim: claims.Claim
    control: RunControl
    started: float
    # The run has ended and its outcome is with the completer, whose write releases the claim.
    finished: bool = False


def _note(status: str) -> str:
    if status == S.INTERRUPTED:
        return " (released: it runs again on the next worker)"
    return ""


class Completer:
    """One thread per worker that records finished runs in batches (`claims.complete_many`).

    A batch is written as soon as every run still going has finished into it, or once no run
    has finished for `COMPLETION_GAP_SECS` (runs that end together, as a claim's instant
    answers do, go in one batch; one ending alone waits only that long), or when the first of
    it has waited `COMPLETION_FLUSH_SECS`, or at `COMPLETION_BATCH` runs: one transaction then
    serves several runs. `recorded` is called with each batch once it is
    written (or could not be: the leases then run out and recovery takes the runs over).
    """

    def __init__(
        self, busy: Callable[[], int], recorded: Callable[[list[Finished], list[str]], None]
    ) -> None:
        self._busy = busy
        self._recorded = recorded
        self._queue: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="completer", daemon=True)
        self._thread.start()

    def put(self, finished: Finished) -> None:
        self._queue.put(finished)

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            flush_at = time.monotonic() + COMPLETION_FLUSH_SECS
            while len(batch) < min(COMPLETION_BATCH, self._busy()):
                wait = min(COMPLETION_GAP_SECS, flush_at - time.monotonic())
                try:
                    item = self._queue.get(timeout=max(0.0, wait))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._write(batch)
        connection.close()

    def _write(self, batch: list[Finished]) -> None:
        statuses: list[str] = []
        ids = [f.claim.execution_id for f in batch]
        try:
            statuses = _through_outage(
                lambda: claims.complete_many([(f.claim, f.outcome) for f in batch]),
                f"executions {ids}",
            )
        except Exception:
            # Nothing recorded: the leases run out and a worker recovers the occurrences.
            logger.exception("executions %s could not be completed", ids)
        finally:
            _keep_connection_if_clean()
            self._recorded(batch, statuses)


@dataclass
class Finished:
    """A run that ended, waiting for the completer to record it."""

    claim: claims.Claim
    outcome: claims.Outcome
    started: float


class Worker:
    """One scheduler worker process: see the module docstring."""

    def __init__(
        self,
        *,
        worker_id: str | None = None,
        concurrency: int = 1,
        once: bool = False,
        grace_secs: float = 30.0,
    ) -> None:
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.concurrency = concurrency
        self.once = once
        self.grace_secs = grace_secs
        self.running: dict[int, Running] = {}
        self.stopping = False
        # With once: the executions this run started (for the summary runworker prints).
        self.started_ids: list[int] = []
        self.skipped_count = 0
        self._signals: list[tuple[int, float]] = []
        self._usernames: dict[int, str] = {}
        self._lock = threading.Lock()
        self._waker = Waker()
        self._monitor_stop = threading.Event()
        self._next_purge = 0.0
        # The last claim took every slot it asked for, so more is likely due: the next tick
        # claims without reading the agenda first, if that was read recently (handle_one_tick).
        self._more_due = False
        self._agenda_at = 0.0
        self._listener: Any = None
        self._next_listen = 0.0
        self._queue: queue.SimpleQueue[tuple[claims.Claim, RunControl] | None] = queue.SimpleQueue()
        self._slots: list[threading.Thread] = []
        self._completer: Completer | None = None

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or, with once, until what was due has run). Returns an exit code."""
        self.install_signal_handlers()
        # A claim holds the claim lock across a few round trips. Each time its thread waits on
        # the database it lets go of the GIL, and to get it back waits for a busy thread (a slot,
        # the completer) to yield it: by default after 5 ms, so a claim of a few statements held
        # the lock for 15-20 ms, and every other worker waited that long for it.
        sys.setswitchinterval(GIL_SWITCH_SECS)
        monitor = threading.Thread(target=self._monitor, name="lease-monitor", daemon=True)
        monitor.start()
        self._completer = Completer(self.running_count, self._recorded)
        self._listen()
        logger.info(
            "worker %s started: concurrency=%s once=%s", self.worker_id, self.concurrency, self.once
        )
        try:
            if self.once:
                self._run_once()
            else:
                self._run_forever()
            self.drain()
        finally:
            self._monitor_stop.set()
            monitor.join(timeout=5)
            self._stop_slots()
            self._completer.stop()
            self._unlisten()
            connection.close()
        logger.info("worker %s stopped", self.worker_id)
        return 0

    def _run_forever(self) -> None:
        while not self.stopping:
            self._survive(self.handle_one_tick)

    def handle_one_tick(self) -> bool:
        """Purge, recover, claim; sleep when there was nothing to claim. True if it claimed.

        One query (`claims.agenda`) says whether a lease expired and whether anything is due,
        so an idle tick costs the database that query and nothing else."""
        self.handle_one_purge()
        fresh = time.monotonic() - self._agenda_at < AGENDA_EVERY_SECS
        if self._more_due and fresh and self.handle_one_claim(known_due=True):
            # The last claim filled every free slot, so more was likely due: claim again at
            # once. The agenda (and so the check for expired leases) is still read at least
            # every AGENDA_EVERY_SECS, and whenever a claim takes nothing.
            return True
        agenda = claims.agenda()
        taken = self._agenda_at = time.monotonic()
        # A recovered job may be due at once: then the agenda is stale, so ask again.
        recovered = agenda.leases_expired() and self.handle_one_recovery()
        if recovered or agenda.due():
            if self.handle_one_claim(known_due=not recovered):
                return True
            # The claim took nothing (another worker was first, or the limits hold it back), so
            # the agenda is stale: idle reads the next wake-up afresh.
            self.idle()
            return False
        self.idle(agenda, time.monotonic() - taken)
        return False

    def _run_once(self) -> None:
        cutoff = self._survive(db_now)
        while cutoff is None and not self.stopping:
            cutoff = self._survive(db_now)
        while not self.stopping:
            done = self._survive(lambda: self.handle_one_once_tick(cutoff))
            if done:
                return

    def handle_one_once_tick(self, cutoff: datetime) -> bool:
        """One step of --once; True when everything due at `cutoff` has run."""
        self.handle_one_recovery()
        if self.handle_one_claim(due_before=cutoff):
            return False
        if not self.running_count():
            return True
        self._waker.sleep(settings.PICOBOT.scheduler.tick_secs)
        return False

    def _survive(self, step: Callable[[], T]) -> T | None:
        """Run one loop step; an error (a locked SQLite file, a dropped PostgreSQL connection,
        or a fault of our own) is logged and waited out for a tick instead of ending the worker,
        whose running executions would otherwise die without a drain."""
        try:
            return step()
        except Exception as exc:
            if isinstance(exc, DatabaseError):
                logger.exception("worker %s: database error; retrying in a tick", self.worker_id)
            else:
                # A fault of the loop's own (a bug in a part of it, as a closed socket once was)
                # must not end the worker either: a restarted worker would meet it again.
                logger.exception(
                    "worker %s: unexpected error in the loop; going on in a tick", self.worker_id
                )
            connection.close()
            self._waker.sleep(settings.PICOBOT.scheduler.tick_secs)
            return None

    def handle_one_claim(
        self, *, due_before: datetime | None = None, known_due: bool = False
    ) -> bool:
        """Claim due occurrences into the free slots; True if the claim did anything.

        `known_due`: the caller has just seen something due, so the read-only check that keeps
        an idle worker off the claim lock is skipped."""
        free = self.concurrency - self.running_count()
        if free <= 0 or self.stopping:
            return False
        if free < max(1, self.concurrency // 2) and free < self.concurrency:
            # Runs are finishing one by one: with fewer than half the slots free, wait a few
            # milliseconds for more, so one claim (its look, its turn of the claim lock) serves
            # several runs. (At a quarter, four workers of 4 slots claimed 2.5 runs a claim;
            # at half, 1 and 4 workers both ran faster, docs/benchmarks.md.)
            self._waker.sleep(CLAIM_GATHER_SECS)
            free = self.concurrency - self.running_count()
        if not known_due and not claims.anything_due(due_before):
            return False
        result = claims.claim_due(self.worker_id, free, due_before=due_before)
        self._more_due = len(result.claims) >= free
        self.skipped_count += result.skipped
        for claim in result.claims:
            self._start(claim)
        return bool(result.claims or result.skipped)

    def handle_one_recovery(self) -> bool:
        """Recover jobs whose lease expired; True if any was recovered."""
        return claims.recover_expired() > 0

    def handle_one_purge(self) -> bool:
        """Purge old history about once an hour; True if it ran."""
        now = time.monotonic()
        if now < self._next_purge:
            return False
        self._next_purge = now + PURGE_EVERY_SECS
        executions, jobs = claims.purge_history()
        if executions or jobs:
            logger.info("purged %s executions and %s deleted jobs", executions, jobs)
        # Chat tool calls a dead web process left `started` (a chat turn looks too, but only
        # when someone chats).
        interrupt_abandoned_chat_calls(TURN_LEASE_SECS)
        return True

    def idle(self, agenda: claims.Agenda | None = None, elapsed_secs: float = 0.0) -> None:
        """Sleep until the next due time or lease expiry, at most tick_secs; interruptible.

        `agenda` (read `elapsed_secs` ago, and still current) saves reading it again."""
        secs = self.idle_secs(agenda, elapsed_secs)
        fds, woken = self._listen_fds()
        if woken:
            secs = 0.0
        if not fds and connection.vendor == "postgresql":
            # Not listening (the server was away): a NOTIFY cannot wake us, so try again soon.
            secs = min(secs, RELISTEN_SECS)
        self._waker.sleep(secs, extra=fds)
        self._drain_notifies()

    def idle_secs(self, agenda: claims.Agenda | None = None, elapsed_secs: float = 0.0) -> float:
        tick = float(settings.PICOBOT.scheduler.tick_secs)
        if self.running_count() >= self.concurrency:
            return tick  # a finishing execution wakes us
        if agenda is None:
            agenda, elapsed_secs = claims.agenda(), 0.0
        wake = agenda.next_wakeup()
        if wake is None:
            return tick
        delta = (wake - agenda.now).total_seconds() - elapsed_secs
        # Due already, yet the claim took nothing: the limits hold it back. Check again in a tick
        # rather than spin.
        return tick if delta <= 0 else min(tick, delta)

    def running_count(self) -> int:
        with self._lock:
            return len(self.running)

    # --- one execution -------------------------------------------------------------------------

    def _start(self, claim: claims.Claim) -> None:
        control = RunControl.with_timeout(claim.timeout_secs)
        if self.once:
            self.started_ids.append(claim.execution_id)
        logger.info("%s started (scheduled for %s)", self.describe(claim), claim.scheduled_for)
        with self._lock:
            self.running[claim.execution_id] = Running(claim, control, time.monotonic())
            metrics.RUNNING.set(len(self.running))
            # A slot is busy exactly while its run is in `running`, so with at least as many
            # slots as runs every queued run has an idle slot waiting for it.
            if len(self._slots) < len(self.running):
                slot = threading.Thread(
                    target=self._serve_slot, name=f"execution-slot-{len(self._slots)}", daemon=True
                )
                self._slots.append(slot)
                slot.start()
        self._queue.put((claim, control))

    def _serve_slot(self) -> None:
        """An execution slot: run what `_start` queues, one at a time, for the worker's life."""
        name = threading.current_thread().name
        idle_since = time.monotonic()
        while True:
            work = self._queue.get()
            if work is None:
                connection.close()
                return
            claim, control = work
            threading.current_thread().name = f"execution-{claim.execution_id}"
            if time.monotonic() - idle_since > CONNECTION_CHECK_AFTER_SECS:
                _drop_unusable_connection()
            self._execute(claim, control)
            threading.current_thread().name = name
            idle_since = time.monotonic()

    def _stop_slots(self) -> None:
        """End the idle slots, closing their connections (a slot still stuck in a run keeps its
        thread; the process exits without it)."""
        for _ in self._slots:
            self._queue.put(None)
        deadline = time.monotonic() + (0.0 if self.running_count() else 5.0)
        for slot in self._slots:
            slot.join(timeout=max(0.0, deadline - time.monotonic()))

    def _execute(self, claim: claims.Claim, control: RunControl) -> None:
        started = time.monotonic()
        handed_over = False
        try:
            outcome = executor.execute(
                claim, control, lambda: claims.holds_claim(claim.job_id, claim.token)
            )
            if outcome.status == S.SUPERSEDED:
                _through_outage(
                    lambda: claims.record_superseded(claim, outcome),
                    f"execution {claim.execution_id}",
                )
                self._ended(claim, S.SUPERSEDED, started)
            else:
                # The run stays in `running` (its lease renewed) until the completer has
                # written it.
                assert self._completer is not None
                with self._lock:
                    if claim.execution_id in self.running:
                        self.running[claim.execution_id].finished = True
                self._completer.put(Finished(claim, outcome, started))
                handed_over = True
        except Exception:
            # Nothing recorded: the lease runs out and a worker recovers the occurrence.
            logger.exception(
                "job=%s execution=%s user=%s could not be completed",
                claim.job_id,
                claim.execution_id,
                claim.owner_id,
            )
        finally:
            _keep_connection_if_clean()
            if not handed_over:
                self._forget([claim])

    def _recorded(self, batch: list[Finished], statuses: list[str]) -> None:
        """The completer wrote `batch` (or gave up on it: no statuses): the runs leave
        `running`."""
        for finished, recorded in zip(batch, statuses, strict=False):
            self._ended(finished.claim, recorded, finished.started)
        self._forget([finished.claim for finished in batch])

    def _ended(self, claim: claims.Claim, recorded: str, started: float) -> None:
        logger.info(
            "%s ended %s in %.1fs%s",
            self.describe(claim),
            recorded,
            time.monotonic() - started,
            _note(recorded),
        )
        metrics.EXECUTION_DURATION.labels(claim.schedule_type).observe(time.monotonic() - started)

    def _forget(self, done: list[claims.Claim]) -> None:
        with self._lock:
            for claim in done:
                self.running.pop(claim.execution_id, None)
            metrics.RUNNING.set(len(self.running))
        self._waker.wake()

    # --- the monitor thread --------------------------------------------------------------------

    def _monitor(self) -> None:
        renew_every = settings.PICOBOT.scheduler.lease_secs / 3
        next_renewal = time.monotonic()
        starting = True
        while not self._monitor_stop.wait(MONITOR_POLL_SECS):
            try:
                self.handle_one_watch()
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + renew_every
                    self.handle_one_renewal()
                    # The registry (the console's "workers alive") rides the renewal round.
                    workers.report(
                        self.worker_id, self.concurrency, self.running_count(), starting=starting
                    )
                    starting = False
            except Exception:
                logger.exception("lease monitor: database error; retrying")
                connection.close()
        with contextlib.suppress(DatabaseError):
            workers.stopped(self.worker_id)
        connection.close()

    def _snapshot(self) -> list[Running]:
        with self._lock:
            return list(self.running.values())

    def handle_one_watch(self) -> bool:
        """Stop runs past their deadline or asked to cancel; True if any was stopped."""
        running = self._snapshot()
        stopped = False
        for item in running:
            if item.control.expired() and not item.control.cancelled:
                item.control.cancel(executor.DEADLINE)
                stopped = True
        live = [item for item in running if not item.control.cancelled]
        wanted = claims.cancel_requested([item.claim.execution_id for item in live])
        for item in live:
            if item.claim.execution_id in wanted:
                logger.info(
                    "job=%s execution=%s user=%s cancel requested",
                    item.claim.job_id,
                    item.claim.execution_id,
                    item.claim.owner_id,
                )
                item.control.cancel(executor.CANCEL_REQUESTED)
                stopped = True
        return stopped

    def handle_one_renewal(self) -> bool:
        """Renew every held lease; a lost one stops its run. True if all were renewed."""
        all_held = True
        for item in self._snapshot():
            if self._stuck(item):
                continue
            if not claims.renew_lease(item.claim.job_id, item.claim.token):
                if item.finished:
                    # Its completion was written between the snapshot and the renewal (that
                    # released the claim), or will find the claim lost and say so: either
                    # way there is no run left to stop.
                    continue
                all_held = False
                logger.warning(
                    "job=%s execution=%s user=%s lost its claim",
                    item.claim.job_id,
                    item.claim.execution_id,
                    item.claim.owner_id,
                )
                item.control.cancel(executor.CLAIM_LOST)
        return all_held

    def _stuck(self, item: Running) -> bool:
        """True for a run past its deadline plus STUCK_AFTER_DEADLINE_SECS (logged)."""
        deadline = item.control.deadline
        if deadline is None or time.monotonic() < deadline + STUCK_AFTER_DEADLINE_SECS:
            return False
        logger.warning(
            "job=%s execution=%s user=%s is stuck past its deadline; its lease is left to expire",
            item.claim.job_id,
            item.claim.execution_id,
            item.claim.owner_id,
        )
        return True

    # --- shutdown ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._signals:
            first, first_at = self._signals[0]
            if signum != first and now - first_at < SAME_REQUEST_SECS and len(self._signals) == 1:
                self._signals.append((signum, now))
                return  # the same Ctrl-C, seen twice (terminal and supervisor)
            # A real second request: leave now. The leases expire and another worker recovers
            # what was running. Raw write: logging is not safe inside a signal handler.
            os.write(
                2,
                f"worker {self.worker_id}: second stop signal ({signal.Signals(signum).name}): "
                f"exiting now; {self.running_count()} running execution(s) will be recovered "
                "when their leases expire\n".encode(),
            )
            os._exit(128 + signum)
        self._signals.append((signum, now))
        self.stopping = True
        self._waker.wake()

    def stop_reason(self) -> str:
        """How the stop was asked for, for the log: "SIGINT", "SIGINT and SIGTERM together"."""
        names = [signal.Signals(signum).name for signum, _ in self._signals]
        if not names:
            return "request"
        return names[0] if len(names) == 1 else f"{names[0]} and {names[1]} together"

    def describe(self, claim: claims.Claim) -> str:
        """`job=1 execution=5 user=alice(2)`: the ids of a run and its owner's name, for logs."""
        name = self._usernames.get(claim.owner_id)
        if name is None:
            from kernel.models import User

            name = User.objects.filter(pk=claim.owner_id).values_list("username", flat=True).first()
            self._usernames[claim.owner_id] = name = name or "?"
        return f"job={claim.job_id} execution={claim.execution_id} user={name}({claim.owner_id})"

    def request_stop(self) -> None:
        self.stopping = True
        self._waker.wake()

    def drain(self) -> None:
        """Let running executions finish within the grace period, then interrupt the rest."""
        draining = self._snapshot()
        if draining:
            logger.info(
                "worker %s stopping on %s: no new claims; waiting up to %ss for %s running "
                "execution(s): %s",
                self.worker_id,
                self.stop_reason(),
                self.grace_secs,
                len(draining),
                ", ".join(self.describe(item.claim) for item in draining),
            )
        deadline = time.monotonic() + self.grace_secs
        while self.running_count() and time.monotonic() < deadline:
            self._waker.sleep(min(0.5, deadline - time.monotonic()))
        left = self._snapshot()
        if left:
            self._interrupt(left)

    def _interrupt(self, left: list[Running]) -> None:
        logger.warning(
            "worker %s: grace period over: interrupting %s running execution(s)",
            self.worker_id,
            len(left),
        )
        for item in left:
            item.control.cancel(executor.SHUTDOWN)
        settle = time.monotonic() + CANCEL_SETTLE_SECS
        while self.running_count() and time.monotonic() < settle:
            self._waker.sleep(0.1)
        for item in self._snapshot():
            # Still stuck (e.g. inside a model request): release it ourselves. Its thread's own
            # completion will then find the token gone and change nothing.
            recorded = claims.complete(
                item.claim,
                claims.Outcome(S.INTERRUPTED, error="the worker shut down; it will run again"),
            )
            logger.info("%s ended %s%s", self.describe(item.claim), recorded, _note(recorded))

    # --- PostgreSQL LISTEN/NOTIFY --------------------------------------------------------------

    def _listen(self) -> None:
        if connection.vendor != "postgresql":
            return
        import psycopg

        self._next_listen = time.monotonic() + RELISTEN_SECS
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        try:
            self._listener = psycopg.connect(**params, autocommit=True)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error:
            logger.warning("LISTEN %s failed; waking on the tick only", NOTIFY_CHANNEL)
            self._unlisten()

    def _listen_fds(self) -> tuple[list[Any], bool]:
        """The listening socket to wait on, and whether a wake-up is already waiting.

        A wake-up psycopg read along with another reply (the LISTEN's own, when the NOTIFY
        followed it at once) waits in psycopg's buffer, not on the socket, so it is drained here
        rather than slept through. A listener lost to a server restart or a terminated backend is
        dropped (its errors are psycopg's, not Django's, so they must not reach the loop) and
        opened again here, at most every RELISTEN_SECS: never is a closed socket waited on."""
        for _ in range(2):
            if self._listener is None and self._next_listen <= time.monotonic():
                self._listen()
            if self._listener is None:
                return [], False
            woken = self._drain_notifies()  # drops the listener if it is found broken
            if self._listener is not None:
                return [self._listener.fileno()], woken
        return [], False

    def _drain_notifies(self) -> bool:
        """Read the wake-ups waiting on the listener; True if there were any."""
        if self._listener is None:
            return False
        try:
            woken = False
            for _ in self._listener.notifies(timeout=0):
                woken = True
            if self._listener.broken or self._listener.closed:
                raise ConnectionError("the LISTEN connection is closed")
            return woken
        except Exception:
            # The connection is gone: its socket would otherwise stay readable and end every
            # sleep at once.
            self._lose_listener()
            return False

    def _lose_listener(self) -> None:
        """Drop a broken listener; the next idle opens a new one at once."""
        logger.warning("LISTEN connection lost; listening again")
        self._unlisten()
        self._next_listen = 0.0

    def _unlisten(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None
