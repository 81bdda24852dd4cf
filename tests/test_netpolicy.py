"""The address rule: public addresses pass; non-public ones only through a grant naming the IP
literal; link-local and metadata addresses never; a granted name never unlocks what it resolves
to. Checked on the rule itself and through http_fetch with a recording connect."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

import pytest

from kernel.context import ToolContext
from kernel.kernel import kernel
from kernel.netpolicy import AddressRefused, address_refusal, check_address, resolve_allowed
from kernel.permissions import CapabilitySet

PUBLIC = ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"]
NON_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "0.0.0.0",
    "fc00::1",
    "::ffff:127.0.0.1",
    "224.0.0.1",
]
NEVER = [
    "169.254.169.254",
    "169.254.170.2",
    "169.254.0.1",
    "fe80::1",
    "fd00:ec2::254",
    "100.100.100.200",
    "168.63.129.16",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",  # NAT64 form of 169.254.169.254
]


@pytest.mark.parametrize("text", PUBLIC)
def test_public_addresses_pass(text: str) -> None:
    check_address(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", NON_PUBLIC)
def test_non_public_addresses_pass_only_when_the_literal_is_granted(text: str) -> None:
    address = ipaddress.ip_address(text)
    with pytest.raises(AddressRefused):
        check_address(address)
    check_address(address, literal_granted=True)


@pytest.mark.parametrize("text", NEVER)
def test_link_local_and_metadata_addresses_never_pass(text: str) -> None:
    address = ipaddress.ip_address(text)
    reason = address_refusal(address, literal_granted=True)
    assert reason is not None and "never reachable" in reason


@pytest.mark.parametrize("text", NON_PUBLIC + NEVER)
def test_a_name_resolving_to_a_non_public_address_is_refused_whatever_the_flag(
    monkeypatch, text: str
) -> None:
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [(family, socket.SOCK_STREAM, 6, "", (text, port))],
    )
    with pytest.raises(AddressRefused, match="resolves to"):
        resolve_allowed("service.example.com", 443, literal_granted=True)


def test_one_refused_answer_among_public_ones_refuses_the_name(monkeypatch) -> None:
    answers = ["93.184.216.34", "10.0.0.7"]
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers
        ],
    )
    with pytest.raises(AddressRefused, match="private"):
        resolve_allowed("mixed.example.com", 80)


def test_a_literal_is_checked_without_resolving(monkeypatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a literal must not be resolved")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert resolve_allowed("[::1]", 80, literal_granted=True) == [ipaddress.ip_address("::1")]
    assert resolve_allowed("1.1.1.1", 80) == [ipaddress.ip_address("1.1.1.1")]
    with pytest.raises(AddressRefused, match=r"only an exact grant net:10\.0\.0\.1"):
        resolve_allowed("10.0.0.1", 80)


@pytest.fixture
def recorded_connects(monkeypatch) -> list[Any]:
    """Every outbound connect attempt, recorded and refused (nothing leaves the machine)."""
    attempts: list[Any] = []

    def recording(sock: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise ConnectionRefusedError("recording connect")

    def recording_ex(sock: socket.socket, address: Any) -> int:
        attempts.append(address)
        return errno.ECONNREFUSED

    monkeypatch.setattr(socket.socket, "connect", recording)
    monkeypatch.setattr(socket.socket, "connect_ex", recording_ex)
    return attempts


@pytest.mark.django_db
@pytest.mark.parametrize("answer", ["169.254.169.254", "127.0.0.1", "10.0.0.5", "fd00:ec2::254"])
def test_an_exactly_granted_name_resolving_to_a_refused_address_is_never_connected(
    make_user, monkeypatch, recorded_connects, answer: str
) -> None:
    family = socket.AF_INET6 if ":" in answer else socket.AF_INET
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [(family, socket.SOCK_STREAM, 6, "", (answer, port))],
    )
    grant = CapabilitySet(["net:metadata.example.com", f"net:{answer}", "net:[fd00:ec2::254]"])
    context = ToolContext(user=make_user(), capabilities=grant)
    result = kernel.invoke("http_fetch", {"url": "http://metadata.example.com/latest"}, context)
    assert result.decision == "error"
    assert "metadata.example.com resolves to" in result.content
    assert recorded_connects == []


@pytest.mark.django_db
@pytest.mark.parametrize("literal", ["169.254.169.254", "[fe80::1]", "[::ffff:169.254.169.254]"])
def test_a_grant_naming_a_link_local_literal_still_cannot_reach_it(
    make_user, recorded_connects, literal: str
) -> None:
    context = ToolContext(user=make_user(), capabilities=CapabilitySet([f"net:{literal}"]))
    result = kernel.invoke("http_fetch", {"url": f"http://{literal}/latest"}, context)
    assert result.decision == "error"
    assert "never reachable" in result.content
    assert recorded_connects == []


@pytest.mark.django_db
def test_the_recorder_sees_a_connect_to_an_allowed_public_address(
    make_user, monkeypatch, recorded_connects
) -> None:
    """The tests above assert that no connect was seen: this one shows one would be."""
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))
        ],
    )
    context = ToolContext(user=make_user(), capabilities=CapabilitySet(["net:example.com"]))
    result = kernel.invoke("http_fetch", {"url": "http://example.com/"}, context)
    assert result.decision == "error" and "connection refused" in result.content
    assert recorded_connects == [("93.184.216.34", 80)]
