"""Enforcement in the kernel: one nftables table of ours, ``inet tollgate``.

Layout (``Enforcer.ruleset()`` is the exact text; ``tollgate policy show``
prints what is installed)::

  sets     blocked*            blocked subscribers' networks
           up*, down*          the same with a counter per element: per-subscriber counters
  forward  block    priority -10   before the queue
           (queue   priority   0   native ``queue`` statement, or iptables' filter FORWARD)
           account  priority  10   after the queue
  input    local    priority -10   what a blocked subscriber may reach on the gateway
  prerouting portal priority dstnat  a blocked subscriber's tcp/80 goes to the portal

Each purpose (``blocked``, ``up``, ``down``) has five sets, because nft
1.0.6 rewrites interval sets element by element (measured: deleting a batch
of 10k addresses from an interval set runs at ~100 elements/s, from a hash
set at ~400k/s): ``<purpose>4`` and ``<purpose>6`` are hash sets of single
addresses (/32, /128); ``<purpose>6_64`` is a hash set of IPv6 /64s looked up
with ``ip6 saddr & ffff:ffff:ffff:ffff::``, the usual subscriber prefix; only
other prefix lengths go to the interval sets ``<purpose>4_net`` and
``<purpose>6_net``. Subscriber networks must not overlap (the engine's
longest-prefix lookup would split their traffic differently); a packet is
counted once, by the first set that matches, in that order.

* ``block`` (forward, -10): a packet *from* a blocked network is rejected at
  once (TCP reset, ICMP/ICMPv6 administratively prohibited) so applications
  fail fast instead of timing out; a packet *to* one is dropped. The
  operator's allow-list (``allow=``) is let through in both directions. This
  runs before the queue, so a block holds while the daemon is down or slow.
  With ``refused_at_tc`` (the eBPF source) the tc program has refused a
  blocked subscriber's traffic before this hook, both ways, while the daemon
  is down too (gateway/sources/ebpf.py: its blocked flag is set before the
  nft block and cleared after the unblock), except its tcp/80 uploads, which
  it passes uncounted for the portal: nft redirects a new connection to the
  block page (``portal``) and this chain rejects the rest (a connection
  established before the block). So ``block`` tests ``tcp dport 80`` and
  only then the blocked sets (``blocked_http``): measured with
  ``benches/bench_dataplane.py --diagnose``, the ten rules and four set
  lookups it held cost every forwarded packet more than the tc program.
* the queue (0): native ``queue num A-B fanout bypass`` where the kernel has
  the statement (probed once, in a throwaway table); otherwise the xtables
  NFQUEUE target, added with iptables-nft/ip6tables-nft to the ``filter
  FORWARD`` chain (priority 0, so after ``block``), tagged with the comment
  ``tollgate`` and removed by tag. Only traffic from or to the local
  (subscriber) networks is queued; other forwarded traffic is not slowed.
  The fallback rules are appended: the operator's own FORWARD rules keep
  precedence (a packet they accept earlier is not queued, which the daemon's
  drift check reports).
* ``account`` (forward, 10): ``ip saddr @up4`` / ``ip daddr @down4`` (and the
  other slots).
  Each element's counter counts the packets and bytes of every forwarded
  packet whose source (upload) or destination (download) lies in that
  network and that got past the queue (a packet the queue drops is never
  counted). Bytes are ``skb->len`` at the forward hook: the IP header and
  everything after it, no link layer. A GSO/GRO aggregate counts as one
  packet with one IP header, exactly as it is queued to the daemon and as it
  crosses a veth. Traffic to or from the gateway itself (DNS, portal) is not
  forwarded and not counted. A packet between two subscribers counts as
  upload for one and download for the other.
  Not there with ``count=False`` (the eBPF source: its tc program's maps are
  the kernel's count, and the daemon reads no nft counter under it, no
  crash recovery from them and no drift check): neither the chain nor the
  ``up``/``down`` sets, so a forwarded packet is not looked up ten times
  more and counted again for nothing; ``install`` deletes the chains and
  sets a run that counted left. Blocks, the portal, the guests' sets and
  bindings stay.
* ``passive`` (forward, 0), instead of the queue when a passive source
  counts: first the per-subscriber kernel quotas, ``quota name ip saddr map
  @quota4 drop`` (and daddr, and the other slots): a named quota object
  ``q<subscriber id>`` per subscriber, ``over N bytes``, shared by all its
  networks and both directions, drops every packet once the subscriber has
  used N bytes since the quota was last reset (so a lagging reader cannot let
  a subscriber overspend; the quota counts the bytes of every packet it sees,
  dropped ones too); then, for the NFLOG source, ``log group G snaplen S
  queue-threshold Q`` copies the headers of each packet from or to a local
  network, once (``accept`` after logging: a packet between two subscribers
  is not logged twice). A packet the quota drops is neither logged nor
  counted by ``account``.
* ``local`` (input, -10): a blocked subscriber may reach DNS (udp and tcp 53)
  and the portal port on the gateway's addresses, IPv6 neighbour discovery,
  and the allow-list; everything else is rejected.
* ``portal`` (prerouting nat): a blocked subscriber's new tcp/80 connections
  not to the allow-list are redirected to the portal port on the gateway.
* ``probes`` (output, raw): the gateway's own probes that end a blocked
  subscriber's established connections (``policy/resets.py``, marked
  ``PROBE_MARK``) are not tracked.
* guests (``guests=True``, ``[sessions] portal_login``; issue 15): an
  address of the local networks that is in no ``up`` set belongs to no one
  (a hotel guest's device before it logs in). The ``known*`` sets hold the
  same networks as ``up*`` with no counters (a lookup in a set with
  counters counts the packet in the element: the up sets are looked up by
  ``account`` only, or a subscriber's upload would count twice); the
  ``GuestEnforcer`` that ``from_config`` makes keeps them in line. ``block``
  jumps to ``guests_out`` for every packet from the local networks: an
  address in a ``known`` set returns, the allow-list is accepted, the rest
  is rejected as a blocked subscriber's is; ``portal`` jumps to
  ``guests_portal`` for their tcp/80, which returns for a known address and
  otherwise redirects to the portal (``portal_redirect``). A portal login or
  a voucher makes the device's address a session's, so it enters the sets
  and leaves both rules with no rule change. Only new connections are
  redirected (nat sees the first packet); the block page closes its own.
* bindings (``bindings=True``, ``[sessions] bind_mac``; issue 15,
  anti-spoofing): ``bound4``/``bound6`` map a bound address (a /32 or
  /128) to its subscriber's named counter ``spoof<subscriber id>``;
  ``bound_mac4``/``bound_mac6`` hold the ``address . MAC`` pairs allowed.
  The first rules of ``block``: ``ip saddr . ether saddr != @bound_mac4
  counter name ip saddr map @bound4 drop`` (and ip6): a packet whose pair is
  not allowed is counted and dropped only if its address is bound (the map
  lookup fails for an address that is not, and the rule does not match), so
  nothing changes for unbound addresses. Forwarded packets only, and only
  from Ethernet-like links (``ether saddr`` needs a MAC header); kept by
  ``AddressBindings`` (gateway/daemon/sessions.py decides what is bound).

Every change goes through one reused libnftables context (python-nftables,
JSON for elements), never by forking ``nft``; a batch of elements is one
transaction. Everything applies to the network namespace of the process.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass

import nftables

from ext import netaddr
from ext.constants import IPPROTO_TCP, PORT_PROTOCOLS
from ext.errors import TollgateError

log = logging.getLogger("tollgate.policy")
TABLE = "tollgate"
COMMENT = "tollgate"  # marks our xtables queue rules
# The slots of a purpose: (family, set name suffix, nft type, prefix length it
# holds (None: any, interval set), mask applied to the address before lookup).
SLOTS = (("ip", "4", "ipv4_addr", 32, ""),
         ("ip", "4_net", "ipv4_addr", None, ""),
         ("ip6", "6", "ipv6_addr", 128, ""),
         ("ip6", "6_64", "ipv6_addr", 64, " & ffff:ffff:ffff:ffff::"),
         ("ip6", "6_net", "ipv6_addr", None, ""))
PURPOSES = ("blocked", "up", "down")
COUNTED = ("up", "down")  # the purposes whose sets count (left out with count=False)
PREFIX_OF = {suffix: plen for _f, suffix, _t, plen, _m in SLOTS}
QUOTA_MAP = "quota"  # quota4, quota6_64, ...: network -> the subscriber's quota object
QUOTA_PREFIX = "q"   # the quota object of subscriber 12 is q12
# elements per `get element` command. libnftables 1.0.6 corrupts its stack past a fixed number of elements
# (measured here: IPv4 from 255, IPv6 from 129 elements: "stack smashing detected", the process dies), so a
# command asks for far fewer
GET_BATCH = 64
QUOTA_BATCH = 256  # quota objects asked for by name in one call
PROBE_MARK = 0x74670001  # SO_MARK of the gateway's reset probes (policy/resets.py): left untracked


class PolicyError(TollgateError):
    """The kernel refused a ruleset change, or an address given to the
    enforcer is not a network; nothing was changed."""


@dataclass(frozen=True)
class QueueSpec:
    first: int = 0
    last: int = 0
    fail_open: bool = True


@dataclass(frozen=True)
class AllowRule:
    """Traffic a blocked subscriber may still exchange: ``network`` (CIDR),
    ``proto`` (IP protocol number, 0 = any) and, for port protocols, the
    remote port range."""

    network: str
    proto: int = 0
    port_lo: int = 0
    port_hi: int = 65535

    @classmethod
    def of(cls, rule) -> AllowRule:
        """From an ``AllowRule``, a config ``ZoneRule`` (attributes network,
        proto, port_lo, port_hi) or a tuple ``(network, proto, lo, hi)``."""
        if isinstance(rule, cls):
            return rule
        if hasattr(rule, "network"):
            return cls(str(rule.network), rule.proto, rule.port_lo, rule.port_hi)
        return cls(*rule)

    def match(self, direction: str) -> str:
        """nft match text; ``direction`` is ``d`` (to the rule's network) or
        ``s`` (replies from it)."""
        net = ipaddress.ip_network(self.network, strict=False)
        text = f"{'ip' if net.version == 4 else 'ip6'} {direction}addr {net}"
        if self.proto:
            text += f" meta l4proto {self.proto}"
            if self.proto in PORT_PROTOCOLS and (self.port_lo, self.port_hi) != (0, 65535):
                ports = str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"
                text += f" th {direction}port {ports}"
        return text

    def covers_http(self) -> bool:
        return self.proto in (0, IPPROTO_TCP) and self.port_lo <= 80 <= self.port_hi


def _split(networks) -> dict[str, list]:
    """Networks as nft JSON set elements, by slot suffix (see ``SLOTS``).
    Raises PolicyError on the first thing that is not a network."""
    out: dict[str, list] = {}
    for n in networks:
        try:
            version, addr, plen = netaddr.split(n)
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"{n!r} is not an address or network: {exc}") from None
        fam = str(version)
        suffix = fam if plen == (32 if version == 4 else 128) else "6_64" if (version, plen) == (6, 64) \
            else f"{fam}_net"
        out.setdefault(suffix, []).append(addr if PREFIX_OF[suffix] else {"prefix": {"addr": addr, "len": plen}})
    return out


# an element of a set in nft's text form: the address, prefix or range, and its counter if the set counts
_SET_ITEM = re.compile(r"([0-9a-fA-F.:]+(?:/\d+|-[0-9a-fA-F.:]+)?)(?:\s+counter packets (\d+) bytes (\d+))?")
_ELEMENT_COUNTER = re.compile(r"([0-9a-f.:]+) counter packets (\d+) bytes (\d+)")  # nft's text form of a counted element


def _counter_rows(read: dict) -> dict[str, dict]:
    """``Enforcer._read``'s up and down sets as per-network counter rows (see ``Enforcer.counters``)."""
    rows: dict[str, dict] = {}
    for way in ("up", "down"):
        for net, counter in read.get(way, {}).items():
            row = rows.setdefault(net, {"up_bytes": 0, "up_packets": 0, "down_bytes": 0, "down_packets": 0})
            row[f"{way}_bytes"] = counter.get("bytes", 0)
            row[f"{way}_packets"] = counter.get("packets", 0)
    return rows


def _quota_items(out: dict) -> dict[int, dict]:
    """Our quota objects in nft's JSON output: ``{subscriber id: {"used", "allowed"}}``."""
    found = {}
    for item in out.get("nftables", []):
        q = item.get("quota")
        if q and q.get("table") == TABLE and q["name"].startswith(QUOTA_PREFIX) and q["name"][len(QUOTA_PREFIX):].isdigit():
            found[int(q["name"][len(QUOTA_PREFIX):])] = {"used": q.get("used", 0), "allowed": q.get("bytes", 0)}
    return found


def _canon(network) -> str:
    """The key networks are reported under: ``100.64.1.2/32``, ``2001:db8:100:1::/64``."""
    return netaddr.canonical(network)


def _value(elem):
    """A listed element's value: counted sets wrap it as ``{"elem": {"val": ..., "counter": ...}}``."""
    return elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem


def _elem_key(elem, plen: int | None = None) -> str:
    """A listed element's network, ``plen`` being the prefix length its set holds."""
    elem = _value(elem)
    if plen is not None:
        return f"{elem}/{plen}"
    if isinstance(elem, dict):
        p = elem.get("prefix")
        if p:
            return f"{p['addr']}/{p['len']}"
        r = elem.get("range")
        if r:  # an interval the kernel merged; name it by its ends
            return f"{r[0]}-{r[1]}"
    return _canon(elem)


class Enforcer:
    """Owns ``table inet tollgate`` (and the xtables queue rules where the
    native queue statement is missing) in the current network namespace.

    ``queues``: the NFQUEUE numbers the daemon reads (a contiguous range);
    ``fail_open``: let traffic pass when no reader is there (``bypass``);
    ``portal_port``: the block page's tcp port on the gateway;
    ``local_networks``: the subscriber networks whose traffic is queued;
    ``allow``: what blocked subscribers may still reach (``AllowRule``,
    config ``ZoneRule`` or ``(network, proto, lo, hi)``);
    ``dns_port``: DNS on the gateway, always allowed to blocked subscribers;
    ``log_group``: log the local networks' forwarded packets to this NFLOG
    group (the NFLOG source; use with ``queues=()``), ``log_snaplen`` bytes of
    each, ``log_threshold`` packets per netlink datagram;
    ``quotas``: per-subscriber kernel quotas (``set_quotas``);
    ``count``: the ``account`` chain and its counted sets (False: the eBPF
    source, which counts in its own maps; see the module docstring);
    ``refused_at_tc``: a tc program refuses blocked subscribers' traffic
    before the forward hook but their tcp/80 (the eBPF source); ``block``
    keeps only that (the module docstring's ``block``).
    """

    def __init__(self, queues=(0,), fail_open: bool = True, portal_port: int = 8080,
                 local_networks=("100.64.0.0/10",), allow=(), dns_port: int = 53, log_group: int | None = None,
                 log_snaplen: int = 128, log_threshold: int = 64, quotas: bool = False, guests: bool = False,
                 bindings: bool = False, count: bool = True, refused_at_tc: bool = False) -> None:
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        queues = sorted(queues)
        if queues and (queues != list(range(queues[0], queues[-1] + 1)) or not 0 <= queues[0] <= queues[-1] <= 65535):
            raise PolicyError(f"queues must be a contiguous range of 0..65535, not {queues}")
        # no queues: a passive source counts the traffic, nothing is queued
        self.queue = QueueSpec(queues[0], queues[-1], fail_open) if queues else None
        self.portal_port = int(portal_port)
        self.dns_port = int(dns_port)
        self.local_networks = [_canon(n) for n in local_networks]
        self.allow = [AllowRule.of(r) for r in allow]
        self.native_queue: bool | None = None
        if log_group is not None and not 0 <= log_group <= 65535:
            raise PolicyError(f"log group must be 0..65535, not {log_group}")
        if log_group is not None and self.queue is not None:
            raise PolicyError("a log group is for a passive source: give no queues with it")
        if not 20 <= log_snaplen <= 65535 or not 1 <= log_threshold <= 65535:
            raise PolicyError("log snaplen must be 20..65535 and the queue threshold 1..65535")
        self.log_group = log_group
        self.log_snaplen = int(log_snaplen)
        self.log_threshold = int(log_threshold)
        self.quotas_on = bool(quotas)
        self.guests = bool(guests)  # see the module docstring: guests
        self.bindings = bool(bindings)  # see the module docstring: bindings
        self.count = bool(count)
        self.refused_at_tc = bool(refused_at_tc)
        self.purposes = PURPOSES if self.count else tuple(p for p in PURPOSES if p not in COUNTED)

    @classmethod
    def from_config(cls, config, **kw) -> Enforcer:
        """One for a gateway ``Config``: its local networks and allow-list;
        ``kw`` (queues, fail_open, portal_port) as for the constructor."""
        kw.setdefault("guests", bool(getattr(getattr(config, "sessions", None), "portal_login", False)))
        kw.setdefault("bindings", bool(getattr(getattr(config, "sessions", None), "bind_mac", ())))
        return (GuestEnforcer if kw["guests"] and cls is Enforcer else cls)(
            local_networks=config.zones.local_networks, allow=config.allowlist, **kw)

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
        """Whether the kernel has the nft ``queue`` statement: probed once, by
        adding a queue rule to a throwaway table that is deleted again."""
        if self.native_queue is None:
            probe = f"tollgate_probe_{os.getpid()}"
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
        if q is None:
            return []
        target = ["-m", "comment", "--comment", COMMENT, "-j", "NFQUEUE"]
        target += (["--queue-balance", f"{q.first}:{q.last}"] if q.last > q.first else ["--queue-num", str(q.first)])
        if q.fail_open:
            target.append("--queue-bypass")
        rules = []
        for net in self.local_networks:
            tool = "ip6tables-nft" if ":" in net else "iptables-nft"
            rules.append((tool, ["-s", net] + target))
            rules.append((tool, ["-d", net] + target))
        return rules

    @staticmethod
    def _our_xtables_rules() -> list[tuple[str, list[str]]]:
        """Every FORWARD rule carrying our comment, whatever queues it was made with."""
        found = []
        for tool in ("iptables-nft", "ip6tables-nft"):
            listing = subprocess.run([tool, "-S", "FORWARD"], check=False, capture_output=True, text=True).stdout
            for line in listing.splitlines():
                if line.startswith("-A FORWARD ") and f"--comment {COMMENT}" in line:
                    found.append((tool, shlex.split(line)[2:]))
        return found

    def _xtables_install(self) -> None:
        """Make the FORWARD queue rules exactly ours for this configuration:
        stale ones (other queues, other networks) go, missing ones are appended."""
        wanted = self._iptables_rules()
        canon = {(tool, " ".join(r)) for tool, r in wanted}
        for tool, rule in self._our_xtables_rules():
            # iptables -S prints "-s 100.64.0.0/10"; compare on that form
            if (tool, " ".join(rule)) not in canon:
                subprocess.run([tool, "-D", "FORWARD", *rule], check=False, capture_output=True)
        for tool, rule in wanted:
            if subprocess.run([tool, "-C", "FORWARD"] + rule, check=False, capture_output=True).returncode == 0:
                continue
            proc = subprocess.run([tool, "-A", "FORWARD"] + rule, check=False, capture_output=True, text=True)
            if proc.returncode:
                raise PolicyError(f"{tool} -A FORWARD {' '.join(rule)}: {proc.stderr.strip()}")

    def _xtables_remove(self) -> None:
        for tool, rule in self._our_xtables_rules():
            subprocess.run([tool, "-D", "FORWARD", *rule], check=False, capture_output=True)

    # ---- the ruleset -----------------------------------------------------------

    def ruleset(self) -> str:
        """The table as nft text (what ``install`` loads)."""
        def lines(items) -> str:
            return "".join(f"    {item}\n" for item in items)

        sets = "".join(
            f"  set {purpose}{suffix} {{ type {kind};{'' if plen else ' flags interval;'}"
            f"{' counter;' if purpose != 'blocked' else ''} }}\n"
            for purpose in self.purposes for _fam, suffix, kind, plen, _mask in SLOTS)
        if self.quotas_on:
            sets += "".join(f"  map {QUOTA_MAP}{suffix} {{ type {kind} : quota;{'' if plen else ' flags interval;'} }}\n"
                            for _fam, suffix, kind, plen, _mask in SLOTS)

        def each(purpose: str, direction: str, then: str) -> list[str]:
            return [f"{fam} {direction}addr{mask} @{purpose}{suffix} {then}".rstrip()
                    for fam, suffix, _kind, _plen, mask in SLOTS]

        queue = ""
        if self.queue is not None and self.has_native_queue():
            stmts = []
            for net in self.local_networks:
                fam = "ip6" if ":" in net else "ip"
                stmts += [f"{fam} saddr {net} {self._queue_stmt()}", f"{fam} daddr {net} {self._queue_stmt()}"]
            queue = ("  chain queue {\n    type filter hook forward priority 0; policy accept;\n"
                     + lines(stmts) + "  }\n")
        passive = ""
        if self.quotas_on or self.log_group is not None:
            stmts = [f"quota name {fam} {direction}addr{mask} map @{QUOTA_MAP}{suffix} drop"
                     for direction in "sd" for fam, suffix, _kind, _plen, mask in SLOTS] if self.quotas_on else []
            if self.log_group is not None:
                log_stmt = (f"log group {self.log_group} snaplen {self.log_snaplen} "
                            f"queue-threshold {self.log_threshold} accept")
                for fam in ("ip", "ip6"):
                    nets = [n for n in self.local_networks if (":" in n) == (fam == "ip6")]
                    if nets:
                        stmts += [f"{fam} saddr {{ {', '.join(nets)} }} {log_stmt}",
                                  f"{fam} daddr {{ {', '.join(nets)} }} {log_stmt}"]
            passive = ("  chain passive {\n    type filter hook forward priority 0; policy accept;\n"
                       + lines(stmts) + "  }\n")
        reject = ["meta l4proto tcp reject with tcp reset", "reject with icmpx type admin-prohibited"]
        # Under a tc program that refuses blocked subscribers first (refused_at_tc), what reaches the forward
        # hook of theirs is the tcp/80 it passes for the portal: one port test per forwarded packet, the
        # set lookups only for tcp/80 (blocked_http), instead of ten rules and four lookups for every packet.
        if self.refused_at_tc:
            blocks = ["tcp dport 80 jump blocked_http"]
            blocked_chains = "  chain blocked_http {\n" + lines(each("blocked", "s", "jump blocked_out")) + "  }\n"
        else:
            blocks = each("blocked", "s", "jump blocked_out") + each("blocked", "d", "jump blocked_in")
            blocked_chains = ("  chain blocked_in {\n" + lines([f"{r.match('s')} accept" for r in self.allow] + ["drop"])
                              + "  }\n")
        local_allowed = [
            f"meta l4proto {{ tcp, udp }} th dport {self.dns_port} accept",
            f"tcp dport {self.portal_port} accept",
            # without neighbour discovery a blocked IPv6 subscriber could not reach the portal at all
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
        ]
        return (
            f"table inet {TABLE} {{\n"
            + sets + self._guest_sets() + binding_sets(self.bindings)
            + "  chain block {\n    type filter hook forward priority -10; policy accept;\n"
            + lines(binding_rules(self.bindings) + blocks + self._guest_rules("jump guests_out"))
            + "  }\n"
            + blocked_chains
            + "  chain blocked_out {\n"
            + lines([f"{r.match('d')} accept" for r in self.allow] + reject)
            + "  }\n"
            + queue
            + passive
            + (("  chain account {\n    type filter hook forward priority 10; policy accept;\n"
                + lines(["jump count_up", "jump count_down"])
                # return at the first match: each packet counted once per direction
                + "  }\n  chain count_up {\n" + lines(each("up", "s", "return"))
                + "  }\n  chain count_down {\n" + lines(each("down", "d", "return"))
                + "  }\n") if self.count else "")
            + "  chain local {\n    type filter hook input priority -10; policy accept;\n"
            + lines(each("blocked", "s", "jump blocked_local"))
            + "  }\n  chain blocked_local {\n"
            + lines(local_allowed + [f"{r.match('d')} accept" for r in self.allow] + reject)
            + "  }\n  chain probes {\n    type filter hook output priority raw; policy accept;\n"
            # a probe poses as the peer of a tracked connection: tracking it would clash with that connection
            + lines([f"meta mark {PROBE_MARK:#x} notrack"])
            + "  }\n  chain portal {\n    type nat hook prerouting priority dstnat; policy accept;\n"
            + lines(each("blocked", "s", "tcp dport 80 jump portal_redirect")
                    + self._guest_rules("tcp dport 80 jump guests_portal"))
            + "  }\n  chain portal_redirect {\n"
            + lines([f"{r.match('d')} return" for r in self.allow if r.covers_http()]
                    + [f"tcp dport 80 redirect to :{self.portal_port}"])
            + "  }\n" + self._guest_chains(lines, each, reject) + "}\n")

    # ---- guests: addresses of no one go to the portal (issue 15; the module docstring's "guests") ----------------

    def _guest_rules(self, then: str) -> list[str]:
        """Rules sending every packet from the local networks to ``then`` (none unless ``guests``)."""
        if not self.guests:
            return []
        out = []
        for fam in ("ip", "ip6"):
            nets = [n for n in self.local_networks if (":" in n) == (fam == "ip6")]
            if nets:
                out.append(f"{fam} saddr {{ {', '.join(nets)} }} {then}")
        return out

    def _guest_sets(self) -> str:
        if not self.guests:
            return ""
        return "".join(f"  set {GUEST_KNOWN}{suffix} {{ type {kind};{'' if plen else ' flags interval;'} }}\n"
                       for _fam, suffix, kind, plen, _mask in SLOTS)

    def _guest_chains(self, lines, each, reject) -> str:
        if not self.guests:
            return ""
        return ("  chain guests_out {\n" + lines(each(GUEST_KNOWN, "s", "return")
                                                 + [f"{r.match('d')} accept" for r in self.allow] + reject)
                + "  }\n  chain guests_portal {\n" + lines(each(GUEST_KNOWN, "s", "return") + ["jump portal_redirect"])
                + "  }\n")

    def install(self) -> None:
        """Create our table, or renew its rules (the allow-list, the portal
        port, the queues may have changed) in one transaction; and the queue
        rules. Set elements and their counters are kept, so a config reload
        neither unblocks anyone nor resets the counters. A table of another
        layout (an older version) is replaced whole, elements and all: call
        ``restore`` after ``install`` on start."""
        rc, _out, _err = self.nft.cmd(f"add table inet {TABLE}\nflush table inet {TABLE}\n" + self.ruleset())
        if rc != 0:
            self._text(f"table inet {TABLE}\ndelete table inet {TABLE}\n" + self.ruleset())
        if not self.count:
            # what a counting run left: flush table empties chains and keeps them (an empty base chain in the
            # forward hook is still walked by every packet) and keeps sets, elements and all; each delete fails
            # where there is nothing to delete (nft 1.0.6 has no destroy); chains first (they referenced the sets)
            stale = [("chain", c) for c in ("account", "count_up", "count_down")]
            stale += [("set", purpose + suffix) for purpose in COUNTED for _f, suffix, _k, _p, _m in SLOTS]
            for kind, name in stale:
                self.nft.cmd(f"delete {kind} inet {TABLE} {name}")
        if self.has_native_queue():
            self._xtables_remove()  # left by an earlier run on another kernel's rules
        else:
            self._xtables_install()
        log.info("installed table inet %s (%s)", TABLE, (f"NFLOG group {self.log_group}" if self.log_group is not None
                                                        else "no queue") if self.queue is None else
                 ("native queue " if self.native_queue else "xtables NFQUEUE fallback ") + self._queue_stmt())

    def installed(self) -> bool:
        """Whether our table exists in this namespace."""
        rc, _out, _err = self.nft.cmd(f"list table inet {TABLE}")
        return rc == 0

    def remove(self) -> None:
        """Delete our table and our queue rules; nothing else. Idempotent."""
        self.nft.cmd(f"table inet {TABLE}\ndelete table inet {TABLE}")
        if self._our_xtables_rules():
            self._xtables_remove()
            self._drop_empty_xtables_tables()

    def _drop_empty_xtables_tables(self) -> None:
        """iptables-nft made ``ip filter``/``ip6 filter`` to hold our queue
        rules; delete them again when they are exactly what it made: one
        empty FORWARD chain with policy accept (nothing anyone else uses)."""
        for family in ("ip", "ip6"):
            rc, out, _err = self.nft.json_cmd({"nftables": [{"list": {"table": {"family": family, "name": "filter"}}}]})
            if rc != 0:
                continue
            items = out.get("nftables", [])
            chains = [i["chain"] for i in items if "chain" in i]
            if (not any("rule" in i or "set" in i or "map" in i for i in items) and len(chains) == 1
                    and chains[0]["name"] == "FORWARD" and chains[0].get("policy") == "accept"):
                self.nft.cmd(f"delete table {family} filter")

    # ---- elements ----------------------------------------------------------------

    def _element_cmds(self, verb: str, purposes, networks) -> list:
        """``verb`` (add, delete) the networks in the sets of each of ``purposes`` (one name or several:
        the networks are parsed once)."""
        split = _split(networks)
        return [{verb: {"element": {"family": "inet", "table": TABLE, "name": purpose + suffix, "elem": elems}}}
                for purpose in ((purposes,) if isinstance(purposes, str) else purposes)
                for suffix, elems in split.items()]

    def _present(self, networks, purpose: str) -> list:
        """The given networks that are elements of the purpose's sets."""
        have = self._read((purpose,))[purpose]
        return [n for n in networks if _canon(n) in have]

    def block(self, networks) -> None:
        """Add networks to the blocked sets, all in one transaction.
        Already blocked ones are no error."""
        self._run(self._element_cmds("add", "blocked", networks))

    def unblock(self, networks) -> None:
        """Remove networks from the blocked sets in one transaction; ones
        not blocked are skipped."""
        self._delete(networks, "blocked")

    def add_subscriber_addresses(self, networks) -> None:
        """Start counting these subscriber networks (one transaction; nothing with ``count=False``)."""
        if self.count:
            self._run(self._element_cmds("add", COUNTED, networks))

    def remove_subscriber_addresses(self, networks) -> None:
        """Stop counting these networks (their counters go with them)."""
        if self.count:
            self._delete(networks, *COUNTED)

    def _delete(self, networks, *purposes) -> None:
        """Delete elements in one transaction. nft 1.0.6 has no ``destroy``
        and a batch with an absent element fails as a whole; only then are
        the present ones looked up and deleted (rare: the daemon deletes
        what it added)."""
        def cmds(nets):
            return self._element_cmds("delete", purposes, nets)

        batch = cmds(networks)  # validates every address before the kernel is asked
        if not batch:
            return
        rc, _out, _err = self.nft.json_cmd({"nftables": batch})
        if rc != 0:
            self._run(cmds(self._present(networks, purposes[0])))

    add_subscribers = add_subscriber_addresses
    remove_subscribers = remove_subscriber_addresses

    def _run(self, cmds: list) -> None:
        if cmds:
            self._json(cmds)

    def restore(self, blocked, subscribers) -> dict[str, dict]:
        """Bring the sets to exactly this state (the daemon calls it on start,
        from the ledger), in one transaction, without ever emptying them:
        missing elements are added first, then the others deleted. An element
        that stays keeps its counter and a blocked network that stays blocked
        never leaves its set, so a restart neither lets a blocked subscriber
        through for a moment nor resets the kernel's count that crash
        recovery reads as a delta (gateway/daemon/kernel.py). Running it twice
        changes nothing. Returns the counters of the subscriber networks as
        :meth:`counters` would have read them just before (an element added
        here starts at zero), so that a start lists the table once (with
        ``count=False``: the blocked sets only, and nothing counted: {})."""
        have = self._read(self.purposes)
        want = {"blocked": {_canon(n) for n in blocked}}
        if self.count:
            want["up"] = want["down"] = {_canon(n) for n in subscribers}
        adds, deletes = [], []
        missing = {purpose: sorted(want[purpose] - set(have[purpose])) for purpose in self.purposes}
        if self.count and missing["up"] == missing["down"]:  # as usual: parsed once for both
            adds += self._element_cmds("add", COUNTED, missing.pop("up"))
            missing.pop("down")
        for purpose, nets in missing.items():
            adds += self._element_cmds("add", purpose, nets)
        for purpose in self.purposes:
            # "a-b": an interval the kernel merged (our sets never ask it to): nothing to delete it by
            deletes += self._element_cmds("delete", purpose, sorted(k for k in set(have[purpose]) - want[purpose]
                                                                    if "-" not in k))
        self._run(adds + deletes)
        return {net: row for net, row in _counter_rows(have).items() if net in want.get("up", ())}

    # ---- reading back ------------------------------------------------------------

    def _read(self, purposes=PURPOSES) -> dict[str, dict[str, dict]]:
        """``{purpose: {network: counter}}`` from a listing of each of the
        purposes' sets (the counter is ``{}`` for sets without counters). The
        text form, parsed here, because nft's JSON is far dearer at scale:
        for 360k counted elements (100k subscribers) 4.7 s and 800 MB of
        Python objects, against 2.6 s and 90 MB."""
        found: dict[str, dict[str, dict]] = {p: {} for p in purposes}
        self.nft.set_json_output(False)
        try:
            for purpose in purposes:
                for suffix, plen in PREFIX_OF.items():
                    rc, out, _err = self.nft.cmd(f"list set inet {TABLE} {purpose}{suffix}")
                    start = out.find("elements = {") if rc == 0 else -1
                    if start < 0:  # no such set, or an empty one
                        continue
                    block = out[start + len("elements = {"):out.index("}", start)]
                    into = found[purpose]
                    for m in _SET_ITEM.finditer(block):
                        key = m.group(1) if plen is None else f"{m.group(1)}/{plen}"
                        into[key] = {"packets": int(m.group(2)), "bytes": int(m.group(3))} if m.group(2) else {}
        finally:
            self.nft.set_json_output(True)
        return found

    def blocked(self) -> set[str]:
        """The blocked networks, as ``100.64.1.2/32`` / ``2001:db8:100:1::/64``."""
        return set(self._read(("blocked",))["blocked"])

    def counters(self) -> dict[str, dict]:
        """The kernel's per-network counters, read in one call:
        ``{"100.64.1.2/32": {"up_bytes", "up_packets", "down_bytes", "down_packets"}}``
        (what they count: see the module docstring)."""
        return _counter_rows(self._read(("up", "down")))

    def counters_of(self, networks, batch: int = GET_BATCH) -> dict[str, dict]:
        """The counters of just these networks, as :meth:`counters` gives
        them: what the drift check reads of the subscribers that had traffic,
        instead of listing the whole table (3.6M counted elements at a million
        subscribers). Hash-set elements are asked for by value (``get
        element``: the text form, the only one that carries their counters in
        nft 1.0.6); the interval sets, which hold only the unusual prefix
        lengths, are listed whole. A network that is no element of ours is
        left out (the slow path finds it: one listing per missing batch)."""
        wanted = {_canon(n) for n in networks}
        by_slot = _split(wanted)
        rows: dict[str, dict] = {}

        def put(way: str, net: str, packets: int, nbytes: int) -> None:
            row = rows.setdefault(net, {"up_bytes": 0, "up_packets": 0, "down_bytes": 0, "down_packets": 0})
            row[f"{way}_bytes"], row[f"{way}_packets"] = nbytes, packets

        for way in ("up", "down"):
            for suffix, elems in by_slot.items():
                plen = PREFIX_OF[suffix]
                if plen is None:
                    continue
                for i in range(0, len(elems), batch):
                    chunk = elems[i:i + batch]
                    out = self._get_elements(f"{way}{suffix}", chunk)
                    if out is None:  # some element is gone: read them from the set's listing
                        listed = self._read((way,))[way]
                        for e in chunk:
                            c = listed.get(f"{e}/{plen}")
                            if c is not None:
                                put(way, f"{e}/{plen}", c.get("packets", 0), c.get("bytes", 0))
                        continue
                    for addr, packets, nbytes in out:
                        put(way, _canon(f"{addr}/{plen}"), packets, nbytes)
            if any(PREFIX_OF[suffix] is None for suffix in by_slot):
                for net, c in self._read((way,))[way].items():
                    if net in wanted and PREFIX_OF[next(iter(_split([net])))] is None:
                        put(way, net, c.get("packets", 0), c.get("bytes", 0))
        return rows

    def _get_elements(self, set_name: str, elems: list) -> list[tuple[str, int, int]] | None:
        """``(address, packets, bytes)`` of these elements of a counted hash set; None if one is missing."""
        self.nft.set_json_output(False)
        try:
            rc, out, _err = self.nft.cmd(f"get element inet {TABLE} {set_name} {{ {', '.join(elems)} }}")
        finally:
            self.nft.set_json_output(True)
        if rc != 0:
            return None
        return [(a, int(p), int(b)) for a, p, b in _ELEMENT_COUNTER.findall(out)]

    # ---- kernel quotas -------------------------------------------------------------

    def _quota_obj(self, sid: int, allowed: int | None = None) -> dict:
        obj = {"family": "inet", "table": TABLE, "name": f"{QUOTA_PREFIX}{int(sid)}"}
        if allowed is not None:
            if not 0 <= allowed < 2 ** 63:
                raise PolicyError(f"quota of subscriber {sid}: {allowed} bytes is out of range")
            obj.update(bytes=int(allowed), inv=True)  # "over N bytes": matches (drops) past N
        return obj

    def _quota_elements(self, verb: str, sid: int, networks) -> list:
        return [{verb: {"element": {"family": "inet", "table": TABLE, "name": QUOTA_MAP + suffix,
                                    "elem": [[e, f"{QUOTA_PREFIX}{int(sid)}"] for e in elems]}}}
                for suffix, elems in _split(networks).items()]

    def _need_quotas(self) -> None:
        if not self.quotas_on:
            raise PolicyError("this enforcer was made without quotas=True: the table has no quota maps")

    def set_quotas(self, quotas: dict) -> None:
        """``{subscriber id: (networks, allowed bytes)}``: create each
        subscriber's quota (or renew its limit, keeping what it has used) and
        point its networks at it, all in one transaction. The kernel drops the
        subscriber's packets once it has used more than ``allowed`` bytes
        since the quota was created or last reset."""
        self._need_quotas()
        cmds = []
        for sid, (networks, allowed) in quotas.items():
            cmds.append({"add": {"quota": self._quota_obj(sid, allowed)}})
            cmds += self._quota_elements("add", sid, networks)
        self._run(cmds)

    def set_quota_limits(self, limits: dict) -> None:
        """``{subscriber id: allowed bytes}`` for existing quotas, in one
        transaction; the bytes they have used stay."""
        self._need_quotas()
        self._run([{"add": {"quota": self._quota_obj(sid, allowed)}} for sid, allowed in limits.items()])

    def reset_quotas(self, sids) -> dict[int, int]:
        """Set the used bytes of these quotas to zero (one transaction);
        returns what each had used."""
        self._need_quotas()
        sids = list(sids)
        if not sids:
            return {}
        out = self._json([{"reset": {"quota": self._quota_obj(sid)}} for sid in sids])
        return {int(q["name"][len(QUOTA_PREFIX):]): q.get("used", 0)
                for q in (i.get("quota") for i in out.get("nftables", [])) if q}

    def remove_quotas(self, quotas: dict) -> None:
        """``{subscriber id: networks}``: drop the map elements and the quota
        objects, one transaction (elements missing already are no error)."""
        self._need_quotas()
        direct = [c for sid, networks in quotas.items() for c in self._quota_elements("delete", sid, networks)]
        direct += [{"delete": {"quota": self._quota_obj(sid)}} for sid in quotas]
        if not direct or self.nft.json_cmd({"nftables": direct})[0] == 0:  # as usual: everything was there
            return
        have = self.quotas()  # a batch with a missing element fails whole: delete what is there
        elements = self._read_quota_maps()
        cmds = []
        for sid, networks in quotas.items():
            present = [n for n in networks if elements.get(_canon(n)) == int(sid)]
            cmds += self._quota_elements("delete", sid, present)
            if int(sid) in have:
                cmds.append({"delete": {"quota": self._quota_obj(sid)}})
        self._run(cmds)

    def restore_quotas(self, quotas: dict) -> None:
        """Exactly these quotas (``{sid: (networks, allowed)}``), used bytes
        zero, in one transaction: the maps are flushed and every quota object
        of ours deleted first."""
        self._need_quotas()
        cmds = [{"flush": {"map": {"family": "inet", "table": TABLE, "name": QUOTA_MAP + suffix}}}
                for _f, suffix, _t, _p, _m in SLOTS]
        cmds += [{"delete": {"quota": self._quota_obj(sid)}} for sid in self.quotas()]
        for sid, (networks, allowed) in quotas.items():
            cmds.append({"add": {"quota": self._quota_obj(sid, allowed)}})
            cmds += self._quota_elements("add", sid, networks)
        self._run(cmds)

    def quotas(self, sids=None) -> dict[int, dict]:
        """``{subscriber id: {"used": bytes, "allowed": bytes}}`` of every
        quota of ours (one listing), or of just ``sids`` (asked for by name,
        QUOTA_BATCH at a time: what a quota round of the active subscribers
        reads; one that does not exist makes its batch fail, and the listing
        answers for it)."""
        if sids is None:
            return _quota_items(self._json([{"list": {"quotas": {"family": "inet", "table": TABLE}}}]))
        sids = sorted({int(sid) for sid in sids})
        found: dict[int, dict] = {}
        for i in range(0, len(sids), QUOTA_BATCH):
            part = sids[i:i + QUOTA_BATCH]
            rc, out, _err = self.nft.cmd("; ".join(f"list quota inet {TABLE} {QUOTA_PREFIX}{sid}" for sid in part))
            if rc != 0:
                every = self.quotas()
                return {sid: every[sid] for sid in sids if sid in every}
            for line in out.splitlines():  # one JSON document per command
                if line.strip():
                    found.update(_quota_items(json.loads(line)))
        return found

    def _read_quota_maps(self) -> dict[str, int]:
        """``{network: subscriber id}`` of the quota maps."""
        out = self._json([{"list": {"table": {"family": "inet", "name": TABLE}}}])
        found = {}
        for item in out.get("nftables", []):
            m = item.get("map")
            if not m or not m["name"].startswith(QUOTA_MAP) or m["name"][len(QUOTA_MAP):] not in PREFIX_OF:
                continue
            plen = PREFIX_OF[m["name"][len(QUOTA_MAP):]]
            for key, target in m.get("elem", []):
                found[_elem_key(key, plen)] = int(str(target)[len(QUOTA_PREFIX):])
        return found

    def dump(self) -> str:
        """Our table as nft text, or '' when it is not installed."""
        self.nft.set_json_output(False)
        try:
            _rc, out, _err = self.nft.cmd(f"list table inet {TABLE}")
        finally:
            self.nft.set_json_output(True)
        return out


# ---- guests: the known sets follow the up sets (issue 15; the module docstring's "guests") ----------------------

GUEST_KNOWN = "known"


class GuestEnforcer(Enforcer):
    """An ``Enforcer`` with ``guests=True`` that keeps the counter-less ``known*`` sets equal to the ``up*`` sets:
    a network is known before it is counted and counted until it is forgotten, so no packet of a subscriber
    is refused as a guest's (one of nobody's may be, in the instant between the two transactions)."""

    def add_subscriber_addresses(self, networks) -> None:
        networks = list(networks)
        self._run(self._element_cmds("add", GUEST_KNOWN, networks))
        super().add_subscriber_addresses(networks)

    def remove_subscriber_addresses(self, networks) -> None:
        networks = list(networks)
        super().remove_subscriber_addresses(networks)
        self._delete(networks, GUEST_KNOWN)

    add_subscribers = add_subscriber_addresses
    remove_subscribers = remove_subscriber_addresses

    def restore(self, blocked, subscribers):
        """``Enforcer.restore`` (and what it returns), the known sets brought to the same networks first."""
        subscribers = list(subscribers)
        want = {_canon(n) for n in subscribers}
        have = set(self._read((GUEST_KNOWN,))[GUEST_KNOWN])
        self._run(self._element_cmds("add", GUEST_KNOWN, sorted(want - have)))
        listing = super().restore(blocked, subscribers)
        self._run(self._element_cmds("delete", GUEST_KNOWN, sorted(k for k in have - want if "-" not in k)))
        return listing


# ---- bindings: an address bound to a MAC (anti-spoofing; issue 15; the module docstring's "bindings") -----------

BOUND = "bound"          # bound4, bound6: address -> the subscriber's counter
BOUND_MAC = "bound_mac"  # bound_mac4, bound_mac6: the allowed address . MAC pairs
SPOOF_PREFIX = "spoof"   # the counter of subscriber 12's dropped packets is spoof12


def binding_sets(on: bool) -> str:
    if not on:
        return ""
    return "".join(f"  map {BOUND}{v} {{ type {kind} : counter; }}\n  set {BOUND_MAC}{v} {{ type {kind} . ether_addr; }}\n"
                   for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")))


def binding_rules(on: bool) -> list[str]:
    if not on:
        return []
    return [f"{fam} saddr . ether saddr != @{BOUND_MAC}{v} counter name {fam} saddr map @{BOUND}{v} drop"
            for fam, v in (("ip", "4"), ("ip6", "6"))]


def _bound_key(network: str) -> tuple[str, str]:
    """(set suffix, address) of a /32 or /128; PolicyError for anything else."""
    try:
        net = ipaddress.ip_network(str(network).strip())
    except ValueError:
        raise PolicyError(f"bad address {network!r}") from None
    if net.prefixlen != net.max_prefixlen:
        raise PolicyError(f"only single addresses are bound to a MAC, not {network!r}")
    return ("4" if net.version == 4 else "6"), str(net.network_address)


class AddressBindings:
    """The kernel half of address binding, through an ``Enforcer`` made with ``bindings=True`` (its libnftables
    context: the caller holds the daemon's ``enforcer_lock``). A binding is ``{network: (subscriber id,
    frozenset of MACs)}``; ``apply(old, new)`` moves the kernel from one to the other in one transaction."""

    def __init__(self, enforcer: Enforcer) -> None:
        self.enforcer = enforcer

    def read(self) -> dict[str, tuple[int, frozenset]]:
        """What the kernel binds now."""
        out: dict[str, list] = {}
        for v, plen in (("4", 32), ("6", 128)):
            for item in self.enforcer._json([{"list": {"map": {"family": "inet", "table": TABLE,
                                                               "name": f"{BOUND}{v}"}}}])["nftables"]:
                for key, counter in (item.get("map") or {}).get("elem", []):
                    out[f"{key}/{plen}"] = [int(str(counter).removeprefix(SPOOF_PREFIX)), set()]
            for item in self.enforcer._json([{"list": {"set": {"family": "inet", "table": TABLE,
                                                               "name": f"{BOUND_MAC}{v}"}}}])["nftables"]:
                for elem in (item.get("set") or {}).get("elem", []):
                    addr, mac = elem["concat"]
                    got = out.get(f"{addr}/{plen}")
                    if got is not None:
                        got[1].add(mac)
        return {net: (sid, frozenset(macs)) for net, (sid, macs) in out.items()}

    def apply(self, old: dict, new: dict) -> int:
        """Change the kernel from ``old`` (what it holds) to ``new`` for the networks of either; returns how
        many networks changed. Counters are added as needed and kept (a subscriber's count is history)."""
        lines, counters = [], set()
        changed = 0
        for net in sorted(set(old) | set(new)):
            was, will = old.get(net), new.get(net)
            if was == will:
                continue
            changed += 1
            v, addr = _bound_key(net)
            if was is not None:
                for mac in sorted(was[1] - (will[1] if will else frozenset())):
                    lines.append(f"delete element inet {TABLE} {BOUND_MAC}{v} {{ {addr} . {mac} }}")
                if will is None or will[0] != was[0]:
                    lines.append(f"delete element inet {TABLE} {BOUND}{v} {{ {addr} }}")
            if will is not None:
                if was is None or will[0] != was[0]:
                    counters.add(will[0])
                    lines.append(f'add element inet {TABLE} {BOUND}{v} {{ {addr} : "{SPOOF_PREFIX}{will[0]}" }}')
                for mac in sorted(will[1] - (was[1] if was else frozenset())):
                    lines.append(f"add element inet {TABLE} {BOUND_MAC}{v} {{ {addr} . {mac} }}")
        if lines:
            self.enforcer._text("".join(f"add counter inet {TABLE} {SPOOF_PREFIX}{sid}\n" for sid in sorted(counters))
                                + "\n".join(lines) + "\n")
        return changed

    def counters(self) -> dict[int, tuple[int, int]]:
        """``{subscriber id: (packets, bytes)}`` of the packets dropped from its bound addresses."""
        out = {}
        for item in self.enforcer._json([{"list": {"counters": {"family": "inet", "table": TABLE}}}])["nftables"]:
            c = item.get("counter")
            if c and c.get("table") == TABLE and str(c.get("name", "")).startswith(SPOOF_PREFIX):
                try:
                    out[int(c["name"][len(SPOOF_PREFIX):])] = (c["packets"], c["bytes"])
                except ValueError:
                    continue
        return out
