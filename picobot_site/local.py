"""`make run`: the whole system on one machine, on SQLite, with one command.

Writes ./picobot.toml (scheduler enabled) on first use, migrates, creates an admin login once,
then starts the web app, the scheduler worker and the notification worker. Ctrl-C stops them all.
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
ADDRESS = os.environ.get("PICOBOT_ADDRESS", "127.0.0.1:8000")


def write_config() -> None:
    if os.environ.get("PICOBOT_CONFIG") or CONFIG.exists():
        return
    example = (ROOT / "picobot.example.toml").read_text()
    CONFIG.write_text(example.replace("enabled = false", "enabled = true", 1))
    print(f"wrote {CONFIG} with the scheduler enabled")


def manage(*args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, check=True)


def ensure_admin() -> tuple[str, str]:
    import django

    django.setup()
    from kernel.models import User

    if PASSWORD_FILE.exists():
        return "admin", PASSWORD_FILE.read_text().strip()
    password = secrets.token_urlsafe(12)
    user = User.objects.filter(username="admin").first()
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


def worker_commands() -> list[list[str]]:
    from django.core.management import get_commands

    available = get_commands()
    commands = [["runserver", ADDRESS, "--noreload"]]
    if "runworker" in available:
        commands.append(["runworker"])
    if "qcluster" in available:
        commands.append(["qcluster"])
    return commands


def main() -> int:
    os.chdir(ROOT)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picobot_site.settings")
    os.environ.setdefault("DEBUG", "true")
    write_config()
    manage("migrate", "--no-input", "-v", "0")
    username, password = ensure_admin()
    processes = [
        subprocess.Popen([sys.executable, "manage.py", *command], cwd=ROOT)
        for command in worker_commands()
    ]
    base = f"http://{ADDRESS}"
    print(
        f"""
PicoBot Scheduler is running ({len(processes)} processes). Ctrl-C stops all of them.
  admin:  {base}/admin/    login: {username} / {password}
  API:    {base}/api/v1/   schema: {base}/api/v1/schema
  API key: {sys.executable} manage.py createapikey {username} --grant 'schedule:*'
""",
        flush=True,
    )
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for process in processes:
            if process.poll() is not None:
                print(f"process {process.args} exited with {process.returncode}; stopping")
                stopping, exit_code = True, 1
                break
        time.sleep(0.5)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
