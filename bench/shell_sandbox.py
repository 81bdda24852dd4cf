"""The cost of the shell sandbox: starting `/bin/true` plainly, through the launcher unconfined,
and confined (namespaces + Landlock), plus building the allow-list for a broad grant.

Run: `.venv/bin/python -m bench.shell_sandbox` (also part of `make bench`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kernel import sandbox
from kernel.permissions import CapabilitySet

ROUNDS = 30
PROJECT = str(Path(__file__).resolve().parent.parent)


def timed(action: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, float]:
    """Median and worst wall time of `action`, in milliseconds."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def run(argv: list[str]) -> None:
    subprocess.run(argv, env={}, stdin=subprocess.DEVNULL, capture_output=True, check=True)


def main() -> None:
    reason = sandbox.unavailable_reason()
    if reason is not None:
        print(f"shell sandbox: skipped, this kernel cannot confine ({reason})")
        return
    broad = CapabilitySet(["filesystem:read:/**", "filesystem:write:/tmp/**"])
    protected = [f"{PROJECT}/picobot.sqlite3", f"{PROJECT}/.secret_key"]
    with tempfile.TemporaryDirectory() as scratch:
        spec = sandbox.build_spec(broad, scratch, protected, PROJECT)
        rules = sum(len(spec[k]) for k in ("exec", "read", "write", "device"))
        unconfined = {"parent": os.getpid(), "confine": False}
        rows = [
            ("plain exec of /bin/true", timed(lambda: run(["/bin/true"]))),
            (
                "launcher, unconfined",
                timed(lambda: run(sandbox.launcher_command(unconfined, ["/bin/true"]))),
            ),
            (
                f"launcher, confined ({rules} rules)",
                timed(lambda: run(sandbox.launcher_command(spec, ["/bin/true"]))),
            ),
            (
                "build_spec for filesystem:read:/**",
                timed(lambda: sandbox.build_spec(broad, scratch, protected, PROJECT)),
            ),
        ]
    print(f"shell sandbox ({ROUNDS} rounds each, Python {sys.version.split()[0]})")
    print(f"{'what':<42} {'median ms':>10} {'max ms':>8}")
    for name, (median, worst) in rows:
        print(f"{name:<42} {median:>10.1f} {worst:>8.1f}")


if __name__ == "__main__":
    main()
