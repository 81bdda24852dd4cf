"""Permission matching and containment stay cheap whatever the patterns: hostile globs, many
`**`, deep paths. Costs are asserted by counting component comparisons (never by timing: timings
are in `make bench`); the file's timeout catches a regression to backtracking."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kernel import permissions
from kernel.permissions import (
    MAX_PATH_COMPONENTS,
    MAX_PERMISSION_LENGTH,
    MAX_WILDCARDS_PER_COMPONENT,
    CapabilitySet,
    InvalidPermission,
    parse_permission,
    path_matches,
)

pytestmark = pytest.mark.timeout(30)

HOSTILE_COMPONENT = "*a" * MAX_WILDCARDS_PER_COMPONENT + "b"  # `*a*a*a…b`: backtracks in `re`
HOSTILE = [
    f"filesystem:read:/d/{HOSTILE_COMPONENT}",
    f"filesystem:read:/d/**/{HOSTILE_COMPONENT}/**/{HOSTILE_COMPONENT}",
    "filesystem:read:/" + "/".join(["**", "*a*a*a*a*"] * (MAX_PATH_COMPONENTS // 2)),
    "filesystem:read:/" + "/".join(["**"] + ["*"] * (MAX_PATH_COMPONENTS - 2) + ["b"]),
]


@pytest.fixture
def comparisons(monkeypatch) -> dict[str, int]:
    """Counts the component comparisons of matching and containment."""
    counts = {"match": 0, "contains": 0}

    def counting(name: str, real: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
        def wrapper(pattern: str, text: str) -> bool:
            counts[name] += 1
            return real(pattern, text)

        return wrapper

    monkeypatch.setattr(
        permissions, "_component_match", counting("match", permissions._component_match)
    )
    monkeypatch.setattr(
        permissions, "_component_contains", counting("contains", permissions._component_contains)
    )
    return counts


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_patterns_match_deep_paths_in_at_most_n_times_m_comparisons(
    comparisons: dict[str, int], text: str
) -> None:
    glob = parse_permission(text).value
    pattern_components = len([c for c in glob.split("/") if c])
    for depth in (10, 500, 5000):
        comparisons["match"] = 0
        path = "/d" + "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * depth
        path_matches(glob, path)
        assert comparisons["match"] <= (depth + 1) * pattern_components


@pytest.mark.parametrize("text", HOSTILE)
def test_containment_of_hostile_patterns_is_bounded_by_their_sizes(
    comparisons: dict[str, int], text: str
) -> None:
    hostile = parse_permission(text)
    others = [parse_permission(other) for other in HOSTILE]
    for other in others:
        comparisons["contains"] = 0
        hostile.contains(other)
        other.contains(hostile)
        assert comparisons["contains"] <= 2 * (MAX_PATH_COMPONENTS + 1) ** 2


def test_a_hostile_pattern_inside_a_wide_grant_is_still_decided_correctly() -> None:
    grant = CapabilitySet(["filesystem:read:/d/**"])
    hostile = parse_permission(f"filesystem:read:/d/{HOSTILE_COMPONENT}")
    assert grant.contains([hostile])
    session = CapabilitySet([hostile])
    assert session.allows("filesystem:read:/d/" + "a" * 900 + "ab")
    assert not session.allows("filesystem:read:/d/" + "a" * 900)
    assert not session.allows("filesystem:read:/d/" + "a" * 500 + "/b")


def test_a_path_deeper_than_any_recursion_limit_is_matched_without_recursion() -> None:
    deep = "/x" * 100_000
    assert path_matches("/**", deep)
    assert path_matches("/**/x/**/x", deep)
    assert not path_matches("/**/y", deep)
    assert parse_permission("filesystem:read:/**").contains(
        parse_permission("filesystem:read:" + "/x" * (MAX_PATH_COMPONENTS - 1) + "/**")
    )


@pytest.mark.parametrize(
    ("text", "bound"),
    [
        ("filesystem:read:/d/" + "*a" * (MAX_WILDCARDS_PER_COMPONENT + 1), "'*' wildcards"),
        ("filesystem:write:/" + "/".join(["a"] * (MAX_PATH_COMPONENTS + 1)), "components"),
        ("filesystem:read:/" + "/".join(["**", "x"] * 40), "components"),
        ("filesystem:read:/" + "a" * 2000, "characters"),
        ("net:" + "a" * 2000 + ".com", "characters"),
    ],
)
def test_patterns_past_a_bound_are_refused_with_a_message_naming_it(text: str, bound: str) -> None:
    with pytest.raises(InvalidPermission, match=bound):
        parse_permission(text)


def test_each_bound_admits_its_limit_and_refuses_one_more() -> None:
    prefix = "filesystem:read:/d/"
    at_length = prefix + "a" * (MAX_PERMISSION_LENGTH - len(prefix))
    assert parse_permission(at_length).value.endswith("a")
    with pytest.raises(InvalidPermission, match="characters"):
        parse_permission(at_length + "a")
    parse_permission(prefix + "*a" * MAX_WILDCARDS_PER_COMPONENT)
    with pytest.raises(InvalidPermission, match="'\\*' wildcards"):
        parse_permission(prefix + "*a" * (MAX_WILDCARDS_PER_COMPONENT + 1))
    parse_permission("filesystem:read:/" + "/".join(["a"] * MAX_PATH_COMPONENTS))
    with pytest.raises(InvalidPermission, match="components"):
        parse_permission("filesystem:read:/" + "/".join(["a"] * (MAX_PATH_COMPONENTS + 1)))


@pytest.mark.django_db
def test_the_schedules_api_answers_400_naming_the_bound(make_user, api_client_for) -> None:
    hostile = "filesystem:read:/d/" + "*a" * (MAX_WILDCARDS_PER_COMPONENT + 4) + "b"
    client = api_client_for(make_user(grant=["filesystem:read:/d/**", "schedule:*"]))
    body = {
        "name": "hostile",
        "prompt": "p",
        "schedule_type": "interval",
        "interval_secs": 3600,
        "capabilities": [hostile],
    }
    response = client.post("/api/v1/schedules", json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert f"at most {MAX_WILDCARDS_PER_COMPONENT} '*' wildcards" in json.dumps(response.json())


@pytest.mark.django_db
def test_the_chat_api_answers_400_naming_the_bound(make_user, api_client_for, model_server) -> None:
    deep = "filesystem:read:/" + "/".join(["*"] * (MAX_PATH_COMPONENTS + 1))
    client = api_client_for(make_user(grant=["filesystem:read:/**"]))
    response: Any = client.post(
        "/api/v1/chat",
        json.dumps({"message": "hi", "capabilities": [deep]}),
        content_type="application/json",
    )
    assert response.status_code == 400
    assert f"at most {MAX_PATH_COMPONENTS} components" in json.dumps(response.json())
