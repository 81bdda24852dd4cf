"""WhatsApp through Twilio's Messages API, with the `twilio` package's Client.

`TWILIO_API_BASE_URL` (tests: a local fake) replaces Twilio's host through the Client's own
extension point, its `http_client`. Twilio's answers are classified: the error codes in
PERMANENT_CODES (and other 4xx answers) are permanent; 429, 5xx, timeouts and connection errors
are transient. 63016 (the recipient is outside WhatsApp's 24-hour window) is answered by
resending through the approved template `TWILIO_WHATSAPP_CONTENT_SID`; without one it is
permanent, and says so. Twilio may also report 63016 later, in a status callback: the callback
view then queues the same row again, marked to go through the template.
"""

from __future__ import annotations

import json
import threading
from urllib.parse import urlsplit

import requests
from django.conf import settings
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from notifications.channels import Channel, DeliveryError, Message

OUTSIDE_WINDOW = 63016
# Invalid number, unsubscribed (STOP), not a mobile / unreachable, WhatsApp user unavailable,
# not a WhatsApp user, and the template errors: retrying cannot help.
PERMANENT_CODES = frozenset({21211, 21408, 21610, 21612, 21614, 63003, 63024, 63032, 63049})
TRANSIENT_STATUSES = frozenset({401, 403, 408, 409, 429})
TIMEOUT_SECS = 10
STATUS_CALLBACK_PATH = "/api/v1/notifications/twilio-status"


class RebasedHttpClient(TwilioHttpClient):
    """Twilio's own HTTP client, sending every request to `base_url` instead of twilio.com."""

    def __init__(self, base_url: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.base_url = base_url.rstrip("/")

    def request(self, method: str, url: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        parts = urlsplit(url)
        rebased = self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")
        return super().request(method, rebased, *args, **kwargs)  # type: ignore[arg-type]


_clients: dict[tuple[str, str, str], Client] = {}
_lock = threading.Lock()


def client() -> Client:
    """One Client per credentials and base URL per process (it keeps a connection pool)."""
    key = (settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN, settings.TWILIO_API_BASE_URL)
    with _lock:
        found = _clients.get(key)
        if found is None:
            http_client = (
                RebasedHttpClient(key[2], timeout=TIMEOUT_SECS)
                if key[2]
                else TwilioHttpClient(timeout=TIMEOUT_SECS)
            )
            found = _clients[key] = Client(key[0], key[1], http_client=http_client)
        return found


def status_callback_url() -> str | None:
    public = settings.PICOBOT_PUBLIC_URL.rstrip("/")
    return f"{public}{STATUS_CALLBACK_PATH}" if public else None


class WhatsAppChannel(Channel):
    name = "whatsapp"

    def send(self, message: Message) -> str:
        if not (
            settings.TWILIO_ACCOUNT_SID
            and settings.TWILIO_AUTH_TOKEN
            and settings.TWILIO_WHATSAPP_FROM
        ):
            raise DeliveryError(
                "WhatsApp is not configured (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, "
                "TWILIO_WHATSAPP_FROM)",
                permanent=True,
            )
        if message.via_template:
            return self._create(message, template=True)
        try:
            return self._create(message, template=False)
        except DeliveryError as exc:
            if getattr(exc, "code", None) != OUTSIDE_WINDOW:
                raise
            return self._create(message, template=True)

    def _create(self, message: Message, *, template: bool) -> str:
        params: dict[str, str] = {
            "to": _whatsapp(message.address),
            "from_": _whatsapp(settings.TWILIO_WHATSAPP_FROM),
        }
        callback = status_callback_url()
        if callback:
            params["status_callback"] = callback
        if template:
            if not settings.TWILIO_WHATSAPP_CONTENT_SID:
                raise DeliveryError(
                    "outside WhatsApp's 24-hour window (63016) and no approved template is "
                    "configured (TWILIO_WHATSAPP_CONTENT_SID)",
                    permanent=True,
                )
            params["content_sid"] = settings.TWILIO_WHATSAPP_CONTENT_SID
            params["content_variables"] = json.dumps({"1": message.body})
        else:
            params["body"] = message.body
        try:
            created = client().messages.create(**params)
        except TwilioRestException as exc:
            raise classify(exc) from None
        except (requests.RequestException, TwilioException) as exc:
            raise DeliveryError(
                f"Twilio unreachable: {type(exc).__name__}", permanent=False
            ) from None
        return str(created.sid or "")


def classify(exc: TwilioRestException) -> DeliveryError:
    """A Twilio error answer as a DeliveryError that says whether retrying can help."""
    code = exc.code
    text = f"Twilio {exc.status}" + (f" error {code}" if code else "") + f": {exc.msg}"[:500]
    if code == OUTSIDE_WINDOW:
        error = DeliveryError(text, permanent=True)
    elif code in PERMANENT_CODES:
        error = DeliveryError(text, permanent=True)
    elif exc.status >= 500 or exc.status in TRANSIENT_STATUSES:
        error = DeliveryError(text, permanent=False)
    else:
        error = DeliveryError(text, permanent=True)
    error.code = code  # type: ignore[attr-defined]
    return error


def _whatsapp(number: str) -> str:
    return number if number.startswith("whatsapp:") else f"whatsapp:{number}"


CHANNEL = WhatsAppChannel()
