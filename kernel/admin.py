"""The operator console for users, grants and API keys."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.forms import UserChangeForm
from django.db.models import QuerySet
from django.http import HttpRequest

from kernel.forms import PermissionListField
from kernel.models import ApiKey, ChatSession, ToolCall, User
from kernel.permissions import CapabilitySet, interpreters_in

GRANT_HELP = (
    "One permission per line, e.g. schedule:*, net:api.example.com, filesystem:read:~/notes/**, "
    "shell:ls,cat, notify:whatsapp. Granting an interpreter (python, sh, git, find, env, "
    "xargs...) to shell is equivalent to shell:* — it can run anything."
)


class UserGrantForm(UserChangeForm):
    grant = PermissionListField(required=False, help_text=GRANT_HELP)

    class Meta(UserChangeForm.Meta):
        model = User


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(User)
class PicoUserAdmin(UserAdmin):
    form = UserGrantForm
    inlines = [ApiKeyInline]
    list_display = ("username", "email", "is_staff", "is_system", "grant_summary")
    list_filter = ("is_staff", "is_superuser", "is_active", "is_system")
    readonly_fields = ("is_system", "last_login", "date_joined")
    fieldsets = (
        *UserAdmin.fieldsets,
        ("PicoBot", {"fields": ("grant", "is_system")}),
    )

    @admin.display(description="grant")
    def grant_summary(self, obj: User) -> str:
        return ", ".join(obj.grant) or "—"

    def save_model(self, request: HttpRequest, obj: User, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        risky = interpreters_in(CapabilitySet.parse(obj.grant))
        if risky:
            self.message_user(
                request,
                f"{obj.username}'s grant names interpreters ({', '.join(risky)}): "
                "that is equivalent to shell:*.",
                level=messages.WARNING,
            )


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("user", "name")

    def clean_user(self) -> User:
        user: User = self.cleaned_data["user"]
        if user.is_system:
            raise forms.ValidationError("The system principal cannot hold API keys.")
        return user


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("user__username", "name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke_keys"]

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any):  # type: ignore[no-untyped-def]
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ("user", "name")
        return ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        return ("user", "prefix", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, secret = ApiKey.issue(obj.user, name=obj.name)
        obj.pk = key.pk
        self.message_user(
            request,
            f"New API key for {obj.user} (shown once, copy it now): {secret}",
            level=messages.WARNING,
        )

    @admin.action(description="Revoke selected API keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        from django.db.models.functions import Now

        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=Now())
        self.message_user(request, f"Revoked {count} key(s).")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Audit data: shown, never edited from the console."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ToolCall)
class ToolCallAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "tool",
        "decision",
        "status",
        "missing_permission",
        "user",
        "execution_id",
        "session_id",
        "duration_ms",
    )
    list_filter = ("decision", "status", "tool")
    search_fields = ("user__username", "tool", "missing_permission")
    list_select_related = ("user",)
    date_hierarchy = "created_at"


@admin.register(ChatSession)
class ChatSessionAdmin(ReadOnlyAdmin):
    list_display = ("id", "owner", "created_at", "updated_at", "capability_summary")
    search_fields = ("owner__username",)
    list_select_related = ("owner",)

    @admin.display(description="capabilities")
    def capability_summary(self, obj: ChatSession) -> str:
        return ", ".join(obj.capabilities) or "—"
