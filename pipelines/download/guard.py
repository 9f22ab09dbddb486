"""Where a download may connect: public addresses only, checked on the address each connection actually opens."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.config.networks import IPNetwork, networks

BLOCKED = "blocked address"  # how every refusal's message starts: the catalog's `blocked_address`
SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The properties that make an address non-public, in the order a refusal names them.
_KINDS = ("loopback", "unspecified", "link_local", "multicast", "private", "reserved")
_DEFAULT_TIMEOUT: Any = socket._GLOBAL_DEFAULT_TIMEOUT  # what http.client passes when no timeout was given


class BlockedAddress(OSError):
    """A connection the guard refused: its message starts with BLOCKED."""


def non_public(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address (`loopback`, `private`, ...), or None for a public one.

    An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is judged as its IPv4 address.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in _KINDS:
        if getattr(ip, f"is_{kind}"):
            return kind
    return None if ip.is_global else "not globally routable"


@dataclass(frozen=True)
class AddressGuard:
    """Which addresses the fetch connects to: public ones, and non-public ones inside `allowed`.

    Attributes:
        allowed: non-public networks that may be connected to anyway (download.allow_private_addresses).
    """

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, allow: bool | Sequence[str]) -> AddressGuard:
        """The guard of an `allow_private_addresses` setting (True, False, or CIDR networks)."""
        return cls(networks(allow))

    def refusal(self, ip: IPAddress) -> str | None:
        """Why a connection to `ip` is refused, or None when it may go ahead."""
        kind = non_public(ip)
        if kind is None:
            return None
        plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        if any(plain in net or ip in net for net in self.allowed):
            return None
        return kind

    def connect(
        self, address: tuple[str, int], timeout: Any = _DEFAULT_TIMEOUT, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        """socket.create_connection that resolves the host once and connects only to addresses it allows.

        Each resolved address is checked and a refused one is skipped; the socket connects to the checked numeric
        address, so the name cannot resolve differently in between (DNS rebinding). Raises BlockedAddress when
        every address of the host is refused.
        """
        host, port = address
        refused: list[str] = []
        error: OSError | None = None
        for family, socktype, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            shown = str(sockaddr[0])
            why = self.refusal(ipaddress.ip_address(shown.split("%")[0]))
            if why is not None:
                refused.append(f"{shown} ({why})")
                continue
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        if error is not None:
            raise error
        where = ", ".join(refused)
        if [host] != [r.split(" ")[0] for r in refused]:  # a name, or a host of several addresses
            where = f"{host} -> {where}"
        raise BlockedAddress(f"{BLOCKED}: {where}: not a public address (see download.allow_private_addresses)")


def scheme_refusal(url: str) -> str | None:
    """Why a URL's scheme is not fetched (anything but http and https, in any case), or None."""
    scheme, sep, _ = url.partition(":")
    if sep and scheme.lower() in SCHEMES:
        return None
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return f"{BLOCKED}: {url[:40]!r} has no URL scheme (only http and https URLs are fetched)"
    return f"{BLOCKED}: the URL scheme {scheme[:20]!r} is not fetched (only http and https)"
