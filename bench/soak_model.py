"""The soak's model: the scripted server answering at random, the way a real provider misbehaves.

Most answers come after a short random delay; some ask for a `shell echo <nonce>` tool call
(the nonce lets the soak match each call the model saw answered to its audit row); some are HTTP
500s, dropped connections, or answers held longer than a run's timeout.
"""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from kernel.testing.model_server import ScriptedModelServer, Turn

# Prompts containing this get slow answers (the API user's schedules, which it cancels).
SLOW_MARK = "[slow]"


@dataclass
class ModelMix:
    """Probabilities of each behaviour per request (the rest: an answer after a short delay)."""

    tool_call: float = 0.10
    error: float = 0.04
    drop: float = 0.02
    hang: float = 0.01
    mean_delay_secs: float = 0.12
    max_delay_secs: float = 2.0
    hang_secs: float = 8.0


@dataclass
class SoakModel:
    """The responder and what it saw: tool calls issued, and those whose result came back."""

    mix: ModelMix
    seed: int
    issued: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.server = ScriptedModelServer(responder=self.respond)

    def respond(self, body: dict[str, Any]) -> Turn:
        messages = body.get("messages") or [{}]
        last = messages[-1]
        with self._lock:
            self.requests += 1
            if last.get("role") == "tool":
                self.answered.add(str(last.get("tool_call_id", "")))
                return self._count("after_tool", {"content": f"done: the echo ran {_nonce()}"})
            draw = self._rng.random()
            delay = min(
                self.mix.max_delay_secs, self._rng.expovariate(1 / self.mix.mean_delay_secs)
            )
            if any(SLOW_MARK in str(m.get("content")) for m in messages if m.get("role") == "user"):
                delay = self._rng.uniform(1.0, 3.0)  # long enough for an API cancel to meet it
            mix = self.mix
            if draw < mix.tool_call:
                nonce = _nonce()
                call_id = f"call_{nonce}"
                self.issued.add(call_id)
                call = {
                    "id": call_id,
                    "name": "shell",
                    "arguments": {"command": "echo", "args": [nonce]},
                }
                return self._count("tool_call", {"tool_calls": [call], "delay": delay})
            draw -= mix.tool_call
            if draw < mix.error:
                return self._count("error", {"status": 500, "delay": delay})
            draw -= mix.error
            if draw < mix.drop:
                return self._count("drop", {"drop": True, "delay": delay})
            draw -= mix.drop
            if draw < mix.hang:
                return self._count("hang", {"content": "too late", "delay": mix.hang_secs})
            # Each answer is unique, so each result message is (the soak counts deliveries of a
            # WhatsApp message by its text).
            return self._count("answer", {"content": f"ok {_nonce()}", "delay": delay})

    def _count(self, kind: str, turn: Turn) -> Turn:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return turn


def _nonce() -> str:
    return uuid.uuid4().hex[:16]
