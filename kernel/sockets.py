"""Socket I/O that a run's cancel or deadline cuts short, from another thread.

A `SocketWatch` holds the socket one blocking call waits on; `RunControl.interrupting` calls its
`interrupt()`, which shuts that socket down, so a blocked connect, TLS handshake, read or write
returns at once however slowly the other end answers (or never does). `connect` makes a TCP
connection that such an interrupt stops too, name resolution included (`wait_for`: the system
resolver cannot be interrupted, so it runs on a helper thread the caller stops waiting for).
`http_fetch` and the model client use both.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# How often a connect in progress looks at the watch as well: the shutdown wakes the poll, and
# this bounds the wait should some kernel not report a shutdown made before the connect began.
CONNECT_POLL_SECS = 0.25


class SocketWatch:
    """The socket one blocking call waits on, so that another thread can shut it down.

    Watch a handle that outlives TLS wrapping (`socket.dup()` of the connection's socket: a
    wrapped socket detaches the original object, the dup still names the same connection).
    A socket watched after `interrupt()` is shut down as soon as it is watched. The shutdown is
    made under the watch's lock and `unwatch` takes it too, so it never reaches a descriptor
    that the caller has closed (and the system may have reused) since.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._interrupted = False

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._interrupted:
                _shutdown(sock)

    def unwatch(self) -> None:
        with self._lock:
            self._sock = None

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (yet), or closed: the interrupted flag still tells
        pass


def connect(
    address: tuple[str, int],
    timeout_secs: float | None,
    watch: SocketWatch,
    *,
    source_address: tuple[str, int] | None = None,
) -> tuple[socket.socket, socket.socket]:
    """A TCP connection to `address` (a host name is resolved, each address tried in turn) and a
    handle on it, `(sock, handle)`, with `handle` watched by `watch`.

    The caller owns both: it calls `watch.unwatch()` and closes the handle when it no longer
    waits on the connection. Raises TimeoutError after `timeout_secs`, ConnectionAbortedError
    once `watch` is interrupted, OSError for anything else.
    """
    host, port = address
    deadline = None if timeout_secs is None else time.monotonic() + timeout_secs
    last_error: OSError | None = None
    for family, kind, proto, _, target in _addresses(host, port, watch, deadline):
        sock = socket.socket(family, kind, proto)
        handle = sock.dup()
        watch.watch(handle)
        try:
            if source_address is not None:
                sock.bind(source_address)
            _connect(sock, target, deadline, watch)
        except OSError as exc:
            watch.unwatch()
            handle.close()
            sock.close()
            if isinstance(exc, TimeoutError | ConnectionAbortedError):
                raise
            last_error = exc
            continue
        sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return sock, handle
    raise last_error or OSError(f"no address found for {host}")


def _addresses(
    host: str, port: int, watch: SocketWatch, deadline: float | None
) -> list[tuple[Any, ...]]:
    def lookup() -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)

    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:  # a name: the resolver may take its time
        return wait_for(lookup, watch, deadline)
    return lookup()  # an IP literal: no lookup, nothing to wait for


def wait_for(work: Callable[[], T], watch: SocketWatch, deadline: float | None) -> T:
    """`work()`'s result (or exception), for a blocking call that nothing can cut short, such
    as the system resolver's: it runs on a helper thread, and the caller stops waiting once
    `watch` is interrupted (ConnectionAbortedError) or at `deadline` (TimeoutError), within
    CONNECT_POLL_SECS. An abandoned call ends on its own (the resolver's own timeout); its
    result is dropped."""
    if watch.interrupted:
        raise ConnectionAbortedError("interrupted")
    done = threading.Event()
    outcome: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the waiting caller
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=call, name="picobot-resolve", daemon=True).start()
    while True:
        left = CONNECT_POLL_SECS if deadline is None else deadline - time.monotonic()
        if done.wait(max(0.0, min(left, CONNECT_POLL_SECS))):
            break
        if watch.interrupted:
            raise ConnectionAbortedError("interrupted")
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("timed out")
    succeeded, value = outcome[0]
    if succeeded:
        return value
    raise value


def _connect(
    sock: socket.socket, target: tuple[object, ...], deadline: float | None, watch: SocketWatch
) -> None:
    # Non-blocking, polled: a shutdown wakes the poll at once (Linux reports a shutdown made
    # even before the connect began as a hang-up), and the watch's flag is looked at between
    # polls and after the wake-up, since an aborted connect may report no error.
    sock.setblocking(False)
    error = sock.connect_ex(target)
    if error == errno.EINPROGRESS:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while True:
            if watch.interrupted:
                raise ConnectionAbortedError("the connect was interrupted")
            left = CONNECT_POLL_SECS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            if poller.poll(min(left, CONNECT_POLL_SECS) * 1000):
                break
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if watch.interrupted:
        raise ConnectionAbortedError("the connect was interrupted")
    if error:
        raise OSError(error, os.strerror(error))
