"""A private, throwaway PostgreSQL cluster for the soak: its own data directory and port.

The soak restarts its database and terminates backends mid-run; doing that to a shared server
would break everyone else's work, so it gets a cluster of its own (`initdb` into a temporary
directory, trust auth on 127.0.0.1 and a unix socket in the same directory, fsync off). initdb
and postgres refuse to run as root: as root the cluster runs as the `postgres` OS user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


class ClusterUnavailable(Exception):
    """The PostgreSQL server binaries (or a user allowed to run them) are missing."""


def find_bindir() -> Path:
    """The newest installed server's bin directory (Debian layout first, then the PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major, reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ClusterUnavailable(
        "initdb was not found (install the PostgreSQL server: apt-get install postgresql)"
    )


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.parent.name)
    except ValueError:
        return 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateCluster:
    """initdb + pg_ctl around one temporary data directory; `stop()` removes it."""

    def __init__(self, port: int | None = None) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="picobot-soak-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = port or free_port()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterUnavailable("running as root needs a 'postgres' OS user") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        self.started = False

    def url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def _tool(self, name: str, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            [*self._run_as, str(self.bindir / name), *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            # Our own process group: a Ctrl-C meant for the soak must not reach the server first.
            start_new_session=True,
        )

    def start(self) -> None:
        self._tool(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c fsync=off -c full_page_writes=off "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        # fsync off only risks data if the machine itself crashes. synchronous_commit must stay
        # on: `restart -m immediate` is a server crash, and would lose commits already
        # acknowledged (the soak would then see rows vanish that no code of ours deleted).
        self._tool(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )
        self.started = True
        self.wait_ready()

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m fast|immediate`: every connection is cut, the server comes back."""
        self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "restart")
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def terminate_backends(self, dbname: str, application: str) -> int:
        """pg_terminate_backend on every connection to `dbname` made by `application`."""
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() "
                "AND application_name = %s",
                [dbname, application],
            ).fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._tool("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
