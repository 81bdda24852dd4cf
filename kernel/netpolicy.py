"""Which network addresses the project may connect to: the one rule, for every outbound request.

Public addresses are reachable. Loopback, private, carrier-grade NAT, unspecified, multicast,
reserved and IPv4-embedding IPv6 addresses are reachable only when the caller says the IP
literal itself was granted (`literal_granted`, e.g. `net:127.0.0.1` named exactly); a host
*name* never unlocks them, whatever it resolves to. Link-local and cloud metadata addresses are
never reachable. `resolve_allowed` resolves a host once and checks every answer before anything
connects; the caller then connects to one of the returned addresses (pinning it), never to a
fresh resolution of the name.

Pure Python (no Django): the Kernel's `http_fetch` and the webhook channel both use it.
"""

from __future__ import annotations

import ipaddress
import socket

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# Instance metadata services outside 169.254.0.0/16: AWS over IPv6, Alibaba Cloud, Azure's
# WireServer (a public address that answers only inside Azure).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text) for text in ("fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)


class AddressRefused(ValueError):
    """A destination the rule refuses; the message names the host and the reason."""


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or address in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def never_reason(address: Address) -> str | None:
    """Why `address` is never reachable (link-local, cloud metadata), or None."""
    for candidate in (address, _embedded_ipv4(address)):
        if candidate is None:
            continue
        if candidate in METADATA_ADDRESSES:
            return "a cloud metadata address"
        if candidate.is_link_local:
            return "a link-local address"
    return None


def non_public_reason(address: Address) -> str | None:
    """Why `address` is not a public destination, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address.sixtofour is not None or address.teredo is not None:
            return "an IPv6 address embedding an IPv4 address"
        if address in _NAT64 or address in _NAT64_LOCAL:
            return "a NAT64 address"
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address in _CGNAT, "a carrier-grade NAT address"),
        (address.is_private, "a private address"),
        (address.is_multicast, "a multicast address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    for refused, reason in checks:
        if refused:
            return reason
    return None


def address_refusal(address: Address, *, literal_granted: bool = False) -> str | None:
    """Why a connection to `address` is refused, or None when it may go ahead.

    `literal_granted`: this very IP address was named by the caller's grant (and was what the
    request asked for, not what a name resolved to)."""
    never = never_reason(address)
    if never is not None:
        return f"{never}, which is never reachable"
    reason = non_public_reason(address)
    if reason is not None and not literal_granted:
        return reason
    return None


def check_address(address: Address, *, literal_granted: bool = False) -> None:
    """Raise AddressRefused when a connection to `address` is not allowed."""
    reason = address_refusal(address, literal_granted=literal_granted)
    if reason is not None:
        raise AddressRefused(f"refused: {address} is {reason}")


def ip_literal(host: str) -> Address | None:
    """The address `host` names when it is a standard IP literal (IPv6 with or without
    brackets), else None."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(literal)
    except ValueError:
        return None


def resolve_allowed(host: str, port: int, *, literal_granted: bool = False) -> list[Address]:
    """The addresses a connection to `host`:`port` may use, each checked by the rule.

    `host` is a name or an IP literal; `literal_granted` counts only for a literal. Every answer
    of the resolver must pass (one refused answer refuses the host), so no later choice among
    them can reach a refused address. Raises AddressRefused, with the host in the message.
    """
    literal = ip_literal(host)
    if literal is not None:
        addresses: list[Address] = [literal]
        exact = literal_granted
        subject = f"{host}"
    else:
        addresses = _resolve(host, port)
        exact = False  # a name never unlocks a non-public address
        subject = host
    for address in addresses:
        reason = address_refusal(address, literal_granted=exact)
        if reason is None:
            continue
        if literal is not None:
            hint = f"only an exact grant net:{host} allows that"
        else:
            hint = "a host name never unlocks it; only a grant of the IP address itself does"
        if "never reachable" in reason:
            hint = "no grant allows that"
        raise AddressRefused(f"refused: {subject} resolves to {reason}; {hint}")
    return addresses


def _resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise AddressRefused(f"cannot resolve {host}") from None
    addresses: list[Address] = []
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        except ValueError:
            continue
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise AddressRefused(f"cannot resolve {host}")
    return addresses
