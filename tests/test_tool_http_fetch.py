"""http_fetch: host grants, refused addresses, pinned resolution, redirects, proxies, limits."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kernel.context import RunControl, ScheduledRunCapabilities, ToolContext
from kernel.kernel import kernel
from kernel.models import ToolCall
from kernel.permissions import CapabilitySet
from kernel.tools import http_fetch

pytestmark = pytest.mark.django_db


class LocalServer:
    """A tiny HTTP server on 127.0.0.1 that records requests; routes set per test."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append({"path": self.path, "host": self.headers.get("Host", "")})
                status, headers, body, delay = owner.routes.get(
                    self.path, (200, {"Content-Type": "text/plain"}, b"hello from local", 0)
                )
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def redirect(self, path: str, location: str) -> None:
        self.routes[path] = (302, {"Location": location}, b"", 0)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    yield local
    local.stop()


@pytest.fixture
def other_server() -> Iterator[LocalServer]:
    local = LocalServer()
    yield local
    local.stop()


def fetch(user, grant: list[str], url: str, control: RunControl | None = None):
    context = ToolContext(
        user=user, capabilities=CapabilitySet(grant), control=control or RunControl()
    )
    return kernel.invoke("http_fetch", {"url": url}, context)


def test_an_exactly_granted_local_host_can_be_fetched(make_user, server) -> None:
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/page"))
    assert result.decision == "allowed"
    assert "HTTP 200" in result.content
    assert "hello from local" in result.content
    assert server.requests == [{"path": "/page", "host": f"127.0.0.1:{server.port}"}]


def test_a_host_outside_the_grant_is_denied_and_never_contacted(make_user, server) -> None:
    result = fetch(make_user(), ["net:example.com"], server.url())
    assert result.decision == "denied"
    assert "net:127.0.0.1" in result.content
    assert server.requests == []
    assert ToolCall.objects.get().missing_permission == "net:127.0.0.1"


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("10.0.0.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("[::ffff:127.0.0.1]", "IPv4-mapped"),
        ("localhost", "loopback"),
    ],
)
def test_non_public_addresses_are_refused_under_a_wildcard_grant(
    make_user, server, host: str, reason: str
) -> None:
    result = fetch(make_user(), ["net:*"], server.url("/", host=host))
    if host == "localhost":  # a name: allowed by net:*, refused by what it resolves to
        assert result.decision == "error"
        assert f"resolves to a {reason}" in result.content
    else:  # an IP literal: net:* does not cover a non-public one at all
        assert result.decision == "denied"
        assert result.missing_permission.startswith("net:")
    assert server.requests == []


def test_a_decimal_form_ip_is_refused(make_user, server) -> None:
    for host in ("2130706433", "0x7f000001", "127.1", "0177.0.0.1"):
        result = fetch(make_user(), ["net:*"], server.url("/", host=host))
        assert result.decision == "invalid", host
        assert "numeric" in result.content
    assert server.requests == []


