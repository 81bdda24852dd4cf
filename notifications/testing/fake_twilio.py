"""A fake Twilio Messages API over real HTTP, for tests and fault drills.

It speaks what the `twilio` package sends: `POST /2010-04-01/Accounts/{sid}/Messages.json` with
form parameters and Basic authentication, answering 201 with a message resource as JSON, or an
error body `{code, message, more_info, status}` like Twilio's. After accepting a message it posts
signed status callbacks (`X-Twilio-Signature`, computed with the `twilio` package's
RequestValidator) to the message's `StatusCallback` URL.

Failure modes can be changed while it runs (thread-safe):
- `script(*actions)`: the next requests take these actions in order, one each: "ok", "drop"
  (close the connection without answering), an HTTP status (500, 503, 429...), or
  `("error", http_status, twilio_code)`.
- `fail_number(number, http_status, code)`: every message to `number` gets that error.
- `outside_window(number)`: free-form messages to `number` are accepted, then fail by callback
  with error 63016; messages with a ContentSid (an approved template) are delivered.
- `fail_all(action)`: every request takes `action` until `fail_all(None)` (a stretch of
  failures). Besides the actions above: "timeout" (hold the request past the client's timeout,
  then close without accepting) and "late" (accept the message, then answer only after the
  client's timeout: the provider has it, the sender never learns so).
- `hold()` / `release()`: accepted requests wait before answering (a crash can be staged).
- `callback_statuses`: the statuses sent after acceptance (default sent, delivered).

Each accepted message records `AcceptedAt` (time.time()) and `Late` ("1" when answered late)
beside its parameters and `Sid`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from twilio.request_validator import RequestValidator

ERROR_MESSAGES = {
    21604: "A 'To' phone number is required.",
    21211: "The 'To' number is not a valid phone number.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
    63016: "Failed to send freeform message because you are outside the allowed window.",
    63024: "Invalid message recipient",
    20003: "Authenticate",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
}
_STATUS_CODES = {429: 20429, 500: 20500, 503: 20503}
# Longer than any client timeout the project uses (the WhatsApp channel's is 10 s).
SLOW_SECS = 11.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FakeTwilio:
    def __init__(
        self, account_sid: str = "AC" + "f" * 32, auth_token: str = "fake-twilio-auth-token"
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.callback_statuses: list[str] = ["sent", "delivered"]
        self.callback_delay_secs = 0.3
        self.requests: list[dict[str, str]] = []
        self.accepted: list[dict[str, str]] = []
        self.callbacks: list[tuple[str, dict[str, str], int]] = []
        self._actions: deque[Any] = deque()
        self._failing: dict[str, tuple[int, int]] = {}
        self._fail_all: Any = None
        self.slow_secs = SLOW_SECS
        self._outside: set[str] = set()
        self._held = threading.Event()
        self._held.set()
        self._lock = threading.Lock()
        self._server: _Server | None = None

    # --- control ---------------------------------------------------------------------------

    def start(self) -> FakeTwilio:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._held.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def script(self, *actions: Any) -> None:
        with self._lock:
            self._actions.extend(actions)

    def fail_number(self, number: str, http_status: int, code: int) -> None:
        with self._lock:
            self._failing[number] = (http_status, code)

    def fail_all(self, action: Any) -> None:
        """Every request takes `action` (see the module doc) until `fail_all(None)`."""
        with self._lock:
            self._fail_all = action

    def outside_window(self, number: str) -> None:
        with self._lock:
            self._outside.add(number)

    def hold(self) -> None:
        self._held.clear()

    def release(self) -> None:
        self._held.set()

    def reset(self) -> None:
        with self._lock:
            self._actions.clear()
            self._failing.clear()
            self._outside.clear()
            self._fail_all = None
            self.requests.clear()
            self.accepted.clear()
            self.callbacks.clear()
        self._held.set()

    def bodies_to(self, number: str) -> list[str]:
        with self._lock:
            return [m.get("Body", "") for m in self.accepted if m["To"] == f"whatsapp:{number}"]

    # --- behaviour -------------------------------------------------------------------------

    def _next_action(self, params: dict[str, str]) -> Any:
        with self._lock:
            self.requests.append(params)
            to = params.get("To", "").removeprefix("whatsapp:")
            if self._actions:
                return self._actions.popleft()
            if self._fail_all is not None:
                return self._fail_all
            if to in self._failing:
                status, code = self._failing[to]
                return ("error", status, code)
        return "ok"

    def _accept(self, params: dict[str, str], *, late: bool = False) -> dict[str, Any]:
        sid = "SM" + uuid.uuid4().hex
        message = {**params, "Sid": sid, "AcceptedAt": repr(time.time()), "Late": "1" * late}
        to = params.get("To", "").removeprefix("whatsapp:")
        with self._lock:
            self.accepted.append(message)
            outside = to in self._outside and not params.get("ContentSid")
        statuses = [("failed", "63016")] if outside else [(s, "") for s in self.callback_statuses]
        if params.get("StatusCallback"):
            threading.Thread(
                target=self._send_callbacks, args=(message, statuses), daemon=True
            ).start()
        return _resource(self.account_sid, message)

    def _send_callbacks(self, message: dict[str, str], statuses: list[tuple[str, str]]) -> None:
        url = message["StatusCallback"]
        for status, error_code in statuses:
            time.sleep(self.callback_delay_secs)
            params = {
                "MessageSid": message["Sid"],
                "SmsSid": message["Sid"],
                "AccountSid": self.account_sid,
                "MessageStatus": status,
                "To": message.get("To", ""),
                "From": message.get("From", ""),
                "ApiVersion": "2010-04-01",
            }
            if error_code:
                params["ErrorCode"] = error_code
            self.callbacks.append((url, params, self.post_callback(url, params)))

    def post_callback(self, url: str, params: dict[str, str], signature: str | None = None) -> int:
        """POST a status callback to `url`, signed unless `signature` is given; the status."""
        if signature is None:
            signature = RequestValidator(self.auth_token).compute_signature(url, params)
        data = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(url, data=data, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        if signature:
            request.add_header("X-Twilio-Signature", signature)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0


def _resource(account_sid: str, message: dict[str, str]) -> dict[str, Any]:
    now = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    sid = message["Sid"]
    return {
        "sid": sid,
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": message.get("Body", ""),
        "date_created": now,
        "date_updated": now,
        "date_sent": None,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": message.get("From"),
        "to": message.get("To"),
        "messaging_service_sid": None,
        "num_media": "0",
        "num_segments": "1",
        "price": None,
        "price_unit": "USD",
        "status": "queued",
        "uri": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
        "subresource_uris": {},
    }


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeTwilio
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        fake = self.server_fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if len(raw) < length:
            # The client went away mid-request (a killed sender): nothing to take, as for Twilio.
            self.close_connection = True
            return
        params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        expected = f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json"
        if self.path.split("?")[0] != expected:
            return self._error(404, 20404)
        if not self._authorised(fake):
            return self._error(401, 20003)
        if not params.get("To"):
            return self._error(400, 21604)  # Twilio: "A 'To' phone number is required."
        action = fake._next_action(params)
        if action == "drop":
            self.close_connection = True
            return
        if action == "timeout":
            time.sleep(fake.slow_secs)
            self.close_connection = True
            return
        if action == "late":
            resource = fake._accept(params, late=True)
            time.sleep(fake.slow_secs)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(201, resource)
            return
        if isinstance(action, int):
            return self._error(action, _STATUS_CODES.get(action, 20500))
        if isinstance(action, tuple):
            _, status, code = action
            return self._error(status, code)
        fake._held.wait(60)
        self._send(201, fake._accept(params))

    def _authorised(self, fake: FakeTwilio) -> bool:
        header = self.headers.get("Authorization", "")
        expected = base64.b64encode(f"{fake.account_sid}:{fake.auth_token}".encode()).decode()
        return header == f"Basic {expected}"

    def _error(self, status: int, code: int) -> None:
        self._send(
            status,
            {
                "code": code,
                "message": ERROR_MESSAGES.get(code, "Error"),
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
