"""Zones: where traffic goes, as billing sees it.

Zone 0 is ``local``: the operator's own networks (internal traffic). Zone 1 is
``external``: everything no other zone claims. Zones 2.. are the operator's
own, each a set of prefixes optionally narrowed to a protocol and a port
range (the port of the remote side). The engine picks, among the prefixes
containing the remote address, the longest one, and within it the first rule
whose protocol and ports match; rules with a protocol or ports come before
plain ones so that ``198.18.0.0/16 tcp 443 -> video`` can carve a zone out of
``198.18.0.0/16 -> peering``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ext.engine_py import ZoneRule

LOCAL = 0
EXTERNAL = 1
RESERVED = ("local", "external")


@dataclass(frozen=True)
class ZoneSpec:
    name: str
    networks: tuple
    proto: int = 0
    port_lo: int = 0
    port_hi: int = 65535

    @property
    def constrained(self) -> bool:
        return self.proto != 0 or (self.port_lo, self.port_hi) != (0, 65535)


class ZoneMap:
    """Names and ids of the zones, and the rules the engine loads."""

    def __init__(self, local_networks, specs=()) -> None:
        self.names = list(RESERVED)
        self.local_networks = tuple(str(ipaddress.ip_network(n)) for n in local_networks)
        self.specs = list(specs)
        for spec in self.specs:
            if spec.name not in self.names:
                self.names.append(spec.name)

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        return self.names.index(name)

    def rules(self) -> list[ZoneRule]:
        """Engine rules: constrained before plain, each group in the order given
        (``sorted`` is stable)."""
        rules = [ZoneRule(n, LOCAL) for n in self.local_networks]
        for spec in self.specs:
            for network in spec.networks:
                rules.append(ZoneRule(network, self.id(spec.name), spec.proto, spec.port_lo, spec.port_hi))
        return sorted(rules, key=lambda r: not (r.proto or (r.port_lo, r.port_hi) != (0, 65535)))
