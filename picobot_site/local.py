"""`make run`: the whole system on one machine, on SQLite, with one command.

Writes ./picobot.toml (scheduler enabled) on first use, migrates, creates an admin login once,
then starts the web app, the scheduler worker and the notification worker. `make run
ADDRESS=0.0.0.0:9000` (PICOBOT_ADDRESS) serves elsewhere than 127.0.0.1:8000.

Ctrl-C stops them all, and stops the scheduler the way a lone SIGTERM does: the children run in
their own process groups, so the terminal's SIGINT reaches this launcher only, and the launcher
sends each child exactly one SIGTERM. The worker then lets running executions finish within its
grace period, then interrupts and releases the rest. A second Ctrl-C stops everything at once.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "picobot.toml"
PASSWORD_FILE = ROOT / ".admin_password"
ADDRESS = os.environ.get("PICOBOT_ADDRESS") or "127.0.0.1:8000"
# The worker's grace period for running executions, and how long after it the launcher waits
# for the worker to record and release what it interrupted before it kills it.
GRACE_SECS = 30
RELEASE_MARGIN_SECS = 15


def write_config() -> None:
    if os.environ.get("PICOBOT_CONFIG") or CONFIG.exists():
        return
    example = (ROOT / "picobot.example.toml").read_text()
    CONFIG.write_text(example.replace("enabled = false", "enabled = true", 1))
    print(f"wrote {CONFIG} with the scheduler enabled")


def manage(*args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, check=True)


def ensure_admin() -> tuple[str, str]:
    """The admin login: created once, its password kept in .admin_password. A database made
    afresh (the file kept) gets the admin again, with the same password."""
    import django

    django.setup()
    from kernel.models import User

    known = PASSWORD_FILE.read_text().strip() if PASSWORD_FILE.exists() else ""
    user = User.objects.filter(username="admin").first()
    if known and user is not None:
        return "admin", known
    password = known or secrets.token_urlsafe(12)
    if user is None:
        User.objects.create_superuser(
            "admin", email="", password=password, grant=["schedule:*", "notify:*"]
        )
    else:
        user.set_password(password)
        user.save(update_fields=["password"])
    PASSWORD_FILE.write_text(password + "\n")
    PASSWORD_FILE.chmod(0o600)
    return "admin", password


def worker_commands() -> dict[str, list[str]]:
    """The children by name. `migrate` has just shown the system checks: they skip them."""
    from django.core.management import get_commands

    available = get_commands()
    commands = {"web": ["runserver", ADDRESS, "--noreload", "--skip-checks"]}
    if "runworker" in available:
        commands["scheduler"] = ["runworker", "--grace-secs", str(GRACE_SECS), "--skip-checks"]
    if "qcluster" in available:
        commands["notifications"] = ["qcluster", "--skip-checks"]
    return commands


def banner(count: int, username: str, password: str) -> str:
    base = f"http://{ADDRESS}"
    return f"""
PicoBot Scheduler is running ({count} processes). Ctrl-C stops all of them.
  API docs: {base}/api/v1/docs      (schema: {base}/api/v1/schema)
  API:      {base}/api/v1/
  admin:    {base}/admin/    login: {username} / {password}
  API key:  {sys.executable} manage.py createapikey {username} --grant 'schedule:*'
"""


def main() -> int:
    os.chdir(ROOT)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picobot_site.settings")
    os.environ.setdefault("DEBUG", "true")
    write_config()
    try:
        manage("migrate", "--no-input", "-v", "0")
    except subprocess.CalledProcessError as exc:
        return exc.returncode  # manage.py has said what is wrong (a config mistake: one line)
    username, password = ensure_admin()
    processes = {
        name: subprocess.Popen([sys.executable, "manage.py", *command], cwd=ROOT, process_group=0)
        for name, command in worker_commands().items()
    }
    print(banner(len(processes), username, password), flush=True)
    return supervise(processes)


def supervise(processes: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait for Ctrl-C (or SIGTERM, or a child exiting), then stop every child once."""
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        if len(signals) > 1:
            # A second Ctrl-C: whatever is still running stops now.
            for process in processes.values():
                if process.poll() is None:
                    process.kill()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    exit_code = 0
    while not signals:
        exited = [name for name, p in processes.items() if p.poll() is not None]
        if exited:
            name = exited[0]
            print(f"{name} exited with {processes[name].returncode}; stopping the others")
            exit_code = 1
            break
        time.sleep(0.2)
    if signals:
        print(
            f"{signal.Signals(signals[0]).name}: stopping; the scheduler lets running executions "
            f"finish (up to {GRACE_SECS} s), then releases them. Ctrl-C again to stop at once.",
            flush=True,
        )
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECS + RELEASE_MARGIN_SECS
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in time; killing it", flush=True)
            process.kill()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
