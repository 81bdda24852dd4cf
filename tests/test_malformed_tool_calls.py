"""Malformed tool calls (NaN and Infinity, lone surrogates, absurdly deep paths, odd shapes) are
refused as invalid and audited: through Kernel.invoke, and from the model through the chat API."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.context import ToolContext
from kernel.kernel import kernel
from kernel.models import ToolCall
from kernel.permissions import CapabilitySet

pytestmark = pytest.mark.django_db

GRANT = ["filesystem:read:/tmp/**", "filesystem:write:/tmp/**", "net:example.com", "notify:*"]
TOOLS = ["filesystem_read", "filesystem_write", "http_fetch", "notify", "schedule", "shell"]

nasty_strings = st.one_of(
    st.sampled_from(
        [
            "/tmp/\ud800",
            "/tmp/a\udfff/b",
            "/tmp/" + "a/" * 500 + "f",
            "/tmp/" + "x" * 5000,
            "http://example.com/\ud800",
            "\x00",
        ]
    ),
    st.text(max_size=40),
)
nasty_scalars = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400 if False else 1e308, -0.0]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    nasty_strings,
)
nasty_values = st.recursive(
    nasty_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(nasty_strings, inner, max_size=3)
    ),
    max_leaves=8,
)
nasty_args = st.one_of(
    st.dictionaries(
        st.sampled_from(["path", "content", "url", "message", "action", "command", "args", "x"]),
        nasty_values,
        max_size=4,
    ),
    nasty_values,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tool=st.sampled_from(TOOLS), args=nasty_args)
def test_malformed_arguments_are_refused_or_handled_and_always_audited(
    make_user, tool: str, args: Any
) -> None:
    before = ToolCall.objects.count()
    context = ToolContext(user=make_user(), capabilities=CapabilitySet(GRANT))
    result = kernel.invoke(tool, args, context)
    assert result.decision in ("invalid", "denied", "error", "allowed")
    assert "unexpectedly" not in result.content
    assert ToolCall.objects.count() == before + 1
    json.dumps(result.summary(), allow_nan=False)  # what the chat API answers with


@pytest.mark.parametrize(
    "raw",
    [
        '{"path": NaN}',
        '{"path": Infinity}',
        '{"path": "/tmp/a", "x": -Infinity}',
        '{"path": "/tmp/\\ud800"}',
        '{"path": "/tmp/' + "a/" * 400 + 'f"}',
        '{"url": "http://example.com/\\udc00"}',
        '{"path": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_malformed_calls_from_the_model_are_invalid_and_audited_through_chat(
    make_user, api_client_for, model_server, raw: str
) -> None:
    tool = "http_fetch" if "url" in raw else "filesystem_read"
    model_server.add({"tool_calls": [{"name": tool, "arguments": raw}]}, {"content": "ok"})
    client = api_client_for(make_user(grant=GRANT))
    response = client.post(
        "/api/v1/chat", json.dumps({"message": "go"}), content_type="application/json"
    )
    assert response.status_code == 200, response.content[:300]
    [call] = response.json()["tool_calls"]
    assert call["decision"] == "invalid", call
    assert ToolCall.objects.get(pk=call["id"]).decision == "invalid"
