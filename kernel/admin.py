"""The operator console for users, grants and API keys."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.forms import UserChangeForm
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

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


class ConsoleMedia:
    """The console's stylesheet: long untrusted text wraps instead of widening the page."""

    css = {"all": ("picobot/console.css",)}


def admin_link(obj: Any, text: object | None = None) -> SafeString | str:
    """A link to `obj`'s admin page (its text escaped), or "—" for nothing."""
    if obj is None:
        return "—"
    meta = obj._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, obj if text is None else text)


class ApiKeyRevokeForm(forms.ModelForm):
    """An inline row whose only change is "revoke": a conditional update, never a save."""

    revoke = forms.BooleanField(required=False, help_text="Revoke this key now.")

    class Meta:
        model = ApiKey
        fields = ()

    def save(self, commit: bool = True) -> ApiKey:
        if self.cleaned_data.get("revoke"):
            self.instance.revoke()
        return self.instance


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    form = ApiKeyRevokeForm
    extra = 0
    can_delete = False
    fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at", "revoke")
    readonly_fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(User)
class PicoUserAdmin(UserAdmin):
    form = UserGrantForm
    inlines = [ApiKeyInline]
    list_display = ("username", "email", "is_staff", "is_system", "grant_summary", "links")
    list_filter = ("is_staff", "is_superuser", "is_active", "is_system")
    readonly_fields = ("is_system", "last_login", "date_joined", "links")
    # The grant is what an operator comes here for: first, above Django's own permissions.
    fieldsets = (
        UserAdmin.fieldsets[0],
        ("PicoBot grant", {"fields": ("grant", "is_system", "links")}),
        *UserAdmin.fieldsets[1:],
    )
    Media = ConsoleMedia

    @admin.display(description="see")
    def links(self, obj: User) -> SafeString | str:
        if obj.pk is None:
            return "—"
        targets = [
            (
                "schedules",
                reverse("admin:schedules_job_changelist") + f"?owner__id__exact={obj.pk}",
            ),
            (
                "executions",
                reverse("admin:schedules_execution_changelist")
                + f"?job__owner__id__exact={obj.pk}",
            ),
            (
                "tool calls",
                reverse("admin:kernel_toolcall_changelist") + f"?user__id__exact={obj.pk}",
            ),
            (
                "chat sessions",
                reverse("admin:kernel_chatsession_changelist") + f"?owner__id__exact={obj.pk}",
            ),
        ]
        return format_html_join(
            " · ", '<a href="{}">{}</a>', ((url, text) for text, url in targets)
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # The system principal's grant is `[heartbeats] capabilities`, written by
        # loadheartbeats: the file is its source of truth, as it is for the heartbeat jobs.
        fields = tuple(super().get_readonly_fields(request, obj))
        return (*fields, "grant") if obj is not None and obj.is_system else fields

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
    list_select_related = ("user",)
    Media = ConsoleMedia

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
        "user_link",
        "execution_link",
        "session_link",
        "duration_ms",
    )
    list_filter = ("decision", "status", "tool", "created_at")
    search_fields = ("user__username", "tool", "missing_permission")
    list_select_related = ("user", "execution__job", "session__owner")
    # No date_hierarchy: its year/month links scan the whole table on every page.
    show_full_result_count = False
    fields = (
        "created_at",
        "tool",
        "decision",
        "status",
        "missing_permission",
        "user_link",
        "execution_link",
        "session_link",
        "arguments",
        "error",
        "duration_ms",
    )
    readonly_fields = fields
    Media = ConsoleMedia

    @admin.display(description="user")
    def user_link(self, obj: ToolCall) -> SafeString | str:
        return admin_link(obj.user)

    @admin.display(description="execution")
    def execution_link(self, obj: ToolCall) -> SafeString | str:
        return admin_link(obj.execution)

    @admin.display(description="chat session")
    def session_link(self, obj: ToolCall) -> SafeString | str:
        return admin_link(obj.session)


@admin.register(ChatSession)
class ChatSessionAdmin(ReadOnlyAdmin):
    list_display = ("id", "owner_link", "created_at", "updated_at", "capability_summary")
    search_fields = ("owner__username",)
    list_select_related = ("owner",)
    fields = ("owner_link", "created_at", "updated_at", "capability_summary", "transcript")
    readonly_fields = fields
    Media = ConsoleMedia

    @admin.display(description="owner")
    def owner_link(self, obj: ChatSession) -> SafeString | str:
        return admin_link(obj.owner)

    @admin.display(description="capabilities")
    def capability_summary(self, obj: ChatSession) -> str:
        return ", ".join(obj.capabilities) or "—"

    @admin.display(description="transcript")
    def transcript(self, obj: ChatSession) -> SafeString | str:
        """One block per message: who spoke, what they said, which tools they called."""
        turns = [_turn(message) for message in obj.messages or [] if isinstance(message, dict)]
        if not turns:
            return "—"
        body = format_html_join(
            "",
            '<div class="turn"><span class="role">{}</span><pre class="picobot-text">{}</pre></div>',
            turns,
        )
        return format_html('<div class="picobot-transcript">{}</div>', body)


def _turn(message: dict[str, Any]) -> tuple[str, str]:
    role = str(message.get("role", "?"))
    content = message.get("content")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    calls = message.get("tool_calls") or []
    if isinstance(calls, list) and calls:
        names = [
            str((call.get("function") or {}).get("name", "?"))
            for call in calls
            if isinstance(call, dict)
        ]
        text = (text if content else "") + ("\n" if content else "") + "calls: " + ", ".join(names)
    if role == "tool":
        role = f"tool result ({message.get('tool_call_id', '')})"
    return role, text or ""
