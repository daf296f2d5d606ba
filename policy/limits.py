"""Speed and connection limits per subscriber, in the kernel: our own nft
table ``inet tollgate_limits`` and an HTB qdisc on each gateway interface.

Speed: tc HTB, not nft ``limit rate``. A policer drops every packet above the
rate; TCP reads each burst of drops as congestion and halves its window, so
at real round-trip times it runs under the limit and saw-tooths around it.
Measured in the lab (``benches/README.md``, "HTB against an nft policer"),
where the round trip is 0.05 ms and TCP recovers at once, the policer does
reach the rate, but one packet in three to six is dropped and sent again (a
dropped download packet has already crossed, and cost, the upstream link).
HTB queues the excess instead, so TCP sees delay, not loss, and settles at
the limit, with next to no retransmissions.

* Downloads are shaped on the way out of the subscriber-facing (LAN)
  interfaces, uploads on the way out of the upstream (WAN) interface(s), each
  with a root ``htb`` qdisc (handle ``1:``, ``default 0``: traffic without a
  class, such as unlimited subscribers' and the gateway's own, passes
  unshaped). A limited subscriber has one class minor ``N``: class ``1:N``
  with the upload rate on the WAN qdiscs, with the download rate on the LAN
  qdiscs; its leaf is ``fq_codel`` where the kernel has it, otherwise a
  ``bfifo`` holding about 100 ms at the rate (never a 1000-packet FIFO: at
  10 Mbit/s that is more than a second of queue).
* A packet finds its class by its *priority*: the ``forward`` chain sets
  ``meta priority`` to ``1:N`` from a map of the subscriber's addresses (by
  source address when the packet leaves by a WAN interface, by destination
  address when it leaves by a LAN interface), and HTB takes a priority that
  names one of its classes as the class, before any filter. The forward hook
  sees the inside addresses in both directions (masquerade rewrites the
  source later, in postrouting; the reply is un-NATed before forward), and
  the priority stays on the packet through NAT to the qdisc. The textbook
  design marks the packet (``meta mark``) and classifies with ``tc filter
  fw``; the priority needs no classifier at all, which matters because this
  kernel has neither ``cls_fw`` nor u32's mark match, and it leaves the
  firewall mark to the operator's own policy routing. The kernel writes the
  priority of a forwarded IPv4 packet from its TOS *before* the forward hook
  (``ip_forward``), so ours is the one the qdisc sees. Rates are rates of
  link-layer frames, as tc counts them: TCP goodput over Ethernet at MTU
  1500 is about 95 % of the limit (1448 payload bytes per 1514-byte frame).
* Traffic between two subscribers leaves by a LAN interface: it is shaped by
  the receiver's download limit, not by the sender's upload limit.
* Networks of different subscribers must not overlap (as in ``policy.nft``:
  the engine refuses it too); the same network twice is refused here.

Connections: a new connection (``ct state new``) from a subscriber's address
jumps, by a verdict map, to the subscriber's own chain ``conn_<sid>`` holding
one ``ct count over N`` rule. The count is the rule's own (a conncount list
per rule), so all of the subscriber's addresses, IPv4 and IPv6, share it; the
connection beyond N is refused at once (TCP reset, otherwise ICMP
administratively prohibited); a connection leaves the count once conntrack
has seen it closed (TIME_WAIT or CLOSE). Changing a subscriber's N starts a new count: its open
connections are not counted until they close, so it may briefly hold more.

Subscriber ids and classes: the map ``subscribers`` (sid -> class) records
which class minor each limited subscriber has, the address maps record its
networks and the set ``shaped`` the interfaces carrying our qdiscs, so the
kernel itself holds the whole state. A new ``Limits`` reads it back
(``install``): after a restart, ``set_subscriber`` and ``restore`` change
only what differs; an unchanged connection limit keeps its count, an
unchanged class its queue. This matters beyond the counts: the kernel's cost
of adding an HTB class grows with the classes already there, so restoring
10,000 subscribers from nothing takes about 30 s, and 0.5 s when the kernel
holds them already (``benches/README.md``).

Address maps come in the five slots of ``policy.nft`` (hash maps for /32,
/128 and /64 keys, interval maps for other prefix lengths), for the reason
given there: nft 1.0.6 rewrites interval sets element by element.

Changes: one nft transaction per call through one reused libnftables context
(elements of a call in one batch), with one ``tc -batch`` before it (classes
that packets are about to be steered to) and one after (classes no longer
used). Not thread-safe: one caller at a time. The table
and the qdiscs stay when the daemon stops, so limits hold while it is down;
``remove`` takes away our table and the HTB qdiscs of our interfaces.
Everything applies to the network namespace of the process.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import subprocess
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import nftables

from .nft import PolicyError

log = logging.getLogger("tollgate.policy.limits")
TABLE = "tollgate_limits"
HTB_MAJOR = 1  # handle of our root qdisc: class ids and priorities are 1:N
MAX_MINOR = 0xFFFE  # HTB class minors 1..0xfffe
MAX_SID = 0xFFFFFFFF  # the subscribers map's key is a 32-bit mark
QUEUE_SECONDS = Decimal("0.1")  # bfifo leaf: about this much queue at the class rate
MIN_QUEUE_BYTES = 3 * 65536  # ... but room for a few GSO packets at any rate
MIN_RATE, MAX_RATE = 1_000, 100 * 10 ** 9
IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # IFNAMSIZ - 1; nothing nft or tc would parse as syntax
# (set name suffix, family, nft key type, prefix length held (None: any, interval map), mask before lookup);
# the same layout as policy.nft.SLOTS
SLOTS = (("4", "ip", "ipv4_addr", 32, ""),
         ("4_net", "ip", "ipv4_addr", None, ""),
         ("6", "ip6", "ipv6_addr", 128, ""),
         ("6_64", "ip6", "ipv6_addr", 64, " & ffff:ffff:ffff:ffff::"),
         ("6_net", "ip6", "ipv6_addr", None, ""))
PREFIX_OF = {suffix: plen for suffix, _f, _t, plen, _m in SLOTS}
_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<prefix>[kKmMgG]?)\s*(?P<unit>bit(?:/s)?)?")
_PREFIXES = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}


def parse_rate(text) -> int:
    """A speed in bits per second: ``"10M"``, ``"512k"``, ``"1.5G"``,
    ``"20Mbit"``, ``"800000"`` or an int. Prefixes are decimal (k = 1000);
    ``bps``/``B`` are refused because tc reads them as bytes per second."""
    if isinstance(text, bool):
        raise PolicyError(f"{text!r} is not a rate")
    if isinstance(text, int):
        value = Decimal(text)
    else:
        m = _RATE.fullmatch(str(text).strip()) if isinstance(text, str) else None
        if m is None:
            hint = " (bytes? write bits: \"8M\" for 1 MB/s)" if isinstance(text, str) and re.search(
                r"\d\s*[kKmMgG]?(bps|B|byte)", text) else ""
            raise PolicyError(f"{text!r} is not a rate like \"10M\", \"512k\" or \"1G\" (bits per second){hint}")
        try:
            value = Decimal(m["number"]) * _PREFIXES[m["prefix"].lower()]
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
            raise PolicyError(f"{text!r} is not a rate") from None
    if value != value.to_integral_value():
        raise PolicyError(f"{text!r} is not a whole number of bits per second")
    if not MIN_RATE <= value <= MAX_RATE:
        raise PolicyError(f"{text!r}: a rate is 1k to 100G bits per second")
    return int(value)


@dataclass(frozen=True)
class SubscriberLimits:
    """One subscriber's limits, as ``set_subscriber`` takes them; None: no limit."""

    sid: int
    networks: tuple
    up_bps: int | None = None
    down_bps: int | None = None
    max_connections: int | None = None

    @classmethod
    def checked(cls, sid, networks, up_bps=None, down_bps=None, max_connections=None) -> SubscriberLimits:
        """Validated and canonical, or PolicyError naming what is wrong."""
        if isinstance(sid, bool) or not isinstance(sid, int) or not 1 <= sid <= MAX_SID:
            raise PolicyError(f"subscriber id must be an integer 1..{MAX_SID}, not {sid!r}")
        if isinstance(networks, str):
            networks = [networks]
        nets = []
        for n in networks:
            try:
                nets.append(ipaddress.ip_network(n, strict=False))
            except (TypeError, ValueError) as exc:
                raise PolicyError(f"subscriber {sid}: {n!r} is not an address or network: {exc}") from None
        if not nets:
            raise PolicyError(f"subscriber {sid}: no networks to limit")
        up = None if up_bps is None else parse_rate(up_bps)
        down = None if down_bps is None else parse_rate(down_bps)
        if max_connections is not None and (isinstance(max_connections, bool) or not isinstance(max_connections, int)
                                            or not 1 <= max_connections <= 10 ** 7):
            raise PolicyError(f"subscriber {sid}: max_connections must be an integer 1..10000000, "
                              f"not {max_connections!r}")
        return cls(sid, tuple(sorted({str(n) for n in nets})), up, down, max_connections)

    @property
    def unlimited(self) -> bool:
        return self.up_bps is None and self.down_bps is None and self.max_connections is None


