"""Idle load: the queries one worker makes per second with nothing due, counted in its process.

    python -m bench.idle DATABASE_URL PICOBOT_CONFIG
runs a worker (as `runworker` would, 16 slots) against a queue whose jobs are all due later,
counts every statement its threads send after a warm-up, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

WARMUP_SECS = 3.0
MEASURE_SECS = 20.0


def main() -> None:
    url, config = sys.argv[1], sys.argv[2]
    os.environ.update(
        DATABASE_URL=url,
        PICOBOT_CONFIG=config,
        DJANGO_SETTINGS_MODULE="picobot_site.settings",
        PICOBOT_LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.db.backends.signals import connection_created

    from schedules.worker import Worker

    lock = threading.Lock()
    counted = {"on": False, "queries": 0}

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if counted["on"]:
            with lock:
                counted["queries"] += 1
        return execute(sql, params, many, context)

    def on_connect(sender: Any, connection: Any, **kwargs: Any) -> None:
        connection.execute_wrappers.append(count)

    connection_created.connect(on_connect)
    worker = Worker(worker_id="bench-idle", concurrency=16)

    def measure() -> None:
        time.sleep(WARMUP_SECS)
        counted["on"] = True
        time.sleep(MEASURE_SECS)
        counted["on"] = False
        worker.request_stop()

    threading.Thread(target=measure, daemon=True).start()
    worker.run()
    print(json.dumps({"idle_queries_per_sec": round(counted["queries"] / MEASURE_SECS, 2)}))


if __name__ == "__main__":
    main()
