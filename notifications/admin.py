"""The operator console for contacts and notifications (list pages: constant query counts)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from notifications.delivery import enqueue
from notifications.models import Contact, Notification, Status
from schedules.dbtime import db_now


@admin.register(Contact)
class ContactAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "channel", "address", "verified_at", "created_at")
    list_filter = ("channel", ("verified_at", admin.EmptyFieldListFilter))
    list_select_related = ("owner",)
    search_fields = ("address", "owner__username")
    # The webhook secret and the code's HMAC are never shown.
    fields = ("owner", "channel", "address", "verified_at", "code_attempts", "created_at")
    readonly_fields = ("owner", "channel", "address", "code_attempts", "created_at")
    actions = ["mark_verified"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Mark verified (the operator vouches for the address)")
    def mark_verified(self, request: HttpRequest, queryset: QuerySet[Contact]) -> None:
        count = queryset.filter(verified_at__isnull=True).update(
            verified_at=db_now(), code_hmac="", code_expires_at=None
        )
        self.message_user(request, f"{count} contact(s) marked verified.", messages.SUCCESS)


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "created_at",
        "owner",
        "channel",
        "kind",
        "status",
        "attempts",
        "provider_status",
        "error",
    )
    list_filter = ("status", "channel", "kind", "provider_status")
    list_select_related = ("owner",)
    search_fields = ("owner__username", "provider_message_id")
    show_full_result_count = False
    actions = ["retry_now"]
    readonly_fields = [field.name for field in Notification._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="last error")
    def error(self, obj: Notification) -> str:
        return obj.last_error[:120]

    @admin.action(description="Retry now (dead notifications)", permissions=["view"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        ids = list(queryset.filter(status=Status.DEAD).values_list("id", flat=True))
        Notification.objects.filter(id__in=ids, status=Status.DEAD).update(
            status=Status.PENDING,
            attempts=0,
            next_attempt_at=db_now(),
            enqueued_at=None,
            last_error="retried by an operator",
        )
        enqueue(ids)
        self.message_user(request, f"{len(ids)} notification(s) queued again.", messages.SUCCESS)
