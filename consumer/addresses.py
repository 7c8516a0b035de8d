"""The address guard: image hosts that resolve to loopback, private, link-local, metadata or any other
special-purpose address (the IANA IPv4 and IPv6 special-purpose registries) are refused, at every hop."""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The IANA IPv4 and IPv6 special-purpose address registries, plus multicast and IPv6 site-local:
# no image host lives there. Python's is_global calls several of them global (NAT64, 6to4 relay,
# AS112, AMT, ORCHIDv2, 192.0.0.9 and .10, 2001:db8::/32's newer twin 3fff::/20, ...), so each
# range is named here; the most specific range names an address.
_SPECIAL_PURPOSE_RANGES: Final = (
    ("0.0.0.0/32", "an unspecified address"),
    ("0.0.0.0/8", "a 'this network' address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared address space (CGNAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address (TEST-NET-1)"),
    ("192.31.196.0/24", "an AS112 DNS address"),
    ("192.52.193.0/24", "an AMT relay address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("192.175.48.0/24", "an AS112 DNS address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address (TEST-NET-2)"),
    ("203.0.113.0/24", "a documentation address (TEST-NET-3)"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("255.255.255.255/32", "the limited broadcast address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible address (deprecated)"),
    ("64:ff9b::/96", "a NAT64 address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("100:0:0:1::/64", "a dummy IPv6 prefix address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001::/32", "a Teredo address"),
    ("2001:2::/48", "a benchmarking address"),
    ("2001:3::/32", "an AMT address"),
    ("2001:4:112::/48", "an AS112 DNS address"),
    ("2001:10::/28", "an ORCHID address (deprecated)"),
    ("2001:20::/28", "an ORCHIDv2 address"),
    ("2001:30::/28", "a drone remote ID address"),
    ("2001:db8::/32", "a documentation address"),
    ("2002::/16", "a 6to4 address"),
    ("2620:4f:8000::/48", "an AS112 DNS address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment routing (SRv6 SID) address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address (deprecated)"),
    ("ff00::/8", "a multicast address"),
)
_SPECIAL_PURPOSE: Final = sorted(
    ((ipaddress.ip_network(network), reason) for network, reason in _SPECIAL_PURPOSE_RANGES),
    key=lambda entry: -entry[0].prefixlen,
)
_METADATA_ADDRESSES: Final = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})

class AddressBlockedError(OSError):
    """A host resolved to an address the guard refuses (an OSError so aiohttp's connector passes it on)."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        where = f"{address} is" if host == address else f"it resolves to {address},"
        super().__init__(
            f"refused to fetch from host {host!r}: {where} {reason} "
            "(set fetch.allow_private_addresses to allow such addresses)"
        )
        self.host = host
        self.address = address
        self.reason = reason


def address_block_reason(address: IPAddress) -> str | None:
    """Why the guard refuses `address` (e.g. "a loopback address"), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 address reach that address; judge it (too).
        if address.ipv4_mapped is not None:
            reason = address_block_reason(address.ipv4_mapped)
            return f"{reason} (IPv4-mapped)" if reason else None
        if address.sixtofour is not None and (reason := address_block_reason(address.sixtofour)):
            return f"{reason} (inside a 6to4 address)"
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for network, reason in _SPECIAL_PURPOSE:
        if address.version == network.version and address in network:
            return f"{reason} ({network})"
    checks: tuple[tuple[bool, str], ...] = (  # what the table may not know yet
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (address.is_multicast, "a multicast address"),
        (not address.is_global, "not a globally routable address"),
    )
    return next((reason for hit, reason in checks if hit), None)


def check_address(host: str, address: str) -> None:
    """Raise AddressBlockedError unless `address` (what `host` resolved to) is public."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise AddressBlockedError(host, address, "not an IP address the guard can judge") from None
    reason = address_block_reason(parsed)
    if reason is not None:
        raise AddressBlockedError(host, address, reason)


def looks_like_ip_literal(host: str) -> bool:
    """aiohttp's own test: such hosts skip the resolver, so the guard must see them first."""
    return ":" in host or host.replace(".", "").isdigit()


class GuardedResolver(AbstractResolver):
    """Resolves with an inner resolver and refuses the name if ANY of its addresses is blocked.

    aiohttp connects to exactly the addresses returned here, so a DNS answer that changes
    between the check and the connection (rebinding) cannot slip through.
    """

    def __init__(self, inner: AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()
