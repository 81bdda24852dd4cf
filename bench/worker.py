"""A `runworker` process that counts its own statements, commits and CPU, for the benchmarks.

    python -m bench.worker [--no-model] RUNWORKER-ARGS...
On SIGUSR2 the counters and the CPU clock start (the scenario sends it just before the jobs
come due, so start-up is not counted); at exit one JSON line goes to $BENCH_COUNTS_FILE:
statements, commits (explicit, plus each statement run in autocommit) and CPU seconds since.
`--no-model` replaces the agent loop by an instant answer: what is left is the scheduler's own
cost per run. With BENCH_SAMPLE_FILE set, where the CPU went (bench/sampler.py) is appended
to that file at exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()
_counts = {"on": False, "statements": 0, "commits": 0, "cpu": 0.0}
# Claims and completion batches: how many, how many runs they carried, and the wall time a
# claim waited for the claim lock and then held it (PostgreSQL's advisory lock; SQLite's
# writer lock is taken with the transaction, so there the wait is not seen separately).
_batches = {"claims": 0, "claimed": 0, "look": 0.0, "locked_trip": 0.0}
_batches |= {"completions": 0, "completed": 0}


_explicit = threading.local()


def _count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    if _counts["on"]:
        connection = context["connection"]
        implicit = connection.get_autocommit() and not connection.in_atomic_block
        # A transaction sent as BEGIN ... COMMIT in autocommit (the claim's one round trip):
        # its statements are not commits of their own, and BEGIN and COMMIT not statements.
        word = sql.lstrip()[:6].upper()
        if word.startswith("BEGIN"):
            _explicit.on = True
        with _lock:
            if word == "COMMIT":
                _explicit.on = False
                _counts["commits"] += 1
            elif not word.startswith("BEGIN"):
                _counts["statements"] += 1
                _counts["commits"] += int(implicit and not getattr(_explicit, "on", False))
    return execute(sql, params, many, context)


def _install_counters() -> None:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.signals import connection_created

    def on_connect(sender: Any, connection: Any, **kwargs: Any) -> None:
        # Once per connection object: it fires again each time a closed connection reopens.
        if _count not in connection.execute_wrappers:
            connection.execute_wrappers.append(_count)

    connection_created.connect(on_connect, weak=False)
    commit = BaseDatabaseWrapper._commit

    def counted_commit(self: Any) -> Any:
        if _counts["on"]:
            with _lock:
                _counts["commits"] += 1
        return commit(self)

    BaseDatabaseWrapper._commit = counted_commit  # type: ignore[method-assign]

    def start(signum: int, frame: Any) -> None:
        _counts.update(on=True, statements=0, commits=0, cpu=time.process_time())
        _batches.update(dict.fromkeys(_batches, 0))
        if os.environ.get("BENCH_SAMPLE_FILE"):
            from bench import sampler

            sampler.start()

    _install_batch_counters()

    signal.signal(signal.SIGUSR2, start)


def _install_batch_counters() -> None:
    from schedules import claims

    look, locked_trip, claim_due, complete_many = (
        claims._look,
        claims._in_one_round_trip,
        claims.claim_due,
        claims.complete_many,
    )

    def timed_look(*args: Any, **kwargs: Any) -> Any:
        # PostgreSQL: the look is read without the lock (the general path: with it, the wait
        # for the lock included).
        begin = time.monotonic()
        found = look(*args, **kwargs)
        _batches["look"] += time.monotonic() - begin
        return found

    def timed_trip(*args: Any) -> Any:
        # The lock, the claim statement and the commit, sent together: the wait for the lock
        # and its hold, with one round trip.
        begin = time.monotonic()
        found = locked_trip(*args)
        _batches["locked_trip"] += time.monotonic() - begin
        return found

    def timed_claim(*args: Any, **kwargs: Any) -> Any:
        result = claim_due(*args, **kwargs)
        _batches["claims"] += 1
        _batches["claimed"] += len(result.claims)
        return result

    def counted_complete(done: list[Any]) -> Any:
        _batches["completions"] += 1
        _batches["completed"] += len(done)
        return complete_many(done)

    claims._look = timed_look
    claims._in_one_round_trip = timed_trip
    claims.claim_due = timed_claim
    claims.complete_many = counted_complete


def _without_model() -> None:
    from kernel.agent import AgentResult
    from schedules import executor

    def instant(prompt: str, context: Any, **kwargs: Any) -> AgentResult:
        return AgentResult(text="ok", prompt_tokens=1, completion_tokens=1)

    executor.run_agent = instant  # type: ignore[assignment]


def _report() -> None:
    if os.environ.get("BENCH_SAMPLE_FILE"):
        from bench import sampler

        sampler.dump(os.environ["BENCH_SAMPLE_FILE"])
    path = os.environ.get("BENCH_COUNTS_FILE")
    if not path:
        return
    cpu = time.process_time() - _counts["cpu"] if _counts["on"] else 0.0
    row = {"statements": _counts["statements"], "commits": _counts["commits"], "cpu_secs": cpu}
    row |= _batches
    with open(path, "a") as out:
        out.write(json.dumps(row) + "\n")


def main() -> None:
    args = sys.argv[1:]
    no_model = "--no-model" in args
    args = [a for a in args if a != "--no-model"]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picobot_site.settings")
    import django

    django.setup()
    _install_counters()
    if no_model:
        _without_model()
    from django.core.management import call_command

    try:
        call_command("runworker", *args)
    finally:
        _report()


if __name__ == "__main__":
    main()
