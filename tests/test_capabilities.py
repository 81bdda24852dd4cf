"""Permission strings and capability sets: parsing, allows, contains (examples and properties)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.permissions import (
    CapabilitySet,
    InvalidPermission,
    Permission,
    interpreters_in,
    parse_permission,
    path_matches,
)


def contains(container: str, contained: str) -> bool:
    return parse_permission(container).contains(parse_permission(contained))


# --- examples: the containment table of DESIGN.md --------------------------------------------


@pytest.mark.parametrize(
    ("container", "contained"),
    [
        ("filesystem:read:/a/**", "filesystem:read:/a/b/**"),
        ("filesystem:read:/a/**", "filesystem:read:/a/b/c.txt"),
        ("filesystem:read:/a/*", "filesystem:read:/a/b"),
        ("filesystem:read:/a/*/c", "filesystem:read:/a/b/c"),
        ("filesystem:read:/a/*.txt", "filesystem:read:/a/x.txt"),
        ("filesystem:read:/a/*.txt", "filesystem:read:/a/*.txt"),
        ("filesystem:read:/a/**/c", "filesystem:read:/a/x/y/c"),
        ("filesystem:read:/**", "filesystem:read:/etc/passwd"),
        ("filesystem:write:/a/b", "filesystem:write:/a/b/"),
        ("net:*.a.com", "net:x.a.com"),
        ("net:*.a.com", "net:*.x.a.com"),
        ("net:*.a.com", "net:y.x.a.com"),
        ("net:*", "net:anything.example"),
        ("net:*", "net:93.184.216.34"),
        ("net:10.0.0.1", "net:10.0.0.1"),
        ("net:A.COM", "net:a.com"),
        ("shell:*", "shell:ls,cat"),
        ("shell:ls,cat,grep", "shell:cat,ls"),
        ("shell:ls,cat", "shell:ls"),
        ("schedule:*", "schedule:create"),
        ("schedule:*", "schedule:*"),
        ("notify:*", "notify:whatsapp"),
        ("notify:webhook", "notify:webhook"),
    ],
)
def test_the_design_tables_containments_hold(container: str, contained: str) -> None:
    assert contains(container, contained)


@pytest.mark.parametrize(
    ("container", "contained"),
    [
        ("filesystem:read:/a/*", "filesystem:read:/a/b/c"),  # * stays within one component
        ("filesystem:read:/a/*", "filesystem:read:/a/**"),
        ("filesystem:read:/a/*.txt", "filesystem:read:/a/x/y.txt"),
        ("filesystem:read:/a/b*", "filesystem:read:/a/*"),
        ("filesystem:read:/a/b/**", "filesystem:read:/a/**"),
        ("filesystem:read:/a/**", "filesystem:read:/ab/c"),  # whole components only
        ("filesystem:read:/a/**", "filesystem:write:/a/b"),  # write is not read
        ("filesystem:write:/a/**", "filesystem:read:/a/b"),
        ("filesystem:read:/a/**/c", "filesystem:read:/a/**"),
        ("net:*.a.com", "net:a.com"),
        ("net:*.a.com", "net:xa.com"),
        ("net:*.a.com", "net:*"),
        ("net:x.a.com", "net:*.a.com"),
        ("net:a.com", "net:b.a.com"),
        ("net:*.b.com", "net:a.com"),
        ("net:*.a.com", "net:10.0.0.1"),
        ("net:*", "net:10.0.0.1"),  # a non-public address: only an exact grant covers it
        ("net:*", "net:127.0.0.1"),
        ("net:*", "net:[::1]"),
        ("net:*", "net:169.254.169.254"),
        ("shell:ls", "shell:ls,rm"),
        ("shell:ls,cat", "shell:*"),
        ("schedule:create", "schedule:*"),
        ("schedule:create", "schedule:delete"),
        ("notify:whatsapp", "notify:*"),
        ("notify:*", "schedule:create"),
    ],
)
def test_what_cannot_be_proven_is_not_contained(container: str, contained: str) -> None:
    assert not contains(container, contained)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "filesystem",
        "filesystem:read",
        "filesystem:read:",
        "filesystem:exec:/a",
        "filesystem:read:relative/path",
        "filesystem:read:/a/../etc",
        "filesystem:read:/a/./b",
        "filesystem:read:/a/b**",
        "filesystem:read:/a/***",
        "net:",
        "net:http://a.com",
        "net:a.com:443",
        "net:a.com/path",
        "net:*.com",
        "net:a*.com",
        "net:-a.com",
        "net:2130706433",
        "net:0x7f.0.0.1",
        "net:127.1",
        "net:*.0.0.1",
        "shell:",
        "shell:/bin/ls",
        "shell:ls;rm",
        "shell:ls,,rm",
        "shell:../ls",
        "schedule:explode",
        "schedule:",
        "notify:sms",
        "telepathy:all",
        "net:a.com\n",
        "net:a.com\x00",
        "x" * 2000,
    ],
)
def test_malformed_permissions_are_refused_with_a_message(text: str) -> None:
    with pytest.raises(InvalidPermission) as info:
        parse_permission(text)
    assert str(info.value)


def test_non_strings_are_refused() -> None:
    for value in (None, 5, ["net:a.com"], {"net": "a.com"}):
        with pytest.raises(InvalidPermission):
            parse_permission(value)


def test_canonical_forms_are_stable() -> None:
    assert parse_permission("shell:ls,cat,ls").text == "shell:cat,ls"
    assert parse_permission("net:API.Example.COM").text == "net:api.example.com"
    assert parse_permission("net:[::1]").text == "net:[::1]"
    assert parse_permission("net:::1").text == "net:[::1]"
    assert parse_permission("filesystem:read:/a//b/").text == "filesystem:read:/a/b"
    assert parse_permission("filesystem:read:/a/**/**/b").text == "filesystem:read:/a/**/b"


def test_tilde_is_the_server_users_home() -> None:
    home = os.path.expanduser("~")
    assert parse_permission("filesystem:read:~/notes/**").value == f"{home}/notes/**"


def test_a_host_wildcard_never_covers_an_ip_address() -> None:
    assert not CapabilitySet(["net:*.a.com"]).allows("net:10.0.0.1")
    assert CapabilitySet(["net:10.0.0.1"]).allows("net:10.0.0.1")


def test_a_set_allows_what_one_member_covers() -> None:
    grant = CapabilitySet(["net:*.a.com", "filesystem:read:/srv/**"])
    assert grant.allows("net:x.a.com")
    assert grant.allows(parse_permission("filesystem:read:/srv/notes/a.md"))
    assert not grant.allows("net:a.com")
    assert not grant.allows("shell:ls")


def test_missing_lists_exactly_the_members_not_contained_in_order() -> None:
    grant = CapabilitySet(["net:*.a.com", "shell:ls,cat"])
    wanted = CapabilitySet(["shell:rm", "net:x.a.com", "net:a.com", "shell:ls"])
    assert [p.text for p in grant.missing(wanted)] == ["shell:rm", "net:a.com"]
    assert not grant.contains(wanted)
    assert grant.contains(["net:x.a.com", "shell:cat"])


def test_allows_exactly_needs_the_member_itself() -> None:
    grant = CapabilitySet(["net:*", "net:localhost"])
    assert grant.allows_exactly("net:localhost")
    assert not grant.allows_exactly("net:127.0.0.1")


def test_path_matches_concrete_paths_by_whole_components() -> None:
    assert path_matches("/a/**", "/a/b/c")
    assert path_matches("/a/*.txt", "/a/b.txt")
    assert not path_matches("/a/*.txt", "/a/b/c.txt")
    assert not path_matches("/a/b", "/a/bc")
    assert path_matches("/a/*", "/a/**")  # a file literally named ** is just a name


def test_interpreters_are_flagged() -> None:
    found = interpreters_in(CapabilitySet(["shell:ls,python3,find", "shell:*"]))
    assert sorted(found) == ["find", "python3"]


def test_many_double_stars_stay_fast() -> None:
    pattern = "filesystem:read:" + "/**/a" * 31 + "/b"
    path = "filesystem:read:" + "/a" * 62 + "/c"
    assert not CapabilitySet([pattern]).allows(path)
    assert path_matches(pattern.split(":", 2)[2], "/a" * 200 + "/b")
    assert not path_matches(pattern.split(":", 2)[2], "/a" * 200 + "/c")


# --- properties ---------------------------------------------------------------------------------

_COMPONENTS = st.sampled_from(
    ["a", "b", "ab", "ba", "*", "a*", "*a", "b*", "*b", "*a*", "a*b", "**"]
)
_NAMES = st.sampled_from(["a", "b", "ab", "ba", "aab", "bab"])


def _glob(components: list[str]) -> str:
    return "/" + "/".join(components)


path_globs = st.lists(_COMPONENTS, max_size=4).map(_glob)
concrete_paths = st.lists(_NAMES, max_size=5).map(_glob)
host_patterns = st.one_of(
    st.just("*"),
    st.lists(st.sampled_from(["a", "b", "x"]), min_size=2, max_size=4).flatmap(
        lambda labels: st.sampled_from([".".join(labels), "*." + ".".join(labels)])
    ),
    st.sampled_from(["10.0.0.1", "[::1]", "93.184.216.34"]),
)
concrete_hosts = st.one_of(
    st.lists(st.sampled_from(["a", "b", "x"]), min_size=1, max_size=5).map(".".join),
    st.sampled_from(["10.0.0.1", "[::1]", "93.184.216.34"]),
)
shell_values = st.one_of(
    st.just("*"),
    st.sets(st.sampled_from(["ls", "cat", "rm", "git"]), min_size=1).map(",".join),
)


def _net(host: str) -> str:
    return f"net:{host}"


permissions = st.one_of(
    st.tuples(st.sampled_from(["read", "write"]), path_globs).map(
        lambda t: f"filesystem:{t[0]}:{t[1]}"
    ),
    host_patterns.map(_net).filter(lambda t: _valid(t)),
    shell_values.map(lambda v: f"shell:{v}"),
    st.sampled_from(["*", "create", "list", "update", "delete", "cancel"]).map(
        lambda a: f"schedule:{a}"
    ),
    st.sampled_from(["*", "whatsapp", "webhook", "console"]).map(lambda c: f"notify:{c}"),
)
concrete_permissions = st.one_of(
    st.tuples(st.sampled_from(["read", "write"]), concrete_paths).map(
        lambda t: f"filesystem:{t[0]}:{t[1]}"
    ),
    concrete_hosts.map(_net).filter(lambda t: _valid(t)),
    st.sets(st.sampled_from(["ls", "cat", "rm", "git"]), min_size=1).map(
        lambda s: "shell:" + ",".join(s)
    ),
    st.sampled_from(["create", "list", "update", "delete", "cancel"]).map(
        lambda a: f"schedule:{a}"
    ),
    st.sampled_from(["whatsapp", "webhook", "console"]).map(lambda c: f"notify:{c}"),
)
capability_sets = st.lists(permissions, max_size=4).map(CapabilitySet)


@st.composite
def narrowed(draw: st.DrawFn, text: str) -> str:
    """A permission the rules can prove is inside `text` (so containment is exercised)."""
    permission = parse_permission(text)
    if permission.kind == "filesystem":
        value = permission.value
        if value.endswith("**") and draw(st.booleans()):
            value = value[:-2].rstrip("/") + "/" + draw(_NAMES) + "/**"
        else:
            value = value.rstrip("/") + "".join(f"/{c}" for c in draw(st.lists(_NAMES, max_size=2)))
            if not value.endswith("**"):
                value = parse_permission(f"filesystem:read:{permission.value}").value
        return f"filesystem:{permission.action}:{value}"
    if permission.kind == "net":
        if permission.value == "*":
            host = draw(concrete_hosts)
            return f"net:{'93.184.216.34' if host in ('10.0.0.1', '[::1]') else host}"
        if permission.value.startswith("*."):
            label = draw(st.sampled_from(["a", "b", "*"]))
            return f"net:{label}.{permission.value[2:]}"
        return text
    if permission.kind == "shell":
        if permission.value == "*":
            return f"shell:{draw(st.sampled_from(['ls', 'cat,rm', '*']))}"
        commands = permission.value.split(",")
        return "shell:" + ",".join(draw(st.lists(st.sampled_from(commands), min_size=1)))
    action = permission.action
    if action == "*":
        choices = ["create", "list"] if permission.kind == "schedule" else ["console", "webhook"]
        action = draw(st.sampled_from([*choices, "*"]))
    return f"{permission.kind}:{action}"


@st.composite
def nested_sets(draw: st.DrawFn) -> tuple[CapabilitySet, CapabilitySet]:
    """A set and a set made of narrowed members of it, which it must contain."""
    big = draw(st.lists(permissions, min_size=1, max_size=4))
    small = [draw(narrowed(draw(st.sampled_from(big)))) for _ in range(draw(st.integers(1, 3)))]
    return CapabilitySet(big), CapabilitySet(small)


def _valid(text: str) -> bool:
    try:
        parse_permission(text)
    except InvalidPermission:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(capability_sets, capability_sets, st.lists(concrete_permissions, min_size=1, max_size=8))
def test_anything_a_contained_set_allows_the_containing_set_allows(
    big: CapabilitySet, small: CapabilitySet, probes: list[str]
) -> None:
    if big.contains(small):
        for probe in probes:
            if small.allows(probe):
                assert big.allows(probe), (big, small, probe)


@settings(max_examples=300, deadline=None)
@given(nested_sets(), st.lists(concrete_permissions, min_size=1, max_size=10))
def test_a_set_contains_its_narrowed_members_and_allows_all_they_allow(
    nested: tuple[CapabilitySet, CapabilitySet], probes: list[str]
) -> None:
    big, small = nested
    assert big.contains(small), (big, small)
    for probe in probes:
        if small.allows(probe):
            assert big.allows(probe), (big, small, probe)


@settings(max_examples=300, deadline=None)
@given(permissions, permissions, st.lists(concrete_permissions, min_size=1, max_size=10))
def test_permission_containment_is_sound_on_concrete_permissions(
    container: str, contained: str, probes: list[str]
) -> None:
    outer, inner = parse_permission(container), parse_permission(contained)
    if outer.contains(inner):
        for probe in probes:
            concrete = parse_permission(probe)
            if inner.contains(concrete):
                assert outer.contains(concrete), (container, contained, probe)


@settings(max_examples=300, deadline=None)
@given(path_globs, path_globs, st.lists(concrete_paths, min_size=1, max_size=10))
def test_glob_containment_agrees_with_matching_concrete_paths(
    container: str, contained: str, paths: list[str]
) -> None:
    outer = parse_permission(f"filesystem:read:{container}")
    inner = parse_permission(f"filesystem:read:{contained}")
    if outer.contains(inner):
        for path in paths:
            if path_matches(inner.value, path):
                assert path_matches(outer.value, path), (container, contained, path)


def reference_match(glob: str, path: str) -> bool:
    """An independent regex reading of the dialect: `*` within a component, `**` across."""
    import re

    pattern = ""
    for component in [c for c in glob.split("/") if c]:
        if component == "**":
            pattern += "(?:/[^/]+)*"
        else:
            pattern += "/" + "[^/]*".join(re.escape(piece) for piece in component.split("*"))
    return re.fullmatch(pattern or "/?", path if path != "/" else "") is not None or (
        pattern == "" and path in ("", "/")
    )


@settings(max_examples=400, deadline=None)
@given(path_globs, concrete_paths)
def test_path_matching_agrees_with_an_independent_reading_of_the_dialect(
    glob: str, path: str
) -> None:
    assert path_matches(glob, path) == reference_match(glob, path), (glob, path)


small_globs = st.lists(st.sampled_from(["a", "b", "*", "a*", "*a", "*b*", "**"]), max_size=3).map(
    _glob
)


@st.composite
def globs_with_instances(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """Two globs and concrete paths made from the second (its stars filled in)."""
    outer, inner = draw(small_globs), draw(small_globs)
    paths = []
    for _ in range(draw(st.integers(1, 6))):
        parts: list[str] = []
        for component in [c for c in inner.split("/") if c]:
            if component == "**":
                parts.extend(draw(st.lists(_NAMES, max_size=2)))
            else:
                pieces = component.split("*")
                fills = [draw(st.sampled_from(["", "a", "b", "ba"])) for _ in pieces[1:]]
                parts.append(
                    pieces[0] + "".join(f + p for f, p in zip(fills, pieces[1:], strict=True))
                )
        paths.append(_glob([p for p in parts if p]))
    return outer, inner, paths


@settings(max_examples=1500, deadline=None)
@given(globs_with_instances())
def test_glob_containment_is_sound_against_the_independent_reading(
    case: tuple[str, str, list[str]],
) -> None:
    container, contained, paths = case
    outer = parse_permission(f"filesystem:read:{container}")
    inner = parse_permission(f"filesystem:read:{contained}")
    if outer.contains(inner):
        for path in paths:
            if reference_match(inner.value, path):
                assert reference_match(outer.value, path), (container, contained, path)


@settings(max_examples=200, deadline=None)
@given(permissions)
def test_every_permission_contains_itself(text: str) -> None:
    permission = parse_permission(text)
    assert permission.contains(permission)


@settings(max_examples=200, deadline=None)
@given(capability_sets)
def test_containment_of_sets_is_reflexive(grant: CapabilitySet) -> None:
    assert grant.contains(grant)


@settings(max_examples=400, deadline=None)
@given(permissions, permissions, permissions)
def test_containment_is_transitive(a: str, b: str, c: str) -> None:
    pa, pb, pc = parse_permission(a), parse_permission(b), parse_permission(c)
    if pa.contains(pb) and pb.contains(pc):
        assert pa.contains(pc), (a, b, c)


@settings(max_examples=300, deadline=None)
@given(capability_sets, capability_sets, capability_sets)
def test_set_containment_is_transitive(
    a: CapabilitySet, b: CapabilitySet, c: CapabilitySet
) -> None:
    if a.contains(b) and b.contains(c):
        assert a.contains(c)


@settings(max_examples=200, deadline=None)
@given(permissions)
def test_parsing_the_canonical_form_gives_the_same_permission(text: str) -> None:
    permission = parse_permission(text)
    assert parse_permission(permission.text) == permission


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_either_parses_or_is_refused_with_a_message(text: str) -> None:
    try:
        permission = parse_permission(text)
    except InvalidPermission as exc:
        assert str(exc)
    else:
        assert isinstance(permission, Permission)
