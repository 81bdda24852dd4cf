"""The tool registry. A tool is one module in this package (or another app's module that calls
`register` from its `AppConfig.ready()`); `load_builtin_tools()` imports every module here.

A tool declares `name`, `description`, `parameters` (a JSON schema with
`additionalProperties: false`), `timeout_secs`, `required_permissions(args, context)` and
`run(args, context) -> str`. `run` raises `ToolError` for failures the model should read, and
`ToolPermissionDenied` when a later step (a redirect, say) needs a permission the run lacks.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import TYPE_CHECKING, Any, ClassVar

from kernel.permissions import Permission

if TYPE_CHECKING:
    from kernel.context import ToolContext


class ToolError(Exception):
    """A failure the model may read: the message must not leak secrets."""


class ToolPermissionDenied(ToolError):
    """A step of a running call needs a permission the context does not allow."""

    def __init__(self, missing: Permission, detail: str = "") -> None:
        message = f"permission denied: this needs {missing}"
        super().__init__(f"{message} ({detail})" if detail else message)
        self.missing = missing


class UnknownTool(LookupError):
    """No tool is registered under that name."""


class Tool:
    """Base class of tools; subclasses set the class attributes and implement two methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[dict[str, Any]]
    timeout_secs: ClassVar[float] = 30

    def required_permissions(self, args: dict[str, Any], context: ToolContext) -> list[Permission]:
        raise NotImplementedError

    def run(self, args: dict[str, Any], context: ToolContext) -> str:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The Chat Completions `tools` entry for this tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


_registry: dict[str, Tool] = {}
_lock = threading.Lock()
# The `tools` list every model request sends, built once per registry state (see `tool_specs`).
_specs: list[dict[str, Any]] | None = None


def register(tool: Tool | type[Tool]) -> Any:
    """Register a tool (an instance, or a class, which is instantiated); usable as a decorator.

    Registering a second, different tool under a taken name is an error; registering the same
    class again (a module imported twice) replaces it.
    """
    instance = tool() if isinstance(tool, type) else tool
    if instance.parameters.get("additionalProperties", True) is not False:
        raise ValueError(f"tool {instance.name!r}: parameters must set additionalProperties: false")
    with _lock:
        existing = _registry.get(instance.name)
        if existing is not None and type(existing).__qualname__ != type(instance).__qualname__:
            raise ValueError(f"a different tool is already registered as {instance.name!r}")
        _registry[instance.name] = instance
        _forget_specs()
    return tool


def unregister(name: str) -> None:
    """Remove a tool (tests register throwaway tools)."""
    with _lock:
        _registry.pop(name, None)
        _forget_specs()


def get_tool(name: str) -> Tool:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownTool(name) from None


def all_tools() -> list[Tool]:
    with _lock:
        return sorted(_registry.values(), key=lambda tool: tool.name)


def tool_specs() -> list[dict[str, Any]]:
    """Every registered tool's Chat Completions spec, sorted by name: built once and shared
    until a tool is registered or removed. Callers must not change it."""
    global _specs
    with _lock:
        if _specs is None:
            tools = sorted(_registry.values(), key=lambda tool: tool.name)
            _specs = [tool.spec() for tool in tools]
        return _specs


def _forget_specs() -> None:
    global _specs
    _specs = None


def load_builtin_tools() -> None:
    """Import every module of this package, so each registers its tool."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
