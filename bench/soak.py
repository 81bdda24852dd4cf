"""`make soak`: many executions under sustained faults; nothing lost, nothing run twice.

    python -m bench.soak [--database postgres|sqlite] [--executions N] [--duration SECS]
                         [--workers N] [--concurrency N] [--qclusters N] [--seed N]

(or SOAK_DATABASE, SOAK_EXECUTIONS, SOAK_DURATION_SECS, SOAK_WORKERS, SOAK_CONCURRENCY,
SOAK_QCLUSTERS, SOAK_SEED). It creates a database of its own (PostgreSQL: a private cluster, see
`bench/pgcluster.py`; SQLite: a temporary file), a mix of once / interval / cron schedules of
many users, N `runworker` processes and the scripted model (random delays, errors, dropped and
hung answers, tool calls). For the whole run a fault injector SIGKILLs a random worker every few
seconds and starts another, SIGSTOPs one past its lease and resumes it, and on PostgreSQL
restarts the server and terminates the workers' and clusters' connections; an API user creates,
PATCHes, cancels and deletes schedules meanwhile. Users have verified WhatsApp and webhook
contacts on local receivers, and `qcluster` processes deliver their jobs' notifications while
the receivers fail for stretches and a random cluster is SIGKILLed now and then
(`bench/soak_notify.py`). Then the workers drain what came due and stop, the clusters deliver
what is left and stop, and `bench/soak_check.py` checks every occurrence and every
notification. Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTROLLER_APP = "soak-controller"
WORKER_APP = "soak-worker"
USERS = 20
API_USERS = 3
LEASE_SECS = 6
JOB_TIMEOUT_SECS = 5
# Recurring schedules: (type, interval or cron, misfire). Seconds-first crons need
# min_interval_secs <= 15, which the soak's own config allows.
RECURRING = [
    ("interval", 60, "run_once"),
    ("interval", 10, "run_once"),
    ("interval", 30, "skip"),
    ("cron", "* * * * *", "run_once"),
    ("cron", "*/15 * * * * *", "skip"),
]
RECURRING_SHARE = 0.25
CONFIG = """[scheduler]
enabled = true
tick_secs = 0.5
lease_secs = {lease}
max_concurrent = {slots}
max_concurrent_per_user = 6
max_jobs_per_user = 1000000
max_created_per_window = 1000000
max_runs_per_window = 100000000
min_interval_secs = 10
default_timeout_secs = {timeout}
max_retries = 3
backoff_base_secs = 1
backoff_max_secs = 4
max_consecutive_failures = 1000

