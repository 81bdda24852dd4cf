"""A scripted model server for tests: real HTTP on 127.0.0.1, speaking Chat Completions.

Each request to `.../chat/completions` takes the next scripted turn; when the script is used up
the server answers with `default` (if set) or HTTP 500. A turn is a dict:

- `{"content": "text"}`: a final answer.
- `{"tool_calls": [{"name": "shell", "arguments": {...}}]}`: ask for tool calls (`arguments` may
  be a dict, or a string sent as is, e.g. invalid JSON; `id` is optional).
- `"delay"`: seconds to wait before answering; `"hold"`: a `threading.Event` to wait for before
  answering (at most `HOLD_LIMIT_SECS`), so a test decides when a run gets its answer instead
  of guessing a delay; `"status"`: answer with that HTTP error status;
  `"drop": True`: close the connection without answering (a transport error);
  `"usage": {"prompt_tokens": n, "completion_tokens": m}`.

Every request body is recorded in `requests` (parsed JSON), in arrival order. The server is
threaded and keeps connections alive, so many concurrent clients (worker processes) can share it.

    with ScriptedModelServer([{"content": "hi"}]) as server:
        server.base_url  # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Turn = dict[str, Any]
DEFAULT_USAGE = {"prompt_tokens": 10, "completion_tokens": 5}
# A held answer is sent anyway after this long: a test that never releases it fails on what the
# late answer did, instead of hanging.
HOLD_LIMIT_SECS = 60.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (a run cancelled or its worker killed mid-request) is normal
        # here; anything else is still printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ScriptedModelServer:
    """A Chat Completions server answering scripted turns; see the module docstring."""

    def __init__(
        self,
        script: Iterable[Turn] = (),
        *,
        default: Turn | None = None,
        responder: Callable[[dict[str, Any]], Turn] | None = None,
        api_key: str | None = None,
    ) -> None:
        self._script: deque[Turn] = deque(script)
        self.default = default
        self.responder = responder
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> ScriptedModelServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ScriptedModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- scripting --------------------------------------------------------------------------

    def add(self, *turns: Turn) -> None:
        """Append turns to the script."""
        with self._lock:
            self._script.extend(turns)

    def reply_always(self, content: str = "ok", **extra: Any) -> None:
        """Answer every request (once the script is used up) with `content`."""
        self.default = {"content": content, **extra}

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._script)

    def _next_turn(self, body: dict[str, Any], headers: dict[str, str]) -> Turn | None:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            if self._script:
                return self._script.popleft()
        if self.responder is not None:
            return self.responder(body)
        return self.default


def completion(turn: Turn, model: str) -> dict[str, Any]:
    """The Chat Completions response body for one scripted turn."""
    message: dict[str, Any] = {"role": "assistant", "content": turn.get("content")}
    finish_reason = "stop"
    if turn.get("tool_calls"):
        calls = []
        for call in turn["tool_calls"]:
            arguments = call.get("arguments", {})
            calls.append(
                {
                    "id": call.get("id") or f"call_{uuid.uuid4().hex[:12]}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": arguments
                        if isinstance(arguments, str)
                        else json.dumps(arguments),
                    },
                }
            )
        message["tool_calls"] = calls
        finish_reason = "tool_calls"
    usage = {**DEFAULT_USAGE, **turn.get("usage", {})}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes; with Nagle's algorithm on, the body then
    # waits for the client's delayed ACK (~40 ms), so an "instant" answer would not be instant.
    disable_nagle_algorithm = True
    server_owner: ScriptedModelServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(400, {"error": {"message": "the body is not JSON"}})
            return
        owner = self.server_owner
        if owner.api_key is not None:
            if self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                self._send(401, {"error": {"message": "bad api key"}})
                return
        turn = owner._next_turn(body, dict(self.headers.items()))
        if turn is None:
            self._send(500, {"error": {"message": "the script is used up"}})
            return
        if turn.get("hold") is not None:
            turn["hold"].wait(timeout=HOLD_LIMIT_SECS)
        if turn.get("delay"):
            time.sleep(float(turn["delay"]))
        if turn.get("drop"):
            self.close_connection = True
            self.connection.close()
            return
        if turn.get("status"):
            self._send(int(turn["status"]), {"error": {"message": "scripted error"}})
            return
        self._send(200, completion(turn, str(body.get("model", "scripted"))))

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
            return
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
