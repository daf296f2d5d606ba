"""Speed and connection limits per subscriber, in the kernel.

Speed: tc HTB, not nft ``limit rate``. A policer drops whatever exceeds the
rate, and TCP answers a burst of drops by halving its window: throughput
ends well below the limit and swings. HTB queues instead, so TCP sees delay
and settles at the limit. The subscriber-facing interfaces shape downloads on
their way out, the upstream interfaces shape uploads. A packet finds its HTB
class without any tc filter: our own nft table ``inet tollgate_rates`` sets
the packet's priority to the class id (``1:N``) from the subscriber's address
in the forward hook, after the kernel's own forwarding code has set it, and
HTB takes a priority that names one of its classes as the class. The class
survives the gateway's masquerade (an address does not), and needs no
classifier module (this kernel has no ``fw``). Traffic of subscribers
without a limit has no class and passes unshaped (HTB ``default 0``).

Connections: nft ``ct count`` in a dynamic set keyed by the subscriber's
class id, one pair of sets per distinct limit, so all of a subscriber's
addresses, IPv4 and IPv6, share one count; a new connection beyond it is
rejected at once.

The table and the qdiscs stay when the daemon stops (limits hold); the
daemon rebuilds both from the ledger on start (``restore``).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from dataclasses import dataclass

import nftables

from .nft import PolicyError

log = logging.getLogger("tollgate.rates")
TABLE = "tollgate_rates"
MAX_CLASSES = 0xFFFE  # HTB class minors 1..0xfffe


@dataclass(frozen=True)
class Limits:
    """One subscriber's limits; None: no limit."""

    up_bps: int | None = None
    down_bps: int | None = None
    max_connections: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.up_bps, self.down_bps, self.max_connections))


def _canon(network: str) -> str:
    try:
        return str(ipaddress.ip_network(network, strict=True))
    except ValueError as exc:
        raise PolicyError(f"bad subscriber network {network!r}: {exc}") from None