[model]
request_timeout_secs = 30
"""


@dataclass
class Options:
    database: str
    executions: int
    duration_secs: float
    workers: int
    concurrency: int
    seed: int
    kill_every_secs: float
    pause_every_secs: float
    restarts: int
    terminate_every_secs: float
    api_every_secs: float
    settle_secs: float
    pg_port: int = 0
    qclusters: int = 2
    cluster_kill_every_secs: float = 30
    channel_fault_every_secs: float = 20


def parse_options(argv: list[str]) -> Options:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    add = parser.add_argument
    add("--database", choices=["postgres", "sqlite"], default=env("SOAK_DATABASE", "postgres"))
    add("--executions", type=int, default=int(env("SOAK_EXECUTIONS", "10000")))
    add("--duration", type=float, default=float(env("SOAK_DURATION_SECS", "0")))
    add("--workers", type=int, default=int(env("SOAK_WORKERS", "0")))
    add("--concurrency", type=int, default=int(env("SOAK_CONCURRENCY", "4")))
    add("--seed", type=int, default=int(env("SOAK_SEED", str(int(time.time())))))
    add("--kill-every", type=float, default=float(env("SOAK_KILL_EVERY_SECS", "5")))
    add("--pause-every", type=float, default=float(env("SOAK_PAUSE_EVERY_SECS", "30")))
    add("--restarts", type=int, default=int(env("SOAK_RESTARTS", "2")))
    add("--terminate-every", type=float, default=float(env("SOAK_TERMINATE_EVERY_SECS", "20")))
    add("--api-every", type=float, default=float(env("SOAK_API_EVERY_SECS", "0.3")))
    add("--settle", type=float, default=float(env("SOAK_SETTLE_SECS", "0")))
    add("--qclusters", type=int, default=int(env("SOAK_QCLUSTERS", "2")), help="0: none")
    add(
        "--cluster-kill-every",
        type=float,
        default=float(env("SOAK_QCLUSTER_KILL_EVERY_SECS", "30")),
    )
    add(
        "--channel-fault-every",
        type=float,
        default=float(env("SOAK_CHANNEL_FAULT_EVERY_SECS", "20")),
    )
    add("--pg-port", type=int, default=int(env("SOAK_PG_PORT", "0")), help="default: any free")
    args = parser.parse_args(argv)
    # About 20 executions a second when the duration is not given: ~8 minutes for the default.
    duration = args.duration or max(30.0, args.executions / 20)
    workers = args.workers or (4 if args.database == "sqlite" else 5)
    settle = args.settle or max(180.0, duration)
    return Options(
        database=args.database,
        executions=args.executions,
        duration_secs=duration,
        workers=workers,
        concurrency=args.concurrency,
        seed=args.seed,
        kill_every_secs=args.kill_every,
        pause_every_secs=args.pause_every,
        restarts=args.restarts if args.database == "postgres" else 0,
        terminate_every_secs=args.terminate_every if args.database == "postgres" else 0,
        api_every_secs=args.api_every,
        settle_secs=settle,
        pg_port=args.pg_port,
        qclusters=args.qclusters,
        cluster_kill_every_secs=args.cluster_kill_every,
        channel_fault_every_secs=args.channel_fault_every,
    )


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the database ------------------------------------------------------------------------------


def with_application(url: str, name: str) -> str:
    return f"{url}?application_name={name}" if url.startswith("postgres") else url


def setup_django(url: str, config_path: Path) -> None:
    os.environ["DATABASE_URL"] = with_application(url, CONTROLLER_APP)
    os.environ["PICOBOT_CONFIG"] = str(config_path)
    os.environ["DJANGO_SETTINGS_MODULE"] = "picobot_site.settings"
    os.environ["PICOBOT_LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("SECRET_KEY", "soak-only-" + "x" * 40)
    os.environ["ALLOWED_HOSTS"] = "testserver,localhost"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    # The API user's expected 404s and 409s are not news; its 500s are checked, not logged.
    logging.getLogger("django.request").setLevel(logging.CRITICAL)


def retrying(step: Any, what: str, timeout: float = 120.0) -> Any:
    """Run `step`, reconnecting through database outages (a restart under way)."""
    from django.db import InterfaceError, OperationalError, connection

    deadline = time.monotonic() + timeout
    while True:
        try:
            return step()
        except (OperationalError, InterfaceError) as exc:
            connection.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: the database stayed unreachable ({exc})") from exc
            time.sleep(0.5)


# --- the schedules -----------------------------------------------------------------------------


@dataclass
class Plan:
    """What the soak created: the first due time of each job it will check occurrence by
    occurrence (the API user's jobs are checked by the general rules only)."""

    first_due: dict[int, Any] = field(default_factory=dict)
    api_users: list[Any] = field(default_factory=list)
    api_keys: dict[int, str] = field(default_factory=dict)
    recurring: int = 0
    once: int = 0


def create_schedules(options: Options, rng: random.Random, webhook_url: str = "") -> Plan:
    from datetime import timedelta

    from bench import soak_notify
    from kernel.models import ApiKey, User
    from schedules import lifecycle
    from schedules.dbtime import db_now
    from schedules.models import Job

    plan = Plan()
    grant = ["shell:echo", "schedule:*"]
    users = [
        User.objects.create(username=f"soak-{i}", grant=grant + soak_notify.GRANT_EXTRA)
        for i in range(USERS)
    ]
    if webhook_url:
        soak_notify.create_contacts(users, webhook_url)
    for i in range(API_USERS):
        user = User.objects.create(username=f"soak-api-{i}", grant=grant)
        plan.api_users.append(user)
        plan.api_keys[user.pk] = ApiKey.issue(user, "soak")[1]
    duration = options.duration_secs
    per_cycle = sum(duration / _period(kind, every) for kind, every, _ in RECURRING)
    cycles = max(1, round(options.executions * RECURRING_SHARE / per_cycle))
    now = db_now()
    for i in range(cycles * len(RECURRING)):
        kind, every, misfire = RECURRING[i % len(RECURRING)]
        body: dict[str, Any] = {
            "name": f"soak {kind} {every} #{i}",
            "prompt": f"recurring {i}",
            "schedule_type": kind,
            "capabilities": ["shell:echo"],
            "timeout_secs": JOB_TIMEOUT_SECS,
            "misfire": misfire,
        }
        if kind == "interval":
            body["interval_secs"] = every
            # Every-minute jobs due at once; the others spread over their first period.
            offset = 1 if every == 60 else 1 + rng.uniform(0, every)
            body["run_at"] = (db_now() + timedelta(seconds=offset)).isoformat()
        else:
            body["cron"] = every
        notify = soak_notify.notify_on(i % USERS, rng)
        if notify is not None:
            body["notify_on"] = notify
        job = lifecycle.create_job(users[i % USERS], body)
        plan.first_due[job.pk] = job.next_run_at
    plan.recurring = len(plan.first_due)
    plan.once = max(0, options.executions - round(cycles * per_cycle))
    start = now + timedelta(seconds=2)
    batch: list[Job] = []
    for i in range(plan.once):
        due = start + timedelta(seconds=rng.uniform(0, duration - 2))
        owner = rng.randrange(USERS)
        notify = soak_notify.notify_on(owner, rng)
        batch.append(
            Job(
                owner=users[owner],
                name=f"soak once #{i}",
                prompt=f"once {i}",
                schedule_type="once",
                run_at=due,
                next_run_at=due,
                capabilities=["shell:echo"],
                timeout_secs=JOB_TIMEOUT_SECS,
                **({} if notify is None else {"notify_on": notify}),
            )
        )
        if len(batch) == 2000 or i == plan.once - 1:
            for job in Job.objects.bulk_create(batch):
                plan.first_due[job.pk] = job.next_run_at
            batch = []
    return plan


def _period(kind: str, every: Any) -> float:
    if kind == "interval":
        return float(every)
    return 15.0 if str(every).startswith("*/15") else 60.0


# --- the workers -------------------------------------------------------------------------------


class WorkerPool:
    """`runworker` processes: started, killed, paused and stopped by the soak."""

    def __init__(self, env: dict[str, str], logs: Path, concurrency: int) -> None:
        self.env = env
        self.logs = logs
        self.concurrency = concurrency
        self.live: list[Any] = []
        self.started = 0
        self.kills = 0
        self.pauses = 0
        self.crashed: list[str] = []
        self.paused: set[Any] = set()
        self._lock = threading.Lock()

    def start_one(self) -> None:
        import subprocess

        with self._lock:
            self.started += 1
            name = f"soak-w{self.started}"
            log = open(self.logs / f"{name}.log", "wb")
            argv = ["runworker", "--worker-id", name, "--concurrency", str(self.concurrency)]
            process = subprocess.Popen(
                [sys.executable, "manage.py", *argv, "--grace-secs", "5"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            self.live.append(process)

    def reap(self) -> list[str]:
        """Workers that exited by themselves (a crash): replaced, and reported."""
        with self._lock:
            dead = [p for p in self.live if p.poll() is not None]
            self.live = [p for p in self.live if p not in dead]
        for process in dead:
            self.crashed.append(f"{process.args[4]} exited with {process.returncode}")
            self.start_one()
        return [f"{p.args[4]} exited with {p.returncode}" for p in dead]

    def kill_random(self, rng: random.Random) -> None:
        with self._lock:
            # A paused worker is left to wake up after its lease: that is its own fault.
            candidates = [p for p in self.live if p not in self.paused]
            if not candidates:
                return
            victim = rng.choice(candidates)
            self.live.remove(victim)
        victim.kill()
        victim.wait()
        self.kills += 1
        self.start_one()

    def pause_random(self, rng: random.Random, secs: float, stop: threading.Event) -> None:
        with self._lock:
            if not self.live:
                return
            victim = self.live[rng.randrange(len(self.live))]
            self.paused.add(victim)
        with contextlib.suppress(ProcessLookupError):
            victim.send_signal(signal.SIGSTOP)
        self.pauses += 1
        stop.wait(secs)
        with contextlib.suppress(ProcessLookupError):
            victim.send_signal(signal.SIGCONT)
        with self._lock:
            self.paused.discard(victim)

    def stop_all(self, grace_secs: float) -> list[int]:
        """SIGTERM every worker (after SIGCONT) and wait; returns their exit codes."""
        with self._lock:
            procs, self.live = self.live, []
        for process in procs:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        codes = []
        deadline = time.monotonic() + grace_secs
        for process in procs:
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except Exception:
                process.kill()
                codes.append(process.wait())
        return codes

    def kill_all(self) -> None:
        with self._lock:
            procs, self.live = self.live, []
        for process in procs:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.kill()
            with contextlib.suppress(Exception):
                process.wait(timeout=10)


# --- faults ------------------------------------------------------------------------------------


@dataclass
class FaultLog:
    kills: int = 0
    pauses: int = 0
    restarts: list[tuple[str, float, float]] = field(default_factory=list)  # mode, start, end
    terminated: int = 0
    terminate_rounds: int = 0
    terminate_times: list[float] = field(default_factory=list)  # time.time() of each round
    clusters_terminated: int = 0


def inject_faults(
    options: Options,
    pool: WorkerPool,
    cluster: Any,
    dbname: str,
    stop: threading.Event,
    log: FaultLog,
) -> None:
    """The fault loop, until `stop`: kills, pauses, restarts and terminated connections."""
    rng = random.Random(options.seed + 1)
    started = time.monotonic()
    restart_at = [
        started + options.duration_secs * (k + 1) / (options.restarts + 1)
        for k in range(options.restarts)
    ]
    next_kill = started + options.kill_every_secs
    next_pause = started + options.pause_every_secs / 2
    next_terminate = started + (options.terminate_every_secs or float("inf"))
    pauser: threading.Thread | None = None
    while not stop.wait(0.2):
        pool.reap()
        now = time.monotonic()
        if now >= next_kill:
            next_kill = now + rng.uniform(0.5, 1.5) * options.kill_every_secs
            pool.kill_random(rng)
            log.kills += 1
        if now >= next_pause and (pauser is None or not pauser.is_alive()):
            next_pause = now + rng.uniform(0.5, 1.5) * options.pause_every_secs
            secs = LEASE_SECS + rng.uniform(2, 5)
            pauser = threading.Thread(target=pool.pause_random, args=(rng, secs, stop))
            pauser.start()
            log.pauses += 1
        if restart_at and now >= restart_at[0]:
            restart_at.pop(0)
            mode = "fast" if len(log.restarts) % 2 == 0 else "immediate"
            began = time.time()
            cluster.restart(mode)
            log.restarts.append((mode, began, time.time()))
            say(f"PostgreSQL restarted (-m {mode}) in {time.time() - began:.1f}s")
        if now >= next_terminate:
            next_terminate = now + rng.uniform(0.5, 1.5) * options.terminate_every_secs
            with contextlib.suppress(Exception):
                log.terminate_times.append(time.time())
                log.terminated += cluster.terminate_backends(dbname, WORKER_APP)
                log.terminate_rounds += 1
                if options.qclusters:
                    from bench.soak_notify import CLUSTER_APP

                    log.clusters_terminated += cluster.terminate_backends(dbname, CLUSTER_APP)
    if pauser is not None:
        pauser.join()


# --- the API user ------------------------------------------------------------------------------


@dataclass
class ApiLog:
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # 400s, shown (the soak's own bodies)


def drive_api(plan: Plan, options: Options, stop: threading.Event, log: ApiLog) -> None:
    """Creates, PATCHes, cancels and deletes the API users' schedules until `stop`."""
    from datetime import timedelta

    from django.db import connection
    from rest_framework.test import APIClient

    from schedules.dbtime import db_now

    rng = random.Random(options.seed + 2)
    clients = []
    for user in plan.api_users:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plan.api_keys[user.pk]}")
        clients.append(client)
    mine: list[tuple[APIClient, int, str]] = []
    while not stop.wait(options.api_every_secs):
        client = rng.choice(clients)
        action = rng.choice(["create", "create", "patch", "cancel", "delete", "list"])
        try:
            if action == "create" or not mine:
                kind = rng.choice(["once", "once", "interval"])
                body: dict[str, Any] = {
                    "prompt": "api soak [slow]",
                    "schedule_type": kind,
                    "capabilities": ["shell:echo"],
                    "timeout_secs": JOB_TIMEOUT_SECS,
                }
                due = retrying(db_now, "clock") + timedelta(seconds=rng.uniform(3, 20))
                body["run_at"] = due.isoformat()
                if kind == "interval":
                    body["interval_secs"] = rng.choice([10, 30])
                answer = client.post("/api/v1/schedules", body, format="json")
                if answer.status_code == 201:
                    mine.append((client, answer.json()["id"], kind))
            else:
                owner, job_id, kind = rng.choice(mine)
                url = f"/api/v1/schedules/{job_id}"
                if action == "patch":
                    answer = owner.patch(url, {"prompt": f"[slow] {rng.random()}"}, format="json")
                elif action == "cancel":
                    # Aim at a run in progress when there is one, so cancels meet live runs.
                    running = retrying(lambda: _running_job(plan), "running job") or job_id
                    owner = next((c for c, j, _ in mine if j == running), owner)
                    answer = owner.post(f"/api/v1/schedules/{running}/cancel")
                elif action == "delete":
                    answer = owner.delete(url)
                    mine.remove((owner, job_id, kind))
                else:
                    answer = owner.get(f"{url}/executions")
            _record(log, action, answer.status_code, answer.content)
        except Exception as exc:
            connection.close()
            log.requests += 1
            log.by_status["exception"] = log.by_status.get("exception", 0) + 1
            log.failures.append(f"{action}: {type(exc).__name__}: {exc}"[:300])
    connection.close()


def _running_job(plan: Plan) -> int | None:
    """An API user's job with a run in progress, if any."""
    from schedules.models import Execution

    return (
        Execution.objects.filter(status="running", job__owner__in=plan.api_users)
        .values_list("job_id", flat=True)
        .first()
    )


def _record(log: ApiLog, action: str, status: int, content: bytes) -> None:
    log.requests += 1
    key = f"{action} {status}"
    log.by_status[key] = log.by_status.get(key, 0) + 1
    if status == 400 and len(log.refused) < 5:
        log.refused.append(f"{action}: {content[:200]!r}")
    if status >= 500 or b"database is locked" in content:
        log.failures.append(f"{action}: HTTP {status}: {content[:200]!r}")


# --- the run -----------------------------------------------------------------------------------


def wait_drained(pool: WorkerPool, cutoff: Any, timeout: float, started: float) -> bool:
    """Wait until every occurrence due by `cutoff` has run: no live job is still due by then,
    and nothing runs an occurrence from before it."""
    from schedules.models import Execution, Job

    def drained() -> bool:
        due = Job.objects.filter(
            enabled=True, deleted_at__isnull=True, next_run_at__lte=cutoff
        ).exists()
        pending = Job.objects.filter(
            enabled=True, deleted_at__isnull=True, pending_scheduled_for__lte=cutoff
        ).exists()
        running = Execution.objects.filter(status="running", scheduled_for__lte=cutoff).exists()
        return not (due or pending or running)

    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 30
    while time.monotonic() < deadline:
        if retrying(drained, "drain check"):
            return True
        pool.reap()
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + 30
            say(f"draining: {progress(started)}")
        time.sleep(1)
    return False


def progress(started: float) -> str:
    from schedules.models import Execution

    done = retrying(lambda: Execution.objects.exclude(status="running").count(), "progress")
    elapsed = time.monotonic() - started
    return f"{done} executions finished in {elapsed:.0f}s ({done / max(elapsed, 1):.1f}/s)"


def run(options: Options, workdir: Path) -> int:
    from bench import soak_notify
    from bench.pgcluster import PrivateCluster
    from bench.soak_model import ModelMix, SoakModel

    cluster = None
    dbname = "picobot_soak"
    if options.database == "postgres":
        cluster = PrivateCluster(options.pg_port or None)
        cluster.start()
        url = cluster.create_database(dbname)
        say(f"private PostgreSQL cluster on 127.0.0.1:{cluster.port} ({cluster.root})")
    else:
        url = f"sqlite:///{workdir / 'soak.sqlite3'}"
    pool: WorkerPool | None = None
    model: SoakModel | None = None
    receivers: soak_notify.Receivers | None = None
    clusters: soak_notify.ClusterPool | None = None
    try:
        slots = options.workers * options.concurrency
        config = workdir / "picobot.soak.toml"
        config.write_text(
            CONFIG.format(lease=LEASE_SECS, slots=slots, timeout=JOB_TIMEOUT_SECS)
            + soak_notify.CONFIG.format(lease=soak_notify.DELIVERY_LEASE_SECS)
        )
        setup_django(url, config)
        from bench import soak_check

        rng = random.Random(options.seed)
        if options.qclusters:
            receivers = soak_notify.Receivers.start(workdir)
        plan = create_schedules(options, rng, receivers.webhook.url if receivers else "")
        say(f"seed {options.seed}: {plan.recurring} recurring and {plan.once} once schedules")
        model = SoakModel(ModelMix(), options.seed)
        model.server.start()
        env = {
            **os.environ,
            "DATABASE_URL": with_application(url, WORKER_APP),
            "PICOBOT_MODEL_BASE_URL": model.server.base_url,
            "PICOBOT_MODEL": "soak-model",
            "PICOBOT_MODEL_API_KEY": "soak-key",
            "PICOBOT_LOG_LEVEL": "WARNING",
        }
        logs = workdir / "logs"
        logs.mkdir()
        pool = WorkerPool(env, logs, options.concurrency)
        for _ in range(options.workers):
            pool.start_one()
        faults, api = FaultLog(), ApiLog()
        channel_faults = soak_notify.ChannelFaults()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=inject_faults, args=(options, pool, cluster, dbname, stop, faults)
            ),
            threading.Thread(target=drive_api, args=(plan, options, stop, api)),
        ]
        if receivers is not None:
            cluster_env = {
                **env,
                **receivers.env(),
                "DATABASE_URL": with_application(url, soak_notify.CLUSTER_APP),
            }
            clusters = soak_notify.ClusterPool(cluster_env, logs)
            for _ in range(options.qclusters):
                clusters.start_one()
            threads.append(
                threading.Thread(
                    target=soak_notify.inject_channel_faults,
                    args=(options, receivers, clusters, stop, channel_faults),
                )
            )
        for thread in threads:
            thread.start()
        started = time.monotonic()
        try:
            while time.monotonic() - started < options.duration_secs:
                time.sleep(min(15.0, options.duration_secs - (time.monotonic() - started)))
                say(f"{progress(started)}; kills {faults.kills}, pauses {faults.pauses}")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        from schedules.dbtime import db_now

        cutoff = retrying(db_now, "clock")
        say(f"faults stopped at {cutoff:%H:%M:%S}; draining what came due")
        drained = wait_drained(pool, cutoff, options.settle_secs, started)
        say(progress(started))
        codes = pool.stop_all(grace_secs=30)
        delivered = True
        if clusters is not None:
            say("workers stopped; delivering the notifications left")
            delivered = soak_notify.wait_delivered(clusters, options.settle_secs, retrying, say)
            clusters.stop_all()
        report = soak_check.check(plan, cutoff, drained, model, options.database)
        if receivers is not None and clusters is not None:
            soak_check.check_notifications(
                report, plan, receivers, clusters, channel_faults, delivered
            )
        report.add_faults(faults, api, codes, pool, logs, options.database)
        report.print(options, time.monotonic() - started)
        return 1 if report.violations else 0
    finally:
        if pool is not None:
            pool.kill_all()
        if clusters is not None:
            clusters.stop_all(grace_secs=5)
        if receivers is not None:
            receivers.stop()
        if model is not None:
            model.server.stop()
        if cluster is not None:
            cluster.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    # SIGTERM (a CI timeout, a kill) cleans up like Ctrl-C: workers, the cluster, the files.
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="picobot-soak-") as tmp:
        keep = os.environ.get("SOAK_KEEP_LOGS")
        code = run(options, Path(tmp))
        if keep:
            import shutil

            shutil.copytree(Path(tmp) / "logs", keep, dirs_exist_ok=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
