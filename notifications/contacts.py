"""Contacts: adding one (address checked, a code sent), verifying it, deleting it.

A code is 6 digits, made when its message is delivered and stored only as an HMAC keyed by the
server's secret (`delivery.code_hmac`), valid for `code_ttl_secs`. Each guess first counts
itself with a conditional UPDATE (`code_attempts < code_max_attempts`), so guesses sent in
parallel cannot exceed the limit; a new code (adding the contact again) resets the count. Codes
sent are limited to `max_codes_per_hour` per user (serialised on the user's row, so exact) and
per address.
"""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils.crypto import constant_time_compare

from kernel.context import lenient_capability_set
from kernel.models import User
from notifications.channels.webhook import AddressRefused, check_url
from notifications.delivery import code_hmac
from notifications.models import Channel, Contact, Kind, Notification
from notifications.writing import write_rows
from schedules.dbtime import db_now

CONTACT_CHANNELS = (Channel.WHATSAPP, Channel.WEBHOOK)
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_NUMBER_PUNCTUATION = re.compile(r"[\s\-().]")
_CODE = re.compile(r"[0-9]{6}")
CODE_BODY = "Your PicoBot verification code"


class ContactError(Exception):
    """A refused request: `field` and `message` for a 400, or `status` 403/429 with `quota`."""

    def __init__(self, field: str, message: str, status: int = 400, quota: str = "") -> None:
        super().__init__(message)
        self.field, self.message, self.status, self.quota = field, message, status, quota


def normalise_whatsapp(address: str) -> str:
    """An E.164 number (`+` and 7 to 15 digits); spaces, dashes, dots and brackets dropped."""
    number = address.strip()
    if number.lower().startswith("whatsapp:"):
        number = number[len("whatsapp:") :]
    number = _NUMBER_PUNCTUATION.sub("", number)
    if not _E164.fullmatch(number):
        raise ContactError(
            "address",
            "a WhatsApp address is an E.164 number: + then the country code and number, "
            "7 to 15 digits in all (e.g. +14155550123)",
        )
    return number


def check_address(owner: User, channel: str, address: str) -> str:
    if channel == Channel.WHATSAPP:
        return normalise_whatsapp(address)
    if not lenient_capability_set(owner.grant or []).allows("notify:webhook"):
        raise ContactError("channel", "adding a webhook needs notify:webhook", status=403)
    try:
        check_url(address, tuple(owner.grant or ()))
    except AddressRefused as exc:
        raise ContactError("address", f"this webhook address is refused: {exc}") from None
    return address


def add_contact(owner: User, channel: str, address: str) -> tuple[Contact, bool]:
    """Create the contact (or find the owner's unverified one) and queue a verification code.
    Returns (contact, created). Raises ContactError."""
    address = check_address(owner, channel, address)
    with transaction.atomic():
        User.objects.select_for_update().filter(pk=owner.pk).first()  # serialise this user
        _check_code_rate(owner, channel, address)
        contact, created = Contact.objects.get_or_create(
            owner=owner,
            channel=channel,
            address=address,
            defaults={"webhook_secret": secrets.token_hex(32) if channel == "webhook" else ""},
        )
        if contact.verified:
            raise ContactError("address", "this address is already one of your verified contacts")
        code = Notification(
            owner=owner,
            contact=contact,
            channel=channel,
            kind=Kind.VERIFICATION,
            body=CODE_BODY,
            idempotency_key=f"verification:{contact.pk}:{uuid.uuid4().hex}",
        )
        write_rows([code])
    return contact, created


def _check_code_rate(owner: User, channel: str, address: str) -> None:
    limit = settings.PICOBOT.notifications.max_codes_per_hour
    since = db_now() - timedelta(hours=1)
    codes = Notification.objects.filter(kind=Kind.VERIFICATION, created_at__gte=since)
    if codes.filter(owner=owner).count() >= limit:
        raise ContactError(
            "", f"at most {limit} codes an hour may be sent per user", 429, "max_codes_per_hour"
        )
    if codes.filter(contact__channel=channel, contact__address=address).count() >= limit:
        raise ContactError(
            "",
            f"at most {limit} codes an hour may be sent to one address",
            429,
            "max_codes_per_hour",
        )


def verify(contact: Contact, code: str) -> None:
    """Mark `contact` verified if `code` is its current code; ContactError says why not."""
    if contact.verified:
        return
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise ContactError("code", "the code is the 6 digits that were sent")
    config = settings.PICOBOT.notifications
    counted = (
        Contact.objects.filter(
            pk=contact.pk, verified_at__isnull=True, code_attempts__lt=config.code_max_attempts
        )
        .exclude(code_hmac="")
        .update(code_attempts=F("code_attempts") + 1)
    )
    current = Contact.objects.get(pk=contact.pk)
    if current.verified:
        return
    if not counted:
        if not current.code_hmac:
            raise ContactError("code", "no code has been sent yet; try again in a moment")
        raise ContactError(
            "code",
            f"too many wrong codes ({config.code_max_attempts}); add the contact again to "
            "get a new code",
        )
    now = db_now()
    if current.code_expires_at is None or current.code_expires_at <= now:
        raise ContactError("code", "the code has expired; add the contact again to get a new one")
    if not constant_time_compare(current.code_hmac, code_hmac(contact.pk, code)):
        raise ContactError("code", "wrong code")
    Contact.objects.filter(pk=contact.pk, code_hmac=current.code_hmac).update(
        verified_at=now, code_hmac="", code_expires_at=None
    )
