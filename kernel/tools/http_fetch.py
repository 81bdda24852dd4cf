"""`http_fetch {url}`: one GET over HTTP(S), guarded against server-side request forgery.

For the URL and for every redirect: the host must be allowed (`net:<host>`); the name is
resolved once and the connection goes to that address (the Host header and TLS SNI carry the
name), so a second, different DNS answer cannot redirect it. Which addresses may be reached is
`kernel.netpolicy`'s rule: a non-public address only through a grant naming that IP literal
(`net:10.0.0.5`, not `net:*`, never a host name), link-local and metadata addresses never.
`http.client` is used directly, so proxy settings from the environment play no part.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

from kernel.context import DeadlineExceeded, RunControl, ToolContext
from kernel.netpolicy import Address, AddressRefused, resolve_allowed
from kernel.permissions import InvalidPermission, Permission, parse_permission
from kernel.sockets import SocketWatch, connect, wait_for
from kernel.tools import Tool, ToolError, ToolPermissionDenied, register

MAX_BODY_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "PicoBot/1 (+http_fetch)"


class Target:
    """One URL, parsed and checked for shape: scheme, host, port, path."""

    def __init__(self, url: str) -> None:
        if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
            raise ToolError("the URL must not contain spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ToolError(f"not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise ToolError("only http and https URLs can be fetched")
        if parts.username is not None or parts.password is not None:
            raise ToolError("URLs with credentials are refused")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ToolError("the URL has no host")
        self.url = url
        self.scheme = parts.scheme
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            self.address: Address | None = ipaddress.ip_address(host)
        except ValueError:
            # Not a standard IP literal. Notations resolvers also accept (2130706433, 0x7f.1,
            # 127.1) end in a numeric label, which `permission()` refuses as a host name.
            self.address = None
        if self.address is not None:
            self.host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
            self.connect_name = str(self.address)
        else:
            self.host = host
            self.connect_name = host

    def permission(self) -> Permission:
        try:
            return parse_permission(f"net:{self.host}")
        except InvalidPermission as exc:
            raise ToolError(f"not a valid host: {exc}") from None


def resolve(target: Target, context: ToolContext) -> Address:
    """The one address this hop connects to, by the project's address rule (`netpolicy`). A
    cancel or the deadline stops the wait for a slow resolver (`sockets.wait_for`)."""
    literal_granted = target.address is not None and context.allows_exactly(target.permission())
    control = context.control
    watch = SocketWatch()

    def lookup() -> Address:
        return resolve_allowed(target.connect_name, target.port, literal_granted=literal_granted)[0]

    try:
        if target.address is not None:  # a literal: nothing is looked up
            return lookup()
        with control.interrupting(watch.interrupt):
            return wait_for(lookup, watch, control.deadline)
    except AddressRefused as exc:
        raise ToolError(str(exc).replace(target.connect_name, target.host, 1)) from None
    except (ConnectionAbortedError, TimeoutError):
        control.check()
        raise DeadlineExceeded("the deadline passed") from None


def _connection(
    target: Target, address: Address, timeout: float, watch: SocketWatch
) -> tuple[http.client.HTTPConnection, list[socket.socket]]:
    """The hop's connection, and a list that will hold the handle `watch` watches once the
    connection is made (the caller unwatches and closes it)."""
    connection: http.client.HTTPConnection
    if target.scheme == "https":
        connection = http.client.HTTPSConnection(
            target.connect_name, target.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(target.connect_name, target.port, timeout=timeout)
    handles: list[socket.socket] = []

    def connect_pinned(_address: Any, timeout: Any = None, source_address: Any = None) -> Any:
        # Pin: connect to the address checked above, never to a fresh resolution of the name.
        # The watch sees the connect, the TLS handshake and the exchange (`sockets.connect`).
        sock, handle = connect(
            (str(address), target.port), timeout, watch, source_address=source_address
        )
        handles.append(handle)
        return sock

    connection._create_connection = connect_pinned  # type: ignore[attr-defined]
    return connection, handles


class HttpFetch(Tool):
    name = "http_fetch"
    description = (
        "Fetch a URL with HTTP GET and return the status, content type and body as text "
        "(at most 1 MiB). Redirects are followed when the run may fetch their hosts too."
    )
    parameters = {
        "type": "object",
        "properties": {"url": {"type": "string", "minLength": 1, "maxLength": 4096}},
        "required": ["url"],
        "additionalProperties": False,
    }
    timeout_secs = 30

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [Target(args["url"]).permission()]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        target = Target(args["url"])
        for _ in range(MAX_REDIRECTS + 1):
            permission = target.permission()
            if not context.capabilities.allows(permission):
                raise ToolPermissionDenied(permission, f"redirected to {target.host}")
            address = resolve(target, context)
            status, headers, body, truncated = self._get(target, address, context)
            location = headers.get("location")
            if status in REDIRECT_STATUSES and location:
                target = Target(urljoin(target.url, location))
                continue
            return _render(target.url, status, headers, body, truncated)
        raise ToolError(f"more than {MAX_REDIRECTS} redirects")

    def _get(
        self, target: Target, address: Address, context: ToolContext
    ) -> tuple[int, dict[str, str], bytes, bool]:
        """One request and its answer. The run's deadline (or the tool's limit, whichever is
        first) and a cancel shut the socket down from another thread, so neither a connect that
        hangs nor a server that trickles its headers or body a byte at a time can hold the call
        past them."""
        control = context.control
        control.check()
        watch = SocketWatch()
        connection, handles = _connection(
            target, address, max(0.1, control.bounded(self.timeout_secs)), watch
        )
        try:
            with control.interrupting(watch.interrupt):
                answer = self._exchange(connection, target, control)
            if watch.interrupted:  # the shutdown read as the end of the body: not an answer
                control.check()
                raise DeadlineExceeded("the deadline passed")
            return answer
        except (OSError, http.client.HTTPException) as exc:
            control.check()
            if watch.interrupted:  # the timer fired a hair before the deadline it stands for
                raise DeadlineExceeded("the deadline passed") from None
            raise ToolError(f"fetching {target.host} failed ({_why(exc)})") from None
        finally:
            watch.unwatch()
            connection.close()
            for handle in handles:
                handle.close()

    def _exchange(
        self, connection: http.client.HTTPConnection, target: Target, control: RunControl
    ) -> tuple[int, dict[str, str], bytes, bool]:
        connection.request(
            "GET",
            target.path,
            headers={
                "User-Agent": USER_AGENT,
                "Accept": "*/*",
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )
        response = connection.getresponse()
        headers = {key.lower(): value for key, value in response.getheaders()}
        body = bytearray()
        while len(body) <= MAX_BODY_BYTES:
            control.check()
            if connection.sock is not None:
                connection.sock.settimeout(max(0.1, control.bounded(self.timeout_secs)))
            chunk = response.read1(65536)
            if not chunk:
                break
            body += chunk
        truncated = len(body) > MAX_BODY_BYTES
        return response.status, headers, bytes(body[:MAX_BODY_BYTES]), truncated


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return type(exc).__name__


def _render(url: str, status: int, headers: dict[str, str], body: bytes, truncated: bool) -> str:
    content_type = headers.get("content-type", "")
    charset_match = re.search(r"charset=([\w-]+)", content_type)
    charset = charset_match.group(1) if charset_match else "utf-8"
    try:
        text = body.decode(charset, errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    note = f"\n[truncated at {MAX_BODY_BYTES} bytes]" if truncated else ""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return (
        f"HTTP {status}\nurl: {url}\ncontent-type: {content_type or 'unknown'}\n"
        f"fetched-at: {started}\n\n{text}{note}"
    )


register(HttpFetch)
