#!/usr/bin/env python
"""Django's command-line utility for PicoBot Scheduler."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "picobot_site.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        # Loaded here, before Django would turn a settings error into "Unknown command".
        settings.INSTALLED_APPS  # noqa: B018
    except ImproperlyConfigured as exc:
        # A configuration mistake is the user's to fix: one line, not a traceback.
        print(f"Configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
