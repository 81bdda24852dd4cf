"""What one tick of the worker's loop asks the database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from schedules import claims, worker
from schedules.dbtime import db_now
from schedules.models import Job
from schedules.worker import AGENDA_EVERY_SECS, Worker

# Transactional: the worker's claims take their own transactions, as in a real worker.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ticking(make_user: Any, monkeypatch: Any, picobot_config: Any) -> Iterator[Any]:
    """A worker of 2 slots whose runs are only recorded, 7 due jobs, and a count of the
    agenda reads."""
    picobot_config("scheduler", max_concurrent=50, max_concurrent_per_user=50)
    owner = make_user("ticker")
    now = db_now()
    spec = {"prompt": "hi", "schedule_type": "interval", "interval_secs": 3600}
    Job.objects.bulk_create(
        Job(owner=owner, name=f"job {i}", next_run_at=now - timedelta(seconds=60 - i), **spec)
        for i in range(7)
    )
    started: list[claims.Claim] = []
    agendas: list[claims.Agenda] = []
    real_agenda = claims.agenda

    def counted_agenda() -> claims.Agenda:
        agendas.append(real_agenda())
        return agendas[-1]

    monkeypatch.setattr(claims, "agenda", counted_agenda)
    w = Worker(worker_id="ticks", concurrency=2)
    monkeypatch.setattr(w, "_start", started.append)  # the slots stay free
    monkeypatch.setattr(w, "idle", lambda *args, **kwargs: None)
    yield w, started, agendas


def test_a_worker_whose_claims_fill_its_slots_claims_again_without_the_agenda(ticking) -> None:
    w, started, agendas = ticking
    assert w.handle_one_tick() and (len(started), len(agendas)) == (2, 1)
    # More is likely due: straight to the claim.
    assert w.handle_one_tick() and (len(started), len(agendas)) == (4, 1)
    assert w.handle_one_tick() and (len(started), len(agendas)) == (6, 1)
    # The last one: the claim took fewer than it asked for, so the next tick reads the agenda.
    assert w.handle_one_tick() and (len(started), len(agendas)) == (7, 1)
    assert not w.handle_one_tick() and len(agendas) == 2


@pytest.mark.parametrize(
    ("later", "reads"), [(AGENDA_EVERY_SECS - 0.05, False), (AGENDA_EVERY_SECS, True)]
)
def test_a_busy_worker_still_reads_the_agenda_every_so_often(
    ticking, monkeypatch, later, reads
) -> None:
    # The agenda is what finds an expired lease: a worker kept busy by due work still reads it,
    # once AGENDA_EVERY_SECS have passed since it last did (and not before).
    w, started, agendas = ticking
    assert w.handle_one_tick() and len(agendas) == 1
    read_at = w._agenda_at
    monkeypatch.setattr(worker.time, "monotonic", lambda: read_at + later)
    assert w.handle_one_tick() and (len(started), len(agendas)) == (4, 2 if reads else 1)


@pytest.mark.parametrize(
    ("concurrency", "busy", "waits"),
    [(4, 3, True), (4, 2, False), (16, 9, True), (16, 8, False), (1, 0, False)],
)
def test_a_claim_waits_a_moment_for_more_free_slots_below_half(
    ticking, monkeypatch, concurrency, busy, waits
) -> None:
    # Runs finishing one by one would each get a claim of their own: with fewer than half the
    # slots free, the claim waits CLAIM_GATHER_SECS for more.
    w, started, _ = ticking
    w.concurrency = concurrency
    monkeypatch.setattr(w, "running_count", lambda: busy)
    slept: list[float] = []
    monkeypatch.setattr(w._waker, "sleep", lambda secs, **kwargs: slept.append(secs))
    assert w.handle_one_claim(known_due=True)
    assert slept == ([worker.CLAIM_GATHER_SECS] if waits else [])
    assert len(started) == min(7, concurrency - busy)
