"""The run's deadline, the tool's limit and a cancel stop a blocked socket read at once, however
slowly the server trickles its answer (real sockets; a server sending a byte at a time), and a
cancel stops a connect that hangs (a local listener whose backlog is full) or a name resolution
that hangs (a resolver stub that never answers). Bounds are checked only against the wait they
cut short (40 s), never as timings."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernel import sockets
from kernel.context import Cancelled, DeadlineExceeded, RunControl, ToolContext
from kernel.kernel import kernel
from kernel.models import ToolCall
from kernel.permissions import CapabilitySet
from kernel.tools import http_fetch

pytestmark = pytest.mark.django_db

TRICKLE_SECS = 40.0  # how long the server keeps trickling: every bound below is far under it
BOUND_SECS = 20.0


class TricklingServer:
    """Answers every request a byte at a time: in the status line and headers (`headers`) or,
    after complete headers, in the body (`body`)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            if self.mode == "body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            ends = time.monotonic() + TRICKLE_SECS
            while time.monotonic() < ends and not self.stopping.is_set():
                try:
                    conn.sendall(b"a")
                except OSError:
                    return
                time.sleep(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()


@pytest.fixture(params=["headers", "body"])
def trickling(request: Any) -> Iterator[TricklingServer]:
    server = TricklingServer(request.param)
    yield server
    server.stop()


def fetch(user: Any, server: TricklingServer, control: RunControl) -> Any:
    context = ToolContext(user=user, capabilities=CapabilitySet(["net:127.0.0.1"]), control=control)
    return kernel.invoke("http_fetch", {"url": f"http://127.0.0.1:{server.port}/"}, context)


def test_the_tools_limit_stops_a_trickling_answer(make_user, trickling, monkeypatch) -> None:
    monkeypatch.setattr(http_fetch.HttpFetch, "timeout_secs", 1)
    control = RunControl.with_timeout(60)
    started = time.monotonic()
    result = fetch(make_user(), trickling, control)
    assert time.monotonic() - started < BOUND_SECS
    assert result.decision == "error" and "timed out after 1 s" in result.content
    control.check()  # the run goes on


def test_the_runs_deadline_stops_a_trickling_answer_before_the_tools_own_limit(
    make_user, trickling, monkeypatch
) -> None:
    monkeypatch.setattr(http_fetch.HttpFetch, "timeout_secs", 60)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        fetch(make_user(), trickling, RunControl.with_timeout(1))
    assert time.monotonic() - started < BOUND_SECS
    assert ToolCall.objects.get().error == "stopped: the run's deadline passed"


def test_a_cancel_stops_a_trickling_answer(make_user, trickling) -> None:
    control = RunControl()
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            fetch(make_user(), trickling, control)
    finally:
        timer.cancel()
    assert time.monotonic() - started < BOUND_SECS
    assert ToolCall.objects.get().error == "stopped: cancelled by the owner"


class FullListener:
    """A local listening socket whose accept queue is full: the kernel drops further SYNs, so
    a connect to it hangs (each attempt retried with backoff) until it gives up."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        while len(self.fillers) < 16:
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)
            poller = select.poll()
            poller.register(filler, select.POLLOUT)
            if not poller.poll(500):  # this one hangs: the queue is full
                return
        raise AssertionError("the listener's accept queue never filled")

    def close(self) -> None:
        for sock in [*self.fillers, self.listener]:
            sock.close()


@pytest.fixture
def full_listener() -> Iterator[FullListener]:
    listener = FullListener()
    yield listener
    listener.close()


def test_a_cancel_stops_a_connect_that_hangs(make_user, full_listener, monkeypatch) -> None:
    monkeypatch.setattr(http_fetch.HttpFetch, "timeout_secs", TRICKLE_SECS)
    control = RunControl()
    context = ToolContext(
        user=make_user(), capabilities=CapabilitySet(["net:127.0.0.1"]), control=control
    )
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            url = f"http://127.0.0.1:{full_listener.port}/"
            kernel.invoke("http_fetch", {"url": url}, context)
    finally:
        timer.cancel()
    assert time.monotonic() - started < BOUND_SECS
    assert ToolCall.objects.get().error == "stopped: cancelled by the owner"


def test_a_connect_made_after_the_interrupt_fails_at_once(full_listener) -> None:
    """An interrupt that comes before the connect begins is still seen (the socket then reports
    a hang-up and no error): the connect gives up instead of returning a dead connection or
    waiting out its timeout."""
    watch = sockets.SocketWatch()
    watch.interrupt()
    started = time.monotonic()
    with pytest.raises(ConnectionAbortedError):
        sockets.connect(("127.0.0.1", full_listener.port), TRICKLE_SECS, watch)
    assert time.monotonic() - started < BOUND_SECS


def test_a_cancel_stops_a_tls_handshake_that_hangs(make_user, monkeypatch) -> None:
    monkeypatch.setattr(http_fetch.HttpFetch, "timeout_secs", TRICKLE_SECS)
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, and never says a word
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    control = RunControl()
    context = ToolContext(
        user=make_user(), capabilities=CapabilitySet(["net:127.0.0.1"]), control=control
    )
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            url = f"https://127.0.0.1:{listener.getsockname()[1]}/"
            kernel.invoke("http_fetch", {"url": url}, context)
    finally:
        timer.cancel()
        for sock in [*accepted, listener]:
            sock.close()
    assert time.monotonic() - started < BOUND_SECS
    assert accepted  # the connect was made: the handshake was what hung
    assert ToolCall.objects.get().error == "stopped: cancelled by the owner"


def test_a_cancel_stops_a_name_resolution_that_hangs(make_user, hanging_resolver) -> None:
    control = RunControl()
    context = ToolContext(
        user=make_user(), capabilities=CapabilitySet(["net:slow.hang.test"]), control=control
    )
    timer = threading.Timer(0.5, control.cancel, args=("cancelled by the owner",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Cancelled):
            kernel.invoke("http_fetch", {"url": "http://slow.hang.test/"}, context)
    finally:
        timer.cancel()
    assert time.monotonic() - started < BOUND_SECS
    assert not hanging_resolver.is_set()
    assert ToolCall.objects.get().error == "stopped: cancelled by the owner"


def test_the_tools_limit_stops_a_name_resolution_that_hangs(
    make_user, hanging_resolver, monkeypatch
) -> None:
    monkeypatch.setattr(http_fetch.HttpFetch, "timeout_secs", 1)
    context = ToolContext(
        user=make_user(), capabilities=CapabilitySet(["net:slow.hang.test"]), control=RunControl()
    )
    started = time.monotonic()
    result = kernel.invoke("http_fetch", {"url": "http://slow.hang.test/"}, context)
    assert time.monotonic() - started < BOUND_SECS
    assert result.decision == "error" and "timed out" in result.content
