"""The networks of a `download.allow_private_addresses` setting, parsed once for the config and the download guard."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(allow: bool | Sequence[str]) -> tuple[IPNetwork, ...]:
    """The networks of an `allow_private_addresses` setting: everything for True, none for False, else the list's.

    Raises ValueError naming an entry that is not an address or CIDR network (host bits set included).
    """
    if allow is True:
        return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    if allow is False:
        return ()
    out = []
    for entry in allow:
        try:
            out.append(ipaddress.ip_network(str(entry).strip()))
        except ValueError as e:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network ({e})") from None
    return tuple(out)
