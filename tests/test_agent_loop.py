"""The agent loop against a scripted Chat Completions server over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernel.agent import AgentError, ModelNotConfigured, run_agent
from kernel.context import Cancelled, DeadlineExceeded, RunControl, ToolContext
from kernel.models import ToolCall
from kernel.permissions import CapabilitySet, Permission, parse_permission
from kernel.tools import Tool, register, tool_specs, unregister

pytestmark = pytest.mark.django_db


class CounterTool(Tool):
    name = "test_counter"
    description = "Counts its calls."
    parameters = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    calls: list[int] = []

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        return [parse_permission("notify:console")]

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        CounterTool.calls.append(args["n"])
        return f"count {args['n']}"


@pytest.fixture(autouse=True)
def counter_tool() -> Iterator[None]:
    CounterTool.calls = []
    register(CounterTool)
    yield
    unregister("test_counter")


@pytest.fixture
def context(make_user) -> ToolContext:
    return ToolContext(
        user=make_user(),
        capabilities=CapabilitySet(["notify:*"]),
        control=RunControl.with_timeout(30),
    )


def test_a_plain_answer_comes_back_with_its_usage(model_server, context) -> None:
    model_server.add({"content": "Hello!", "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    result = run_agent("Say hello", context, system_prompt="Be brief.")
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Hello!", 7, 3)
    sent = model_server.requests[0]
    assert sent["model"] == "scripted-model"
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][-1] == {"role": "user", "content": "Say hello"}
    assert model_server.headers[0]["authorization"] == "Bearer test-model-key"


def test_tools_are_offered_with_their_schemas(model_server, context) -> None:
    model_server.add({"content": "ok"})
    run_agent("hi", context)
    offered = {tool["function"]["name"]: tool for tool in model_server.requests[0]["tools"]}
    assert offered["test_counter"]["function"]["parameters"] == CounterTool.parameters


def test_tool_calls_run_through_the_kernel_and_their_results_go_back(model_server, context) -> None:
    model_server.add(
        {
            "tool_calls": [
                {"id": "c1", "name": "test_counter", "arguments": {"n": 1}},
                {"id": "c2", "name": "test_counter", "arguments": {"n": 2}},
            ]
        },
        {"content": "done"},
    )
    result = run_agent("count", context)
    assert result.text == "done"
    assert CounterTool.calls == [1, 2]
    tool_messages = [m for m in model_server.requests[1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["c1", "c2"]
    assert "count 1" in tool_messages[0]["content"]
    assert [c["decision"] for c in result.tool_calls] == ["allowed", "allowed"]
    assert ToolCall.objects.count() == 2
    assert [m["role"] for m in result.messages] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]


def test_a_denied_call_goes_back_to_the_model_as_permission_denied(model_server, make_user) -> None:
    context = ToolContext(user=make_user(), capabilities=CapabilitySet(["notify:whatsapp"]))
    model_server.add(
        {"tool_calls": [{"name": "test_counter", "arguments": {"n": 1}}]}, {"content": "sorry"}
    )
    result = run_agent("count", context)
    assert CounterTool.calls == []
    tool_message = model_server.requests[1]["messages"][-1]
    assert "permission denied" in tool_message["content"]
    assert "notify:console" in tool_message["content"]
    assert result.tool_calls[0]["missing_permission"] == "notify:console"


def test_invalid_json_arguments_are_refused_and_audited(model_server, context) -> None:
    model_server.add(
        {"tool_calls": [{"name": "test_counter", "arguments": "{not json"}]}, {"content": "ok"}
    )
    result = run_agent("count", context)
    assert result.tool_calls[0]["decision"] == "invalid"
    assert ToolCall.objects.get().decision == "invalid"


def test_arguments_too_deeply_nested_to_parse_are_refused_and_audited(
    model_server, context
) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    model_server.add(
        {"tool_calls": [{"name": "test_counter", "arguments": deep}]}, {"content": "ok"}
    )
    result = run_agent("count", context)
    assert result.text == "ok"
    assert result.tool_calls[0]["decision"] == "invalid"
    assert "nested more than 32 levels deep" in result.tool_calls[0]["error"]
    assert "nested more than 32 levels deep" in model_server.requests[1]["messages"][-1]["content"]
    assert ToolCall.objects.get().decision == "invalid"
    assert CounterTool.calls == []


def test_parsable_arguments_nested_too_deeply_are_refused_and_audited(
    model_server, context
) -> None:
    deep = '{"n": ' + "[" * 500 + "]" * 500 + "}"
    model_server.add(
        {"tool_calls": [{"name": "test_counter", "arguments": deep}]}, {"content": "ok"}
    )
    result = run_agent("count", context)
    assert result.tool_calls[0]["decision"] == "invalid"
    assert "nested more than 32 levels deep" in result.tool_calls[0]["error"]
    assert ToolCall.objects.get().decision == "invalid"


def test_history_is_sent_before_the_new_prompt(model_server, context) -> None:
    model_server.add({"content": "second"})
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}]
    result = run_agent("again", context, history=history)
    assert model_server.requests[0]["messages"] == [*history, {"role": "user", "content": "again"}]
    assert result.messages[-1] == {"role": "assistant", "content": "second"}


def test_the_loop_stops_after_max_turns(model_server, context, picobot_config) -> None:
    picobot_config("model", max_turns=3)
    model_server.reply_always()
    model_server.default = {"tool_calls": [{"name": "test_counter", "arguments": {"n": 0}}]}
    with pytest.raises(AgentError, match="max_turns"):
        run_agent("loop forever", context)
    assert len(model_server.requests) == 3


def test_the_loop_stops_when_the_token_budget_is_spent(
    model_server, context, picobot_config
) -> None:
    picobot_config("model", max_tokens_per_run=100)
    model_server.add(
        {
            "tool_calls": [{"name": "test_counter", "arguments": {"n": 1}}],
            "usage": {"prompt_tokens": 90, "completion_tokens": 20},
        },
        {"content": "never reached"},
    )
    with pytest.raises(AgentError, match="max_tokens_per_run"):
        run_agent("spend", context)
    assert CounterTool.calls == []


def test_no_model_configured_fails_with_how_to_configure(settings, context) -> None:
    settings.PICOBOT_MODEL_BASE_URL = ""
    settings.PICOBOT_MODEL = ""
    with pytest.raises(ModelNotConfigured) as info:
        run_agent("hi", context)
    for name in ("PICOBOT_MODEL_BASE_URL", "PICOBOT_MODEL", "PICOBOT_MODEL_API_KEY"):
        assert name in str(info.value)


def test_an_http_error_from_the_model_is_an_agent_error_and_not_retried(
    model_server, context
) -> None:
    model_server.add({"status": 500}, {"content": "never"})
    with pytest.raises(AgentError, match="500"):
        run_agent("hi", context)
    assert len(model_server.requests) == 1


def test_a_dropped_connection_is_retried_without_rerunning_tools(model_server, context) -> None:
    model_server.add(
        {"tool_calls": [{"name": "test_counter", "arguments": {"n": 1}}]},
        {"drop": True},
        {"content": "done"},
    )
    result = run_agent("count", context)
    assert result.text == "done"
    assert CounterTool.calls == [1]
    assert len(model_server.requests) == 3
    assert model_server.requests[1]["messages"] == model_server.requests[2]["messages"]


def test_a_request_timeout_is_retried(model_server, context, picobot_config) -> None:
    picobot_config("model", request_timeout_secs=1)
    model_server.add({"delay": 1.5, "content": "too late"}, {"content": "in time"})
    assert run_agent("hi", context).text == "in time"


def test_the_runs_deadline_interrupts_a_slow_model(model_server, make_user) -> None:
    control = RunControl.with_timeout(0.5)
    context = ToolContext(user=make_user(), capabilities=CapabilitySet(), control=control)
    # The answer is held until the run has given up on it: only the deadline can end the wait.
    answer = threading.Event()
    model_server.add({"hold": answer, "content": "late"})
    started = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded):
            run_agent("hi", context)
    finally:
        answer.set()
    assert time.monotonic() - started < 15  # far below the hold's 60 s: a load-proof bound


def test_a_cancelled_run_stops_before_the_next_tool_call(model_server, make_user) -> None:
    control = RunControl.with_timeout(30)

    class CancellingTool(CounterTool):
        def run(self, args: dict[str, Any], context: ToolContext) -> str:
            control.cancel("cancelled by the owner")
            return super().run(args, context)

    unregister("test_counter")
    register(CancellingTool())
    context = ToolContext(
        user=make_user(), capabilities=CapabilitySet(["notify:*"]), control=control
    )
    model_server.add(
        {
            "tool_calls": [
                {"name": "test_counter", "arguments": {"n": 1}},
                {"name": "test_counter", "arguments": {"n": 2}},
            ]
        },
        {"content": "never"},
    )
    with pytest.raises(Cancelled):
        run_agent("count", context)
    assert CounterTool.calls == [1]
    assert len(model_server.requests) == 1
    # The call that ran is audited although the run stopped before its result went back.
    row = ToolCall.objects.get()
    assert (row.tool, row.decision) == ("test_counter", "error")
    assert row.error == "stopped: cancelled by the owner"


def test_the_tools_offered_follow_the_registry_while_their_specs_are_built_once(
    model_server, context
) -> None:
    model_server.reply_always("ok")
    run_agent("hi", context)
    run_agent("hi", context)
    first, second = (request["tools"] for request in model_server.requests)
    assert first == second and "test_counter" in [t["function"]["name"] for t in first]
    assert tool_specs() is tool_specs()
    unregister("test_counter")
    run_agent("hi", context)
    assert "test_counter" not in [t["function"]["name"] for t in model_server.requests[-1]["tools"]]
    register(CounterTool)
    run_agent("hi", context)
    assert "test_counter" in [t["function"]["name"] for t in model_server.requests[-1]["tools"]]


def test_the_model_server_sends_its_answers_without_waiting_on_nagle(model_server) -> None:
    # Headers and body go out in two writes: with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK. Checked on the socket option rather than timed.
    import socket

    seen: list[int] = []
    handler = model_server._httpd.RequestHandlerClass
    original = handler.setup

    def setup(self: Any) -> None:
        original(self)
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    handler.setup = setup
    try:
        model_server.add({"content": "x"})
        run_agent("hi", _plain_context())
    finally:
        handler.setup = original
    assert seen and all(seen)


def _plain_context() -> ToolContext:
    from kernel.models import User

    return ToolContext(
        user=User.objects.create(username="nagle"),
        capabilities=CapabilitySet([]),
        control=RunControl.with_timeout(30),
    )


def test_the_model_server_records_what_it_received(model_server) -> None:
    import urllib.request

    model_server.add({"content": "x"})
    request = urllib.request.Request(
        f"{model_server.base_url}/chat/completions",
        data=json.dumps({"model": "m", "messages": []}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.loads(response.read())
    assert body["choices"][0]["message"]["content"] == "x"
    assert body["usage"]["total_tokens"] == 15
    assert model_server.requests == [{"model": "m", "messages": []}]


def test_the_model_server_answers_many_concurrent_requests_with_a_default_reply() -> None:
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from kernel.testing.model_server import ScriptedModelServer

    def ask(base_url: str) -> str:
        request = urllib.request.Request(
            f"{base_url}/chat/completions",
            data=json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    with ScriptedModelServer(default={"content": "NOTHING_TO_REPORT"}) as server:
        with ThreadPoolExecutor(max_workers=100) as pool:
            answers = list(pool.map(ask, [server.base_url] * 1000))
    assert answers == ["NOTHING_TO_REPORT"] * 1000
    assert len(server.requests) == 1000
