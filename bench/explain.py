"""The plans of the hot statements, at scale (PostgreSQL): `EXPLAIN (ANALYZE, BUFFERS)`.

    python -m bench.explain DATABASE_URL
With 100k jobs (10k of them due, 20 owners) and 100k executions in the window, records the
statements of one claim of 16 runs, of one batch completion of those 16, of the idle tick and
of the first page of the schedules list, then explains each in the state it ran in (inside a
transaction rolled back afterwards). Prints markdown.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.lockhold import CANDIDATES, CONFIG, OTHERS, _history, _jobs, _reset, _users
from bench.scenario import setup


def _recorded(step: Any) -> list[tuple[str, Any]]:
    """The statements `step()` sends, with their parameters; its writes are rolled back."""
    from django.db import connection, transaction

    seen: list[tuple[str, Any]] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append((sql, params))
        return execute(sql, params, many, context)

    with transaction.atomic(), connection.execute_wrapper(record):
        step()
        transaction.set_rollback(True)
    return seen


def _explain(title: str, statements: list[tuple[str, Any]]) -> None:
    from django.db import connection, transaction

    print(f"\n#### {title}\n")
    for sql, params in statements:
        if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "WITH", "DELETE")):
            continue
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            transaction.set_rollback(True)
        print("```\n" + " ".join(sql.split())[:300] + "\n\n" + plan + "\n```")


def main() -> None:
    url = sys.argv[1]
    os.environ["ALLOWED_HOSTS"] = "testserver"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "picobot.toml"
        config.write_text(CONFIG)
        setup(url, str(config))
        from django.db import connection
        from django.test import Client

        from kernel.models import ApiKey, User
        from schedules import claims

        _reset()
        _jobs(_users("lock-c", CANDIDATES), 10_000, -timedelta(seconds=1))
        quiet = _jobs(_users("lock-o", OTHERS), 90_000, timedelta(days=1))
        _history(quiet, 100_000 // len(quiet))
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        _explain("claim (16 runs)", _recorded(lambda: claims.claim_due("explain", 16)))
        taken = claims.claim_due("explain", 16).claims
        done = [(c, claims.Outcome("succeeded", output="ok")) for c in taken]
        _explain("batch completion (16 runs)", _recorded(lambda: claims.complete_many(done)))
        claims.complete_many(done)
        _explain("idle tick", _recorded(claims.agenda))
        caller = User.objects.get(username="lock-c-0")
        caller.grant = ["schedule:*"]
        caller.save()
        client = Client(HTTP_AUTHORIZATION=f"Bearer {ApiKey.issue(caller)[1]}")
        _explain("schedules list", _recorded(lambda: client.get("/api/v1/schedules?limit=100")))
        _reset()


if __name__ == "__main__":
    main()
