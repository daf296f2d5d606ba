"""The pure-Python twin of the compiled engine (``ext/engine.pyx``).

It has the same interface and, by contract, the same results to the byte and
to the minor unit: the property tests feed both the same streams and compare
verdicts, events, counters and balances. It is written for clarity, not speed,
with deliberately different data structures (a dict per prefix length instead
of a multibit trie), so that agreement between the two means something. It is
also the fallback where the extension is not built (``TOLLGATE_NO_EXT=1``).

Semantics, shared by both engines
---------------------------------
Per packet (``process``):

1. Parse the IP header (v4 or v6, walking IPv6 extension headers) for source,
   destination, protocol and, for TCP/UDP/SCTP/UDP-Lite first fragments, the
   ports. A packet that cannot be parsed is *malformed*: counted in
   ``stats().malformed_*``, given ``malformed_verdict``, never charged. The
   bytes counted are ``wirelen``, or the length the IP header states when that
   is shorter (link-layer padding); a header that states more than ``wirelen``
   is malformed.
2. If the source belongs to a subscriber, the packet is that subscriber's
   UPLOAD, rated in the zone of the destination; if the destination belongs to
   a subscriber, it is that subscriber's DOWNLOAD, rated in the zone of the
   source. Traffic between two subscribers is rated for both (upload first).
   If the destination subscriber is blocked (and the packet not allow-listed
   for it), the packet is dropped before anyone is charged. Neither side a
   subscriber: *unknown*, counted apart and given ``unknown_verdict``.
3. Zone: among the prefixes containing the remote address, from the longest
   to the shortest, the first rule (in the order given) whose protocol and
   port range match the packet; none: ``default_zone``. The port is the
   remote side's port.
4. A blocked subscriber's packets are dropped (counted as dropped) unless
   they match the allow-list on the remote side; allow-listed packets of a
   blocked subscriber are accepted, counted in their zone and never charged.
5. Rating: the allowance buckets of the subscriber's tariff that cover the
   (zone, direction) are drawn on in order, a byte drawn from a bucket costing
   the bucket's own price (0: free volume; else a volume tier, whatever the
   zone's price or time slot); the rest of the bytes cost
   ``price[zone][direction][slot]`` (minor units per byte, scaled by
   ``PRICE_SCALE``), with the remainder carried per (subscriber, zone,
   direction) so that packet-by-packet charging equals rating the same bytes
   at once. If the cost would take the balance below ``-credit`` the packet is
   dropped, nothing of it is charged or drawn, the subscriber is blocked
   (``BLOCK_LIMIT``) and a block event names the packet. A packet that costs
   nothing always passes this step, whatever the balance.
5a. Volume limit: a subscriber with one (``volume_left`` not None) has its
   bytes in the ``volume_zones`` (an engine-wide zone mask; the caller leaves
   the local zone out) taken off ``volume_left`` as they are counted,
   allow-listed and aggregate bytes included. A packet longer than what is
   left is dropped before it is rated (nothing charged or drawn), blocks the
   subscriber (``BLOCK_VOLUME``) and a block event names it: the limit holds
   at the exact packet, as money does. A packet that brings it to exactly 0
   passes.
6. After a charge, each warning level (descending balances) that the balance
   has fallen below emits one warn event.
7. An *aggregate* (a batch made with ``aggregates=True``: flow records from
   conntrack, NetFlow or a spool file) stands for ``packets[i]`` packets of
   ``wirelen`` bytes in all that have already passed. It is rated like a
   packet of that length except that nothing can be dropped any more: it is
   counted and charged even when its subscriber is blocked or the charge takes
   the balance past the limit (the overshoot of a passive source is a debt,
   not lost revenue) or the volume past its limit (``volume_left`` goes
   negative); the entry that breaches still blocks and emits the block event
   (once per reason), and its verdict is ``NF_DROP``. Allow-listed traffic of a
   blocked subscriber stays free.

``rate_volume`` rates a volume of one subscriber, zone and direction that no
packet or flow record brought in (traffic the kernel counted while no reader
was bound), exactly as one aggregate of that size (7.), with no remote address
(nothing allow-listed), any size up to 2**64 - 1 bytes in one step.

Control operations (``add_subscriber``, ``adjust_balance``, ``set_subscriber``)
re-evaluate the limit: a debt beyond the credit (``balance < -credit``) sets
``BLOCK_LIMIT``; anything else clears it. A subscriber at exactly ``-credit``
(a postpaid one at 0, the normal case) is not blocked: its free traffic
passes and its first priced packet is the breaching one (5.). ``set_volume``
(and ``add_subscriber``'s ``volume_left``) re-evaluates the volume limit the
same way: ``volume_left < 0`` sets ``BLOCK_VOLUME``, anything else clears it;
payments and adjustments leave it alone. Warning levels re-arm silently when
the balance rises above them.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple, Sequence

from .constants import (
    BLOCK_ANY,
    BLOCK_LIMIT,
    BLOCK_VOLUME,
    DOWNLOAD,
    EV_BLOCK,
    EV_UNBLOCK,
    EV_WARN,
    IPV6_AH,
    IPV6_DSTOPTS,
    IPV6_FRAGMENT,
    IPV6_HOPOPTS,
    IPV6_ROUTING,
    MAX_BUCKETS,
    MAX_COUNTER_PACKETS,
    MAX_PRICE,
    MAX_SUBSCRIBER_ID,
    MAX_WARN_LEVELS,
    MAX_WIRE_LEN,
    NF_ACCEPT,
    NF_DROP,
    PORT_PROTOCOLS,
    PRICE_SCALE,
    UPLOAD,
)
from . import netaddr
from .errors import EngineError

INT64_MIN = -(1 << 63)


class Event(NamedTuple):
    """Something the policy layer must act on.

    ``index`` is the packet's index in the batch for events raised by
    ``process`` and -1 for those raised by control operations. ``reason`` is a
    ``BLOCK_*`` bit for block/unblock and the level's index for warn.
    """

    kind: int
    subscriber: int
    index: int
    reason: int
    balance: int


class ZoneRule(NamedTuple):
    """``network`` (a CIDR string) maps to ``zone`` for packets of ``proto``
    (0: any) whose remote port lies in ``[port_lo, port_hi]``."""

    network: str
    zone: int
    proto: int = 0
    port_lo: int = 0
    port_hi: int = 65535


class CounterRow(NamedTuple):
    """Traffic of one subscriber in one zone and direction since the last drain."""

    subscriber: int
    zone: int
    direction: int
    bytes: int
    packets: int
    charged: int


class SubscriberState(NamedTuple):
    tariff: int
    balance: int
    credit: int
    blocked: int  # mask of BLOCK_* bits; 0 = not blocked
    allowance: tuple  # bytes left per bucket of the tariff
    warned: int  # how many warning levels have fired
    dropped_packets: int
    dropped_bytes: int
    rated_bytes: int  # cumulative bytes counted, both directions (see policy's kernel quotas)
    volume_left: int | None = None  # bytes of the volume zones before BLOCK_VOLUME; None: no volume limit


class EngineStats(NamedTuple):
    packets: int
    bytes: int
    malformed_packets: int
    malformed_bytes: int
    unknown_packets: int
    unknown_bytes: int
    dropped_packets: int
    dropped_bytes: int
    over_limit_bytes: int  # flow records rated past the limit (they had passed already)


def parse_network(network: str) -> tuple[int, int, int]:
    """``"100.64.0.0/10"`` -> (family 4|6, network as int, prefix length)."""
    try:
        return netaddr.parse(network, strict=True)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"bad network {network!r}: {exc}") from None


def check_rule(rule: ZoneRule) -> None:
    if not 0 <= rule.proto <= 255:
        raise EngineError(f"rule {rule}: protocol must be 0..255")
    if not 0 <= rule.port_lo <= rule.port_hi <= 65535:
        raise EngineError(f"rule {rule}: port range must satisfy 0 <= lo <= hi <= 65535")


def rule_matches(rule: ZoneRule, proto: int, has_ports: bool, port: int) -> bool:
    if rule.proto and rule.proto != proto:
        return False
    if rule.port_lo == 0 and rule.port_hi == 65535:
        return True
    return has_ports and rule.port_lo <= port <= rule.port_hi


def validate_tariff(n_zones: int, n_slots: int, tariff: int, prices, buckets, warn_levels):
    """Normalised (prices, buckets, warn_levels) for ``set_tariff``, or EngineError."""
    if not 0 <= tariff < 65536:
        raise EngineError("tariff ids are 0..65535")
    prices = [int(p) for p in prices]
    if len(prices) != n_zones * 2 * n_slots:
        raise EngineError(f"tariff {tariff}: expected {n_zones * 2 * n_slots} prices, got {len(prices)}")
    if any(not 0 <= p <= MAX_PRICE for p in prices):
        raise EngineError(f"tariff {tariff}: prices must be 0..{MAX_PRICE}")
    if len(buckets) > MAX_BUCKETS:
        raise EngineError(f"tariff {tariff}: at most {MAX_BUCKETS} allowance buckets")
    normal = []
    for bucket in buckets:
        if len(bucket) not in (2, 3):
            raise EngineError(f"tariff {tariff}: a bucket is (zone mask, direction mask[, price])")
        price = int(bucket[2]) if len(bucket) == 3 else 0
        if not 0 <= price <= MAX_PRICE:
            raise EngineError(f"tariff {tariff}: bucket prices must be 0..{MAX_PRICE}")
        normal.append((int(bucket[0]) & ((1 << n_zones) - 1), int(bucket[1]) & 3, price))
    buckets = normal
    warn_levels = [as_int64(w, "warning level") for w in warn_levels]
    if len(warn_levels) > MAX_WARN_LEVELS:
        raise EngineError(f"tariff {tariff}: at most {MAX_WARN_LEVELS} warning levels")
    if any(a <= b for a, b in zip(warn_levels, warn_levels[1:])):
        raise EngineError(f"tariff {tariff}: warning levels must be strictly descending")
    return prices, buckets, warn_levels


def validate_timeline(n_slots: int, starts, slots):
    """Normalised (starts, slots) for ``set_timeline``, or EngineError."""
    starts = [as_int64(s, "timeline start") for s in starts]
    slots = [int(s) for s in slots]
    if not starts or len(starts) != len(slots):
        raise EngineError("timeline needs as many starts as slots, at least one")
    if any(a >= b for a, b in zip(starts, starts[1:])):
        raise EngineError("timeline starts must be strictly ascending")
    if any(not 0 <= s < n_slots for s in slots):
        raise EngineError("timeline slot out of range")
    return starts, slots


def validate_engine_args(n_zones: int, n_slots: int, default_zone: int, malformed_verdict: int,
                         unknown_verdict: int, volume_zones=None) -> int:
    """Checks the constructor's arguments; returns the volume zone mask (None: every zone)."""
    if not 1 <= n_zones <= 64:
        raise EngineError("n_zones must be 1..64")
    if not 1 <= n_slots <= 256:
        raise EngineError("n_slots must be 1..256")
    if not 0 <= default_zone < n_zones:
        raise EngineError("default_zone must be one of the zones")
    for verdict in (malformed_verdict, unknown_verdict):
        if verdict not in (NF_ACCEPT, NF_DROP):
            raise EngineError("verdicts are NF_ACCEPT or NF_DROP")
    every = (1 << n_zones) - 1
    if volume_zones is None:
        return every
    if isinstance(volume_zones, bool) or not isinstance(volume_zones, int) or not 0 <= volume_zones <= every:
        raise EngineError(f"volume_zones is a mask of the {n_zones} zones (0..{every}), not {volume_zones!r}")
    return volume_zones


