"""Secrets in tool arguments never reach the audit log or API answers in clear: the value after a
secret-named flag, `user:password` forms, URLs with credentials, Authorization-like headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kernel.context import ToolContext
from kernel.kernel import kernel, redact, redact_text
from kernel.models import ToolCall
from kernel.permissions import CapabilitySet

SECRETS = ["hunter2", "s3cret", "tok-123456", "AbC9xyz", "pa55word", "k3y-value", "c00kie"]


@pytest.mark.parametrize(
    ("args", "kept"),
    [
        (["--password", "hunter2", "-u", "admin:s3cret"], ["--password", "-u", "admin"]),
        (["--token", "tok-123456", "status"], ["--token", "status"]),
        (["--api-key", "AbC9xyz", "--verbose"], ["--api-key", "--verbose"]),
        (["--db-password", "pa55word"], ["--db-password"]),
        (["-H", "Authorization: Bearer tok-123456"], ["-H", "Authorization"]),
        (["-H", "Authorization: token AbC9xyz"], ["-H", "Authorization"]),
        (["-H", "X-Api-Key: k3y-value"], ["-H", "X-Api-Key"]),
        (["-H", "Cookie: session=c00kie"], ["-H", "Cookie"]),
        (["--user", "admin:s3cret", "https://example.com"], ["--user", "admin", "example.com"]),
        (["https://admin:s3cret@example.com/x"], ["example.com/x"]),
        (["mysql://admin:s3cret@db.example.com/app"], ["db.example.com/app"]),
        (["admin:s3cret@db.example.com"], ["db.example.com"]),
        (["--password=hunter2"], ["--password="]),
        (["login --password hunter2 now"], ["login --password", "now"]),
    ],
)
def test_secret_forms_are_redacted_and_the_rest_is_kept(args: list[str], kept: list[str]) -> None:
    stored = json.dumps(redact({"command": "tool", "args": args}))
    for secret in SECRETS:
        assert secret not in stored, (args, stored)
    for text in kept:
        assert text in stored, (args, stored)
    assert "[redacted]" in stored


@pytest.mark.parametrize(
    "args",
    [
        ["-p", "8080"],  # a port (ssh, docker), parents (mkdir): not a password
        ["-u", "root"],  # a user name alone
        ["12:30", "net:*"],  # colons that are not credentials
        ["--tokenizer", "bert"],  # a flag whose name merely contains a secret word
    ],
)
def test_ordinary_arguments_are_not_redacted(args: list[str]) -> None:
    assert redact({"args": args}) == {"args": args}


def test_redacting_text_covers_headers_and_flags_in_one_string() -> None:
    text = "curl -H 'Authorization: Basic YWRtaW46czNjcmV0' --password hunter2 https://x"
    redacted = redact_text(text)
    assert "YWRtaW46czNjcmV0" not in redacted and "hunter2" not in redacted
    assert redacted.startswith("curl -H") and redacted.endswith("https://x")


@pytest.mark.django_db
def test_the_audit_row_and_the_answer_hold_no_secret(make_user) -> None:
    args: dict[str, Any] = {
        "command": "echo",
        "args": ["--password", "hunter2", "-u", "admin:s3cret", "--token", "tok-123456"],
    }
    context = ToolContext(user=make_user(), capabilities=CapabilitySet(["shell:echo"]))
    result = kernel.invoke("shell", args, context)
    row = ToolCall.objects.get()
    for stored in (json.dumps(row.arguments), row.error, json.dumps(result.summary())):
        for secret in ("hunter2", "s3cret", "tok-123456"):
            assert secret not in stored
    assert row.arguments["args"][0] == "--password"
