"""The engine's rules, case by case, with expectations worked out by hand.

Packets are built with scapy, so the bytes counted are checked against what
scapy says the IP packet is, not against the engine's own parser. Every test
runs on both implementations (ids ``c`` and ``py``).
"""

from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPv6, Raw
from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting

import ext
from ext import PacketBatch, ZoneRule
from ext.constants import (BLOCK_LIMIT, BLOCK_MANUAL, BLOCK_VOLUME, DOWNLOAD, EV_BLOCK, EV_UNBLOCK, EV_WARN, NF_ACCEPT,
                           NF_DROP, PRICE_SCALE, UPLOAD)
from ext.errors import EngineError

LOCAL, EXTERNAL, PEERING, VIDEO = range(4)
T = 1_800_000_000 * 10 ** 9


@pytest.fixture(params=["c", "py"])
def make(request):
    cls = ext.ENGINES.get(request.param)
    if cls is None:
        pytest.fail(f"engine {request.param!r} is not built: {ext.EXT_IMPORT_ERROR}")

    def build(prices=None, n_slots=1, buckets=(), warn=(), **kw):
        e = cls(4, n_slots, **kw)
        e.set_zones([
            ZoneRule("100.64.0.0/10", LOCAL), ZoneRule("2001:db8:100::/40", LOCAL),
            ZoneRule("198.18.0.0/15", PEERING), ZoneRule("2001:db8:198::/48", PEERING),
            ZoneRule("198.19.0.0/16", VIDEO, 6, 443, 443),  # tcp/443 inside the peering /15
            ZoneRule("198.19.128.0/17", EXTERNAL),  # nested: longer prefix wins
        ])
        if prices is None:  # 1 minor unit per byte everywhere except local
            prices = [0] * (2 * n_slots) + [PRICE_SCALE] * (6 * n_slots)
        e.set_tariff(1, prices, buckets, warn)
        return e

    return build


def batch(*pkts, ts=T):
    return PacketBatch.of([(bytes(p), len(p), ts + i) for i, p in enumerate(pkts)])


def add(e, sid, balance, *nets, credit=0, allowance=(), volume_left=None):
    events = e.add_subscriber(sid, 1, balance, credit, allowance, volume_left)
    for n in nets:
        e.add_address(sid, n)
    return events


def test_zones_longest_prefix_then_port_rule(make):
    e = make()
    assert e.lookup_zone("100.64.9.9") == LOCAL
    assert e.lookup_zone("198.18.1.1") == PEERING
    assert e.lookup_zone("198.19.1.1", 6, 443) == VIDEO
    assert e.lookup_zone("198.19.1.1", 17, 443) == PEERING  # udp: the /16 rule does not match, falls back to /15
    assert e.lookup_zone("198.19.1.1", 6, 80) == PEERING
    assert e.lookup_zone("198.19.200.1", 6, 443) == EXTERNAL  # the /17 is longer than the /16
    assert e.lookup_zone("8.8.8.8") == EXTERNAL  # default zone
    assert e.lookup_zone("2001:db8:198:ff::1") == PEERING
    assert e.lookup_zone("2001:db8:beef::1") == EXTERNAL


def test_bytes_directions_and_zones(make):
    e = make()
    add(e, 7, 10 ** 9, "100.64.1.2/32", "2001:db8:100:1::/64")
    up = IP(src="100.64.1.2", dst="198.19.1.1") / TCP(dport=443) / Raw(bytes(100))
    down = IPv6(src="2001:db8:198::1", dst="2001:db8:100:1::99") / UDP(sport=53) / Raw(bytes(300))
    other = IP(src="203.0.113.1", dst="198.51.100.1") / ICMP()
    b = batch(up, down, other)
    assert e.process(b) == []
    assert list(b.verdict) == [NF_ACCEPT] * 3
    rows = {(r.zone, r.direction): (r.bytes, r.packets, r.charged) for r in e.drain()}
    assert rows == {(VIDEO, UPLOAD): (len(up), 1, len(up)), (PEERING, DOWNLOAD): (len(down), 1, len(down))}
    assert e.stats().unknown_packets == 1
    assert e.subscriber(7).balance == 10 ** 9 - len(up) - len(down)
    assert e.drain() == []  # drained means reset


