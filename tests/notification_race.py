"""Run by tests as separate processes against the test database, all starting at one instant:

    python -m tests.notification_race guess START CONTACT_ID CODE COUNT
    python -m tests.notification_race notify START USER_ID EXECUTION_ID COUNT TAG

`guess` tries CODE COUNT times; `notify` calls the notify tool COUNT times with distinct
messages. Each prints one line per try: the outcome.
"""

from __future__ import annotations

import os
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()


def guess(contact_id: int, code: str, count: int) -> None:
    from notifications.contacts import ContactError, verify
    from notifications.models import Contact

    for _ in range(count):
        try:
            verify(Contact.objects.get(pk=contact_id), code)
            print("verified", flush=True)
        except ContactError as exc:
            print("locked" if "too many" in exc.message else "wrong", flush=True)


def notify(user_id: int, execution_id: int, count: int, tag: str) -> None:
    from kernel.context import ToolContext
    from kernel.models import User
    from kernel.tools import ToolError
    from notifications.tool import NotifyTool

    context = ToolContext(
        user=User.objects.get(pk=user_id), capabilities=None, execution_id=execution_id or None
    )
    context.session_id = None if execution_id else user_id
    for index in range(count):
        try:
            NotifyTool().run({"message": f"{tag} {os.getpid()} {index}"}, context)
            print("sent", flush=True)
        except ToolError:
            print("capped", flush=True)


if __name__ == "__main__":
    mode, start, *rest = sys.argv[1:]
    time.sleep(max(0.0, float(start) - time.time()))
    if mode == "guess":
        guess(int(rest[0]), rest[1], int(rest[2]))
    else:
        notify(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