def check_volume_left(volume_left):
    """``volume_left`` for add_subscriber/set_volume: None (no limit) or an int64."""
    if volume_left is None:
        return None
    if isinstance(volume_left, bool) or not isinstance(volume_left, int):
        raise EngineError(f"volume_left is None or a number of bytes, not {volume_left!r}")
    return as_int64(volume_left, "volume_left")


def compile_rules(rules, n_zones: int | None):
    """Rules -> prefix groups for a trie: a list of ``(family, net, plen,
    [rules...], fallback group index or -1)``; the fallback of a prefix is
    the group of the longest shorter prefix containing it. ``n_zones`` None:
    zones are not checked (the allow-list)."""
    groups: dict[tuple[int, int, int], list] = {}
    for rule in rules:
        rule = ZoneRule(*rule)
        check_rule(rule)
        if n_zones is not None and not 0 <= rule.zone < n_zones:
            raise EngineError(f"rule {rule}: zone out of range")
        groups.setdefault(parse_network(rule.network), []).append(rule)
    keys = list(groups)
    index = {k: i for i, k in enumerate(keys)}
    out = []
    for family, net, plen in keys:
        bits = 32 if family == 4 else 128
        fallback = -1
        for shorter in range(plen - 1, -1, -1):
            masked = net >> (bits - shorter) << (bits - shorter) if shorter else 0
            if (family, masked, shorter) in index:
                fallback = index[(family, masked, shorter)]
                break
        out.append((family, net, plen, groups[(family, net, plen)], fallback))
    return out


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