def test_link_padding_is_not_counted_and_longer_headers_are_malformed(make):
    e = make()
    add(e, 1, 10 ** 9, "100.64.1.2/32")
    p = bytes(IP(src="100.64.1.2", dst="8.8.8.8") / ICMP())  # 28 bytes
    b = PacketBatch.of([(p + bytes(18), 46, T), (p, 20, T)])  # padded frame; a header claiming more than the wire
    e.process(b)
    assert [r.bytes for r in e.drain()] == [28]
    assert e.stats().malformed_packets == 1


def test_ipv6_extension_headers_and_fragments(make):
    e = make()
    add(e, 1, 10 ** 9, "2001:db8:100:1::/64")
    base = IPv6(src="2001:db8:100:1::2", dst="2001:db8:198::80")
    chained = base / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting() / TCP(dport=443) / Raw(bytes(10))
    first = base / IPv6ExtHdrFragment(offset=0, m=1) / UDP(dport=53) / Raw(bytes(64))
    later = base / IPv6ExtHdrFragment(offset=100, nh=17) / Raw(bytes(64))
    e.process(batch(chained, first, later))
    rows = e.drain()
    assert sum(r.bytes for r in rows) == len(chained) + len(first) + len(later)
    assert e.stats().malformed_packets == 0


def test_garbage_is_counted_not_fatal(make):
    e = make(malformed_verdict=NF_DROP)
    add(e, 1, 10 ** 9, "100.64.1.2/32")
    junk = [b"", b"\x45", b"\x45" + bytes(30), b"\x60" + bytes(10), b"\x99" * 60, b"\x4f" + bytes(59)]
    b = PacketBatch.of([(j, max(len(j), 1), T) for j in junk])
    assert e.process(b) == []
    assert list(b.verdict) == [NF_DROP] * len(junk)
    assert e.stats().malformed_packets == len(junk)
    assert e.drain() == []


def test_no_overspending_blocks_at_the_breaching_packet(make):
    e = make()
    add(e, 3, 250, "100.64.3.3/32")
    pkt = IP(src="198.18.0.1", dst="100.64.3.3") / UDP() / Raw(bytes(72))  # 100 bytes = 100 units
    b = batch(*[pkt] * 5)
    events = e.process(b)
    assert list(b.verdict) == [NF_ACCEPT, NF_ACCEPT, NF_DROP, NF_DROP, NF_DROP]
    assert events == [ext.Event(EV_BLOCK, 3, 2, BLOCK_LIMIT, 50)]
    s = e.subscriber(3)
    assert (s.balance, s.blocked, s.dropped_packets, s.dropped_bytes) == (50, BLOCK_LIMIT, 3, 300)
    # a top-up lifts the block; a further payment changes nothing more
    assert e.adjust_balance(3, 1000) == [ext.Event(EV_UNBLOCK, 3, -1, BLOCK_LIMIT, 1050)]
    assert e.adjust_balance(3, 1) == []
    b = batch(pkt)
    e.process(b)
    assert list(b.verdict) == [NF_ACCEPT]


def test_the_balance_may_reach_exactly_zero(make):
    e = make()
    add(e, 3, 200, "100.64.3.3/32")
    pkt = IP(src="198.18.0.1", dst="100.64.3.3") / UDP() / Raw(bytes(72))  # 100 units
    b = batch(*[pkt] * 3)
    e.process(b)
    assert list(b.verdict) == [NF_ACCEPT, NF_ACCEPT, NF_DROP]
    assert e.subscriber(3).balance == 0


def test_credit_limit_lets_the_balance_go_negative(make):
    e = make()
    add(e, 3, 100, "100.64.3.3/32", credit=150)
    pkt = IP(src="100.64.3.3", dst="198.18.0.1") / UDP() / Raw(bytes(72))  # 100 units
    b = batch(*[pkt] * 3)
    e.process(b)
    assert list(b.verdict) == [NF_ACCEPT, NF_ACCEPT, NF_DROP]
    assert e.subscriber(3).balance == -100


