"""Webhooks: a signed JSON POST to the contact's https URL.

The address rule is the Kernel's one rule (`kernel.netpolicy.resolve_allowed`, as for
`http_fetch`): the name is resolved once and the connection pinned to that address (http_fetch's
`Target` and pinned connection); loopback, private and the other non-public ranges are refused
unless the owner's grant names that IP literal exactly, link-local and metadata addresses
always. It is checked when the contact is created and again at every delivery. Redirects are never followed, the
request is bounded by TIMEOUT_SECS, and proxies from the environment play no part.

Signature: `X-PicoBot-Timestamp: <unix seconds>` and
`X-PicoBot-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with the contact's
secret; a receiver recomputes it and refuses stale timestamps. 2xx is sent, 4xx (and 3xx) is
permanent, 5xx, timeouts and connection errors are retried. What the host answered never
reaches the owner (`public`), so the channel cannot be used to scan ports.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import threading
import time
from typing import Any

from kernel import netpolicy
from kernel.context import lenient_capability_set
from kernel.netpolicy import resolve_allowed
from kernel.sockets import SocketWatch
from kernel.tools import ToolError
from kernel.tools.http_fetch import Target, _connection
from notifications.channels import Channel, DeliveryError, Message

TIMEOUT_SECS = 10
MAX_URL_CHARS = 2048
USER_AGENT = "PicoBot-Webhook/1"
GENERIC_FAILURE = "the webhook did not accept the message"


class AddressRefused(ValueError):
    """The URL is not one a webhook may be sent to; the message says why."""


def check_url(url: str, grant: tuple[str, ...] | list[str]) -> tuple[Target, Any]:
    """The parsed target and the one address to connect to; AddressRefused says why not."""
    if len(url) > MAX_URL_CHARS:
        raise AddressRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    try:
        target = Target(url)
        permission = target.permission()  # refuses host names resolvers read as numbers
    except ToolError as exc:
        raise AddressRefused(str(exc)) from None
    if target.scheme != "https":
        raise AddressRefused("webhook URLs must use https")
    granted = lenient_capability_set(grant).allows_exactly(permission)
    literal_granted = target.address is not None and granted
    try:
        addresses = resolve_allowed(
            target.connect_name, target.port, literal_granted=literal_granted
        )
    except netpolicy.AddressRefused as exc:
        raise AddressRefused(str(exc)) from None
    return target, addresses[0]


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


class WebhookChannel(Channel):
    name = "webhook"

    def send(self, message: Message) -> str:
        try:
            target, address = check_url(message.address, message.grant)
        except AddressRefused as exc:
            raise DeliveryError(
                f"address refused: {exc}", permanent=True, public="the webhook address is refused"
            ) from None
        payload: dict[str, Any] = {"id": message.notification_id, "kind": message.kind}
        payload["text"] = message.body
        if message.code:
            payload["code"] = message.code
        body = json.dumps(payload).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-PicoBot-Timestamp": timestamp,
            "X-PicoBot-Signature": signature(message.secret, timestamp, body),
            "Connection": "close",
        }
        status = self._post(target, address, body, headers)
        if 200 <= status < 300:
            return ""
        permanent = status < 500 and status not in (408, 429)
        raise DeliveryError(
            f"webhook answered HTTP {status}", permanent=permanent, public=GENERIC_FAILURE
        )

    def _post(self, target: Target, address: Any, body: bytes, headers: dict[str, str]) -> int:
        # TIMEOUT_SECS bounds each step and, through the watch, the whole request: a receiver
        # that trickles its answer a byte at a time has its socket shut down at the limit.
        watch = SocketWatch()
        connection, handles = _connection(target, address, TIMEOUT_SECS, watch)
        limit = threading.Timer(TIMEOUT_SECS, watch.interrupt)
        limit.daemon = True
        limit.start()
        try:
            connection.request("POST", target.path, body=body, headers=headers)
            response = connection.getresponse()
            response.read(64 * 1024)
            if watch.interrupted:  # the shutdown read as the end of the answer
                raise TimeoutError("the webhook's answer took too long")
            return response.status
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, TLS failures
            raise DeliveryError(
                f"webhook unreachable: {type(exc).__name__}",
                permanent=False,
                public=GENERIC_FAILURE,
            ) from None
        finally:
            limit.cancel()
            watch.unwatch()
            connection.close()
            for handle in handles:
                handle.close()


CHANNEL = WebhookChannel()
