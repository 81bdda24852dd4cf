"""A local HTTPS webhook receiver for tests: records what it is sent and answers as told.

`make_certificate(directory)` makes a self-signed certificate for 127.0.0.1 with the `openssl`
command; `WebhookReceiver((cert, key))` serves TLS with it (tests point SSL_CERT_FILE at the
certificate so the client trusts it). `answer` is the
status to reply with; `redirect_to` makes it answer 302 with that Location. `connections`
counts TCP connections accepted, so a test can show a refused address was never connected to.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def get_request(self) -> Any:
        sock, address = super().get_request()
        self.receiver.connections += 1  # type: ignore[attr-defined]
        return sock, address


class WebhookReceiver:
    def __init__(self, certificate: tuple[Path, Path] | None) -> None:
        self.cert_file, self.key_file = certificate or (None, None)
        self.answer = 200
        self.redirect_to = ""
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.connections = 0
        self._server: _Server | None = None

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(_Handler):
            owner = receiver

        server = _Server(("127.0.0.1", 0), Handler)
        server.receiver = receiver  # type: ignore[attr-defined]
        if self.cert_file is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert_file, self.key_file)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"


def signature_valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the HMAC over "<timestamp>.<body>" with its secret."""
    timestamp = headers.get("X-PicoBot-Timestamp", "")
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    given = headers.get("X-PicoBot-Signature", "")
    return hmac.compare_digest(given, f"sha256={expected.hexdigest()}")


class _Handler(BaseHTTPRequestHandler):
    owner: WebhookReceiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.owner.received.append((dict(self.headers.items()), body))
        if self.owner.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.owner.redirect_to)
        else:
            self.send_response(self.owner.answer)
        self.send_header("Content-Length", "0")
        self.end_headers()