def test_flow_records_are_rated_like_their_packets(make):
    """A flow record of 3 MiB + 10 bytes over 2,500 packets: four entries, the
    same bytes, packets and charge as the packets themselves would have had."""
    e = make(buckets=[(1 << PEERING, 0b11)])
    add(e, 3, 10 ** 9, "100.64.3.3/32", "2001:db8:100:3::/64", allowance=[1000])
    b = PacketBatch(16, aggregates=True)
    nbytes = 3 * 2 ** 20 + 10
    assert b.append_flow("198.18.0.1", "100.64.3.3", 6, 443, 5000, nbytes, 2500, T) == 4
    assert list(b.packets[:4]) == [625] * 4
    assert b.append_flow("100.64.3.3", "198.19.0.9", 6, 40000, 443, 700, 3, T + 1) == 1  # tcp/443: VIDEO
    assert b.append_flow("2001:db8:100:3::9", "2001:db8:198::1", 17, 1, 2, 0, 1, T + 2) == 1  # zero bytes, one packet
    assert e.process(b) == []
    assert list(b.verdict[:b.n]) == [NF_ACCEPT] * 6
    rows = {(r.subscriber, r.zone, r.direction): (r.bytes, r.packets, r.charged) for r in e.drain()}
    assert rows == {(3, PEERING, DOWNLOAD): (nbytes, 2500, nbytes - 1000), (3, VIDEO, UPLOAD): (700, 3, 700),
                    (3, PEERING, UPLOAD): (0, 1, 0)}
    assert e.stats().packets == 2504


def test_flow_records_past_the_limit_are_charged_and_block_once(make):
    """Traffic a passive source reports has already passed: it is a debt, not
    dropped. The entry that breaches blocks (one event); later entries are
    charged too, except allow-listed ones."""
    e = make()
    e.set_allowlist([ZoneRule("100.64.0.1/32", 0, 17, 53, 53)])
    add(e, 3, 250, "100.64.3.3/32")
    b = PacketBatch(8, aggregates=True)
    for _ in range(3):
        b.append_flow("198.18.0.1", "100.64.3.3", 17, 9, 9, 100, 1, T)
    b.append_flow("100.64.3.3", "100.64.0.1", 17, 5000, 53, 60, 1, T)  # DNS to the allow-listed resolver
    assert e.process(b) == [ext.Event(EV_BLOCK, 3, 2, BLOCK_LIMIT, 50)]
    assert list(b.verdict[:b.n]) == [NF_ACCEPT, NF_ACCEPT, NF_DROP, NF_ACCEPT]
    s = e.subscriber(3)
    assert (s.balance, s.blocked, s.dropped_packets) == (-50, BLOCK_LIMIT, 0)
    b.clear()
    b.append_flow("198.18.0.1", "100.64.3.3", 17, 9, 9, 40, 1, T)
    assert e.process(b) == []  # already blocked: no second event, still charged
    assert e.subscriber(3).balance == -90
    assert e.stats().over_limit_bytes == 100 + 40  # the breaching record and the one after


def _prices(n_slots, by_zone_dir):
    """Flat price list from {(zone, direction): [price per slot]} (0 elsewhere)."""
    out = [0] * (4 * 2 * n_slots)
    for (zone, direction), per_slot in by_zone_dir.items():
        for slot, price in enumerate(per_slot):
            out[(zone * 2 + direction) * n_slots + slot] = price
    return out