class RateLimiter:
    """Speed and connection limits of subscribers; see the module docstring."""

    def __init__(self, lan_interfaces=(), wan_interfaces=()) -> None:
        self.lan = list(lan_interfaces)
        self.wan = list(wan_interfaces)
        self.nft = nftables.Nftables()
        self.slots: dict[int, int] = {}  # subscriber -> its HTB class minor
        self.state: dict[int, tuple] = {}  # subscriber -> (networks, Limits)

    # ---- plumbing -------------------------------------------------------------------

    def _nft(self, script: str) -> None:
        rc, _out, err = self.nft.cmd(script)
        if rc != 0:
            raise PolicyError(f"nftables refused: {err.strip()}")

    @staticmethod
    def _tc(lines: list[str]) -> None:
        if not lines:
            return
        proc = subprocess.run(["tc", "-force", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                              capture_output=True)
        if proc.returncode:
            raise PolicyError(f"tc refused: {proc.stderr.strip()[:300]}")

    def _classid(self, sid: int) -> str:
        return f"1:{self.slots[sid]:x}"

    # ---- the whole of it --------------------------------------------------------------

    def install(self) -> None:
        """Our nft table (empty maps) and an HTB root on every interface; what
        was there from an earlier run is replaced."""
        if self.installed():
            self._nft(f"delete table inet {TABLE}")
        self._nft(
            f"table inet {TABLE} {{\n"
            "  map subs4 { type ipv4_addr : classid; flags interval; }\n"
            "  map subs6 { type ipv6_addr : classid; flags interval; }\n"
            # upload: the source's class, then connection limits; download: the destination's class
            "  chain up { type filter hook forward priority mangle; policy accept;\n"
            "    meta priority set ip saddr map @subs4\n    meta priority set ip6 saddr map @subs6\n"
            "    jump connlimit\n  }\n"
            "  chain connlimit {\n  }\n"
            "  chain down { type filter hook forward priority -140; policy accept;\n"
            "    meta priority set ip daddr map @subs4\n    meta priority set ip6 daddr map @subs6\n  }\n"
            "}\n")
        self._tc([f"qdisc replace dev {dev} root handle 1: htb default 0" for dev in self.lan + self.wan])
        self.slots.clear()
        self.state.clear()
        log.info("installed table inet %s; HTB on %s", TABLE, ", ".join(self.lan + self.wan) or "no interface")

    def installed(self) -> bool:
        return self.nft.cmd(f"list table inet {TABLE}")[0] == 0

    def remove(self) -> None:
        """Take our table and qdiscs away (``tollgate policy remove``)."""
        if self.installed():
            self._nft(f"delete table inet {TABLE}")
        for dev in self.lan + self.wan:
            subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)

    def restore(self, subscribers) -> None:
        """``install`` and then ``set_subscriber`` for each ``(sid, networks, Limits)``."""
        self.install()
        for sid, networks, limits in subscribers:
            self.set_subscriber(sid, networks, limits)

    # ---- one subscriber -----------------------------------------------------------------

    def set_subscriber(self, sid: int, networks, limits: Limits) -> None:
        """Limit ``sid`` (its networks) to ``limits``; no limits: ``remove_subscriber``."""
        networks = sorted(_canon(n) for n in networks)
        if not limits:
            self.remove_subscriber(sid)
            return
        if self.state.get(sid) == (networks, limits):
            return
        self.remove_subscriber(sid)
        if sid not in self.slots:
            used = set(self.slots.values())
            free = next((n for n in range(len(used) + 1, 0, -1) if n not in used), None)  # one of 1..len+1 is free
            if free is None or free > MAX_CLASSES:
                raise PolicyError(f"more than {MAX_CLASSES} subscribers with limits")
            self.slots[sid] = free
        cls = self._classid(sid)
        elements = {4: [], 6: []}
        for net in networks:
            elements[ipaddress.ip_network(net).version].append(f"{net} : {cls}")
        script = "".join(f"add element inet {TABLE} subs{v} {{ {', '.join(e)} }}\n" for v, e in elements.items() if e)
        if limits.max_connections is not None:
            n = limits.max_connections
            script += (f"add set inet {TABLE} conn_{n} {{ type classid; }}\n"
                       f"add set inet {TABLE} count_{n} {{ type classid; size 65535; flags dynamic; }}\n"
                       f"add element inet {TABLE} conn_{n} {{ {cls} }}\n")
            if not self._has_connlimit_rule(n):
                script += (f"add rule inet {TABLE} connlimit ct state new meta priority @conn_{n} "
                           f"add @count_{n} {{ meta priority ct count over {n} }} counter "
                           "reject with icmpx type admin-prohibited\n")
        self._nft(script)
        lines = []
        for devs, rate in ((self.lan, limits.down_bps), (self.wan, limits.up_bps)):
            if rate is None:
                continue
            burst = max(rate // 8 // 100, 16 * 1514)  # 10 ms at the rate, at least a few full-size packets
            lines += [f"class replace dev {dev} parent 1: classid {cls} htb rate {rate}bit ceil {rate}bit "
                      f"burst {burst} cburst {burst} quantum 1514" for dev in devs]
        self._tc(lines)
        self.state[sid] = (networks, limits)

    def _has_connlimit_rule(self, n: int) -> bool:
        rc, out, _err = self.nft.cmd(f"list chain inet {TABLE} connlimit")
        return rc == 0 and f"@conn_{n} " in out

    def remove_subscriber(self, sid: int) -> None:
        old = self.state.pop(sid, None)
        if old is None:
            return
        networks, limits = old
        cls = self._classid(sid)
        script = "".join(f"delete element inet {TABLE} subs{ipaddress.ip_network(n).version} {{ {n} }}\n"
                         for n in networks)
        if limits.max_connections is not None:
            script += f"delete element inet {TABLE} conn_{limits.max_connections} {{ {cls} }}\n"
        self._nft(script)
        self._tc([f"class del dev {dev} classid {cls}"
                  for devs, rate in ((self.lan, limits.down_bps), (self.wan, limits.up_bps)) if rate is not None
                  for dev in devs])
