"""The agent loop: Chat Completions with tool calls, every call through the Kernel.

The loop is bounded by `[model] max_turns`, `[model] max_tokens_per_run` and the run's deadline
(`context.control`). A model request is retried only after a transport error (connection failure
or timeout); an HTTP error answer is final. Tool calls are never re-run: a retry repeats only
the request, with the tool results already in the conversation.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import openai
from django.conf import settings
from opentelemetry import trace

from kernel.context import DeadlineExceeded, ToolContext
from kernel.kernel import ToolResult, kernel
from kernel.model_http import http_client, watching
from kernel.sockets import SocketWatch
from kernel.tools import tool_specs

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("picobot.agent")

TRANSPORT_ATTEMPTS = 3
# Clients kept per process, keyed by endpoint: more only appear when the settings change (tests).
MAX_CACHED_CLIENTS = 8
TRANSPORT_BACKOFF_SECS = (0.5, 2.0)

HOW_TO_CONFIGURE = (
    "No model is configured. Set PICOBOT_MODEL_BASE_URL (an OpenAI-compatible Chat Completions "
    "endpoint, e.g. https://api.openai.com/v1 or http://localhost:11434/v1 for Ollama), "
    "PICOBOT_MODEL (the model name) and, if the endpoint needs one, PICOBOT_MODEL_API_KEY."
)


class ModelNotConfigured(Exception):
    """No model endpoint is configured; the message says how to configure one."""

    def __init__(self, message: str = HOW_TO_CONFIGURE) -> None:
        super().__init__(message)


class AgentError(Exception):
    """The model failed or the run went past a limit; the message is safe to show the owner."""


@dataclass
class AgentResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)


def model_configured() -> bool:
    return bool(settings.PICOBOT_MODEL_BASE_URL and settings.PICOBOT_MODEL)


_clients: dict[tuple[str, str, float], openai.OpenAI] = {}
_clients_lock = threading.Lock()


def _client(timeout_secs: float) -> openai.OpenAI:
    """The process's client for the configured endpoint, made on first use and then shared.

    Building a client costs more than a local model answer (a TLS context, a connection pool), and
    a shared one keeps its connections alive between runs. It is thread-safe, and nothing about
    a run is kept on it: the model, messages and per-request timeout go with each request. Its
    HTTP layer (`kernel.model_http`) lets a run's cancel or deadline cut its request short; it
    never retries on its own (`max_retries=0`), so an interrupted request is not sent again.
    """
    if not model_configured():
        raise ModelNotConfigured()
    # Local servers (Ollama, vLLM) need no key, but the client insists on one.
    key = (
        settings.PICOBOT_MODEL_BASE_URL,
        settings.PICOBOT_MODEL_API_KEY or "not-needed",
        timeout_secs,
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if len(_clients) >= MAX_CACHED_CLIENTS:
                # Dropped, not closed: a run on another thread may still be using it.
                del _clients[next(iter(_clients))]
            client = _clients[key] = openai.OpenAI(
                base_url=key[0],
                api_key=key[1],
                organization=None,
                project=None,
                max_retries=0,
                timeout=timeout_secs,
                http_client=http_client(),
            )
        return client


def run_agent(
    prompt: str,
    context: ToolContext,
    *,
    system_prompt: str | None = None,
    history: list[dict[str, Any]] | None = None,
) -> AgentResult:
    """Run `prompt` to a final answer with the tools `context` allows.

    `history` is earlier Chat Completions messages (without a system prompt). The result's
    `messages` is the history plus this run's messages, again without the system prompt.
    Raises ModelNotConfigured, AgentError, Cancelled or DeadlineExceeded.
    """
    config = settings.PICOBOT.model
    control = context.control
    control.check()
    client = _client(config.request_timeout_secs)
    conversation: list[dict[str, Any]] = [*(history or []), {"role": "user", "content": prompt}]
    result = AgentResult(text="")
    tools = tool_specs()
    try:
        for turn in range(1, config.max_turns + 1):
            control.check()
            with tracer.start_as_current_span(
                "picobot.agent_turn", attributes={**_ids(context), "picobot.turn": turn}
            ):
                messages = (
                    [{"role": "system", "content": system_prompt}, *conversation]
                    if system_prompt
                    else conversation
                )
                response = _complete(client, messages, tools, context)
                _count_usage(result, response)
                message = response.choices[0].message if response.choices else None
                if message is None:
                    raise AgentError("the model answered with no choices")
                calls = list(message.tool_calls or [])
                conversation.append(_assistant_message(message, calls))
                if not calls:
                    result.text = message.content or ""
                    result.messages = conversation
                    return result
                _check_budget(result, config.max_tokens_per_run)
                for call in calls:
                    outcome = _run_tool_call(call, context)
                    result.tool_calls.append(outcome.summary())
                    conversation.append(
                        {"role": "tool", "tool_call_id": call.id, "content": outcome.content}
                    )
        raise AgentError(
            f"the model did not finish within [model] max_turns = {config.max_turns} turns"
        )
    finally:
        result.messages = conversation


def _ids(context: ToolContext) -> dict[str, Any]:
    ids = {
        "picobot.job_id": context.job_id,
        "picobot.execution_id": context.execution_id,
        "picobot.session_id": context.session_id,
        "picobot.user_id": getattr(context.user, "pk", None),
    }
    return {key: value for key, value in ids.items() if value is not None}


def _complete(
    client: openai.OpenAI,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    context: ToolContext,
) -> Any:
    control = context.control
    last_error: Exception | None = None
    for attempt in range(TRANSPORT_ATTEMPTS):
        control.check()
        try:
            return _request(client, messages, tools, context)
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            last_error = exc
            control.check()  # a timeout that was really the run's deadline stops the run
            logger.warning("model request failed (%s), attempt %d", type(exc).__name__, attempt + 1)
            if attempt + 1 < TRANSPORT_ATTEMPTS:
                backoff = TRANSPORT_BACKOFF_SECS[min(attempt, len(TRANSPORT_BACKOFF_SECS) - 1)]
                control.wait(backoff)
        except openai.APIStatusError as exc:
            raise AgentError(
                f"the model endpoint answered HTTP {exc.status_code}: {_short(exc.message)}"
            ) from exc
        except openai.OpenAIError as exc:
            raise AgentError(f"the model request failed: {_short(str(exc))}") from exc
    control.check()
    raise AgentError(
        f"the model endpoint could not be reached after {TRANSPORT_ATTEMPTS} attempts "
        f"({type(last_error).__name__})"
    )


def _request(
    client: openai.OpenAI,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    context: ToolContext,
) -> Any:
    """One model request. A cancel or the run's deadline shuts its socket down (connecting,
    sending or waiting for the answer), so it stops within moments: Cancelled or
    DeadlineExceeded, never a transport error that would be retried. An answer that cannot be
    read as JSON is an AgentError."""
    control = context.control
    kwargs: dict[str, Any] = {"model": settings.PICOBOT_MODEL, "messages": messages}
    if tools:
        # As extra_body: the specs are plain JSON already, built once per process; as
        # `tools=` the client would walk and copy them again on every request.
        kwargs["extra_body"] = {"tools": tools}
    timeout = max(0.1, control.bounded(settings.PICOBOT.model.request_timeout_secs))
    watch = SocketWatch()
    try:
        with control.interrupting(watch.interrupt), watching(watch):
            response = client.chat.completions.create(**kwargs, timeout=timeout)
    except Exception as exc:
        if watch.interrupted:
            # Whatever the cut-short request raised: a transport error, or a body without a
            # length that the shutdown ended early and so is not JSON. The timer stands for
            # the deadline and may fire a hair before it.
            control.check()
            raise DeadlineExceeded("the run's deadline passed") from None
        if isinstance(exc, ValueError):  # an answer whose body is not JSON (cut short, say)
            raise AgentError(
                f"the model endpoint's answer could not be read ({type(exc).__name__})"
            ) from None
        raise
    if watch.interrupted:  # the answer came as the interrupt did: the run stops all the same
        control.check()
        raise DeadlineExceeded("the run's deadline passed")
    return response


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _count_usage(result: AgentResult, response: Any) -> None:
    usage = getattr(response, "usage", None)
    if usage is not None:
        result.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
        result.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)


def _check_budget(result: AgentResult, max_tokens: int) -> None:
    used = result.prompt_tokens + result.completion_tokens
    if used > max_tokens:
        raise AgentError(
            f"the run used {used} tokens, more than [model] max_tokens_per_run = {max_tokens}"
        )


def _assistant_message(message: Any, calls: list[Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"role": "assistant", "content": message.content}
    if calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": _function(call).get("name", ""),
                    "arguments": _function(call).get("arguments", ""),
                },
            }
            for call in calls
        ]
    return entry


def _function(call: Any) -> dict[str, str]:
    function = getattr(call, "function", None)
    if function is None:  # a non-function (custom) tool call: no name we know
        return {"name": str(getattr(call, "type", "unknown")), "arguments": ""}
    return {"name": function.name or "", "arguments": function.arguments or ""}


def _run_tool_call(call: Any, context: ToolContext) -> ToolResult:
    function = _function(call)
    raw = function["arguments"]
    try:
        args: Any = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):  # malformed, or nested too deeply to parse
        args = raw  # the Kernel refuses it as invalid, and audits it
    return kernel.invoke(function["name"], args, context)