def test_no_grant_of_a_name_unlocks_a_name_that_resolves_to_loopback(
    make_user, server, monkeypatch
) -> None:
    real = socket.getaddrinfo

    def fake(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "internal.example.com":
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://internal.example.com:{server.port}/"
    for grant in (["net:*.example.com"], ["net:internal.example.com"], ["net:*"]):
        result = fetch(make_user(), [*grant, "net:127.0.0.1"], url)
        assert result.decision == "error", grant
        assert "resolves to a loopback address" in result.content
        assert "a host name never unlocks it" in result.content
    assert server.requests == []


def test_a_scheduled_run_reaches_a_local_host_only_if_the_owners_grant_names_it(
    make_user, server
) -> None:
    host = "127.0.0.1"

    # The snapshot names the host exactly; a wildcard grant must not make that an exact grant.
    def fetch_as(owner: Any) -> Any:
        capabilities = ScheduledRunCapabilities([f"net:{host}"], owner)
        context = ToolContext(user=owner, capabilities=capabilities, in_scheduled_run=True)
        return kernel.invoke("http_fetch", {"url": server.url("/", host=host)}, context)

    result = fetch_as(make_user(grant=["net:*"]))
    assert result.decision == "denied"
    assert server.requests == []
    result = fetch_as(make_user(grant=["net:*", f"net:{host}"]))
    assert result.decision == "allowed"
    assert "hello from local" in result.content


def chat_fetch(client: Any, url: str, capabilities: list[str]) -> Any:
    response = client.post(
        "/api/v1/chat",
        json.dumps({"message": "fetch it", "capabilities": capabilities}),
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    return response.json()["tool_calls"][0]


def test_through_chat_a_wildcard_grant_cannot_unlock_a_local_host_by_naming_it(
    model_server, make_user, api_client_for, server
) -> None:
    server.routes["/latest/meta-data"] = (200, {}, b"INTERNAL-METADATA-SECRET", 0)
    url = server.url("/latest/meta-data")
    call = {"tool_calls": [{"name": "http_fetch", "arguments": {"url": url}}]}

    wildcard = api_client_for(make_user(grant=["net:*"]))
    response = wildcard.post(
        "/api/v1/chat",
        json.dumps({"message": "fetch it", "capabilities": ["net:127.0.0.1"]}),
        content_type="application/json",
    )
    assert response.status_code == 403  # net:* does not contain the exact host
    assert response.json()["capabilities"] == ["net:127.0.0.1"]
    model_server.add(call, {"content": "done"})
    refused = chat_fetch(wildcard, url, ["net:*"])
    assert refused["decision"] == "denied"
    assert refused["missing_permission"] == "net:127.0.0.1"
    assert server.requests == []
    assert "INTERNAL-METADATA-SECRET" not in json.dumps(model_server.requests[-1])
    assert ToolCall.objects.get(pk=refused["id"]).decision == "denied"

    exact = api_client_for(make_user(grant=["net:127.0.0.1"]))
    model_server.add(call, {"content": "done"})
    allowed = chat_fetch(exact, url, ["net:127.0.0.1"])
    assert allowed["decision"] == "allowed"
    assert "INTERNAL-METADATA-SECRET" in json.dumps(model_server.requests[-1])


def test_a_redirect_to_a_refused_address_is_checked_again(make_user, server) -> None:
    server.redirect("/go", server.url("/inside", host="localhost"))
    result = fetch(make_user(), ["net:127.0.0.1", "net:*"], server.url("/go"))
    assert result.decision == "error"
    assert "localhost resolves to a loopback address" in result.content
    assert [r["path"] for r in server.requests] == ["/go"]


def test_a_redirect_to_a_host_outside_the_grant_is_denied(make_user, server) -> None:
    server.redirect("/go", "http://example.com/")
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/go"))
    assert result.decision == "denied"
    assert "net:example.com" in result.content
    assert ToolCall.objects.get().missing_permission == "net:example.com"


def test_an_allowed_redirect_is_followed(make_user, server) -> None:
    server.redirect("/go", "/final")
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/go"))
    assert result.decision == "allowed"
    assert [r["path"] for r in server.requests] == ["/go", "/final"]


def test_too_many_redirects_stop(make_user, server) -> None:
    server.redirect("/loop", "/loop")
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/loop"))
    assert result.decision == "error"
    assert "redirects" in result.content


def test_the_resolved_address_is_pinned_for_the_request(
    make_user, server, other_server, monkeypatch
) -> None:
    """A second DNS answer (rebinding) must not change where the request goes."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect_ex
    answers = 0
    first, second = "93.184.216.34", "93.184.216.35"  # public: the address rule lets them by
    routes = {first: server.port, second: other_server.port}
    connected: list[str] = []

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal answers
        if host != "rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers += 1
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (first if answers == 1 else second, port))
        ]

    def recording_connect(sock: socket.socket, address: Any) -> Any:
        connected.append(address[0])
        return real_connect(sock, ("127.0.0.1", routes[address[0]]))

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(socket.socket, "connect_ex", recording_connect)
    result = fetch(make_user(), ["net:rebind.test"], f"http://rebind.test:{server.port}/pinned")
    assert result.decision == "allowed", result.content
    assert connected == [first]
    assert server.requests == [{"path": "/pinned", "host": f"rebind.test:{server.port}"}]
    assert other_server.requests == []


def test_proxy_settings_from_the_environment_are_ignored(
    make_user, server, other_server, monkeypatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, other_server.url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/direct"))
    assert result.decision == "allowed"
    assert other_server.requests == []


def test_large_bodies_are_cut_at_the_size_limit(make_user, server, monkeypatch) -> None:
    monkeypatch.setattr(http_fetch, "MAX_BODY_BYTES", 1000)
    server.routes["/big"] = (200, {"Content-Type": "text/plain"}, b"x" * 5000, 0)
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/big"))
    assert "truncated at 1000 bytes" in result.content
    assert "x" * 1001 not in result.content


def test_a_slow_server_hits_the_time_limit(make_user, server, monkeypatch) -> None:
    monkeypatch.setattr(http_fetch.HttpFetch, "timeout_secs", 0.5)
    server.routes["/slow"] = (200, {}, b"late", 30)
    started = time.monotonic()
    result = fetch(make_user(), ["net:127.0.0.1"], server.url("/slow"))
    assert time.monotonic() - started < 15  # far below the server's 30 s: a load-proof bound
    assert result.decision == "error"
    assert "timed out" in result.content


def test_other_schemes_and_credentials_are_invalid(make_user) -> None:
    for url in ("file:///etc/passwd", "ftp://example.com/", "http://user:pw@example.com/"):
        result = fetch(make_user(), ["net:*"], url)
        assert result.decision == "invalid", url
