"""Permission strings and capability sets.

A permission is a string such as `filesystem:read:/srv/notes/**`, `net:*.example.com`,
`shell:ls,cat`, `schedule:create` or `notify:whatsapp`. `parse_permission` turns one into a
typed value or raises `InvalidPermission` with a message; nothing malformed is ever dropped or
widened. Containment is conservative: what the rules cannot prove is "not contained".

This module is pure Python (no Django) so the config loader can use it before settings exist.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from kernel.netpolicy import ip_literal, non_public_reason

SCHEDULE_ACTIONS = frozenset({"create", "list", "update", "delete", "cancel"})
NOTIFY_CHANNELS = frozenset({"whatsapp", "webhook", "console"})
# Bounds on what a permission may be, so matching stays cheap whatever a user writes.
MAX_PERMISSION_LENGTH = 1024
MAX_PATH_COMPONENTS = 64
MAX_WILDCARDS_PER_COMPONENT = 8

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SHELL_COMMAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class InvalidPermission(ValueError):
    """A permission string that cannot be parsed; the message says why."""


@dataclass(frozen=True)
class Permission:
    """One parsed permission. `kind` is filesystem, net, shell, schedule or notify."""

    kind: str
    action: str  # read/write for filesystem; action or channel; "" for net and shell
    value: str  # path glob (home expanded), host glob, or comma-joined sorted commands
    text: str  # canonical string form

    def __str__(self) -> str:
        return self.text

    def contains(self, other: Permission) -> bool:
        """True when everything `other` permits is provably permitted by this permission."""
        if self.kind != other.kind:
            return False
        if self.kind == "filesystem":
            return self.action == other.action and _path_contains(self.value, other.value)
        if self.kind == "net":
            return _host_contains(self.value, other.value)
        if self.kind == "shell":
            if self.value == "*":
                return True
            if other.value == "*":
                return False
            return set(other.value.split(",")) <= set(self.value.split(","))
        # schedule and notify: "*" covers every action/channel.
        return self.action == "*" or self.action == other.action


def parse_permission(text: object) -> Permission:
    """Parse and validate one permission string."""
    if not isinstance(text, str):
        raise InvalidPermission(f"a permission must be a string, not {type(text).__name__}")
    if not text:
        raise InvalidPermission("a permission must not be empty")
    if len(text) > MAX_PERMISSION_LENGTH:
        raise InvalidPermission(f"a permission must be at most {MAX_PERMISSION_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InvalidPermission(f"{text!r}: control characters are not allowed")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise InvalidPermission(f"{text!r}: lone surrogate characters are not allowed")
    kind, sep, rest = text.partition(":")
    if not sep:
        raise InvalidPermission(
            f"{text!r}: expected <kind>:<value>, where kind is one of "
            "filesystem, net, shell, schedule, notify"
        )
    parser = _PARSERS.get(kind)
    if parser is None:
        raise InvalidPermission(
            f"{text!r}: unknown permission kind {kind!r} "
            "(expected filesystem, net, shell, schedule or notify)"
        )
    return parser(text, rest)


def _parse_filesystem(text: str, rest: str) -> Permission:
    action, sep, glob = rest.partition(":")
    if action not in ("read", "write") or not sep:
        raise InvalidPermission(
            f"{text!r}: expected filesystem:read:<glob> or filesystem:write:<glob>"
        )
    if not glob:
        raise InvalidPermission(f"{text!r}: the path glob is empty")
    if glob == "~" or glob.startswith("~/"):
        glob = os.path.expanduser("~") + glob[1:]
    if not glob.startswith("/"):
        raise InvalidPermission(f"{text!r}: the path glob must be absolute (start with / or ~/)")
    components = [c for c in glob.split("/") if c]
    if any(c in ("..", ".") for c in components):
        raise InvalidPermission(f"{text!r}: path globs must not contain '..' or '.' components")
    if len(components) > MAX_PATH_COMPONENTS:
        raise InvalidPermission(
            f"{text!r}: a path glob may have at most {MAX_PATH_COMPONENTS} components"
        )
    for component in components:
        if "**" in component and component != "**":
            raise InvalidPermission(f"{text!r}: '**' must be a whole path component")
        if component.count("*") > MAX_WILDCARDS_PER_COMPONENT:
            raise InvalidPermission(
                f"{text!r}: a path component may have at most {MAX_WILDCARDS_PER_COMPONENT} "
                "'*' wildcards"
            )
    # `**/**` means the same as `**`; collapsing keeps matching linear in the number of `**`.
    collapsed: list[str] = []
    for component in components:
        if not (component == "**" and collapsed and collapsed[-1] == "**"):
            collapsed.append(component)
    normalised = "/" + "/".join(collapsed)
    return Permission("filesystem", action, normalised, f"filesystem:{action}:{normalised}")


def _parse_net(text: str, rest: str) -> Permission:
    host = rest.lower()
    if not host:
        raise InvalidPermission(f"{text!r}: the host is empty")
    if host == "*":
        return Permission("net", "", "*", "net:*")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        canonical = f"[{address}]" if address.version == 6 else str(address)
        return Permission("net", "", canonical, f"net:{canonical}")
    labels = host.split(".")
    body = labels[1:] if labels[0] == "*" else labels
    if not body or len(host) > 253 or not all(_HOST_LABEL.match(label) for label in body):
        raise InvalidPermission(
            f"{text!r}: expected a host name, '*.<domain>', an IP address or '*' "
            "(no ports, paths or schemes)"
        )
    if body[-1].isdigit() or _looks_numeric(body[-1]):
        # `2130706433`, `0x7f.1` or `*.0.1` would name IP addresses in another notation.
        raise InvalidPermission(
            f"{text!r}: a host name cannot end in a numeric label; write IP addresses "
            "in standard dotted or bracketed form"
        )
    if labels[0] == "*" and len(body) < 2:
        raise InvalidPermission(
            f"{text!r}: a wildcard must cover a domain with at least two labels"
        )
    return Permission("net", "", host, f"net:{host}")


def _looks_numeric(label: str) -> bool:
    return bool(re.fullmatch(r"(0x[0-9a-f]*|[0-9]+)", label))


def _parse_shell(text: str, rest: str) -> Permission:
    if rest == "*":
        return Permission("shell", "", "*", "shell:*")
    commands = rest.split(",")
    for command in commands:
        if not _SHELL_COMMAND.match(command):
            raise InvalidPermission(
                f"{text!r}: {command!r} is not an executable name "
                "(letters, digits, '.', '_', '+', '-'; no paths)"
            )
    value = ",".join(sorted(set(commands)))
    return Permission("shell", "", value, f"shell:{value}")


def _parse_named(kind: str, allowed: frozenset[str]):  # type: ignore[no-untyped-def]
    def parse(text: str, rest: str) -> Permission:
        if rest != "*" and rest not in allowed:
            choices = ", ".join(sorted(allowed))
            raise InvalidPermission(f"{text!r}: expected {kind}:* or {kind}:<one of {choices}>")
        return Permission(kind, rest, "", f"{kind}:{rest}")

    return parse


_PARSERS = {
    "filesystem": _parse_filesystem,
    "net": _parse_net,
    "shell": _parse_shell,
    "schedule": _parse_named("schedule", SCHEDULE_ACTIONS),
    "notify": _parse_named("notify", NOTIFY_CHANNELS),
}


def canonical_list(items: Iterable[object]) -> tuple[list[str], dict[int, str]]:
    """The canonical forms of `items` in order without repeats, and each bad item's error by
    its index. Callers refuse the whole list when any item is bad: nothing is dropped."""
    canonical: list[str] = []
    errors: dict[int, str] = {}
    for index, item in enumerate(items):
        try:
            text = parse_permission(item).text
        except InvalidPermission as exc:
            errors[index] = str(exc)
            continue
        if text not in canonical:
            canonical.append(text)
    return canonical, errors


# --- matching and containment -----------------------------------------------------------------
#
# Both are linear-ish whatever the patterns, and recursion-free: within one component a `*`-only
# glob is matched by placing its literal pieces greedily left to right (`str.find`; leftmost is
# always right for `*`), O(len(text) * len(pattern)) at worst; across components `**` is
# simulated as a set of pattern positions advanced one path component at a time (an NFA), so a
# path of n components against a pattern of m costs at most n * m component matches. Nothing
# backtracks, and a deep path is a loop, not a call stack.

_STAR = "\x00"  # stands for a `*` of the contained pattern; only a `*` of the container matches it


def _component_match(pattern: str, text: str) -> bool:
    """True when `text` matches the one-component glob `pattern` (`*`: any run of characters)."""
    if "*" not in pattern:
        return pattern == text
    if pattern == "*":
        return True
    head, *middle, tail = pattern.split("*")
    if len(head) + len(tail) > len(text) or not text.startswith(head) or not text.endswith(tail):
        return False
    position, end = len(head), len(text) - len(tail)
    for piece in middle:
        if piece:
            found = text.find(piece, position, end)
            if found < 0:
                return False
            position = found + len(piece)
    return True


def _component_contains(container: str, contained: str) -> bool:
    if contained == "**":
        return False  # across components: only a `**` of the container covers it
    if container == contained or container == "*":
        return True
    # A `*` in the contained component may stand for any text; it is covered only if a `*` of
    # the container absorbs it, which the placeholder character enforces.
    return _component_match(container, contained.replace("*", _STAR))


def _globs_match(
    pattern: tuple[str, ...], parts: Iterable[str], component_ok: Callable[[str, str], bool]
) -> bool:
    """Whole-component matching of `parts` against `pattern`, whose `**` matches any number of
    components (each accepted by a `**` whatever `component_ok` says). A set simulation: bit i
    of `states` says "the first i pattern components have matched the parts read so far"."""
    accept = 1 << len(pattern)
    globstars = 0
    by_component: dict[str, int] = {}  # each distinct component: the positions holding it
    for index, head in enumerate(pattern):
        if head == "**":
            globstars |= 1 << index
        else:
            by_component[head] = by_component.get(head, 0) | 1 << index
    states = _after_globstars(1, globstars)
    for part in parts:
        following = states & globstars  # a `**` consumes this part and stays
        for head, positions in by_component.items():
            live = states & positions
            if live and component_ok(head, part):
                following |= live << 1
        if not following:
            return False
        states = _after_globstars(following, globstars)
    return bool(states & accept)


def _after_globstars(states: int, globstars: int) -> int:
    """`states` plus every position reached by letting `**` components match nothing."""
    while True:
        widened = states | ((states & globstars) << 1)
        if widened == states:
            return states
        states = widened


def _split(path: str) -> tuple[str, ...]:
    return tuple(c for c in path.split("/") if c)


def _path_contains(container: str, contained: str) -> bool:
    return _globs_match(_split(container), _split(contained), _component_contains)


def path_matches(glob: str, path: str) -> bool:
    """True when the concrete absolute `path` matches `glob` (a literal `*` in a name matches)."""
    return _globs_match(_split(glob), (c for c in path.split("/") if c), _component_match)


def _host_contains(container: str, contained: str) -> bool:
    """Host containment by http_fetch's own rule: a non-public IP address (`net:127.0.0.1`) is
    covered only by a permission naming it exactly, never by a wildcard (`net:*`)."""
    if container == contained:
        return True
    address = ip_literal(contained)
    if address is not None:
        return container == "*" and non_public_reason(address) is None
    if container == "*":
        return True
    if contained == "*" or not container.startswith("*."):
        return False
    suffix = container[1:]  # ".example.com"
    return contained.endswith(suffix) and len(contained) > len(suffix)


# --- sets ---------------------------------------------------------------------------------------


class CapabilitySet:
    """An immutable set of permissions with `allows` and `contains`."""

    __slots__ = ("_members",)

    def __init__(self, permissions: Iterable[Permission | str] = ()) -> None:
        members = []
        for item in permissions:
            members.append(item if isinstance(item, Permission) else parse_permission(item))
        self._members: tuple[Permission, ...] = tuple(dict.fromkeys(members))

    @classmethod
    def parse(cls, permissions: Iterable[object]) -> CapabilitySet:
        """Parse a list of strings, raising InvalidPermission for the first bad one."""
        return cls(parse_permission(item) for item in permissions)

    def __iter__(self) -> Iterator[Permission]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"CapabilitySet({self.as_strings()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CapabilitySet) and set(self._members) == set(other._members)

    def __hash__(self) -> int:
        return hash(frozenset(self._members))

    def as_strings(self) -> list[str]:
        return [p.text for p in self._members]

    def allows(self, required: Permission | str) -> bool:
        """True when some member covers `required`."""
        if isinstance(required, str):
            required = parse_permission(required)
        return any(member.contains(required) for member in self._members)

    def allows_exactly(self, required: Permission | str) -> bool:
        """True when `required` itself is a member (no wildcard of a member covers it)."""
        if isinstance(required, str):
            required = parse_permission(required)
        return required in self._members

    def contains(self, other: CapabilitySet | Iterable[Permission | str]) -> bool:
        """True when this set allows every member of `other`."""
        return not self.missing(other)

    def missing(self, other: CapabilitySet | Iterable[Permission | str]) -> list[Permission]:
        """The members of `other` that this set does not allow, in order."""
        other_set = other if isinstance(other, CapabilitySet) else CapabilitySet(other)
        return [p for p in other_set if not self.allows(p)]


# Executables that can run arbitrary other programs or code: granting one is as good as shell:*.
INTERPRETERS = frozenset(
    {
        "awk", "bash", "busybox", "dash", "env", "find", "gawk", "git", "lua", "make", "node",
        "nohup", "perl", "php", "python", "python3", "ruby", "sh", "ssh", "sudo", "timeout",
        "vi", "vim", "xargs", "zsh",
    }
)  # fmt: skip


def interpreters_in(permissions: Iterable[Permission]) -> list[str]:
    """The interpreter executables named by shell permissions (they amount to shell:*)."""
    found: list[str] = []
    for permission in permissions:
        if permission.kind == "shell" and permission.value != "*":
            found.extend(c for c in permission.value.split(",") if c in INTERPRETERS)
    return found
