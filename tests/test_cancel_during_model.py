"""A cancel or the run's deadline stops a model request whose answer is held back, at once and
without sending it again, in one process and with a real `runworker`; and a run whose cancel was
requested never ends `succeeded`, even when its answer arrived first. Bounds are checked only
against the hold they cut short (60 s), never as timings."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from kernel.agent import AgentError, run_agent
from kernel.context import Cancelled, DeadlineExceeded, RunControl, ToolContext
from kernel.permissions import CapabilitySet
from schedules import claims, lifecycle
from schedules.claims import Outcome
from schedules.dbtime import db_now
from schedules.models import Execution, ExecutionStatus, Job
from tests.test_deadlines import FullListener
from tests.worker_support import Workers, due_job, wait_until

S = ExecutionStatus
HELD_SECS = 60  # the scripted server's hold limit: every bound below is far under it


def agent_context(user: Any, control: RunControl) -> ToolContext:
    return ToolContext(user=user, capabilities=CapabilitySet(), control=control)


class CancelWhen(threading.Thread):
    """Cancels `control` once `ready()` holds (the held request has reached the server), so the
    cancel meets a request in flight however slow the machine; `cancel()` gives up."""

    def __init__(self, ready: Callable[[], bool], control: RunControl) -> None:
        super().__init__(daemon=True)
        self.ready, self.control, self.given_up = ready, control, threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + HELD_SECS
        while not self.given_up.is_set() and time.monotonic() < deadline:
            if self.ready():
                self.control.cancel("cancelled by the owner")
                return
            time.sleep(0.01)

    def cancel(self) -> None:
        self.given_up.set()


@pytest.mark.django_db
def test_a_cancel_stops_a_model_request_whose_answer_is_held(
    model_server, make_user, caplog
) -> None:
    user = make_user()
    answer = threading.Event()
    model_server.add({"content": "warm"}, {"hold": answer, "content": "late"}, {"content": "next"})
    # The held request goes out on the connection the first one left in the pool.
    assert run_agent("first", agent_context(user, RunControl())).text == "warm"
    control = RunControl.with_timeout(HELD_SECS * 2)
    timer = CancelWhen(lambda: len(model_server.requests) >= 2, control)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("held", agent_context(user, control))
        assert time.monotonic() - started < HELD_SECS / 3
        assert not answer.is_set()  # the answer never came: the cancel ended the request
    finally:
        timer.cancel()
        answer.set()
    assert len(model_server.requests) == 2  # not sent again after the interrupt
    # The interrupted connection left the pool: the next run's request succeeds at its first
    # attempt, on the same client.
    with caplog.at_level(logging.WARNING, logger="kernel.agent"):
        assert run_agent("next", agent_context(user, RunControl())).text == "next"
    assert "model request failed" not in caplog.text
    assert len(model_server.requests) == 3


@pytest.mark.django_db
def test_a_cancel_leaves_another_runs_request_on_the_same_client_alone(
    model_server, make_user
) -> None:
    user = make_user()
    first, second = threading.Event(), threading.Event()
    model_server.add({"hold": first, "content": "first"}, {"hold": second, "content": "second"})
    control = RunControl.with_timeout(HELD_SECS * 2)
    outcomes: dict[str, Any] = {}

    def run(name: str, run_control: RunControl) -> None:
        try:
            outcomes[name] = run_agent(name, agent_context(user, run_control)).text
        except Exception as exc:
            outcomes[name] = exc

    runs = [
        threading.Thread(target=run, args=("cancelled", control)),
        threading.Thread(target=run, args=("other", RunControl.with_timeout(HELD_SECS * 2))),
    ]
    try:
        for count, thread in enumerate(runs, 1):  # one at a time: the first run gets `first`
            thread.start()
            wait_until(lambda n=count: len(model_server.requests) >= n, 30, "the request")
        control.cancel("cancelled by the owner")
        runs[0].join(HELD_SECS / 3)
        assert isinstance(outcomes.get("cancelled"), Cancelled)
        assert "other" not in outcomes  # still waiting for its answer, on its own connection
    finally:
        first.set()
        second.set()
        for thread in runs:
            thread.join(HELD_SECS)
    assert outcomes["other"] == "second"
    assert len(model_server.requests) == 2


@pytest.mark.django_db
def test_a_cancel_stops_a_model_request_sent_through_a_proxy_from_the_environment(
    model_server, make_user, settings, monkeypatch
) -> None:
    # The scripted server answers the proxy's absolute-form request itself: the endpoint's
    # name is never resolved, so the request can only have gone through the proxy.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{model_server.port}")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings.PICOBOT_MODEL_BASE_URL = "http://model.proxied.test/v1"
    answer = threading.Event()
    model_server.add({"hold": answer, "content": "late"})
    control = RunControl.with_timeout(HELD_SECS * 2)
    timer = CancelWhen(lambda: len(model_server.requests) >= 1, control)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("held", agent_context(make_user(), control))
        assert time.monotonic() - started < HELD_SECS / 3
        assert not answer.is_set()
    finally:
        timer.cancel()
        answer.set()
    assert len(model_server.requests) == 1


@pytest.mark.django_db
def test_the_runs_deadline_stops_a_model_request_whose_answer_is_held(
    model_server, make_user
) -> None:
    answer = threading.Event()
    model_server.add({"hold": answer, "content": "late"})
    started = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded):
            run_agent("held", agent_context(make_user(), RunControl.with_timeout(1)))
        assert time.monotonic() - started < HELD_SECS / 3
        assert not answer.is_set()
    finally:
        answer.set()
    assert len(model_server.requests) == 1


class RawModelServer:
    """A local endpoint that answers each request with `answer` (raw bytes: status line, headers
    and as much of the body as it likes), then holds the connection open until `release` is set
    or closes it at once when `close` is set."""

    def __init__(self, answer: bytes, *, close: bool = False) -> None:
        self.answer = answer
        self.close_after = close
        self.release = threading.Event()
        self.requests = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                self.requests += 1
                conn.sendall(self.answer)
                if not self.close_after:
                    self.release.wait(HELD_SECS)

    def stop(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def raw_model(settings: Any) -> Iterator[Callable[..., RawModelServer]]:
    made: list[RawModelServer] = []

    def make(answer: bytes, **options: Any) -> RawModelServer:
        made.append(RawModelServer(answer, **options))
        settings.PICOBOT_MODEL_BASE_URL = f"http://127.0.0.1:{made[-1].port}/v1"
        settings.PICOBOT_MODEL = "raw-model"
        return made[-1]

    yield make
    for server in made:
        server.stop()


# An answer without Content-Length or chunking: its body ends when the connection does, so a
# shutdown in the middle reads as a complete answer that is not JSON.
UNDELIMITED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    b'{"id": "chatcmpl-1", "choices": ['
)


@pytest.mark.django_db
def test_a_cancel_stops_an_answer_without_a_length_that_has_begun(make_user, raw_model) -> None:
    server = raw_model(UNDELIMITED)
    control = RunControl.with_timeout(HELD_SECS * 2)
    timer = CancelWhen(lambda: server.requests >= 1, control)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("held", agent_context(make_user(), control))
        assert time.monotonic() - started < HELD_SECS / 3
        assert not server.release.is_set()
    finally:
        timer.cancel()
    assert server.requests == 1


@pytest.mark.django_db
def test_an_answer_that_is_not_json_is_a_model_failure(
    make_user, raw_model, api_client_for
) -> None:
    raw_model(UNDELIMITED, close=True)
    with pytest.raises(AgentError, match="could not be read"):
        run_agent("hi", agent_context(make_user(), RunControl.with_timeout(HELD_SECS)))
    owner = make_user()
    response = api_client_for(owner).post("/api/v1/chat", {"message": "hi"}, format="json")
    assert response.status_code == 502, response.content
    assert "could not be read" in response.json()["detail"]


@pytest.mark.django_db
def test_a_cancel_stops_a_model_request_whose_name_resolution_hangs(
    make_user, settings, hanging_resolver
) -> None:
    settings.PICOBOT_MODEL_BASE_URL = "http://model.hang.test/v1"
    settings.PICOBOT_MODEL = "unresolved-model"
    control = RunControl.with_timeout(HELD_SECS * 2)
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("hi", agent_context(make_user(), control))
        assert time.monotonic() - started < HELD_SECS / 3
        assert not hanging_resolver.is_set()
    finally:
        timer.cancel()


@pytest.mark.django_db
def test_a_cancel_stops_a_model_tls_handshake_that_hangs(make_user, raw_model, settings) -> None:
    server = raw_model(b"")  # reads the client's first bytes and never answers
    settings.PICOBOT_MODEL_BASE_URL = f"https://127.0.0.1:{server.port}/v1"
    control = RunControl.with_timeout(HELD_SECS * 2)
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("hi", agent_context(make_user(), control))
        assert time.monotonic() - started < HELD_SECS / 3
    finally:
        timer.cancel()


@pytest.mark.django_db
def test_a_cancel_stops_a_model_connect_that_hangs(make_user, settings) -> None:
    listener = FullListener()  # its accept queue is full: a connect to it hangs
    settings.PICOBOT_MODEL_BASE_URL = f"http://127.0.0.1:{listener.port}/v1"
    settings.PICOBOT_MODEL = "unreachable-model"
    control = RunControl.with_timeout(HELD_SECS * 2)
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            run_agent("hi", agent_context(make_user(), control))
        assert time.monotonic() - started < HELD_SECS / 3
    finally:
        timer.cancel()
        listener.close()


@pytest.fixture
def claimed(make_user: Callable[..., Any]) -> claims.Claim:
    Job.objects.create(
        owner=make_user(),
        name="job",
        prompt="say hi",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [claim] = claims.claim_due("w1", 1).claims
    return claim


@pytest.mark.django_db
def test_a_success_completed_after_a_cancel_request_is_recorded_cancelled(claimed) -> None:
    Execution.objects.filter(pk=claimed.execution_id).update(cancel_requested_at=db_now())
    status = claims.complete(claimed, Outcome(S.SUCCEEDED, output="the answer came first"))
    assert status == S.CANCELLED
    execution = Execution.objects.get(pk=claimed.execution_id)
    assert (execution.status, execution.error) == (S.CANCELLED, "cancelled on request")
    job = Job.objects.get(pk=claimed.job_id)
    assert job.claim_token is None and job.consecutive_failures == 0


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.FAILED, S.TIMED_OUT])
def test_other_endings_are_kept_when_a_cancel_was_requested(claimed, status: str) -> None:
    Execution.objects.filter(pk=claimed.execution_id).update(cancel_requested_at=db_now())
    assert claims.complete(claimed, Outcome(status, error="it went wrong")) == status


@pytest.mark.django_db
def test_in_a_batch_only_the_run_whose_cancel_was_requested_becomes_cancelled(
    claimed, make_user
) -> None:
    Job.objects.create(
        owner=make_user(),
        name="other",
        prompt="p",
        schedule_type="interval",
        interval_secs=3600,
        next_run_at=db_now() - timedelta(seconds=1),
    )
    [other] = claims.claim_due("w1", 1).claims
    Execution.objects.filter(pk=claimed.execution_id).update(cancel_requested_at=db_now())
    done = [(claimed, Outcome(S.SUCCEEDED, output="a")), (other, Outcome(S.SUCCEEDED, output="b"))]
    assert claims.complete_many(done) == [S.CANCELLED, S.SUCCEEDED]
    assert Execution.objects.get(pk=claimed.execution_id).status == S.CANCELLED
    assert Execution.objects.get(pk=other.execution_id).status == S.SUCCEEDED


@pytest.fixture
def workers(tmp_path: Path, model_server: Any) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(**scheduler: Any) -> Workers:
        made.append(Workers(tmp_path, model_server.base_url, **scheduler))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_cancels_a_run_whose_model_answer_is_held(
    make_user, workers, model_server
) -> None:
    answer = threading.Event()
    model_server.add({"hold": answer, "content": "this answer must not win"})
    model_server.reply_always("should not be asked")
    job = due_job(make_user(), timeout_secs=600)
    workers().start(worker_id="w-cancel")
    try:
        wait_until(lambda: len(model_server.requests) >= 1, 30, "the run to reach the model")
        assert lifecycle.request_cancel(job) is not None
        final = wait_until(
            lambda: Execution.objects.filter(job=job).exclude(status=S.RUNNING).first(),
            HELD_SECS / 2,
            "the cancelled run to end while its answer is still held",
        )
        assert not answer.is_set()
    finally:
        answer.set()
    assert (final.status, final.error) == (S.CANCELLED, "cancelled on request")
    assert len(model_server.requests) == 1