def test_rate_volume_rates_like_one_flow_record(make):
    """Traffic the engine never saw (the kernel counted it while the daemon was
    down), rated at a zone and direction as one aggregate: free volume, the
    tier, the slot's price, the carry, warnings, past the limit, the block."""
    third = PRICE_SCALE // 3  # 333,333: a third of a unit per byte, truncated
    prices = _prices(2, {(PEERING, UPLOAD): [third, 2 * PRICE_SCALE], (PEERING, DOWNLOAD): [third, 2 * PRICE_SCALE]})
    # 1,000 free bytes of peering both ways, then 500 bytes of peering upload at 3 units a byte
    buckets = [(1 << PEERING, 0b11), (1 << PEERING, 0b01, 3 * PRICE_SCALE)]
    engines = []
    for use_flows in (False, True):
        e = make(prices=prices, n_slots=2, buckets=buckets, warn=[5000])
        e.set_timeline([0, T + 2], [0, 1])  # slot 1 from T + 2 on
        add(e, 3, 10_000, "100.64.3.3/32", allowance=[1000, 500])
        engines.append(e)

        def rate(direction, nbytes, npackets, ts):
            if not use_flows:
                return e.rate_volume(3, PEERING, direction, nbytes, npackets, ts)
            b = PacketBatch(1, aggregates=True)
            ends = ("100.64.3.3", "198.18.0.1") if direction == UPLOAD else ("198.18.0.1", "100.64.3.3")
            b.append_flow(*ends, 17, 9, 9, nbytes, npackets, ts)
            return [ev._replace(index=-1) for ev in e.process(b)]

        # 2,000 B up at slot 0: 1,000 free + 500 * 3 + 500 * 333,333 / 10**6
        #   = 1,500 + 166,666,500 / 10**6 -> 1,666 charged, 666,500 carried
        assert rate(UPLOAD, 2000, 7, T) == []
        assert e.subscriber(3).balance == 10_000 - 1666 == 8334
        assert e.subscriber(3).allowance == (0, 0)
        # 3 B more: 3 * 333,333 + 666,500 = 1,666,499 -> 1 more, 666,499 carried (2,003 B at once: 1,667)
        assert rate(UPLOAD, 3, 1, T + 1) == []
        assert e.subscriber(3).balance == 8333
        # 1,700 B down at slot 1 (2 a byte; the tier is upload only): 3,400 -> 4,933, below the 5,000 warning
        assert rate(DOWNLOAD, 1700, 2, T + 2) == [ext.Event(EV_WARN, 3, -1, 0, 4933)]
        # 2,500 B down at slot 1 cost 5,000 > 4,933: charged all the same (it passed), and blocks
        assert rate(DOWNLOAD, 2500, 3, T + 3) == [ext.Event(EV_BLOCK, 3, -1, BLOCK_LIMIT, 4933)]
        # blocked: 100 B down at slot 0 still charged, 100 * 333,333 = 33,333,300 -> 33; no second event
        assert rate(DOWNLOAD, 100, 1, T) == []
        s = e.subscriber(3)
        assert (s.balance, s.blocked, s.dropped_packets) == (4933 - 5000 - 33, BLOCK_LIMIT, 0) == (-100, 1, 0)
        assert s.rated_bytes == 2000 + 3 + 1700 + 2500 + 100 == 6303
        assert e.stats().over_limit_bytes == 2500 + 100
        rows = {(r.zone, r.direction): (r.bytes, r.packets, r.charged) for r in e.drain()}
        assert rows == {(PEERING, UPLOAD): (2003, 8, 1667), (PEERING, DOWNLOAD): (4300, 6, 3400 + 5000 + 33)}
    # and the flow records left the same state behind (carry included: one more byte each way)
    for e in engines:
        e.rate_volume(3, PEERING, UPLOAD, 1, 1, T)
        e.rate_volume(3, PEERING, DOWNLOAD, 1, 1, T)
    assert engines[0].subscriber(3) == engines[1].subscriber(3)
    assert engines[0].drain() == engines[1].drain()


