"""Networks given as text, parsed fast.

At start the daemon hands every subscriber network to the engine and to the
kernel's sets: 1.8 million at a million subscribers. ``ipaddress`` takes
about 25 us per network; the ledger holds canonical text (``100.64.1.2/32``,
``2001:db8:100:1::/64``, written through ``accounting/operations.py``),
which ``inet_pton``/``inet_ntop`` check and canonicalise in about 2 us.
Anything else (no prefix length, host bits set, an IPv4-mapped address,
objects, garbage) goes to ``ipaddress``, which gives the same answer or the
error: ``tests/unit/test_netaddr.py`` holds the two paths equal.
"""

from __future__ import annotations

import ipaddress
import socket

_FAMILY = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}


def _fast(text) -> tuple[int, bytes, int, str] | None:
    """(version, packed address, prefix length, address text) of a network in
    canonical text with no host bits set, else None."""
    if type(text) is not str:
        return None
    addr, sep, plen = text.partition("/")
    if not sep or not (plen.isascii() and plen.isdigit()) or len(plen) > 3 or (len(plen) > 1 and plen[0] == "0"):
        return None
    version = 6 if ":" in addr else 4
    family, bits = _FAMILY[version]
    try:
        packed = socket.inet_pton(family, addr)
    except (OSError, ValueError):
        return None
    length = int(plen)
    if length > bits or socket.inet_ntop(family, packed) != addr or "." in addr and version == 6:
        return None  # not the canonical spelling (or a mapped address ipaddress prints otherwise): the slow path decides
    if int.from_bytes(packed, "big") & ((1 << (bits - length)) - 1):
        return None  # host bits: strict parsing refuses, loose parsing masks; ipaddress does either
    return version, packed, length, addr


def parse(text, strict: bool = True) -> tuple[int, int, int]:
    """``"100.64.0.0/10"`` -> (version 4|6, network as int, prefix length),
    as ``ipaddress.ip_network(text, strict)`` would give it; its ValueError
    (or TypeError) for what is not a network."""
    fast = _fast(text)
    if fast is not None:
        return fast[0], int.from_bytes(fast[1], "big"), fast[2]
    net = ipaddress.ip_network(text, strict=strict)
    return net.version, int(net.network_address), net.prefixlen


def split(text) -> tuple[int, str, int]:
    """(version, canonical network address text, prefix length), host bits
    masked (``ip_network(text, strict=False)``)."""
    fast = _fast(text)
    if fast is not None:
        return fast[0], fast[3], fast[2]
    net = ipaddress.ip_network(text, strict=False)
    return net.version, str(net.network_address), net.prefixlen


def canonical(text) -> str:
    """``str(ipaddress.ip_network(text, strict=False))``: ``100.64.1.2/32``, ``2001:db8:100:1::/64``."""
    if _fast(text) is not None:
        return text
    return str(ipaddress.ip_network(text, strict=False))
