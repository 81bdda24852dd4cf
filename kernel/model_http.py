"""The model client's HTTP layer: a cancel or the run's deadline cuts a model request short.

`http_client()` is an httpx2 client (for `openai.OpenAI(http_client=...)`) whose connections
are made and used through `WatchedBackend`: while a thread runs a request inside
`watching(watch)`, every connect, TLS handshake, read and write of that request has its socket
watched by `watch` (`kernel.sockets.SocketWatch`), so `watch.interrupt()` from another thread
(`RunControl.interrupting`) shuts exactly that socket down and the request fails at once. Other
threads' requests, on other connections of the same pool, are untouched; the interrupted
connection is closed by the pool (its exchange did not finish) and never handed out again.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore2
import httpx2
import openai

# httpcore2's plain socket stream (TLS, TLS in TLS, readability checks); only its backend, not
# the stream, is exported.
from httpcore2._backends.sync import SyncStream

from kernel.sockets import SocketWatch, connect

_current = threading.local()


@contextmanager
def watching(watch: SocketWatch) -> Iterator[None]:
    """Watch the sockets this thread's model requests wait on with `watch` for the duration."""
    previous = getattr(_current, "watch", None)
    _current.watch = watch
    try:
        yield
    finally:
        _current.watch = previous


def _watch() -> SocketWatch | None:
    return getattr(_current, "watch", None)


class WatchedStream(httpcore2.NetworkStream):
    """A connection whose blocking calls are watched by the calling thread's watch, if any.

    `handle` is a dup of the connection's socket, made before the connect, so it still names
    the connection after TLS wrapping; the stream closes it with the connection.
    """

    def __init__(self, inner: httpcore2.NetworkStream, handle: socket.socket) -> None:
        self._inner = inner
        self._handle = handle

    @contextmanager
    def _watched(self) -> Iterator[None]:
        watch = _watch()
        if watch is None:
            yield
            return
        watch.watch(self._handle)
        try:
            yield
        finally:
            watch.unwatch()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with self._watched():
            return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with self._watched():
            self._inner.write(buffer, timeout)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._handle.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.NetworkStream:
        try:
            with self._watched():
                inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self._handle.close()  # the inner stream closed itself
            raise
        return WatchedStream(inner, self._handle)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class WatchedBackend(httpcore2.SyncBackend):
    """httpcore2's synchronous backend with connects and streams the calling thread's watch can
    interrupt (see the module docstring)."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        watch = _watch() or SocketWatch()
        source = None if local_address is None else (local_address, 0)
        try:
            sock, handle = connect((host, port), timeout, watch, source_address=source)
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        watch.unwatch()
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            handle.close()
            sock.close()
            raise httpcore2.ConnectError(str(exc)) from exc
        return WatchedStream(SyncStream(sock), handle)


class WatchedTransport(httpx2.HTTPTransport):
    """httpx2's transport (direct or through a proxy) on `WatchedBackend`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # httpx2 takes no network backend argument; its pool (plain or proxy) uses this one.
        self._pool._network_backend = WatchedBackend()


class WatchedClient(openai.DefaultHttpxClient):
    """The openai SDK's default httpx2 client (its limits, timeout, redirects, and proxies from
    the environment) with every transport a `WatchedTransport`."""

    def _init_transport(self, *args: Any, transport: Any = None, **kwargs: Any) -> Any:
        return transport if transport is not None else WatchedTransport(**kwargs)

    def _init_proxy_transport(self, proxy: Any, *args: Any, **kwargs: Any) -> Any:
        return WatchedTransport(proxy=proxy, **kwargs)


def http_client() -> httpx2.Client:
    """A new client for `openai.OpenAI(http_client=...)`; one per process is enough."""
    return WatchedClient()
