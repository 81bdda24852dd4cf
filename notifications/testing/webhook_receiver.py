"""A local HTTPS webhook receiver for tests: records what it is sent and answers as told.

`make_certificate(directory)` makes a self-signed certificate for 127.0.0.1 with the `openssl`
command; `WebhookReceiver((cert, key))` serves TLS with it (tests point SSL_CERT_FILE at the
certificate so the client trusts it). `answer` is the
status to reply with; `redirect_to` makes it answer 302 with that Location. `connections`
counts TCP connections accepted, so a test can show a refused address was never connected to.

`answer` may also be a failure mode, for fault drills: "drop" (close the connection without
answering), "timeout" (hold the request past the client's timeout, then close without
answering) or "late" (take the message, then answer 200 only after the client's timeout).
`accepted` lists what was taken (answered 2xx, or "late"): (time.time(), the payload's `id`,
the body, late); a request cut short before its whole body arrived is never taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Longer than the webhook channel's timeout (10 s).
SLOW_SECS = 11.0


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
        self.answer: int | str = 200
        self.slow_secs = SLOW_SECS
        self.accepted: list[tuple[float, Any, bytes, bool]] = []
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
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        owner.received.append((dict(self.headers.items()), body))
        if len(body) < length:
            # The sender went away mid-request (a killed process): nothing was delivered.
            self.close_connection = True
            return
        answer = owner.answer
        if answer in ("drop", "timeout"):
            if answer == "timeout":
                time.sleep(owner.slow_secs)
            self.close_connection = True
            return
        late = answer == "late"
        if late or (isinstance(answer, int) and 200 <= answer < 300 and not owner.redirect_to):
            owner.accepted.append((time.time(), _payload_id(body), body, late))
        if late:
            time.sleep(owner.slow_secs)
            self.close_connection = True
            answer = 200
        with contextlib.suppress(OSError):
            if owner.redirect_to:
                self.send_response(302)
                self.send_header("Location", owner.redirect_to)
            else:
                self.send_response(int(answer))
            self.send_header("Content-Length", "0")
            self.end_headers()


def _payload_id(body: bytes) -> Any:
    try:
        return json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None