def test_rate_volume_takes_any_64_bit_volume_in_one_step(make):
    """2**64 - 1 bytes at a quarter unit a byte: (2**64 - 1) / 4 = 2**62 - 0.25,
    so 2**62 - 1 charged and 0.75 of a unit (750,000) carried; one call, no
    2**44 packet-sized pieces. Zero bytes change nothing."""
    e = make(prices=_prices(1, {(EXTERNAL, UPLOAD): [PRICE_SCALE // 4]}))
    add(e, 3, 1 << 62, "100.64.3.3/32")
    assert e.rate_volume(3, EXTERNAL, UPLOAD, 0, 0, T) == []
    assert e.drain() == []
    assert e.rate_volume(3, EXTERNAL, UPLOAD, (1 << 64) - 1, 1 << 40, T) == []
    assert e.subscriber(3).balance == (1 << 62) - ((1 << 62) - 1) == 1
    assert e.drain() == [ext.CounterRow(3, EXTERNAL, UPLOAD, (1 << 64) - 1, 1 << 40, (1 << 62) - 1)]
    assert e.subscriber(3).rated_bytes == (1 << 64) - 1
    with pytest.raises(EngineError, match="64 bits"):  # rated_bytes would wrap: refused, nothing changed
        e.rate_volume(3, EXTERNAL, UPLOAD, 1, 1, T)
    assert e.subscriber(3).balance == 1 and e.drain() == []


def test_flow_records_refuse_bad_input():
    b = PacketBatch(2, aggregates=True)
    for args in [("10.0.0.1", "2001:db8::1", 6, 1, 1), ("10.0.0.1", "x", 6, 1, 1), ("10.0.0.1", "10.0.0.2", 256, 1, 1),
                 ("10.0.0.1", "10.0.0.2", 6, 70000, 1)]:
        with pytest.raises(ValueError):
            b.append_flow(*args, 100, 1, T)
    with pytest.raises(ValueError):
        b.append_flow("10.0.0.1", "10.0.0.2", 6, 1, 1, -1, 1, T)
    with pytest.raises(IndexError):  # 3 entries, room for 2: nothing added
        b.append_flow("10.0.0.1", "10.0.0.2", 6, 1, 1, 3 * 2 ** 20, 1, T)
    assert b.n == 0
    with pytest.raises(ValueError):
        PacketBatch(2).append_flow("10.0.0.1", "10.0.0.2", 6, 1, 1, 1, 1, T)


def test_blocked_subscriber_keeps_the_allow_list(make):
    e = make()
    e.set_allowlist([ZoneRule("100.64.0.1/32", 0, 17, 53, 53)])
    add(e, 3, -1, "100.64.3.3/32")  # a debt beyond its credit (0): blocked from the start
    assert e.subscriber(3).blocked == BLOCK_LIMIT
    dns = IP(src="100.64.3.3", dst="100.64.0.1") / UDP(dport=53) / Raw(bytes(30))
    web = IP(src="100.64.3.3", dst="100.64.0.1") / TCP(dport=80)
    reply = IP(src="100.64.0.1", dst="100.64.3.3") / UDP(sport=53)
    b = batch(dns, web, reply)
    e.process(b)
    assert list(b.verdict) == [NF_ACCEPT, NF_DROP, NF_ACCEPT]


def test_at_exactly_minus_credit_free_traffic_passes_and_the_first_priced_packet_blocks(make):
    """Blocked only by a debt beyond the credit, or at the packet whose cost
    would make one: at 0 with no credit, local (free) traffic passes; the
    first peering packet (100 units) would take it to -100 < 0: dropped."""
    e = make()
    assert add(e, 3, 0, "100.64.3.3/32") == []
    assert add(e, 4, -150, "100.64.4.4/32", credit=150) == []  # at exactly -credit
    assert add(e, 5, -151, "100.64.5.5/32", credit=150) == [ext.Event(EV_BLOCK, 5, -1, BLOCK_LIMIT, -151)]
    free = IP(src="100.64.3.3", dst="100.64.9.9") / UDP() / Raw(bytes(72))  # local: price 0
    priced = IP(src="100.64.3.3", dst="198.18.0.1") / UDP() / Raw(bytes(72))  # 100 bytes, 100 units
    b = batch(free, free, priced, free)
    assert e.process(b) == [ext.Event(EV_BLOCK, 3, 2, BLOCK_LIMIT, 0)]
    assert list(b.verdict) == [NF_ACCEPT, NF_ACCEPT, NF_DROP, NF_DROP]  # blocked from the breaching packet on
    assert e.subscriber(3).balance == 0
    # a payment lifts it; an adjustment back to exactly 0 does not block again (no debt) ...
    assert e.adjust_balance(3, 100) == [ext.Event(EV_UNBLOCK, 3, -1, BLOCK_LIMIT, 100)]
    assert e.adjust_balance(3, -100) == []
    # ... one below does
    assert e.adjust_balance(3, -1) == [ext.Event(EV_BLOCK, 3, -1, BLOCK_LIMIT, -1)]
    # a credit limit that ends with the balance below 0 blocks at once; at exactly 0 it would not
    assert e.set_subscriber(4, credit=149) == [ext.Event(EV_BLOCK, 4, -1, BLOCK_LIMIT, -150)]


def test_volume_limit_holds_at_the_exact_packet(make):
    """250 bytes of the volume zones (all but local here) left: 100 + 100 pass
    (50 left), the next 100-byte packet would exceed it: dropped, not charged,
    blocked (volume) there. Local traffic did not count; a new period's
    volume lifts the block."""
    cls = type(make())
    e = make(volume_zones=0b1110)
    assert type(e) is cls
    add(e, 3, 10_000, "100.64.3.3/32")
    assert e.set_volume(3, 250) == []
    local = IP(src="100.64.3.3", dst="100.64.9.9") / UDP() / Raw(bytes(72))
    out = IP(src="100.64.3.3", dst="198.18.0.1") / UDP() / Raw(bytes(72))  # 100 bytes, 100 units
    back = IP(src="198.18.0.1", dst="100.64.3.3") / UDP() / Raw(bytes(72))
    b = batch(local, out, back, local, out, back)
    assert e.process(b) == [ext.Event(EV_BLOCK, 3, 4, BLOCK_VOLUME, 10_000 - 200)]
    assert list(b.verdict) == [NF_ACCEPT] * 4 + [NF_DROP, NF_DROP]
    s = e.subscriber(3)
    assert (s.balance, s.volume_left, s.blocked, s.dropped_packets) == (9800, 50, BLOCK_VOLUME, 2)
    assert e.adjust_balance(3, 1000) == []  # money does not lift a volume block
    assert e.set_volume(3, 300) == [ext.Event(EV_UNBLOCK, 3, -1, BLOCK_VOLUME, 10_800)]
    b = batch(out, out, out, out)  # 300 bytes left: three pass, exactly to 0; the fourth is dropped
    assert [ev.index for ev in e.process(b)] == [3]
    assert list(b.verdict) == [NF_ACCEPT] * 3 + [NF_DROP]
    assert e.subscriber(3).volume_left == 0
    assert e.set_volume(3, None) == [ext.Event(EV_UNBLOCK, 3, -1, BLOCK_VOLUME, 10_500)]  # no limit any more
    assert e.subscriber(3).volume_left is None


def test_flow_records_past_the_volume_limit_are_counted_and_block(make):
    """An aggregate has passed already: counted and charged past the volume
    limit (volume_left goes negative), blocked there; so does rate_volume.
    An engine told its volume left is below 0 blocks at once."""
    e = make(volume_zones=0b1110)
    add(e, 3, 10_000, "100.64.3.3/32")
    e.set_volume(3, 150)
    b = PacketBatch(2, aggregates=True)
    b.append_flow("198.18.0.1", "100.64.3.3", 17, 9, 9, 100, 1, T)
    b.append_flow("198.18.0.1", "100.64.3.3", 17, 9, 9, 100, 1, T)
    assert e.process(b) == [ext.Event(EV_BLOCK, 3, 1, BLOCK_VOLUME, 9900)]
    assert list(b.verdict[:2]) == [NF_ACCEPT, NF_DROP]
    assert (e.subscriber(3).balance, e.subscriber(3).volume_left) == (9800, -50)
    assert e.rate_volume(3, PEERING, DOWNLOAD, 30, 1, T) == []  # already blocked: counted, charged
    assert (e.subscriber(3).balance, e.subscriber(3).volume_left) == (9770, -80)
    assert e.rate_volume(3, LOCAL, DOWNLOAD, 30, 1, T) == []  # local: not a volume zone
    assert e.subscriber(3).volume_left == -80
    add(e, 4, 10_000, "100.64.4.4/32", volume_left=-1)
    assert e.subscriber(4).blocked == BLOCK_VOLUME
    add(e, 5, 10_000, "100.64.5.5/32", volume_left=40)
    assert e.rate_volume(5, EXTERNAL, UPLOAD, 41, 1, T) == [ext.Event(EV_BLOCK, 5, -1, BLOCK_VOLUME, 10_000)]
    assert e.subscriber(5).volume_left == -1 and e.subscriber(5).balance == 10_000 - 41


def test_a_flow_record_past_every_limit_for_both_sides_raises_all_its_events(make):
    """The most events one entry can raise: internal traffic of two
    subscribers, each past its volume limit and its balance and below all four
    warning levels: per side a volume block, a limit block and four warnings,
    twelve in all (the compiled engine's room per packet), in order."""
    e = make(prices=[PRICE_SCALE] * 8, warn=[4000, 3000, 2000, 1000])
    for sid, net in ((1, "100.64.1.1/32"), (2, "100.64.2.2/32")):
        add(e, sid, 5000, net, volume_left=10)
    b = PacketBatch(1, aggregates=True)
    b.append_flow("100.64.1.1", "100.64.2.2", 17, 9, 9, 6000, 4, T)  # 6,000 units a side: 5,000 - 6,000 = -1,000

    def side(sid):
        return [ext.Event(EV_BLOCK, sid, 0, BLOCK_VOLUME, 5000), ext.Event(EV_BLOCK, sid, 0, BLOCK_LIMIT, 5000)] + [
            ext.Event(EV_WARN, sid, 0, level, -1000) for level in range(4)]

    assert e.process(b) == side(1) + side(2)
    assert [e.subscriber(sid).volume_left for sid in (1, 2)] == [10 - 6000] * 2


def test_manual_block_and_limit_are_independent(make):
    e = make()
    add(e, 3, 1000, "100.64.3.3/32")
    assert e.block(3, BLOCK_MANUAL) == [ext.Event(EV_BLOCK, 3, -1, BLOCK_MANUAL, 1000)]
    b = batch(IP(src="100.64.3.3", dst="8.8.8.8") / ICMP())
    e.process(b)
    assert list(b.verdict) == [NF_DROP]
    assert e.unblock(3, BLOCK_MANUAL) == [ext.Event(EV_UNBLOCK, 3, -1, BLOCK_MANUAL, 1000)]


def test_internal_traffic_counts_for_both_sides(make):
    e = make()
    add(e, 1, 1000, "100.64.1.2/32")
    add(e, 2, 1000, "100.64.2.0/29")
    p = IP(src="100.64.1.2", dst="100.64.2.5") / UDP() / Raw(bytes(100))
    e.process(batch(p))
    rows = {(r.subscriber, r.zone, r.direction): r.bytes for r in e.drain()}
    assert rows == {(1, LOCAL, UPLOAD): len(p), (2, LOCAL, DOWNLOAD): len(p)}


def test_allowance_runs_out_in_the_middle_of_a_packet(make):
    e = make(buckets=[(1 << PEERING, 0b11)])
    add(e, 1, 10_000, "100.64.1.2/32", allowance=[150])
    p = IP(src="198.18.0.1", dst="100.64.1.2") / UDP() / Raw(bytes(72))  # 100 bytes
    e.process(batch(p, p))
    # first packet free, second: 50 free bytes + 50 paid
    assert e.subscriber(1).allowance == (0,)
    assert e.subscriber(1).balance == 10_000 - 50


def test_a_volume_tier_ends_in_the_middle_of_a_packet(make):
    """The first 150 bytes of peering cost 2 units a byte (the tier), the rest
    the zone's price of 1: 100 + 100 bytes cost 200 + (50 * 2 + 50 * 1)."""
    e = make(buckets=[(1 << PEERING, 0b11, 2 * PRICE_SCALE)])
    add(e, 1, 10_000, "100.64.1.2/32", allowance=[150])
    p = IP(src="198.18.0.1", dst="100.64.1.2") / UDP() / Raw(bytes(72))  # 100 bytes
    e.process(batch(p))
    assert e.subscriber(1).balance == 10_000 - 200
    e.process(batch(p))
    assert e.subscriber(1).balance == 10_000 - 200 - 150
    assert e.subscriber(1).allowance == (0,)


def test_remainder_is_carried_not_rounded(make):
    third = PRICE_SCALE // 3  # a third of a unit per byte, truncated at the price scale
    e = make(prices=[0, 0] + [third] * 6)
    add(e, 1, 10 ** 9, "100.64.1.2/32")
    p = IP(src="198.18.0.1", dst="100.64.1.2") / UDP() / Raw(bytes(72))  # 100 bytes
    e.process(batch(*[p] * 30))
    charged = sum(r.charged for r in e.drain())
    assert charged == 30 * 100 * third // PRICE_SCALE  # 999: one-shot rating of the same bytes


def test_time_slots_price_by_packet_time(make):
    prices = [0, 0, 0, 0] + [PRICE_SCALE, 2 * PRICE_SCALE] * 6  # slot 0: 1/byte, slot 1: 2/byte
    e = make(prices=prices, n_slots=2)
    e.set_timeline([0, T + 2], [0, 1])
    add(e, 1, 10 ** 9, "100.64.1.2/32")
    p = IP(src="198.18.0.1", dst="100.64.1.2") / UDP() / Raw(bytes(72))
    e.process(batch(p, p, p, p))  # times T, T+1 (slot 0), T+2, T+3 (slot 1)
    assert sum(r.charged for r in e.drain()) == 2 * 100 + 2 * 200


def test_warning_levels_fire_once_and_rearm(make):
    e = make(warn=[500, 200])
    add(e, 1, 1000, "100.64.1.2/32")
    p = IP(src="198.18.0.1", dst="100.64.1.2") / UDP() / Raw(bytes(72))  # 100 units
    events = e.process(batch(*[p] * 9))
    assert [(ev.kind, ev.index, ev.reason) for ev in events] == [(EV_WARN, 5, 0), (EV_WARN, 8, 1)]
    e.adjust_balance(1, 1000)  # 1100: both re-armed
    events = e.process(batch(*[p] * 7))
    assert [(ev.kind, ev.index, ev.reason) for ev in events] == [(EV_WARN, 6, 0)]


def test_longest_prefix_owner_and_address_changes(make):
    e = make()
    add(e, 1, 1000, "100.64.0.0/16")
    add(e, 2, 1000, "100.64.5.0/24")
    add(e, 3, 1000, "100.64.5.7/32")
    assert [e.lookup_subscriber(a) for a in ("100.64.1.1", "100.64.5.1", "100.64.5.7", "198.18.0.1")] == [1, 2, 3, 0]
    e.remove_address("100.64.5.0/24")
    assert e.lookup_subscriber("100.64.5.1") == 1
    assert e.lookup_subscriber("100.64.5.7") == 3
    e.add_address(2, "100.64.5.0/24")
    assert e.lookup_subscriber("100.64.5.1") == 2
    with pytest.raises(EngineError):
        e.add_address(3, "100.64.5.0/24")
    with pytest.raises(EngineError):
        e.remove_address("100.64.6.0/24")
    with pytest.raises(EngineError):
        e.add_subscriber(1, 1, 0)
    with pytest.raises(EngineError):
        e.adjust_balance(99, 1)


def test_bad_tables_are_refused_and_change_nothing(make):
    e = make()
    with pytest.raises(EngineError):
        e.set_zones([ZoneRule("198.18.0.0/15", 9)])
    with pytest.raises(EngineError):
        e.set_zones([ZoneRule("198.18.0.1/15", 1)])
    with pytest.raises(EngineError):
        e.set_tariff(2, [-1] * 8)
    with pytest.raises(EngineError):
        e.set_tariff(2, [0] * 7)
    with pytest.raises(EngineError):
        e.set_timeline([5, 5], [0, 0])
    assert e.lookup_zone("198.18.1.1") == PEERING


def test_threads_sharing_one_engine_never_overspend():
    """Several queue threads rate one subscriber at once: the balance check and
    decrement is one atomic step, so together they never spend more than the
    balance, and every packet is either charged and accepted or dropped."""
    import threading

    if ext.EngineC is None:
        pytest.fail(f"the compiled engine is not built: {ext.EXT_IMPORT_ERROR}")
    e = ext.EngineC(4, 1)
    e.set_tariff(1, [0, 0] + [PRICE_SCALE] * 6)  # 1 unit per byte outside local
    pkt = bytes(IP(src="198.18.0.1", dst="100.64.3.3") / UDP() / Raw(bytes(72)))  # 100 bytes = 100 units
    k = 12_345  # the balance buys exactly this many packets
    e.add_subscriber(3, 1, 100 * k)
    e.add_address(3, "100.64.3.3/32")
    batches = [[PacketBatch.of([(pkt, len(pkt), T)] * 256) for _ in range(40)] for _ in range(4)]
    accepted = [0] * 4

    def worker(i):
        for b in batches[i]:
            e.process(b)  # releases the GIL for the batch
            accepted[i] += sum(b.verdict[:b.n])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 4 * 40 * 256
    state = e.subscriber(3)
    assert sum(accepted) == k
    assert state.balance == 0
    assert state.dropped_packets == total - k
    assert sum(r.charged for r in e.drain()) == 100 * k
