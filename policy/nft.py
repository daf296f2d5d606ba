"""Enforcement in the kernel: one nftables table of ours, ``inet tollgate``.

The table, evaluated in the forward hook, around the queue:

* priority -10 ``block``: packets from a blocked subscriber are rejected at
  once (TCP reset, ICMP administratively prohibited) so applications fail
  fast; packets to one are dropped. This runs before the queue, so a block
  holds while the daemon is down.
* priority 0: the queue. Where the kernel has the native ``queue`` statement
  it is a rule of ours (``queue num A-B fanout bypass``); where it has not
  (this kernel) it is the xtables NFQUEUE target, added with iptables-nft to
  the ``filter FORWARD`` chain and removed with the table. Only traffic of the
  local networks is queued.
* priority 10 ``account``: per-subscriber kernel counters (sets with a
  counter per element), uploads by source and downloads by destination. A
  packet the queue drops never gets here, so these count exactly the IP bytes
  that went through: the ground truth the engine is checked against.

In prerouting, a blocked subscriber's HTTP (tcp/80) is redirected to the
portal on the gateway, which shows the block page.

Every change goes through one reused libnftables context (python-nftables,
JSON), never by forking ``nft``; element changes are batched into one
transaction per call.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import subprocess
from dataclasses import dataclass

import nftables

from ext.errors import TollgateError

log = logging.getLogger("tollgate.policy")
TABLE = "tollgate"
COMMENT = "tollgate"  # marks our xtables queue rules


class PolicyError(TollgateError):
    """The kernel refused a ruleset change."""


@dataclass
class QueueSpec:
    first: int = 0
    last: int = 0
    fail_open: bool = True


def _split(networks) -> tuple[list, list]:
    v4, v6 = [], []
    for n in networks:
        net = ipaddress.ip_network(n, strict=False)
        elem = str(net.network_address) if net.prefixlen == net.max_prefixlen else \
            {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
        (v4 if net.version == 4 else v6).append(elem)
    return v4, v6


def _elem_key(elem) -> str:
    if isinstance(elem, dict):
        p = elem.get("prefix")
        if p:
            return f"{p['addr']}/{p['len']}"
        r = elem.get("range")
        if r:  # an interval the kernel merged; name it by its start
            return f"{r[0]}-{r[1]}"
    return str(ipaddress.ip_network(elem))


class Enforcer:
    """Our table in the current network namespace; see the module docstring."""

    def __init__(self, queues=(0,), fail_open: bool = True, portal_port: int = 8080,
                 local_networks=("100.64.0.0/10",)) -> None:
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.queue = QueueSpec(min(queues), max(queues), fail_open)
        self.portal_port = portal_port
        self.local_networks = list(local_networks)
        self.native_queue: bool | None = None

    # ---- plumbing ------------------------------------------------------------

    def _json(self, commands: list) -> dict:
        rc, out, err = self.nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise PolicyError(f"nftables refused the change: {err.strip() or out}")
        return out

    def _text(self, script: str) -> None:
        rc, _out, err = self.nft.cmd(script)
        if rc != 0:
            raise PolicyError(f"nftables refused the ruleset: {err.strip()}")

    def has_native_queue(self) -> bool:
        """Whether the kernel has the nft ``queue`` statement (probed once, in a throwaway table)."""
        if self.native_queue is None:
            probe = "tollgate_probe"
            rc, _o, _e = self.nft.cmd(f"add table inet {probe}\n"
                                      f"add chain inet {probe} c {{ type filter hook forward priority 0; }}\n"
                                      f"add rule inet {probe} c queue num 0 bypass")
            self.nft.cmd(f"delete table inet {probe}")
            self.native_queue = rc == 0
        return self.native_queue

    def _queue_stmt(self) -> str:
        q = self.queue
        num = f"{q.first}-{q.last}" if q.last > q.first else f"{q.first}"
        flags = [f for f, on in (("fanout", q.last > q.first), ("bypass", q.fail_open)) if on]
        return f"queue num {num}" + (" " + ",".join(flags) if flags else "")

    def _iptables_rules(self) -> list[tuple[str, list[str]]]:
        q = self.queue
        target = ["-m", "comment", "--comment", COMMENT, "-j", "NFQUEUE"] + (["--queue-balance", f"{q.first}:{q.last}"] if q.last > q.first
                                      else ["--queue-num", str(q.first)])
        if q.fail_open:
            target.append("--queue-bypass")
        rules = []
        for net in self.local_networks:
            tool = "ip6tables-nft" if ":" in net else "iptables-nft"
            rules.append((tool, ["-s", net] + target))
            rules.append((tool, ["-d", net] + target))
        return rules

    def _iptables(self, add: bool) -> None:
        """Add our queue rules (once), or delete every rule carrying our comment,
        whatever queues it was made with."""
        if not add:
            for tool in ("iptables-nft", "ip6tables-nft"):
                listing = subprocess.run([tool, "-S", "FORWARD"], capture_output=True, text=True).stdout
                for line in listing.splitlines():
                    if f"--comment {COMMENT}" in line and line.startswith("-A FORWARD "):
                        subprocess.run([tool, "-D", "FORWARD", *shlex.split(line)[2:]], capture_output=True)
            return
        for tool, rule in self._iptables_rules():
            if subprocess.run([tool, "-C", "FORWARD"] + rule, capture_output=True).returncode == 0:
                continue
            proc = subprocess.run([tool, "-A", "FORWARD"] + rule, capture_output=True, text=True)
            if proc.returncode:
                raise PolicyError(f"{tool} -A FORWARD {' '.join(rule)}: {proc.stderr.strip()}")

    # ---- the ruleset -----------------------------------------------------------

    def ruleset(self) -> str:
        local4 = [n for n in self.local_networks if ":" not in n]
        local6 = [n for n in self.local_networks if ":" in n]
        queue = ""
        if self.has_native_queue():
            lines = []
            if local4:
                lines.append(f"ip saddr {{ {', '.join(local4)} }} {self._queue_stmt()}")
                lines.append(f"ip daddr {{ {', '.join(local4)} }} {self._queue_stmt()}")
            if local6:
                lines.append(f"ip6 saddr {{ {', '.join(local6)} }} {self._queue_stmt()}")
                lines.append(f"ip6 daddr {{ {', '.join(local6)} }} {self._queue_stmt()}")
            queue = ("  chain queue {\n    type filter hook forward priority 0; policy accept;\n"
                     + "".join(f"    {line}\n" for line in lines) + "  }\n")
        sets = "".join(
            f"  set {name} {{ type {kind}; flags interval;{' counter;' if counted else ''} }}\n"
            for name, kind, counted in (
                ("blocked4", "ipv4_addr", False), ("blocked6", "ipv6_addr", False),
                ("up4", "ipv4_addr", True), ("down4", "ipv4_addr", True),
                ("up6", "ipv6_addr", True), ("down6", "ipv6_addr", True)))
        return (
            f"table inet {TABLE} {{\n"
            + sets
            + "  chain block {\n    type filter hook forward priority -10; policy accept;\n"
              "    ip saddr @blocked4 jump blocked_out\n    ip6 saddr @blocked6 jump blocked_out\n"
              "    ip daddr @blocked4 drop\n    ip6 daddr @blocked6 drop\n  }\n"
              "  chain blocked_out {\n    meta l4proto tcp reject with tcp reset\n"
              "    reject with icmpx type admin-prohibited\n  }\n"
            + queue
            + "  chain account {\n    type filter hook forward priority 10; policy accept;\n"
              "    ip saddr @up4\n    ip daddr @down4\n    ip6 saddr @up6\n    ip6 daddr @down6\n  }\n"
              "  chain portal {\n    type nat hook prerouting priority dstnat; policy accept;\n"
              f"    ip saddr @blocked4 tcp dport 80 redirect to :{self.portal_port}\n"
              f"    ip6 saddr @blocked6 tcp dport 80 redirect to :{self.portal_port}\n  }}\n"
              "}\n")

    def install(self) -> None:
        """Create (or replace) our table atomically, and the queue rule."""
        self._text(f"table inet {TABLE}\ndelete table inet {TABLE}\n" + self.ruleset())
        if not self.has_native_queue():
            self._iptables(add=True)
        log.info("installed table inet %s (%s queue %s)", TABLE,
                 "native" if self.native_queue else "xtables NFQUEUE", self._queue_stmt())

    def remove(self) -> None:
        """Delete our table and our queue rules; nothing else. Idempotent."""
        self.nft.cmd(f"table inet {TABLE}\ndelete table inet {TABLE}")
        if not self.has_native_queue():
            self._iptables(add=False)

    # ---- elements ----------------------------------------------------------------

    def _elements(self, verb: str, set4: str, set6: str, networks) -> None:
        v4, v6 = _split(networks)
        cmds = []
        for name, elems in ((set4, v4), (set6, v6)):
            if elems:
                cmds.append({verb: {"element": {"family": "inet", "table": TABLE, "name": name, "elem": elems}}})
        if cmds:
            self._json(cmds)

    def block(self, networks) -> None:
        """Add subscribers' addresses to the blocked sets (one transaction)."""
        self._elements("add", "blocked4", "blocked6", networks)

    def unblock(self, networks) -> None:
        present = self.blocked()
        self._elements("delete", "blocked4", "blocked6",
                       [n for n in networks if str(ipaddress.ip_network(n, strict=False)) in present])

    def add_subscribers(self, networks) -> None:
        self._elements("add", "up4", "up6", networks)
        self._elements("add", "down4", "down6", networks)

    def remove_subscribers(self, networks) -> None:
        self._elements("delete", "up4", "up6", networks)
        self._elements("delete", "down4", "down6", networks)

    def restore(self, blocked, subscribers) -> None:
        """Bring the sets to exactly this state (on start, from the ledger):
        flush and refill in one transaction, so running it twice changes nothing."""
        cmds = [{"flush": {"set": {"family": "inet", "table": TABLE, "name": n}}}
                for n in ("blocked4", "blocked6", "up4", "down4", "up6", "down6")]
        for verb_sets, nets in ((("blocked4", "blocked6"), blocked), (("up4", "up6"), subscribers),
                                (("down4", "down6"), subscribers)):
            v4, v6 = _split(nets)
            for name, elems in zip(verb_sets, (v4, v6)):
                if elems:
                    cmds.append({"add": {"element": {"family": "inet", "table": TABLE, "name": name, "elem": elems}}})
        self._json(cmds)

    def _set(self, name: str) -> list:
        out = self._json([{"list": {"set": {"family": "inet", "table": TABLE, "name": name}}}])
        for item in out.get("nftables", []):
            if "set" in item:
                return item["set"].get("elem", [])
        return []

    def blocked(self) -> set[str]:
        return {_elem_key(e) for name in ("blocked4", "blocked6") for e in self._set(name)}

    def counters(self) -> dict[str, dict]:
        """Per subscriber network: bytes and packets up and down, from the kernel."""
        out: dict[str, dict] = {}
        for name, key in (("up4", "up"), ("up6", "up"), ("down4", "down"), ("down6", "down")):
            for e in self._set(name):
                elem = e.get("elem", e)
                counter = elem.get("counter") or {}
                row = out.setdefault(_elem_key(elem.get("val", elem)),
                                     {"up_bytes": 0, "up_packets": 0, "down_bytes": 0, "down_packets": 0})
                row[f"{key}_bytes"] = counter.get("bytes", 0)
                row[f"{key}_packets"] = counter.get("packets", 0)
        return out

    def dump(self) -> str:
        self.nft.set_json_output(False)
        try:
            _rc, out, _err = self.nft.cmd(f"list table inet {TABLE}")
        finally:
            self.nft.set_json_output(True)
        return out
