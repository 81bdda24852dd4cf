"""POST /api/v1/chat: sessions, capabilities fixed within the grant, errors never 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from kernel.models import ChatSession, ToolCall, User

pytestmark = pytest.mark.django_db


def post(client, **body):
    # json.dumps escapes lone surrogates, as a real client's JSON would.
    return client.post("/api/v1/chat", json.dumps(body), content_type="application/json")


def test_a_first_message_starts_a_session_and_answers(
    model_server, make_user, api_client_for
) -> None:
    user = make_user(grant=["notify:*"])
    model_server.add({"content": "Hi there"})
    response = post(api_client_for(user), message="hello")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["reply"] == "Hi there"
    assert body["tool_calls"] == []
    session = ChatSession.objects.get(pk=body["session_id"])
    assert session.owner == user
    assert session.capabilities == ["notify:*"]  # default: the whole grant
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


def test_a_session_keeps_its_history(model_server, make_user, api_client_for) -> None:
    client = api_client_for(make_user())
    model_server.add({"content": "one"}, {"content": "two"})
    session_id = post(client, message="first").json()["session_id"]
    response = post(client, message="second", session_id=session_id)
    assert response.json() == {"session_id": session_id, "reply": "two", "tool_calls": []}
    sent = [(m["role"], m["content"]) for m in model_server.requests[1]["messages"]][1:]
    assert sent == [("user", "first"), ("assistant", "one"), ("user", "second")]


def test_capabilities_beyond_the_grant_are_refused_listing_exactly_which(
    model_server, make_user, api_client_for
) -> None:
    user = make_user(grant=["net:*.example.com", "shell:ls"])
    response = post(
        api_client_for(user),
        message="hi",
        capabilities=["net:api.example.com", "net:example.com", "shell:ls,rm", "shell:ls"],
    )
    assert response.status_code == 403
    assert response.json()["capabilities"] == ["net:example.com", "shell:ls,rm"]
    assert ChatSession.objects.count() == 0
    assert model_server.requests == []


def test_a_session_uses_only_the_capabilities_it_asked_for(
    model_server, make_user, api_client_for, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("secret a")
    user = make_user(grant=[f"filesystem:read:{tmp_path}/**", "shell:ls"])
    model_server.add(
        {"tool_calls": [{"name": "filesystem_read", "arguments": {"path": f"{tmp_path}/a.txt"}}]},
        {"content": "could not"},
    )
    response = post(api_client_for(user), message="read it", capabilities=["shell:ls"])
    assert response.status_code == 200
    call = response.json()["tool_calls"][0]
    assert call["decision"] == "denied"
    assert call["missing_permission"] == f"filesystem:read:{tmp_path}/a.txt"
    assert "secret a" not in str(model_server.requests[1])
    row = ToolCall.objects.get()
    assert row.session_id == response.json()["session_id"]


def test_an_allowed_tool_call_is_reported_and_audited(
    model_server, make_user, api_client_for, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("content a")
    user = make_user(grant=[f"filesystem:read:{tmp_path}/**"])
    model_server.add(
        {"tool_calls": [{"name": "filesystem_read", "arguments": {"path": f"{tmp_path}/a.txt"}}]},
        {"content": "it says content a"},
    )
    response = post(api_client_for(user), message="read it")
    assert response.json()["tool_calls"][0]["decision"] == "allowed"
    assert "content a" in model_server.requests[1]["messages"][-1]["content"]
    assert ToolCall.objects.get().decision == "allowed"


def test_revoking_the_grant_narrows_an_existing_session(
    model_server, make_user, api_client_for, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("content a")
    user = make_user(grant=[f"filesystem:read:{tmp_path}/**"])
    client = api_client_for(user)
    model_server.add({"content": "ready"})
    session_id = post(client, message="hi").json()["session_id"]
    User.objects.filter(pk=user.pk).update(grant=[])
    model_server.add(
        {"tool_calls": [{"name": "filesystem_read", "arguments": {"path": f"{tmp_path}/a.txt"}}]},
        {"content": "denied"},
    )
    response = post(client, message="read", session_id=session_id)
    assert response.json()["tool_calls"][0]["decision"] == "denied"


def test_capabilities_cannot_be_changed_on_an_existing_session(
    model_server, make_user, api_client_for
) -> None:
    client = api_client_for(make_user(grant=["shell:ls"]))
    model_server.add({"content": "x"})
    session_id = post(client, message="hi", capabilities=[]).json()["session_id"]
    response = post(client, message="hi", session_id=session_id, capabilities=["shell:ls"])
    assert response.status_code == 400
    assert "capabilities" in response.json()


def test_another_users_session_is_not_found(model_server, make_user, api_client_for) -> None:
    model_server.add({"content": "x"})
    session_id = post(api_client_for(make_user()), message="hi").json()["session_id"]
    response = post(api_client_for(make_user()), message="hi", session_id=session_id)
    assert response.status_code == 404
    assert len(model_server.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"message": ""},
        {"message": "   "},
        {"message": 5},
        {"message": "a\x00b"},
        {"message": "\ud800"},
        {"message": "x" * 20_001},
        {"message": "hi", "session_id": "abc"},
        {"message": "hi", "session_id": 0},
        {"message": "hi", "capabilities": "schedule:*"},
        {"message": "hi", "capabilities": ["nonsense"]},
        {"message": "hi", "capabilities": ["filesystem:read:../x"]},
        {"message": "hi", "capabilities": [None]},
        {"message": "hi", "surprise": True},
    ],
)
def test_bad_input_is_a_400_with_field_reasons(
    model_server, make_user, api_client_for, body
) -> None:
    response = post(api_client_for(make_user(grant=["schedule:*"])), **body)
    assert response.status_code == 400, response.content
    assert isinstance(response.json(), dict) and response.json()
    assert model_server.requests == []


def test_a_body_that_is_not_an_object_is_a_400(model_server, make_user, api_client_for) -> None:
    client = api_client_for(make_user())
    for raw in ("[1, 2]", '"text"', "{not json"):
        response = client.post("/api/v1/chat", raw, content_type="application/json")
        assert response.status_code == 400, raw


def test_no_model_configured_is_a_503_saying_how_to_configure(
    settings, make_user, api_client_for
) -> None:
    settings.PICOBOT_MODEL_BASE_URL = ""
    settings.PICOBOT_MODEL = ""
    response = post(api_client_for(make_user()), message="hi")
    assert response.status_code == 503
    assert "PICOBOT_MODEL_BASE_URL" in response.json()["detail"]


def test_a_model_failure_is_a_502(model_server, make_user, api_client_for) -> None:
    model_server.add({"status": 500})
    response = post(api_client_for(make_user()), message="hi")
    assert response.status_code == 502


def test_tool_arguments_too_deeply_nested_to_parse_are_refused_not_a_500(
    model_server, make_user, api_client_for
) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    model_server.add({"tool_calls": [{"name": "shell", "arguments": deep}]}, {"content": "done"})
    client = api_client_for(make_user(grant=["shell:ls"]))
    client.raise_request_exception = False
    response = post(client, message="hi")
    assert response.status_code == 200, response.status_code
    body = response.json()
    assert body["reply"] == "done"
    call = body["tool_calls"][0]
    assert (call["tool"], call["decision"]) == ("shell", "invalid")
    assert "nested more than 32 levels deep" in call["error"]
    row = ToolCall.objects.get()
    assert (row.decision, row.session_id) == ("invalid", body["session_id"])


def test_an_anonymous_caller_gets_401(model_server) -> None:
    assert APIClient().post("/api/v1/chat", {"message": "hi"}, format="json").status_code == 401


def test_the_chat_route_is_in_the_openapi_schema() -> None:
    response = APIClient().get("/api/v1/schema", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json() if response["Content-Type"].startswith("application/json") else None
    if schema is None:
        import yaml

        schema = yaml.safe_load(response.content)
    operation = schema["paths"]["/api/v1/chat"]["post"]
    assert {"200", "400", "403", "404", "503"} <= set(operation["responses"])
    request_schema = schema["components"]["schemas"]["ChatRequest"]
    assert set(request_schema["properties"]) == {"message", "session_id", "capabilities"}


def test_the_admin_lists_tool_calls_and_chat_sessions(
    model_server, make_user, api_client_for, client
) -> None:
    model_server.add({"tool_calls": [{"name": "shell", "arguments": {"command": "ls"}}]})
    model_server.add({"content": "no"})
    post(api_client_for(make_user()), message="hi")
    admin_user = User.objects.create_superuser("boss", "boss@example.com", "pw-for-tests")
    client.force_login(admin_user)
    for url in ("/admin/kernel/toolcall/", "/admin/kernel/chatsession/"):
        response = client.get(url)
        assert response.status_code == 200, url
    assert b"shell:ls" in client.get("/admin/kernel/toolcall/").content
