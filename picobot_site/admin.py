"""The console's branding, and django-q2's pages kept from being mistaken for the queue.

django-q2 delivers notifications; its "Scheduled tasks" and "Queued tasks" pages are not the
schedule queue (they would show 0 while schedules run, and their "Add" would create tasks that
bypass grants), so they are removed. Its task results stay, read-only, under a label that says
what they are.
"""

from __future__ import annotations

from django.contrib import admin
from django_q.models import OrmQ, Schedule

admin.site.site_header = "PicoBot operator console"
admin.site.site_title = "PicoBot console"
admin.site.index_title = "The queue, its users and their grants"
admin.site.index_template = "admin/picobot/index.html"

for model in (Schedule, OrmQ):
    if admin.site.is_registered(model):
        admin.site.unregister(model)
