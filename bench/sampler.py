"""Where a process's CPU goes, by Python function, without a profiler hook in every call.

A thread wakes every few milliseconds and asks the kernel which threads are on a CPU or
ready for one (state R in `/proc/self/task/TID/stat`); each of those is charged one sample, at
the functions on its stack at that moment: the innermost one as its own time, and once each
function on the stack as its total. A thread waiting (for the database, a lock, the GIL, a
socket) is asleep, so it is charged nothing; C code is charged to the Python function that
called it. (Charging each thread's CPU since the last wake-up to its stack instead would blame
the call a thread blocks in for the work it did before.) State R also covers a thread ready
but waiting for a CPU, so on a machine busy with something else the profile charges the
places threads wake up in (psycopg's wait): profile on a quiet machine. Used by
`bench/worker.py` when BENCH_SAMPLE_FILE is set.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

INTERVAL_SECS = 0.004


def _running(native_id: int) -> bool:
    try:
        with open(f"/proc/self/task/{native_id}/stat") as stat:
            # "pid (comm) S ...": the state follows the last ")".
            return stat.read().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        root = str(Path(__file__).resolve().parent.parent) + os.sep
        path = path.removeprefix(root)
    return f"{path}:{code.co_name}"


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.own: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.by_thread: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(INTERVAL_SECS):
            frames = sys._current_frames()
            for thread in threading.enumerate():
                if thread is self or thread.native_id is None or thread.ident not in frames:
                    continue
                if not _running(thread.native_id):
                    continue
                used = 1
                self.by_thread[thread.name.rstrip("0123456789-_")] += used
                frame: FrameType | None = frames[thread.ident]
                self.own[_where(frame)] += used  # type: ignore[arg-type]
                seen = set()
                while frame is not None:
                    where = _where(frame)
                    if where not in seen:
                        seen.add(where)
                        self.total[where] += used
                    frame = frame.f_back

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=1)

    def report(self) -> str:
        whole = sum(self.own.values()) or 1
        lines = [f"samples on a CPU: {whole} (every {INTERVAL_SECS * 1000:g} ms)"]
        lines.append(
            "by thread: "
            + ", ".join(
                f"{name} {100 * n / whole:.0f}%" for name, n in self.by_thread.most_common()
            )
        )
        packages: Counter[str] = Counter()
        for where, n in self.own.items():
            packages[where.split("/", 1)[0].split(":", 1)[0]] += n
        lines.append(
            "own time by package: "
            + ", ".join(f"{name} {100 * n / whole:.0f}%" for name, n in packages.most_common(12))
        )
        lines.append("\ntotal (the function and what it called):")
        lines += [f"  {100 * n / whole:5.1f}%  {w}" for w, n in self.total.most_common(60)]
        lines.append("\nown:")
        lines += [f"  {100 * n / whole:5.1f}%  {w}" for w, n in self.own.most_common(40)]
        return "\n".join(lines) + "\n"


_sampler: Sampler | None = None


def start() -> None:
    global _sampler
    if _sampler is None:
        _sampler = Sampler()
        _sampler.start()


def dump(path: str) -> None:
    if _sampler is None:
        return
    _sampler.stop()
    with open(path, "a") as out:
        out.write(f"--- pid {os.getpid()} at {time.strftime('%H:%M:%S')}\n")
        out.write(_sampler.report())
