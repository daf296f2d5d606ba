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

_AF4, _AF6 = socket.AF_INET, socket.AF_INET6
_PTON, _NTOP = socket.inet_pton, socket.inet_ntop
# The canonical texts of prefix lengths, "0" to "128" (no sign, no leading zero, ASCII digits only):
# one look-up instead of five checks of the text and an int()
_LENGTHS = {str(n): n for n in range(129)}


def _fast_int(text) -> tuple[int, bytes, int, str, int] | None:
    """(version, packed address, prefix length, address text, address as int) of a network in
    canonical text with no host bits set, else None."""
    if type(text) is not str:
        return None
    addr, _sep, plen = text.partition("/")
    length = _LENGTHS.get(plen)  # no "/" gives "": not a length either
    if length is None:
        return None
    if ":" in addr:
        if length > 128 or "." in addr:
            return None  # a mapped address ipaddress prints otherwise: the slow path decides
        try:
            packed = _PTON(_AF6, addr)
        except (OSError, ValueError):
            return None
        if _NTOP(_AF6, packed) != addr:
            return None  # not the canonical spelling
        value = int.from_bytes(packed, "big")
        if value & ((1 << (128 - length)) - 1):
            return None  # host bits: strict parsing refuses, loose parsing masks; ipaddress does either
        return 6, packed, length, addr, value
    if length > 32:
        return None
    try:
        packed = _PTON(_AF4, addr)
    except (OSError, ValueError):
        return None
    if _NTOP(_AF4, packed) != addr:
        return None
    value = int.from_bytes(packed, "big")
    if value & ((1 << (32 - length)) - 1):
        return None
    return 4, packed, length, addr, value


def _fast(text) -> tuple[int, bytes, int, str] | None:
    """(version, packed address, prefix length, address text) of a network in
    canonical text with no host bits set, else None."""
    fast = _fast_int(text)
    return None if fast is None else fast[:4]


def parse(text, strict: bool = True) -> tuple[int, int, int]:
    """``"100.64.0.0/10"`` -> (version 4|6, network as int, prefix length),
    as ``ipaddress.ip_network(text, strict)`` would give it; its ValueError
    (or TypeError) for what is not a network."""
    fast = _fast_int(text)
    if fast is not None:
        return fast[0], fast[4], fast[2]
    net = ipaddress.ip_network(text, strict=strict)
    return net.version, int(net.network_address), net.prefixlen


def split(text) -> tuple[int, str, int]:
    """(version, canonical network address text, prefix length), host bits
    masked (``ip_network(text, strict=False)``)."""
    fast = _fast_int(text)
    if fast is not None:
        return fast[0], fast[3], fast[2]
    net = ipaddress.ip_network(text, strict=False)
    return net.version, str(net.network_address), net.prefixlen


def canonical(text) -> str:
    """``str(ipaddress.ip_network(text, strict=False))``: ``100.64.1.2/32``, ``2001:db8:100:1::/64``."""
    if _fast_int(text) is not None:
        return text
    return str(ipaddress.ip_network(text, strict=False))