def check_volume(n_zones: int, zone, direction, nbytes, npackets, ts_ns) -> tuple[int, int, int, int, int]:
    """Normalised arguments of ``rate_volume``, or EngineError."""
    for name, value in (("zone", zone), ("direction", direction), ("nbytes", nbytes), ("npackets", npackets),
                        ("ts_ns", ts_ns)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EngineError(f"rate_volume: {name} must be an int, not {value!r}")
    if not 0 <= zone < n_zones:
        raise EngineError(f"rate_volume: zone {zone} is not one of the {n_zones} zones")
    if direction not in (UPLOAD, DOWNLOAD):
        raise EngineError(f"rate_volume: direction is {UPLOAD} (upload) or {DOWNLOAD} (download), not {direction}")
    if not 0 <= nbytes <= UINT64_MAX:
        raise EngineError(f"rate_volume: nbytes must be 0..2**64-1, not {nbytes}")
    if not 0 <= npackets <= UINT64_MAX:
        raise EngineError(f"rate_volume: npackets must be 0..2**64-1, not {npackets}")
    return zone, direction, nbytes, npackets, as_int64(ts_ns, "ts_ns")


def as_int64(value, what: str) -> int:
    """``value`` as an int that the compiled engine can hold, or EngineError."""
    value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise EngineError(f"{what} {value} does not fit in 64 bits")
    return value


def check_grant_allowance(allowance, own, n_buckets: int) -> list[int]:
    """``allowance`` of quote_bytes/affordable_bytes: None (the subscriber's
    own, ``own``) or one non-negative int64 per bucket of its tariff."""
    if allowance is None:
        return list(own)
    allowance = [as_int64(a, "allowance") for a in allowance]
    if len(allowance) != n_buckets or any(a < 0 for a in allowance):
        raise EngineError(f"allowance is one non-negative volume per bucket of the tariff ({n_buckets})")
    return allowance


def check_reason(reason) -> None:
    """A block reason is one or more of the BLOCK_* bits."""
    if isinstance(reason, bool) or not isinstance(reason, int) or reason <= 0 or reason & ~BLOCK_ANY:
        raise EngineError(f"a block reason is a combination of the BLOCK_* bits (1..{BLOCK_ANY}), not {reason!r}")


def check_bulk_lengths(*columns) -> None:
    """The columns of a bulk call (``add_subscribers``, ``add_addresses``) describe the same items."""
    if len({len(c) for c in columns}) > 1:
        raise EngineError(f"bulk columns of different lengths: {', '.join(str(len(c)) for c in columns)}")


def check_subscriber_id(sid: int) -> None:
    if not 1 <= sid <= MAX_SUBSCRIBER_ID:
        raise EngineError(f"subscriber ids are 1..{MAX_SUBSCRIBER_ID}")


class PrefixTable:
    """Longest-prefix match with a dict per (family, prefix length)."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, int], dict[int, object]] = {}
        self.lengths = {4: [], 6: []}  # present lengths, longest first

    def insert(self, family: int, net: int, plen: int, value: object) -> None:
        table = self.tables.setdefault((family, plen), {})
        table[net] = value
        if plen not in self.lengths[family]:
            self.lengths[family] = sorted(self.lengths[family] + [plen], reverse=True)

    def get(self, family: int, net: int, plen: int):
        return self.tables.get((family, plen), {}).get(net)

    def remove(self, family: int, net: int, plen: int) -> None:
        table = self.tables.get((family, plen), {})
        table.pop(net, None)
        if not table:
            self.tables.pop((family, plen), None)
            if plen in self.lengths[family]:
                self.lengths[family].remove(plen)

    def matches(self, family: int, addr: int):
        """Values of all prefixes containing ``addr``, longest first."""
        bits = 32 if family == 4 else 128
        for plen in self.lengths[family]:
            value = self.tables[(family, plen)].get(addr >> (bits - plen) << (bits - plen) if plen else 0)
            if value is not None:
                yield value


class Tariff:
    __slots__ = ("prices", "buckets", "warn_levels")

    def __init__(self, prices, buckets, warn_levels) -> None:
        self.prices = prices
        self.buckets = buckets
        self.warn_levels = warn_levels


class Subscriber:
    __slots__ = ("tariff", "balance", "credit", "blocked", "allowance", "warned",
                 "dropped_packets", "dropped_bytes", "rated_bytes", "volume_left", "counters", "carry")

    def __init__(self, tariff: int, balance: int, credit: int, allowance: list[int]) -> None:
        self.tariff = tariff
        self.balance = balance
        self.credit = credit
        self.blocked = 0
        self.allowance = allowance
        self.warned = 0
        self.dropped_packets = 0
        self.dropped_bytes = 0
        self.rated_bytes = 0
        self.volume_left: int | None = None
        self.counters: dict[tuple[int, int], list[int]] = {}  # (zone, dir) -> [bytes, packets, charged]
        self.carry: dict[tuple[int, int], int] = {}  # survives drains


class _Stats:
    __slots__ = EngineStats._fields

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


_V4 = struct.Struct("!BxHxxHBBxx4s4s")
_PORTS = struct.Struct("!HH")


def _draw(tariff, allowance, zone: int, direction: int, length: int) -> tuple[list, int, int]:
    """What ``length`` bytes of ``zone`` and ``direction`` would draw from the
    allowance buckets, in order: ``([(bucket, bytes)], amount of the drawn
    bytes in price units, bytes left to pay at the slot's price)``. Nothing is
    taken: the caller applies it once the traffic is accepted."""
    remaining, drawn, amount = length, [], 0
    for b, (zone_mask, dir_mask, bucket_price) in enumerate(tariff.buckets):
        if remaining == 0:
            break
        if zone_mask >> zone & 1 and dir_mask >> direction & 1 and allowance[b] > 0:
            take = min(remaining, allowance[b])
            remaining -= take
            amount += take * bucket_price
            drawn.append((b, take))
    return drawn, amount, remaining


def parse_packet(data: bytes, wirelen: int, aggregate: bool = False):
    """Parse an IP header: (family, src, dst, proto, has_ports, sport, dport, length)
    or None if malformed. Addresses come back as ints. An aggregate's length is
    ``wirelen``, whatever its (made-up) header says."""
    n = len(data)
    if n < 1 or wirelen > MAX_WIRE_LEN:
        return None
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            return None
        vihl, total, frag, _ttl, proto, src, dst = _V4.unpack_from(data)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl or (total > wirelen and not aggregate):
            return None
        length = total
        l4 = ihl
        first_fragment = (frag & 0x1FFF) == 0
        family = 4
    elif version == 6:
        if n < 40:
            return None
        payload = (data[4] << 8) | data[5]
        # A zero payload length with a jumbo payload (RFC 2675) or BIG TCP:
        # the header cannot tell the length, the wire length can.
        length = wirelen if payload == 0 else 40 + payload
        if length > wirelen and not aggregate:
            return None
        proto = data[6]
        src, dst = data[8:24], data[24:40]
        l4 = 40
        first_fragment = True
        family = 6
        while proto in (IPV6_HOPOPTS, IPV6_ROUTING, IPV6_DSTOPTS, IPV6_FRAGMENT, IPV6_AH):
            if l4 + 8 > n:
                break  # chain runs past the copy range: no ports, not malformed
            nxt = data[l4]
            if proto == IPV6_FRAGMENT:
                first_fragment = (((data[l4 + 2] << 8) | data[l4 + 3]) & 0xFFF8) == 0
                hdrlen = 8
            elif proto == IPV6_AH:
                hdrlen = (data[l4 + 1] + 2) * 4
            else:
                hdrlen = (data[l4 + 1] + 1) * 8
            proto = nxt
            l4 += hdrlen
    else:
        return None
    if length == 0 or aggregate:  # IPv4 BIG TCP (tot_len 0) - take the wire length
        length = wirelen
    has_ports = first_fragment and proto in PORT_PROTOCOLS and l4 + 4 <= n
    sport, dport = _PORTS.unpack_from(data, l4) if has_ports else (0, 0)
    return family, int.from_bytes(src, "big"), int.from_bytes(dst, "big"), proto, has_ports, sport, dport, length


class EnginePy:
    """Per-packet accounting and enforcement; see the module docstring."""

    implementation = "py"

    def __init__(self, n_zones: int, n_slots: int = 1, *, default_zone: int = 1,
                 malformed_verdict: int = NF_ACCEPT, unknown_verdict: int = NF_ACCEPT,
                 volume_zones: int | None = None) -> None:
        """``volume_zones``: the zones (a bit mask) whose bytes count toward
        volume limits; None: all of them."""
        self.volume_zones = validate_engine_args(n_zones, n_slots, default_zone, malformed_verdict, unknown_verdict,
                                                 volume_zones)
        self.n_zones = n_zones
        self.n_slots = n_slots
        self.default_zone = default_zone
        self.malformed_verdict = malformed_verdict
        self.unknown_verdict = unknown_verdict
        self._zones = PrefixTable()
        self._allow = PrefixTable()
        self._owners = PrefixTable()
        self._tariffs: dict[int, Tariff] = {}
        self._subs: dict[int, Subscriber] = {}
        self._timeline = ([INT64_MIN], [0])
        self._stats = _Stats()

    # ---- configuration -------------------------------------------------

    def _rule_table(self, rules: Sequence[ZoneRule], check_zone: bool) -> PrefixTable:
        table = PrefixTable()
        for rule in rules:
            rule = ZoneRule(*rule)
            check_rule(rule)
            if check_zone and not 0 <= rule.zone < self.n_zones:
                raise EngineError(f"rule {rule}: zone out of range")
            family, net, plen = parse_network(rule.network)
            existing = table.get(family, net, plen)
            if existing is None:
                table.insert(family, net, plen, [rule])
            else:
                existing.append(rule)
        return table

    def set_zones(self, rules: Sequence[ZoneRule]) -> None:
        """Replace the zone map (atomically: on error the old one stays)."""
        self._zones = self._rule_table(rules, True)

    def set_allowlist(self, rules: Sequence[ZoneRule]) -> None:
        """Replace the allow-list for blocked subscribers (``zone`` is ignored)."""
        self._allow = self._rule_table(rules, False)

    def set_tariff(self, tariff: int, prices: Sequence[int], buckets: Sequence[tuple[int, int]] = (),
                   warn_levels: Sequence[int] = ()) -> None:
        """Define or redefine tariff ``tariff``.

        ``prices`` is flat, indexed ``(zone * 2 + direction) * n_slots + slot``.
        ``buckets`` are ``(zone_mask, direction_mask)`` pairs (bit z: zone z,
        bit d: direction d), drawn on in order. ``warn_levels`` are balances,
        highest first, below which a warn event fires once.
        """
        prices, buckets, warn_levels = validate_tariff(self.n_zones, self.n_slots, tariff, prices, buckets,
                                                       warn_levels)
        old = self._tariffs.get(tariff)
        if old is not None and len(old.buckets) != len(buckets):
            if any(s.tariff == tariff for s in self._subs.values()):
                raise EngineError(f"tariff {tariff}: cannot change the number of buckets while subscribers use it")
        self._tariffs[tariff] = Tariff(prices, buckets, warn_levels)

    def set_timeline(self, starts: Sequence[int], slots: Sequence[int]) -> None:
        """Time slots: ``slots[i]`` applies from ``starts[i]`` (ns, ascending)
        to the next start; before the first start, ``slots[0]`` applies."""
        starts, slots = validate_timeline(self.n_slots, starts, slots)
        self._timeline = (starts, slots)

    # ---- subscribers ---------------------------------------------------

    def _sub(self, sid: int) -> Subscriber:
        try:
            return self._subs[sid]
        except KeyError:
            raise EngineError(f"unknown subscriber {sid}") from None

    def _check_allowance(self, tariff: int, allowance: Sequence[int]) -> list[int]:
        if tariff not in self._tariffs:
            raise EngineError(f"unknown tariff {tariff}")
        allowance = [as_int64(a, "allowance") for a in allowance]
        if len(allowance) > len(self._tariffs[tariff].buckets) or any(a < 0 for a in allowance):
            raise EngineError(f"allowance must be at most one non-negative volume per bucket of tariff {tariff}")
        return allowance + [0] * (len(self._tariffs[tariff].buckets) - len(allowance))

    def add_subscriber(self, sid: int, tariff: int, balance: int, credit: int = 0,
                       allowance: Sequence[int] = (), volume_left: int | None = None) -> list[Event]:
        """Add a subscriber (no addresses yet); a block event if it is in debt
        beyond its credit (limit) or past its volume limit (``volume_left`` < 0),
        the first reason found named."""
        check_subscriber_id(sid)
        if sid in self._subs:
            raise EngineError(f"subscriber {sid} exists")
        balance, credit = as_int64(balance, "balance"), as_int64(credit, "credit")
        if credit < 0:
            raise EngineError("credit must not be negative")
        volume_left = check_volume_left(volume_left)
        sub = Subscriber(tariff, balance, credit, self._check_allowance(tariff, allowance))
        self._subs[sid] = sub
        sub.warned = self._levels_below(sub)
        sub.volume_left = volume_left
        if sub.balance < -sub.credit:
            sub.blocked |= BLOCK_LIMIT
        if volume_left is not None and volume_left < 0:
            sub.blocked |= BLOCK_VOLUME
        if sub.blocked:
            return [Event(EV_BLOCK, sid, -1, sub.blocked & -sub.blocked, sub.balance)]
        return []

    def remove_subscriber(self, sid: int) -> list[CounterRow]:
        """Forget ``sid`` and its addresses; returns its undrained counters."""
        sub = self._sub(sid)
        for (family, plen), table in list(self._owners.tables.items()):
            for net, owner in list(table.items()):
                if owner == sid:
                    self._owners.remove(family, net, plen)
        del self._subs[sid]
        return [CounterRow(sid, z, d, *c) for (z, d), c in sorted(sub.counters.items()) if any(c)]

    def set_subscriber(self, sid: int, *, tariff: int | None = None, credit: int | None = None,
                       allowance: Sequence[int] | None = None) -> list[Event]:
        sub = self._sub(sid)
        new_tariff = sub.tariff if tariff is None else tariff
        if allowance is None:
            allowance = sub.allowance if new_tariff == sub.tariff else ()
        allowance = self._check_allowance(new_tariff, allowance)
        if credit is not None:
            credit = as_int64(credit, "credit")
            if credit < 0:
                raise EngineError("credit must not be negative")
        sub.tariff = new_tariff
        sub.allowance = allowance
        if credit is not None:
            sub.credit = int(credit)
        return self._reevaluate(sid, sub)

    def add_address(self, sid: int, network: str) -> None:
        self._sub(sid)
        family, net, plen = parse_network(network)
        owner = self._owners.get(family, net, plen)
        if owner is not None:
            raise EngineError(f"{network} already belongs to subscriber {owner}")
        self._owners.insert(family, net, plen, sid)

    def add_subscribers(self, ids, tariffs, balances, credits, allowances, volume_left) -> list[Event]:
        """``add_subscriber`` for many at once (a start fills the engine in chunks), all or nothing:
        subscriber i is ``ids[i]``, ``tariffs[i]``, ``balances[i]``, ``credits[i]`` (int64 arrays:
        ``array('q')``), ``allowances[i]`` and ``volume_left[i]`` (sequences). Each is checked as
        ``add_subscriber`` checks it (an id given twice: it exists); the first refused leaves the
        engine as it was, its EngineError's ``index`` is i. Returns the block events, in order."""
        check_bulk_lengths(ids, tariffs, balances, credits, allowances, volume_left)
        events: list[Event] = []
        for i in range(len(ids)):
            try:
                events += self.add_subscriber(ids[i], tariffs[i], balances[i], credits[i], allowances[i],
                                              volume_left[i])
            except EngineError as exc:
                for sid in ids[:i]:
                    del self._subs[sid]
                exc.index = i
                raise
        return events

    def add_addresses(self, sids, networks) -> None:
        """``add_address(sids[i], networks[i])`` for each i (``sids`` an int64 array), all or nothing: the
        first refused (an unknown subscriber, a network that is not one, one owned already or given
        twice) leaves the engine as it was; its EngineError's ``index`` is i."""
        check_bulk_lengths(sids, networks)
        for i in range(len(networks)):
            try:
                if not isinstance(networks[i], str):
                    raise EngineError(f"bad network {networks[i]!r}: not text")
                self.add_address(sids[i], networks[i])
            except EngineError as exc:
                for network in networks[:i]:
                    self.remove_address(network)
                exc.index = i
                raise

    def add_networks_texts(self, sids, texts) -> None:
        """Subscriber ``sids[i]`` (an int64 array) gets every network of ``texts[i]``: its networks joined
        by single spaces, "" for none (a start's row: ``Ledger.subscriber_rows``). All or nothing, as
        ``add_addresses``: the first refused (an unknown subscriber, a text that is not one, an empty
        network in it, a network that is not one, one owned already or given before in the same text
        or call) leaves the engine as it was; its EngineError's ``index`` is i, the subscriber's."""
        check_bulk_lengths(sids, texts)
        added = []
        for i in range(len(texts)):
            try:
                text = texts[i]
                if not isinstance(text, str):
                    raise EngineError(f"bad networks {text!r}: not text")
                self._sub(sids[i])
                for network in text.split(" ") if text else ():
                    if not network:
                        raise EngineError(f"bad networks {text!r}: an empty network (one space between networks, "
                                          f"none before the first or after the last)")
                    self.add_address(sids[i], network)
                    added.append(network)
            except EngineError as exc:
                for network in reversed(added):
                    self.remove_address(network)
                exc.index = i
                raise

    def remove_address(self, network: str) -> None:
        family, net, plen = parse_network(network)
        if self._owners.get(family, net, plen) is None:
            raise EngineError(f"{network} belongs to no subscriber")
        self._owners.remove(family, net, plen)

    def adjust_balance(self, sid: int, delta: int) -> list[Event]:
        """Add ``delta`` (a payment, or a negative adjustment) to the balance."""
        sub = self._sub(sid)
        balance = sub.balance + as_int64(delta, "delta")
        if not INT64_MIN <= balance <= INT64_MAX:
            raise EngineError(f"balance of subscriber {sid} would leave the 64-bit range")
        sub.balance = balance
        return self._reevaluate(sid, sub)

    def block(self, sid: int, reason: int) -> list[Event]:
        check_reason(reason)
        sub = self._sub(sid)
        was = sub.blocked
        sub.blocked |= reason
        return [] if was else [Event(EV_BLOCK, sid, -1, reason, sub.balance)]

    def unblock(self, sid: int, reason: int) -> list[Event]:
        check_reason(reason)
        sub = self._sub(sid)
        if not sub.blocked & reason:
            return []
        sub.blocked &= ~reason
        return [] if sub.blocked else [Event(EV_UNBLOCK, sid, -1, reason, sub.balance)]

    def _levels_below(self, sub: Subscriber) -> int:
        return sum(1 for level in self._tariffs[sub.tariff].warn_levels if sub.balance < level)

    def _reevaluate(self, sid: int, sub: Subscriber) -> list[Event]:
        sub.warned = min(sub.warned, self._levels_below(sub))
        if sub.balance < -sub.credit:  # a debt beyond the credit; at exactly -credit free traffic still passes
            return self.block(sid, BLOCK_LIMIT)
        return self.unblock(sid, BLOCK_LIMIT)

    def set_volume(self, sid: int, volume_left: int | None) -> list[Event]:
        """Bytes of the volume zones ``sid`` may still pass this period (None:
        no volume limit), e.g. the limit at a period start or after a limit
        changed mid-period. Below 0 (aggregates counted past it) it blocks
        (BLOCK_VOLUME); otherwise that block is lifted."""
        sub = self._sub(sid)
        sub.volume_left = check_volume_left(volume_left)
        if sub.volume_left is not None and sub.volume_left < 0:
            return self.block(sid, BLOCK_VOLUME)
        return self.unblock(sid, BLOCK_VOLUME)

    # ---- queries ---------------------------------------------------------

    def subscriber(self, sid: int) -> SubscriberState:
        s = self._sub(sid)
        return SubscriberState(s.tariff, s.balance, s.credit, s.blocked, tuple(s.allowance), s.warned,
                               s.dropped_packets, s.dropped_bytes, s.rated_bytes, s.volume_left)

    def subscribers(self) -> list[int]:
        return sorted(self._subs)

    def blocked_subscribers(self) -> list[int]:
        """Ids of the blocked subscribers, ascending."""
        return sorted(sid for sid, s in self._subs.items() if s.blocked)

    def owner(self, network: str) -> int:
        """The subscriber that owns exactly ``network`` (not a prefix around it), 0 for none."""
        family, net, plen = parse_network(network)
        owner = self._owners.get(family, net, plen)
        return 0 if owner is None else owner

    def lookup_subscriber(self, address: str) -> int:
        addr = ipaddress.ip_address(address)
        return next(self._owners.matches(addr.version, int(addr)), 0)

    def lookup_zone(self, address: str, proto: int = 0, port: int | None = None) -> int:
        addr = ipaddress.ip_address(address)
        return self._zone(addr.version, int(addr), proto, port is not None, port or 0)

    def stats(self) -> EngineStats:
        return EngineStats(*(getattr(self._stats, f) for f in EngineStats._fields))

    def drain(self) -> list[CounterRow]:
        """Counters since the last drain, sorted, and reset to zero."""
        rows = []
        for sid in sorted(self._subs):
            sub = self._subs[sid]
            for (zone, direction), c in sorted(sub.counters.items()):
                if any(c):
                    rows.append(CounterRow(sid, zone, direction, *c))
            sub.counters.clear()
        return rows

    # ---- the per-packet path --------------------------------------------

    def _zone(self, family: int, addr: int, proto: int, has_ports: bool, port: int) -> int:
        for rules in self._zones.matches(family, addr):
            for rule in rules:
                if rule_matches(rule, proto, has_ports, port):
                    return rule.zone
        return self.default_zone

    def _allowed(self, family: int, addr: int, proto: int, has_ports: bool, port: int) -> bool:
        return any(rule_matches(rule, proto, has_ports, port)
                   for rules in self._allow.matches(family, addr) for rule in rules)

    def _slot(self, ts: int) -> int:
        starts, slots = self._timeline
        lo, hi = 0, len(starts)
        while lo < hi:  # rightmost start <= ts
            mid = (lo + hi) // 2
            if starts[mid] <= ts:
                lo = mid + 1
            else:
                hi = mid
        return slots[max(lo - 1, 0)]

    def _drop(self, sub: Subscriber, length: int, count: int) -> int:
        sub.dropped_packets += count
        sub.dropped_bytes += length
        self._stats.dropped_packets += count
        self._stats.dropped_bytes += length
        return NF_DROP

    def _count(self, sub: Subscriber, zone: int, direction: int, length: int, count: int, cost: int) -> None:
        c = sub.counters.setdefault((zone, direction), [0, 0, 0])
        c[0] += length
        c[1] += count
        c[2] += cost
        sub.rated_bytes += length
        if sub.volume_left is not None and self.volume_zones >> zone & 1:
            sub.volume_left -= length

    def _rate(self, sid: int, sub: Subscriber, zone: int, direction: int, length: int, count: int,
              aggregate: bool, slot: int, index: int, allowed: bool, events: list) -> int:
        """Rate one side of a packet (or of an aggregate of ``count``); returns its verdict."""
        if sub.blocked:
            if allowed:
                self._count(sub, zone, direction, length, count, 0)
                return NF_ACCEPT
            if not aggregate:
                return self._drop(sub, length, count)
        verdict = NF_ACCEPT
        if sub.volume_left is not None and self.volume_zones >> zone & 1 and length > sub.volume_left:
            # the volume limit, checked first: a packet past it is dropped before anything is drawn or charged
            if not sub.blocked & BLOCK_VOLUME:
                sub.blocked |= BLOCK_VOLUME
                events.append(Event(EV_BLOCK, sid, index, BLOCK_VOLUME, sub.balance))
            if not aggregate:
                return self._drop(sub, length, count)
            verdict = NF_DROP  # an aggregate already passed: counted (volume_left goes negative) and charged
        tariff = self._tariffs[sub.tariff]
        drawn, amount, remaining = _draw(tariff, sub.allowance, zone, direction, length)
        price = tariff.prices[(zone * 2 + direction) * self.n_slots + slot]
        key = (zone, direction)
        amount += remaining * price + sub.carry.get(key, 0)
        cost, carry = divmod(amount, PRICE_SCALE)
        if cost > 0 and sub.balance - cost < -sub.credit:
            if not sub.blocked & BLOCK_LIMIT:
                sub.blocked |= BLOCK_LIMIT
                events.append(Event(EV_BLOCK, sid, index, BLOCK_LIMIT, sub.balance))
            if not aggregate:  # the packet is dropped: it draws nothing
                return self._drop(sub, length, count)
            verdict = NF_DROP  # an aggregate is charged all the same: it already passed
            self._stats.over_limit_bytes += length
        for b, take in drawn:
            sub.allowance[b] -= take
        sub.carry[key] = carry
        sub.balance -= cost
        self._count(sub, zone, direction, length, count, cost)
        if cost > 0:
            levels = tariff.warn_levels
            while sub.warned < len(levels) and sub.balance < levels[sub.warned]:
                events.append(Event(EV_WARN, sid, index, sub.warned, sub.balance))
                sub.warned += 1
        return verdict

    def rate_volume(self, sid: int, zone: int, direction: int, nbytes: int, npackets: int,
                    ts_ns: int) -> list[Event]:
        """Rate ``nbytes`` bytes in ``npackets`` packets of ``sid`` in ``zone``
        and ``direction`` at the time slot of ``ts_ns``, exactly as one
        aggregate flow record of that zone and direction (see the module
        docstring, 7.): free volume and tiers drawn on, the carry, charged even
        when blocked or past the limit (counted in ``over_limit_bytes``), a
        block event if it breaches the credit or the volume limit (counted
        past it all the same), warn events; the bytes show up in the next
        ``drain`` and in ``rated_bytes``. It is for traffic that passed without
        the engine seeing it (the kernel counted it while no reader was bound),
        so there is no remote address: nothing is allow-listed.

        ``nbytes`` and ``npackets`` may be anything in 0..2**64-1, rated in one
        step (no packet-sized pieces). EngineError, changing nothing, for an
        argument out of range or a result the 64-bit state of the compiled
        engine cannot hold (balance, undrained counters: bytes up to 2**64-1,
        packets up to ``MAX_COUNTER_PACKETS``, ``rated_bytes``,
        ``over_limit_bytes``). Events carry index -1 (no packet).
        """
        zone, direction, nbytes, npackets, ts_ns = check_volume(self.n_zones, zone, direction, nbytes, npackets,
                                                                ts_ns)
        sub = self._sub(sid)
        tariff = self._tariffs[sub.tariff]
        # what _rate does for an aggregate, computed first and applied only once it is known to fit
        drawn, amount, remaining = _draw(tariff, sub.allowance, zone, direction, nbytes)
        key = (zone, direction)
        amount += remaining * tariff.prices[(zone * 2 + direction) * self.n_slots + self._slot(ts_ns)]
        amount += sub.carry.get(key, 0)
        cost, carry = divmod(amount, PRICE_SCALE)
        breach = cost > 0 and sub.balance - cost < -sub.credit
        by_volume = sub.volume_left is not None and self.volume_zones >> zone & 1
        c = sub.counters.get(key, [0, 0, 0])
        if (sub.balance - cost < INT64_MIN or c[0] + nbytes > UINT64_MAX or c[1] + npackets > MAX_COUNTER_PACKETS
                or c[2] + cost > INT64_MAX or sub.rated_bytes + nbytes > UINT64_MAX
                or (by_volume and sub.volume_left - nbytes < INT64_MIN)
                or (breach and self._stats.over_limit_bytes + nbytes > UINT64_MAX)):
            raise EngineError(f"rate_volume: {nbytes} bytes would take subscriber {sid}'s balance or counters "
                              f"out of 64 bits; drain first or rate less at once")
        for b, take in drawn:
            sub.allowance[b] -= take
        events: list[Event] = []
        if by_volume and nbytes > sub.volume_left and not sub.blocked & BLOCK_VOLUME:
            sub.blocked |= BLOCK_VOLUME
            events.append(Event(EV_BLOCK, sid, -1, BLOCK_VOLUME, sub.balance))
        if breach:
            if not sub.blocked & BLOCK_LIMIT:
                sub.blocked |= BLOCK_LIMIT
                events.append(Event(EV_BLOCK, sid, -1, BLOCK_LIMIT, sub.balance))
            self._stats.over_limit_bytes += nbytes
        sub.carry[key] = carry
        sub.balance -= cost
        self._count(sub, zone, direction, nbytes, npackets, cost)
        if cost > 0:
            levels = tariff.warn_levels
            while sub.warned < len(levels) and sub.balance < levels[sub.warned]:
                events.append(Event(EV_WARN, sid, -1, sub.warned, sub.balance))
                sub.warned += 1
        return events

    # ---- grants (the eBPF data path: gateway/daemon/grants.py) ----------------

    def _grant_view(self, sid: int, zone, direction, ts_ns, allowance):
        """Checked arguments of quote_bytes/affordable_bytes: (sub, tariff, allowance, price, carry)."""
        zone, direction, _n, _p, ts_ns = check_volume(self.n_zones, zone, direction, 0, 0, ts_ns)
        sub = self._sub(sid)
        tariff = self._tariffs[sub.tariff]
        allowance = check_grant_allowance(allowance, sub.allowance, len(tariff.buckets))
        price = tariff.prices[(zone * 2 + direction) * self.n_slots + self._slot(ts_ns)]
        return sub, tariff, allowance, price, sub.carry.get((zone, direction), 0)

    def quote_bytes(self, sid: int, zone: int, direction: int, nbytes: int, ts_ns: int,
                    allowance: Sequence[int] | None = None) -> int:
        """What ``rate_volume(sid, zone, direction, nbytes, _, ts_ns)`` would
        charge now (minor units), changing nothing: the buckets drawn on in
        order (``allowance``: bytes left per bucket to draw on instead of the
        subscriber's own), the slot's price for the rest, the carry."""
        sub, tariff, allowance, price, carry = self._grant_view(sid, zone, direction, ts_ns, allowance)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= UINT64_MAX:
            raise EngineError(f"quote_bytes: nbytes must be 0..2**64-1, not {nbytes!r}")
        _drawn, amount, remaining = _draw(tariff, allowance, zone, direction, nbytes)
        return (amount + remaining * price + carry) // PRICE_SCALE

    def affordable_bytes(self, sid: int, zone: int, direction: int, ts_ns: int, budget: int | None = None,
                         allowance: Sequence[int] | None = None) -> int:
        """The most bytes of ``zone`` and ``direction`` that ``sid`` can pass
        at the time slot of ``ts_ns``: the largest n whose
        :meth:`quote_bytes` is 0 or at most ``budget`` (minor units; None:
        balance + credit), free volume and tiers (``allowance``, as in
        quote_bytes) drawn on first, and no more than the volume limit leaves
        when the zone counts toward it. ``UINT64_MAX`` (the eBPF program's
        GRANT_FREE) when no number of bytes would ever cost anything and no
        volume limit applies. Changes nothing."""
        sub, tariff, allowance, price, carry = self._grant_view(sid, zone, direction, ts_ns, allowance)
        if budget is None:
            budget = sub.balance + sub.credit
        elif isinstance(budget, bool) or not isinstance(budget, int):
            raise EngineError(f"affordable_bytes: budget is None or an int, not {budget!r}")
        # amounts (minor units * PRICE_SCALE) n bytes may come to: floor((carry + amount) / SCALE) <= budget,
        # or the cost is 0, which always passes (step 5 of the module docstring)
        room = (max(budget, 0) + 1) * PRICE_SCALE - 1 - carry
        n = 0
        for b, (zone_mask, dir_mask, bucket_price) in enumerate(tariff.buckets):
            if not (zone_mask >> zone & 1 and dir_mask >> direction & 1 and allowance[b] > 0):
                continue
            if bucket_price == 0 or allowance[b] * bucket_price <= room:
                n += allowance[b]
                room -= allowance[b] * bucket_price
            else:
                n += room // bucket_price
                return self._volume_cap(sub, zone, min(n, UINT64_MAX))
        n = UINT64_MAX if price == 0 else min(UINT64_MAX, n + room // price)
        return self._volume_cap(sub, zone, n)

    def _volume_cap(self, sub: Subscriber, zone: int, n: int) -> int:
        if sub.volume_left is not None and self.volume_zones >> zone & 1:
            return min(n, max(0, sub.volume_left))
        return n

    def process(self, batch) -> list[Event]:
        """Account every packet of ``batch``, write its verdicts, return events."""
        events: list[Event] = []
        stats = self._stats
        buf = batch.buf
        aggregate = batch.aggregates
        for i in range(batch.n):  # a bad offset must not read outside the buffer (the compiled engine checks too)
            if batch.offset[i] + batch.caplen[i] > len(buf):
                raise EngineError(f"packet {i} lies outside the batch buffer")
        for i in range(batch.n):
            off = batch.offset[i]
            wirelen = batch.wirelen[i]
            count = batch.packets[i] if aggregate else 1
            stats.packets += count
            stats.bytes += wirelen
            parsed = parse_packet(bytes(buf[off:off + batch.caplen[i]]), wirelen, aggregate)
            if parsed is None:
                stats.malformed_packets += count
                stats.malformed_bytes += wirelen
                batch.verdict[i] = self.malformed_verdict
                continue
            family, src, dst, proto, has_ports, sport, dport, length = parsed
            src_sid = next(self._owners.matches(family, src), 0)
            dst_sid = next(self._owners.matches(family, dst), 0)
            if not src_sid and not dst_sid:
                stats.unknown_packets += count
                stats.unknown_bytes += length
                batch.verdict[i] = self.unknown_verdict
                continue
            slot = self._slot(batch.ts[i])
            verdict = NF_ACCEPT
            if dst_sid:
                dst_sub = self._subs[dst_sid]
                dst_allowed = bool(dst_sub.blocked) and self._allowed(family, src, proto, has_ports, sport)
                if dst_sub.blocked and not dst_allowed and not aggregate:
                    verdict = self._drop(dst_sub, length, count)
            if verdict == NF_ACCEPT and src_sid:
                src_sub = self._subs[src_sid]
                allowed = bool(src_sub.blocked) and self._allowed(family, dst, proto, has_ports, dport)
                zone = self._zone(family, dst, proto, has_ports, dport)
                verdict = self._rate(src_sid, src_sub, zone, UPLOAD, length, count, aggregate, slot, i, allowed,
                                     events)
            if dst_sid and (verdict == NF_ACCEPT or aggregate):
                # looked at again: rating the upload of an aggregate may have blocked this same subscriber
                dst_allowed = bool(dst_sub.blocked) and self._allowed(family, src, proto, has_ports, sport)
                zone = self._zone(family, src, proto, has_ports, sport)
                if self._rate(dst_sid, dst_sub, zone, DOWNLOAD, length, count, aggregate, slot, i, dst_allowed,
                              events) == NF_DROP:
                    verdict = NF_DROP
            batch.verdict[i] = verdict
        return events