def _slot(network: str) -> tuple[str, str]:
    """``(slot suffix, nft element key)`` of a canonical network."""
    net = ipaddress.ip_network(network)
    fam = str(net.version)
    if net.prefixlen == net.max_prefixlen:
        return fam, str(net.network_address)
    if (fam, net.prefixlen) == ("6", 64):
        return "6_64", str(net.network_address)
    return f"{fam}_net", str(net)


def _listed_network(elem, plen: int | None) -> str:
    """A listed map key as a canonical network."""
    if isinstance(elem, dict):
        p = elem["prefix"]
        return str(ipaddress.ip_network(f"{p['addr']}/{p['len']}"))
    return str(ipaddress.ip_network(f"{elem}/{plen}" if plen else elem))


def _classid(minor: int) -> str:
    return f"{HTB_MAJOR:x}:{minor:x}"


class Limits:
    """Owns ``table inet tollgate_limits`` and the root HTB qdiscs of
    ``lan_interfaces`` (subscriber-facing: downloads) and ``wan_interfaces``
    (upstream: uploads; a name or a list) in the current network namespace.
    ``install`` needs at least one of each; ``Limits().remove()`` takes away
    whatever an earlier install left, without knowing its interfaces."""

    def __init__(self, lan_interfaces=(), wan_interfaces=()) -> None:
        self.lan = self._ifnames(lan_interfaces, "lan_interfaces")
        self.wan = self._ifnames(wan_interfaces, "wan_interfaces")
        if set(self.lan) & set(self.wan):
            raise PolicyError(f"an interface cannot face both ways: {sorted(set(self.lan) & set(self.wan))}")
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.leaf_kind: str | None = None  # fq_codel or bfifo, probed by install
        self.subscribers: dict[int, SubscriberLimits] = {}
        self.minor: dict[int, int] = {}  # sid -> HTB class minor
        self.owner: dict[str, int] = {}  # network -> sid

    @staticmethod
    def _ifnames(names, what: str) -> tuple:
        names = (names,) if isinstance(names, str) else tuple(names or ())
        for name in names:
            if not isinstance(name, str) or not IFNAME.fullmatch(name):
                raise PolicyError(f"{what}: {name!r} is not an interface name")
        return names

    # ---- plumbing ------------------------------------------------------------

    def _nft(self, script: str) -> None:
        rc, _out, err = self.nft.cmd(script)
        if rc != 0:
            raise PolicyError(f"nftables refused the change: {err.strip()}")

    @staticmethod
    def _tc(lines: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["tc", "-batch", "-"], input="".join(f"{line}\n" for line in lines),
                              capture_output=True, text=True, check=False)
        if check and proc.returncode:
            raise PolicyError(f"tc refused the change: {proc.stderr.strip()}")
        return proc

    @staticmethod
    def _show(*args: str) -> str:
        return subprocess.run(["tc", *args], capture_output=True, text=True, check=False).stdout

    def _root_is_ours(self, dev: str) -> bool:
        return self._show("qdisc", "show", "dev", dev, "root").startswith(f"qdisc htb {HTB_MAJOR:x}: root")

    def _probe_leaf(self) -> str:
        """fq_codel where the kernel has it: tried on a throwaway class of our
        qdisc on the first WAN interface."""
        dev, probe = self.wan[0], _classid(MAX_MINOR)
        proc = self._tc([f"class replace dev {dev} parent {HTB_MAJOR:x}: classid {probe} htb rate 1mbit",
                         f"qdisc add dev {dev} parent {probe} fq_codel"], check=False)
        self._tc([f"class del dev {dev} classid {probe}"], check=False)
        return "fq_codel" if proc.returncode == 0 else "bfifo"

    # ---- the table -------------------------------------------------------------

    def ruleset(self) -> str:
        """The table as nft text (what ``install`` loads; the maps' elements and the
        subscribers' ``conn_<sid>`` chains are not part of it and survive a reinstall)."""
        def names(devs) -> str:
            return "{ " + ", ".join(f'"{d}"' for d in devs) + " }"

        maps = ["set shaped { type ifname; }", "map subscribers { type mark : classid; }"]
        maps += [f"map {kind}{suffix} {{ type {key} : {value};{'' if plen else ' flags interval;'} }}"
                 for kind, value in (("class", "classid"), ("conn", "verdict"))
                 for suffix, _fam, key, plen, _mask in SLOTS]
        rules = [f"oifname {names(self.wan)} meta priority set {fam} saddr{mask} map @class{suffix}"
                 for suffix, fam, _key, _plen, mask in SLOTS]
        rules += [f"oifname {names(self.lan)} meta priority set {fam} daddr{mask} map @class{suffix}"
                  for suffix, fam, _key, _plen, mask in SLOTS]
        rules += [f"ct state new {fam} saddr{mask} vmap @conn{suffix}" for suffix, fam, _key, _plen, mask in SLOTS]
        body = "".join(f"  {m}\n" for m in maps)
        body += ("  chain refuse {\n    meta l4proto tcp reject with tcp reset\n"
                 "    reject with icmpx admin-prohibited\n  }\n")
        # after policy.nft's block chain (-10), before its queue (0): a refused
        # connection is never queued to the daemon nor charged
        body += ("  chain forward {\n    type filter hook forward priority -5; policy accept;\n"
                 + "".join(f"    {r}\n" for r in rules) + "  }\n")
        return f"table inet {TABLE} {{\n{body}}}\n"

    def install(self) -> None:
        """Create or update the table and the qdiscs, keeping what the kernel
        already holds (subscribers, their classes and connection counts), and
        read that state back. Idempotent."""
        for devs, what in ((self.lan, "lan_interfaces"), (self.wan, "wan_interfaces")):
            if not devs:
                raise PolicyError(f"{what}: name at least one interface")
        for dev in self.lan + self.wan:
            if not self._exists(dev):
                raise PolicyError(f"no interface {dev!r} in this network namespace")
        before = self._shaped()
        # declaring what exists already changes nothing (maps keep their elements, chains
        # conn_<sid> are not named); the fixed chains and the set of shaped interfaces are
        # emptied and refilled in the same transaction
        flush = "".join(f"flush {what} inet {TABLE} {name}\n" for what, name in
                        (("chain", "forward"), ("chain", "refuse"), ("set", "shaped"))) if self.installed() else ""
        devs = ", ".join(f'"{dev}"' for dev in self.lan + self.wan)
        self._nft(flush + self.ruleset() + f"add element inet {TABLE} shaped {{ {devs} }}\n")
        # an interface left out of the configuration since the last install loses our qdisc
        self._tc([f"qdisc del dev {dev} root" for dev in sorted(set(before) - set(self.lan + self.wan))
                  if self._exists(dev) and self._root_is_ours(dev)])
        self._tc([f"qdisc replace dev {dev} root handle {HTB_MAJOR:x}: htb default 0"
                  for dev in self.lan + self.wan if not self._root_is_ours(dev)])
        if self.leaf_kind is None:
            self.leaf_kind = self._probe_leaf()
        self._load()

    @staticmethod
    def _exists(dev: str) -> bool:
        try:
            socket.if_nametoindex(dev)
            return True
        except OSError:
            return False

    def _shaped(self) -> list[str]:
        """The interfaces the last install put our HTB on (none if the table is not there)."""
        rc, out, _err = self.nft.cmd(f"list set inet {TABLE} shaped")
        return [e for item in json.loads(out)["nftables"] if "set" in item
                for e in item["set"].get("elem", [])] if rc == 0 else []

    def installed(self) -> bool:
        rc, _out, _err = self.nft.cmd(f"list table inet {TABLE}")
        return rc == 0

    def remove(self) -> None:
        """Take away our table and the HTB qdiscs of our interfaces (the
        configured ones and those the table names; only if they are ours);
        nothing else. Idempotent."""
        devs = sorted(set(self.lan + self.wan + tuple(self._shaped())))
        if self.installed():
            self._nft(f"delete table inet {TABLE}")
        self._tc([f"qdisc del dev {dev} root" for dev in devs if self._exists(dev) and self._root_is_ours(dev)])
        self.subscribers.clear()
        self.minor.clear()
        self.owner.clear()

    def _load(self) -> None:
        """The subscribers the kernel holds: ids and classes from the
        ``subscribers`` map, networks from the class maps, connection limits
        from the ``conn_<sid>`` chains, rates from the HTB classes."""
        rc, out, err = self.nft.cmd(f"list table inet {TABLE}")
        if rc != 0:
            raise PolicyError(f"cannot read table {TABLE}: {err.strip()}")
        items = json.loads(out)["nftables"]
        sid_of_class, nets, conn = {}, {}, {}
        for item in items:
            m = item.get("map")
            if m and m["name"] == "subscribers":
                for sid, classid in m.get("elem", []):
                    sid_of_class[classid] = sid
            elif m and m["name"].startswith("class"):
                plen = PREFIX_OF[m["name"].removeprefix("class")]
                for key, classid in m.get("elem", []):
                    nets.setdefault(classid, []).append(_listed_network(key, plen))
            rule = item.get("rule")
            if rule and rule["chain"].startswith("conn_"):
                for expr in rule["expr"]:
                    if "ct count" in expr:
                        conn[int(rule["chain"].removeprefix("conn_"))] = expr["ct count"]["val"]
        up, down = self._rates(self.wan), self._rates(self.lan)
        self.subscribers.clear()
        self.minor.clear()
        self.owner.clear()
        for classid, sid in sid_of_class.items():
            minor = int(classid.split(":")[1], 16)
            limits = SubscriberLimits(sid, tuple(sorted(nets.get(classid, ()))), up.get(minor), down.get(minor),
                                      conn.get(sid))
            self.subscribers[sid] = limits
            self.minor[sid] = minor
            self.owner.update((n, sid) for n in limits.networks)

    def _rates(self, devs) -> dict[int, int]:
        """Class minor -> rate in bit/s, for the classes that have the same rate on every one of
        ``devs`` (an interface added to the configuration lacks them: they are set again there).
        tc prints no JSON for HTB classes, and rounds the rate: a rounded one is set again, exactly."""
        per_dev = []
        for dev in devs:
            out = self._show("class", "show", "dev", dev)
            per_dev.append({int(minor, 16): _tc_rate(rate) for minor, rate in
                            re.findall(rf"^class htb {HTB_MAJOR:x}:([0-9a-f]+) .*? rate (\S+)", out, re.MULTILINE)})
        return {minor: rate for minor, rate in per_dev[0].items() if all(d.get(minor) == rate for d in per_dev)}

    # ---- subscribers ----------------------------------------------------------

    def set_subscriber(self, sid: int, networks, up_bps=None, down_bps=None, max_connections=None) -> None:
        """Give subscriber ``sid`` (its ``networks``, CIDR or addresses) these
        limits (bits per second as int or ``"10M"``; None: no limit); all
        None removes it. Only what differs from the kernel's state changes.
        PolicyError, and nothing changed, on bad input."""
        self._apply([SubscriberLimits.checked(sid, networks, up_bps, down_bps, max_connections)])

    def remove_subscriber(self, sid: int) -> None:
        """Lift all of ``sid``'s limits (nothing happens if it has none)."""
        if sid in self.subscribers:
            self._apply([SubscriberLimits(sid, self.subscribers[sid].networks)])

    def restore(self, subscribers) -> None:
        """Make the kernel hold exactly ``subscribers`` (``SubscriberLimits``,
        or dicts/tuples of ``set_subscriber``'s arguments): what matches is
        left alone, the rest is set or removed. For the daemon's start."""
        wanted = {}
        for s in subscribers:
            s = s if isinstance(s, SubscriberLimits) else \
                SubscriberLimits.checked(**s) if isinstance(s, dict) else SubscriberLimits.checked(*s)
            s = SubscriberLimits.checked(s.sid, s.networks, s.up_bps, s.down_bps, s.max_connections)
            if s.sid in wanted:
                raise PolicyError(f"subscriber {s.sid} given twice")
            wanted[s.sid] = s
        gone = [SubscriberLimits(sid, old.networks) for sid, old in self.subscribers.items() if sid not in wanted]
        self._apply(gone + list(wanted.values()))

    def _apply(self, changes: list[SubscriberLimits]) -> None:
        """One tc batch and one nft transaction for ``changes``; the in-memory
        state follows only when they succeeded."""
        changes = [new for new in changes if new != self.subscribers.get(new.sid)]
        owner, minor = dict(self.owner), dict(self.minor)
        for new in changes:  # release every changed subscriber's networks first: one may move to another
            for n in self.subscribers.get(new.sid, SubscriberLimits(new.sid, ())).networks:
                del owner[n]
        used = set(minor.values())  # a class freed in this batch is not reused in it (its deletion runs last)
        free = (c for c in range(1, MAX_MINOR) if c not in used)
        nft_add, nft_del, tc_set, tc_del = [], [], [], []
        for new in changes:
            for n in (() if new.unlimited else new.networks):
                if owner.setdefault(n, new.sid) != new.sid:
                    raise PolicyError(f"subscriber {new.sid}: {n} belongs to subscriber {owner[n]} already")
            if new.sid not in minor and not new.unlimited:
                pick = new.sid if new.sid < MAX_MINOR and new.sid not in used else next(free, None)
                if pick is None:
                    raise PolicyError(f"no free traffic class for subscriber {new.sid} (at most {MAX_MINOR - 1})")
                minor[new.sid] = pick
                used.add(pick)
            old = self.subscribers.get(new.sid, SubscriberLimits(new.sid, ()))
            if new.sid in minor:
                self._diff(old, new, minor[new.sid], nft_add, nft_del, tc_set, tc_del)
            if new.unlimited:
                minor.pop(new.sid, None)
        # classes exist before packets are steered to them, and go after packets stopped being steered
        self._tc(tc_set)
        if nft_del or nft_add:
            self._nft("".join(f"{c}\n" for c in nft_del + nft_add))
        self._tc(tc_del, check=False)  # a class missing already is fine
        for new in changes:
            self.subscribers.pop(new.sid, None)
            if not new.unlimited:
                self.subscribers[new.sid] = new
        self.owner, self.minor = owner, minor

    def _diff(self, old: SubscriberLimits, new: SubscriberLimits, minor: int,
              nft_add: list, nft_del: list, tc_set: list, tc_del: list) -> None:
        """The commands taking subscriber ``old.sid`` from ``old`` to ``new``."""
        t, classid, sid = f"inet {TABLE}", _classid(minor), new.sid
        new_nets = set() if new.unlimited else set(new.networks)
        gone, added = set(old.networks) - new_nets, new_nets - set(old.networks)
        kept = set(old.networks) & new_nets
        conn_old, conn_new = old.max_connections, new.max_connections
        for n in sorted(gone):
            suffix, key = _slot(n)
            nft_del.append(f"delete element {t} class{suffix} {{ {key} }}")
            if conn_old:
                nft_del.append(f"delete element {t} conn{suffix} {{ {key} }}")
        if old.networks and new.unlimited:
            nft_del.append(f"delete element {t} subscribers {{ {sid} }}")
        if not old.networks and not new.unlimited:
            nft_add.append(f"add element {t} subscribers {{ {sid} : {classid} }}")
        for n in sorted(added):
            suffix, key = _slot(n)
            nft_add.append(f"add element {t} class{suffix} {{ {key} : {classid} }}")
        # the connection limit: the chain conn_<sid> holds the count; rewriting its rule restarts the count
        if conn_old and not conn_new:
            nft_del += [f"delete element {t} conn{_slot(n)[0]} {{ {_slot(n)[1]} }}" for n in sorted(kept)]
            nft_del.append(f"delete chain {t} conn_{sid}")
        elif conn_new and conn_new != conn_old:
            nft_add += [f"add chain {t} conn_{sid}", f"flush chain {t} conn_{sid}",
                        f"add rule {t} conn_{sid} ct count over {conn_new} jump refuse"]
        if conn_new:
            for n in sorted(new_nets if not conn_old else added):
                suffix, key = _slot(n)
                nft_add.append(f"add element {t} conn{suffix} {{ {key} : jump conn_{sid} }}")
        for devs, old_rate, rate in ((self.wan, old.up_bps, new.up_bps), (self.lan, old.down_bps, new.down_bps)):
            if rate == old_rate:
                continue
            for dev in devs:
                if rate is None:
                    tc_del.append(f"class del dev {dev} classid {classid}")
                    continue
                tc_set.append(f"class replace dev {dev} parent {HTB_MAJOR:x}: classid {classid} htb "
                              f"rate {rate}bit ceil {rate}bit quantum {min(max(rate // 80, 1514), 200_000)}")
                tc_set.append(f"qdisc replace dev {dev} parent {classid} {self._leaf(rate)}")  # sized by the rate

    def _leaf(self, rate: int) -> str:
        if self.leaf_kind == "fq_codel":
            return "fq_codel"
        return f"bfifo limit {max(int(rate * QUEUE_SECONDS) // 8, MIN_QUEUE_BYTES)}"


_TC_UNITS = {"bit": 1, "Kbit": 10 ** 3, "Mbit": 10 ** 6, "Gbit": 10 ** 9, "Tbit": 10 ** 12}


def _tc_rate(text: str) -> int:
    """tc's printed rate (``10Mbit``, ``512Kbit``, ``1500bit``) in bit/s."""
    m = re.fullmatch(r"([\d.]+)([KMGT]?bit)", text)
    if not m:
        raise PolicyError(f"tc printed a rate it does not parse: {text!r}")
    return int(Decimal(m[1]) * _TC_UNITS[m[2]])
