"""Permission checks against the most hostile patterns the parser accepts.

Each case times one check (best and worst of several repeats, microseconds) with patterns at the
parser's bounds: `*a*a…b` components (the most wildcards a component may hold) against long runs
of `a`, many `**` against paths as deep as a real path can be, and containment between two such
patterns. `python -m bench.permissions` prints the table; `make bench` adds it to
docs/benchmarks.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kernel.permissions import (
    MAX_PATH_COMPONENTS,
    MAX_PERMISSION_LENGTH,
    MAX_WILDCARDS_PER_COMPONENT,
    CapabilitySet,
    parse_permission,
    path_matches,
)

REPEATS = 5
PATH_MAX = 4096  # the longest path the filesystem tools accept

HOSTILE_COMPONENT = "*a" * MAX_WILDCARDS_PER_COMPONENT + "b"


def _fill(prefix: str, unit: str, limit: int) -> str:
    """`prefix` plus as many `unit`s as fit in `limit` characters."""
    return prefix + unit * ((limit - len(prefix)) // len(unit))


def cases() -> list[tuple[str, Callable[[], object]]]:
    one_component = parse_permission(f"filesystem:read:/d/{HOSTILE_COMPONENT}").value
    alternating = "/" + "/".join(["**", "*a*a*a*a*a*a*a*a"] * (MAX_PATH_COMPONENTS // 2))
    alternating = parse_permission(f"filesystem:read:{alternating}").value
    stars_then_b = parse_permission(
        "filesystem:read:/" + "/".join(["**"] + ["*"] * (MAX_PATH_COMPONENTS - 2) + ["b"])
    ).value
    long_component = _fill("/d/", "a", PATH_MAX)
    deep_path = _fill("/d", "/a", PATH_MAX)
    deep_long = _fill("/d", "/" + "a" * 60, PATH_MAX)
    pairs = (MAX_PATH_COMPONENTS - 2) // 2
    hostile_long = parse_permission(
        "filesystem:read:/d/" + "/".join(["**", "*a*a*a*a*a*a*a*a"] * pairs) + "/**"
    )
    hostile_other = parse_permission(
        "filesystem:read:/d/" + "/".join(["*a*a*a*a*a*a*a*ab", "**"] * pairs) + "/b"
    )
    widest_required = parse_permission(
        "filesystem:read:/d/" + "/".join(["a" * 14] * (MAX_PATH_COMPONENTS - 1))
    )
    grant = CapabilitySet(
        [hostile_long, hostile_other, f"filesystem:read:{alternating}", "filesystem:read:/x/**"]
    )
    return [
        ("`*a` x8 + `b` vs one 4,093-character component", lambda: path_matches(one_component, long_component)),
        ("32 x (`**`, `*a*a*a*a*a*a*a*a`) vs 2,047 components", lambda: path_matches(alternating, deep_path)),
        ("32 x (`**`, `*a*a*a*a*a*a*a*a`) vs 66 components of 60 `a`", lambda: path_matches(alternating, deep_long)),
        ("`**` + 62 x `*` + `b` vs 2,047 components", lambda: path_matches(stars_then_b, deep_path)),
        ("containment: two 64-component `**`/`*a…` patterns, both ways", lambda: (hostile_long.contains(hostile_other), hostile_other.contains(hostile_long))),
        ("a 4-pattern hostile set allows a 64-component, 1,000-character path", lambda: grant.allows(widest_required)),
    ]  # fmt: skip


def measure() -> list[tuple[str, float, float]]:
    """(case, best µs, worst µs) for every case."""
    rows = []
    for name, check in cases():
        samples = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            check()
            samples.append((time.perf_counter() - started) * 1e6)
        rows.append((name, min(samples), max(samples)))
    return rows


def section(rows: list[tuple[str, float, float]] | None = None) -> list[str]:
    """The Markdown lines of the permission-check table."""
    rows = measure() if rows is None else rows
    lines = [
        "",
        "## Permission checks with hostile patterns",
        "",
        f"One check each, best and worst of {REPEATS} (`bench/permissions.py`). Patterns are at "
        f"the parser's bounds: {MAX_PERMISSION_LENGTH} characters, {MAX_PATH_COMPONENTS} "
        f"components, {MAX_WILDCARDS_PER_COMPONENT} `*` per component; paths up to "
        f"{PATH_MAX} characters.",
        "",
        "| case | best (µs) | worst (µs) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {best:,.0f} | {worst:,.0f} |" for name, best, worst in rows]
    return lines


def main() -> None:
    print("\n".join(section()))


if __name__ == "__main__":
    main()
