"""The engine as the oracle of the tc/eBPF program (ext/bpf/tollgate.bpf.c).

The same crafted packets go through BPF_PROG_TEST_RUN (an Ethernet frame) and
through the engine (both implementations), with grants that are what the
engine's balance buys: one priced (zone, direction) at one minor unit per
byte, so a balance of B buys exactly B bytes there, every other (zone,
direction) free (grant 2**64-1), a blocked subscriber (balance -1) mirrored
as blocked with no grant left. After each packet the test does what the
daemon will: a block event of the engine sets the slot blocked in the maps.
Both must agree, packet by packet, on malformed/unknown, the subscriber, the
zone, the direction, the bytes and the verdict.

The block page (``redirected``, "Redirected" in tollgate.bpf.c): with the
slot's redirected flag set, a blocked subscriber's upload that nft's portal
chain redirects to the gateway (TCP, ports present, destination port 80) never
reaches the forward hook, so the engine of the nfqueue path never sees it. The
model: where the engine drops a packet for its blocked sender (the refusal is
the sender's) and the packet is such an upload, the program passes it with
nothing counted (no grant, no refusal) but the "redirected" stat; everything
else as the engine says. The flag is drawn for every subscriber, blocked or
not (it means nothing without the block).

``test_two_cpus_never_pass_beyond_the_grant``: two threads (two CPUs) run the
program on one slot at once; ``used`` ends exactly at the bytes passed and
never beyond the grant.

``test_guard_bpf_ran``: fails (never skips) if the kernel can do BPF but the
program could not be loaded and run here.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext import ENGINES, PacketBatch, ZoneRule
from ext.constants import EV_BLOCK, NF_ACCEPT, PRICE_SCALE
from ext.engine_py import parse_packet

PIN = f"/sys/fs/bpf/tollgate-test-oracle-{os.getpid()}"
N_ZONES, DEFAULT_ZONE, MAX_SLOTS = 3, 1, 16
FREE = (1 << 64) - 1


def bpf_supported() -> bool:
    """bpffs mountable and bpf(BPF_MAP_CREATE) works: the kernel can run the program."""
    try:
        from ext.bpfmaps import ensure_bpffs
        ensure_bpffs("/sys/fs/bpf")
    except Exception:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    attr = struct.pack("=IIII", 2, 4, 8, 1) + bytes(112)  # BPF_MAP_TYPE_ARRAY, key 4, value 8, 1 entry
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(321, 0, buf, len(attr))  # __NR_bpf (x86_64), BPF_MAP_CREATE
    if fd < 0:
        return False
    os.close(fd)
    return True


SUPPORTED = bpf_supported()
needs_bpf = pytest.mark.skipif(not SUPPORTED, reason="the kernel cannot run BPF here (test_guard_bpf_ran says why)")

# slot (= engine subscriber id) -> its networks. 6 and 7 overlap on purpose: the
# /96 (an LPM entry longer than /64) must win over the /64 hash.
SUBSCRIBERS = {
    1: ["100.64.1.2/32"],
    2: ["100.64.2.0/24"],
    3: ["2001:db8:100:3::/64"],
    4: ["2001:db8:100:4::2/128", "100.64.4.4/32"],
    5: ["2001:db8:100:500::/56"],
    6: ["2001:db8:100:6::/96"],
    7: ["2001:db8:100:6::/64"],
}
ZONES = [
    ZoneRule("198.18.0.0/15", 2),
    ZoneRule("198.18.0.0/16", 0, 17, 53, 53),
    ZoneRule("198.18.0.0/16", 0, 6, 0, 1023),
    ZoneRule("198.18.1.0/24", 2, 1),
    ZoneRule("198.18.1.0/24", 0, 6, 65535, 65535),
    ZoneRule("198.18.1.128/25", 0, 0, 0, 0),
    ZoneRule("0.0.0.0/0", 0, 17, 5000, 6000),
    ZoneRule("2001:db8:198::/48", 2),
    ZoneRule("2001:db8:198::/64", 0, 17, 0, 100),
    ZoneRule("2001:db8:198:1::/64", 0, 58),
    ZoneRule("2001:db8:198:1::/64", 2, 6, 80, 443),
    ZoneRule("::/0", 2, 6, 22, 22),
]
ALLOW = [
    ZoneRule("198.18.0.53/32", 0, 17, 53, 53),
    ZoneRule("198.18.1.0/24", 0, 6, 80, 80),
    ZoneRule("2001:db8:198::53/128", 0),
]
REMOTE_NETS = ["198.18.0.0/16", "198.18.1.0/24", "198.18.1.128/25", "198.19.0.0/16", "203.0.113.0/24",
               "2001:db8:198::/64", "2001:db8:198:1::/64", "2001:db8:198:2::/64", "2001:db8:ff::/48"]
REMOTE_FIXED = ["198.18.0.53", "198.18.1.1", "198.18.1.200", "2001:db8:198::53", "2001:db8:198:1::1"]
LOCAL_NETS = [n for nets in SUBSCRIBERS.values() for n in nets] + ["100.64.9.0/24", "2001:db8:100:9::/64"]
LOCAL_FIXED = ["100.64.1.2", "100.64.4.4", "2001:db8:100:4::2", "2001:db8:100:6::1", "2001:db8:100:6:1::1",
               "100.64.1.3"]
PORT_PROTOS = (6, 17, 132, 136)


@pytest.fixture(scope="module", params=[True, False], ids=["refunds", "plain"])
def maps(request):
    """The programs with refunds and without (a kernel without BTF or bpf_cast_to_kern_ctx gets those): the
    same verdicts and counts, packet by packet."""
    if not SUPPORTED:
        pytest.skip("no BPF")
    from ext.bpfmaps import Maps

    Maps.unpin(PIN)
    m = Maps.load(PIN, max_slots=MAX_SLOTS, n_zones=N_ZONES, default_zone=DEFAULT_ZONE, refunds=request.param)
    assert m.refunds == request.param, m.refunds_error
    try:
        slots, prefixes = zip(*[(s, p) for s, nets in SUBSCRIBERS.items() for p in nets])
        m.set_subscribers(list(slots), list(prefixes))
        m.set_zones(ZONES)
        m.set_allowlist(ALLOW)
        yield m
    finally:
        m.close()
        Maps.unpin(PIN)


def address_in(draw, network: str) -> str:
    net = ipaddress.ip_network(network)
    return str(net.network_address + draw(st.integers(0, net.num_addresses - 1)))


@st.composite
def addresses(draw, nets, fixed, family):
    nets = [n for n in nets if ipaddress.ip_network(n).version == family]
    fixed = [a for a in fixed if ipaddress.ip_address(a).version == family]
    if draw(st.booleans()):
        return draw(st.sampled_from(fixed))
    return address_in(draw, draw(st.sampled_from(nets)))


ports = st.one_of(st.sampled_from([0, 1, 22, 53, 80, 100, 101, 443, 1023, 1024, 5000, 6000, 65535]),
                  st.integers(0, 65535))
protos = st.one_of(st.sampled_from([1, 6, 17, 58, 132, 136, 47]), st.integers(0, 255))


@st.composite
def packets(draw):
    """(direction, IP bytes): mostly well-formed packets of a subscriber,
    then truncated, lying about their length, fragments, garbage."""
    kind = draw(st.sampled_from(["v4", "v4", "v4", "v6", "v6", "v6", "garbage"]))
    direction = draw(st.integers(0, 1))
    if kind == "garbage":
        return direction, draw(st.binary(min_size=0, max_size=80))
    family = 4 if kind == "v4" else 6
    local = draw(addresses(LOCAL_NETS, LOCAL_FIXED, family))
    remote = draw(addresses(REMOTE_NETS, REMOTE_FIXED, family))
    src, dst = (local, remote) if direction == 0 else (remote, local)
    proto = draw(protos)
    l4 = struct.pack("!HH", draw(ports), draw(ports)) + draw(st.binary(max_size=16))
    size = draw(st.one_of(st.integers(0, 64), st.integers(0, 1400), st.integers(2500, 2900)))
    payload = l4 + bytes(size)
    if family == 4:
        options = bytes(4 * draw(st.integers(0, 10)) if draw(st.integers(0, 4)) == 0 else 0)
        ihl = 5 + len(options) // 4
        frag = draw(st.one_of(st.sampled_from([0, 0, 0, 0x2000, 1, 2, 0x1000, 0x2000 | 185, 0x1FFF]),
                              st.integers(0, 0xFFFF)))
        total = 20 + len(options) + len(payload)
        total = draw(st.sampled_from([total] * 6 + [0, total - 1, total + 1, 19, 20]))
        total = max(0, min(total, 65535))
        ihl = draw(st.sampled_from([ihl] * 8 + [4, 15]))
        header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0,
                             ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
        data = header + options + payload
    else:
        chain, nxt = b"", proto
        exts = draw(st.lists(st.sampled_from([0, 43, 60, 44, 44, 51]), max_size=5))
        for ext in reversed(exts):
            if ext == 44:
                offset = draw(st.sampled_from([0, 0, 1, 2, 185, 8191]))
                body = struct.pack("!BBHI", nxt, 0, (offset << 3) | draw(st.integers(0, 1)), 7)
            elif ext == 51:
                units = draw(st.integers(1, 6))  # length (units + 2) * 4
                body = struct.pack("!BB", nxt, units) + bytes((units + 2) * 4 - 2)
            else:
                units = draw(st.integers(0, 3))  # length (units + 1) * 8
                body = struct.pack("!BB", nxt, units) + bytes((units + 1) * 8 - 2)
            chain, nxt = body + chain, ext
        plen = len(chain) + len(payload)
        plen = draw(st.sampled_from([plen] * 6 + [0, plen - 1, plen + 1]))
        plen = max(0, min(plen, 65535))
        header = struct.pack("!IHBB16s16s", 0x60000000, plen, nxt, 64, ipaddress.ip_address(src).packed,
                             ipaddress.ip_address(dst).packed)
        data = header + chain + payload
    if draw(st.integers(0, 7)) == 0:
        data = data[:draw(st.integers(0, len(data)))]  # truncated
    if draw(st.integers(0, 7)) == 0:
        data += bytes(draw(st.integers(1, 40)))  # link-layer padding
    return direction, data


def frame(data: bytes, vlan: bool, ethertype: int | None = None) -> bytes:
    """An Ethernet frame around ``data``. BPF_PROG_TEST_RUN refuses an
    untagged IPv4 (IPv6) frame shorter than an IPv4 (IPv6) header (EINVAL:
    the kernel looks at the header before the program runs); such a packet
    goes in 802.1Q-tagged, where the kernel does not look and the program's
    parse after the tag is the same code."""
    if ethertype is None:
        ethertype = 0x86DD if data[:1] and data[0] >> 4 == 6 else 0x0800
    if len(data) < {0x0800: 20, 0x86DD: 40}.get(ethertype, 0):
        vlan = True
    l2 = bytes.fromhex("020000000002" "020000000001")
    if vlan:
        l2 += struct.pack("!HH", 0x8100, 42)
    return l2 + struct.pack("!H", ethertype) + data


def snapshot(maps):
    return [tuple(row) for row in maps.counters().tolist()], maps.stats()


def bpf_effect(before, after):
    """{(slot, zone, dir): (counted bytes, counted packets, dropped bytes)} that changed, and stats deltas."""
    (rows0, stats0), (rows1, stats1) = before, after
    changed = {}
    for i, (r0, r1) in enumerate(zip(rows0, rows1)):
        if r0 != r1:
            d = [b - a for a, b in zip(r0, r1)]
            slot, rest = divmod(i, N_ZONES * 2)
            zone, direction = divmod(rest, 2)
            changed[(slot, zone, direction)] = (d[0] + d[5], d[2] + d[6], d[3])
    stats = {k: (stats1[k][0] - stats0[k][0], stats1[k][1] - stats0[k][1]) for k in stats0}
    return changed, stats


def new_engine(impl: str, priced: tuple[int, int], balances: dict[int, int]):
    engine = ENGINES[impl](N_ZONES, 1, default_zone=DEFAULT_ZONE)
    prices = [0] * (N_ZONES * 2)
    prices[priced[0] * 2 + priced[1]] = PRICE_SCALE  # one minor unit per byte: B buys B bytes
    engine.set_tariff(0, prices)
    engine.set_zones(ZONES)
    engine.set_allowlist(ALLOW)
    for sid, nets in SUBSCRIBERS.items():
        engine.add_subscriber(sid, 0, balances[sid])
        for net in nets:
            engine.add_address(sid, net)
    return engine


def grant(maps, priced, balances, redirected=False):
    """What the engine's balances buy, as grants on top of what each slot has used; ``redirected``: every
    slot's redirected flag (the daemon sets it for a blocked one once nft's blocked set holds it)."""
    for sid in SUBSCRIBERS:
        blocked = balances[sid] < 0
        maps.set_blocked(sid, blocked)
        maps.set_redirected(sid, redirected)
        for zone in range(N_ZONES):
            for direction in (0, 1):
                used = maps.counter(sid, zone, direction).used
                if (zone, direction) == priced:
                    maps.set_grant(sid, zone, direction, used + max(balances[sid], 0))
                else:
                    maps.set_grant(sid, zone, direction, used if blocked else FREE)


def expected_zone(engine, data: bytes, direction: int) -> int | None:
    parsed = parse_packet(data, len(data))
    if parsed is None:
        return None
    family, src, dst, proto, has_ports, sport, dport, _length = parsed
    remote, port = (dst, dport) if direction == 0 else (src, sport)
    return engine.lookup_zone(str(ipaddress.ip_address(remote)), proto, port if has_ports else None)


def ipv4(src: str, dst: str, proto: int, frag: int, sport: int, dport: int, size: int = 60, ihl: int = 5) -> bytes:
    options = bytes(4 * (ihl - 5))
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, size, 1, frag, 64, proto, 0, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed) + options + struct.pack("!HH", sport, dport) \
        + bytes(size - 24 - len(options))


# Shapes the program's fast parse (one read of an untagged frame's first 46 bytes after the MAC addresses) takes or
# hands to the full parse, where ports decide the zone (198.18.0.0/16 udp 53 -> zone 0, else 198.18.0.0/15 -> 2;
# 198.18.1.0/24 tcp 65535 -> 0): fragments after the first have no ports, a first fragment (MF) has them, IPv4
# options move them. Hypothesis rarely draws these by chance.
EXAMPLES = [ipv4("100.64.1.2", "198.18.0.53", 17, 185, 1000, 53), ipv4("100.64.1.2", "198.18.0.53", 17, 0x2000, 1000, 53),
            ipv4("100.64.1.2", "198.18.0.53", 17, 0x2000 | 185, 1000, 53),
            ipv4("100.64.1.2", "198.18.1.1", 6, 0x1FFF, 1000, 65535), ipv4("100.64.1.2", "198.18.1.1", 6, 0, 1, 65535),
            ipv4("100.64.1.2", "198.18.0.53", 17, 0, 1000, 53, ihl=6), ipv4("100.64.1.2", "198.18.0.53", 17, 0, 1000, 53,
                                                                                size=38)]


@needs_bpf
@pytest.mark.parametrize("impl", sorted(ENGINES))
@pytest.mark.parametrize("example", range(len(EXAMPLES)))
def test_bpf_agrees_on_ports_and_fragments(maps, impl, example):
    check_stream(maps, impl, [((0, EXAMPLES[example]), False)], (2, 0), {sid: 100 for sid in SUBSCRIBERS}, None)


# A blocked subscriber's packets with the redirected flag: only tcp/80 uploads, first fragments, not allow-listed,
# pass (nft sends them to the block page); another port, UDP/80, a later fragment, the download, ICMP: dropped
BLOCK_PAGE = [ipv4("100.64.1.2", "198.18.0.9", 6, 0, 40000, 80), ipv4("100.64.1.2", "198.18.0.9", 6, 0x2000, 40000, 80),
              ipv4("100.64.1.2", "198.18.0.9", 6, 185, 40000, 80), ipv4("100.64.1.2", "198.18.0.9", 6, 0, 40000, 81),
              ipv4("100.64.1.2", "198.18.0.9", 17, 0, 40000, 80), ipv4("100.64.1.2", "198.18.0.9", 1, 0, 0x0800, 80),
              ipv4("100.64.1.2", "198.18.1.9", 6, 0, 40000, 80),  # allow-listed: allowed, as without the flag
              ipv4("100.64.1.2", "198.18.0.9", 6, 0, 40000, 80, ihl=7)]


@needs_bpf
@pytest.mark.parametrize("impl", sorted(ENGINES))
@pytest.mark.parametrize("example", range(len(BLOCK_PAGE)))
@pytest.mark.parametrize("redirected", [False, True], ids=["plain", "redirected"])
@pytest.mark.parametrize("direction", [0, 1], ids=["up", "down"])
def test_block_page_redirect(maps, impl, example, redirected, direction):
    data = BLOCK_PAGE[example]
    if direction == 1:  # the same packet turned round: a download (the subscriber the destination)
        data = ipv4("198.18.0.9", "100.64.1.2", data[9], struct.unpack("!H", data[6:8])[0], 80, 40000,
                    ihl=data[0] & 0xf)
    balances = {sid: (-1 if sid == 1 else 100) for sid in SUBSCRIBERS}
    try:
        passed = check_stream(maps, impl, [((direction, data), False)], (2, direction), balances, None, redirected)
        expect = redirected and direction == 0 and example in (0, 1, 7)
        assert passed == expect
    finally:
        for sid in SUBSCRIBERS:
            maps.set_blocked(sid, False)


@needs_bpf
@pytest.mark.parametrize("impl", sorted(ENGINES))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(stream=st.lists(st.tuples(packets(), st.booleans()), min_size=1, max_size=5),
       priced=st.tuples(st.integers(0, N_ZONES - 1), st.integers(0, 1)),
       balances=st.fixed_dictionaries({sid: st.one_of(st.integers(-1, 3000), st.sampled_from([-1, 0, 20, 40]))
                                       for sid in SUBSCRIBERS}),
       exact=st.sampled_from([None, None, 0, -1]), redirected=st.booleans())
def test_bpf_agrees_with_the_engine(maps, impl, stream, priced, balances, exact, redirected):
    check_stream(maps, impl, stream, priced, balances, exact, redirected)


def redirect_candidate(data: bytes, direction: int) -> bool:
    """An upload nft's portal chain would redirect if its sender is blocked: TCP, ports, destination port 80."""
    parsed = parse_packet(data, len(data))
    if parsed is None or direction != 0:
        return False
    _family, _src, _dst, proto, has_ports, _sport, dport, _length = parsed
    return proto == 6 and bool(has_ports) and dport == 80


def check_stream(maps, impl, stream, priced, balances, exact, redirected=False):
    """Returns the number of packets the program passed to the block page (the redirect model above)."""
    if exact is not None:  # the grant ends exactly at the first packet: it must pass, a byte more must not
        (direction, data), _vlan = stream[0]
        parsed = parse_packet(data, len(data))
        if parsed is not None:
            local = parsed[1] if direction == 0 else parsed[2]
            owner = new_engine("py", priced, {s: 0 for s in SUBSCRIBERS}).lookup_subscriber(
                str(ipaddress.ip_address(local)))
            if owner:
                balances = {**balances, owner: parsed[7] + exact}
                priced = (expected_zone(new_engine("py", priced, balances), data, direction), direction)
    engine = new_engine(impl, priced, balances)
    grant(maps, priced, balances, redirected)
    blocked = {sid for sid in SUBSCRIBERS if balances[sid] < 0}  # what the maps say
    passed_to_page = 0
    for k, ((direction, data), vlan) in enumerate(stream):
        batch = PacketBatch(1, 4096)
        batch.append(data, len(data), 0)
        stats0 = engine.stats()
        dropped0 = {sid: engine.subscriber(sid).dropped_bytes for sid in SUBSCRIBERS}
        before = snapshot(maps)
        events = engine.process(batch)
        retval, _ = maps.test_run(direction, frame(data, vlan))
        changed, bstats = bpf_effect(before, snapshot(maps))
        stats1 = engine.stats()
        what = f"packet {k} ({'up' if direction == 0 else 'down'}load, {len(data)} B: {data[:64].hex()}...)"
        dropped = {sid: engine.subscriber(sid).dropped_bytes - dropped0[sid] for sid in SUBSCRIBERS}
        sender = [sid for sid, b in dropped.items() if b]
        if (redirected and batch.verdict[0] != NF_ACCEPT and redirect_candidate(data, direction)
                and len(sender) == 1 and sender[0] in blocked
                and engine.lookup_subscriber(str(ipaddress.ip_address(parse_packet(data, len(data))[1]))) == sender[0]):
            # refused by the engine for its blocked sender, and an upload nft redirects: the block page
            assert retval == 0, what
            assert changed == {} and bstats["redirected"] == (1, parse_packet(data, len(data))[7]), what
            assert engine.drain() == [], what
            passed_to_page += 1
            continue
        assert bstats["redirected"] == (0, 0), what
        assert (retval == 0) == (batch.verdict[0] == NF_ACCEPT), what
        assert bstats["malformed"] == (stats1.malformed_packets - stats0.malformed_packets,
                                       stats1.malformed_bytes - stats0.malformed_bytes), what
        assert bstats["unknown"] == (stats1.unknown_packets - stats0.unknown_packets,
                                     stats1.unknown_bytes - stats0.unknown_bytes), what
        counted = {(r.subscriber, r.zone, r.direction): (r.bytes, r.packets) for r in engine.drain()}
        assert {key: v[:2] for key, v in changed.items() if v[:2] != (0, 0)} == counted, what
        dropped = {sid: engine.subscriber(sid).dropped_bytes - dropped0[sid] for sid in SUBSCRIBERS}
        bpf_dropped = {sid: sum(v[2] for (s, _z, _d), v in changed.items() if s == sid) for sid in SUBSCRIBERS}
        assert bpf_dropped == dropped, what
        for (slot, zone, d) in changed:  # the zone and direction, for dropped packets too
            assert d == direction and zone == expected_zone(engine, data, direction), what
        for event in events:  # what the daemon will do: mirror the engine's block
            if event.kind == EV_BLOCK:
                maps.set_blocked(event.subscriber, True)
                blocked.add(event.subscriber)
    return passed_to_page


@needs_bpf
@pytest.mark.parametrize("impl", sorted(ENGINES))
@pytest.mark.parametrize("blocked", [(), (4,), (1,), (1, 4)], ids=["none", "receiver", "sender", "both"])
def test_between_subscribers(maps, impl, blocked):
    """A packet from one subscriber to another is the sender's upload (its ingress) and the receiver's
    download (its egress). The engine drops a packet to a blocked receiver before anyone is charged: so must
    the sender's ingress, or the sender pays for what the receiver's egress (or the nft blocked set in the
    forward hook) refuses. A blocked receiver's refusal is counted in its own download zone (remote: the
    sender, port 1000, the default zone), not in the zone of the sender's upload (remote port 5000: zone 0,
    ZoneRule("0.0.0.0/0", 0, 17, 5000, 6000))."""
    data = ipv4("100.64.1.2", "100.64.4.4", 17, 0, 1000, 5000)
    balances = {sid: (-1 if sid in blocked else 100) for sid in SUBSCRIBERS}
    engine = new_engine(impl, (2, 0), balances)
    grant(maps, (2, 0), balances)
    try:
        batch = PacketBatch(1, 4096)
        batch.append(data, len(data), 0)
        dropped0 = {sid: engine.subscriber(sid).dropped_bytes for sid in SUBSCRIBERS}
        before = snapshot(maps)
        engine.process(batch)
        verdict = maps.test_run(0, frame(data, False))[0]
        if verdict == 0:  # forwarded: the receiver's egress
            verdict = maps.test_run(1, frame(data, False))[0]
        changed, _stats = bpf_effect(before, snapshot(maps))
        assert (verdict == 0) == (batch.verdict[0] == NF_ACCEPT)
        counted = {(r.subscriber, r.zone, r.direction): (r.bytes, r.packets) for r in engine.drain()}
        assert {key: v[:2] for key, v in changed.items() if v[:2] != (0, 0)} == counted
        dropped = {sid: engine.subscriber(sid).dropped_bytes - dropped0[sid] for sid in SUBSCRIBERS}
        assert {sid: sum(v[2] for (s, _z, _d), v in changed.items() if s == sid) for sid in SUBSCRIBERS} == dropped
        assert expected_zone(engine, data, 0) != expected_zone(engine, data, 1)  # the case tells them apart
        refusals = {(s, z, d) for (s, z, d), v in changed.items() if v[2]}
        if 4 in blocked:  # refused for the receiver: where its egress would have counted the packet
            assert refusals == {(4, expected_zone(engine, data, 1), 1)}
        elif 1 in blocked:  # refused for the sender: its upload
            assert refusals == {(1, expected_zone(engine, data, 0), 0)}
    finally:
        for sid in SUBSCRIBERS:
            maps.set_blocked(sid, False)


@needs_bpf
def test_vlan_and_non_ip(maps):
    """802.1Q frames parse like untagged ones; ARP and other EtherTypes pass uncounted."""
    data = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, ipaddress.ip_address("100.64.1.2").packed,
                       ipaddress.ip_address("198.19.0.1").packed) + struct.pack("!HHHH", 1000, 2000, 8, 0)
    maps.set_blocked(1, False)
    used = maps.counter(1, 2, 0).used
    maps.set_grant(1, 2, 0, used + 1000)
    before = snapshot(maps)
    assert maps.test_run(0, frame(data, True))[0] == 0
    assert maps.test_run(0, frame(data, False))[0] == 0
    assert maps.test_run(0, frame(data, False, 0x0806))[0] == 0
    changed, stats = bpf_effect(before, snapshot(maps))
    assert changed == {(1, 2, 0): (56, 2, 0)}
    assert stats["nonip"][0] == 1 and stats["passed"] == (2, 56)


@needs_bpf
def test_not_forwarded_passes_uncounted(maps):
    """What the gateway delivers to itself or sends itself is never forwarded, so never metered (as in the
    forward hook of the nfqueue path), even for a blocked subscriber without a grant: at ingress a packet to a
    not-forwarded address (Maps.set_zones' not_forwarded), at egress one with no input interface (skb_iif 0).
    The same packets, forwarded, are refused."""
    def udp(src, dst):
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, ipaddress.ip_address(src).packed,
                           ipaddress.ip_address(dst).packed) + struct.pack("!HHHH", 53, 53, 8, 0)

    maps.set_blocked(1, True)
    for zone in range(N_ZONES):
        for direction in (0, 1):
            maps.set_grant(1, zone, direction, maps.counter(1, zone, direction).used)
    try:
        maps.set_zones(ZONES, ["198.18.0.1/32", "ff00::/8"])
        up, down = frame(udp("100.64.1.2", "198.18.0.1"), False), frame(udp("198.18.0.1", "100.64.1.2"), False)
        before = snapshot(maps)
        assert maps.test_run(0, up)[0] == 0
        assert maps.test_run(1, down, ingress_ifindex=0)[0] == 0
        # multicast, link-local, loopback, the limited broadcast: the program knows them without a rule
        for dst in ("224.0.0.251", "169.254.1.1", "127.0.0.1", "255.255.255.255"):
            assert maps.test_run(0, frame(udp("100.64.1.2", dst), False))[0] == 0, dst
        changed, stats = bpf_effect(before, snapshot(maps))
        assert changed == {} and stats["local"] == (6, 5 * 28 + len(down))  # egress: before parsing, skb->len
        assert maps.test_run(1, down)[0] == 2  # forwarded (it came in somewhere): the subscriber is blocked
    finally:
        maps.set_zones(ZONES)
        maps.set_blocked(1, False)
    before = snapshot(maps)
    assert maps.test_run(0, up)[0] == 2  # no longer the gateway's own: in its zone, without a grant
    # a forwarded download from a link-local source is rated as the engine rates it (here: refused, no grant)
    assert maps.test_run(1, frame(udp("169.254.1.1", "100.64.1.2"), False))[0] == 2
    assert bpf_effect(before, snapshot(maps))[1]["local"] == (0, 0)


@needs_bpf
def test_two_cpus_never_pass_beyond_the_grant(maps):
    """Two threads run the program on one slot at once (each BPF_PROG_TEST_RUN
    runs on its thread's CPU, the GIL released): exactly the bytes passed are
    used, never more than the grant."""
    data = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 100, 1, 0, 64, 17, 0, ipaddress.ip_address("100.64.4.4").packed,
                       ipaddress.ip_address("203.0.113.9").packed) + struct.pack("!HHHH", 1, 2, 80, 0) + bytes(72)
    length, grant_bytes, runs, repeat = 100, 100 * 20_000 + 37, 40, 1000
    maps.set_blocked(4, False)
    c0 = maps.counter(4, DEFAULT_ZONE, 0)
    maps.set_grant(4, DEFAULT_ZONE, 0, c0.used + grant_bytes)
    f = frame(data, False)
    barrier = threading.Barrier(2)

    def flood():
        barrier.wait()
        for _ in range(runs):
            maps.test_run(0, f, repeat)

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    c1 = maps.counter(4, DEFAULT_ZONE, 0)
    used, passed, dropped = c1.used - c0.used, c1.packets - c0.packets, c1.dropped_packets - c0.dropped_packets
    assert passed + dropped == 2 * runs * repeat
    assert used == passed * length
    assert used <= grant_bytes < used + length  # filled to the last whole packet, not a byte beyond
    assert c1.dropped_bytes - c0.dropped_bytes == dropped * length


def test_guard_bpf_ran():
    """Fails if this kernel supports BPF but the program cannot be loaded and run."""
    if not SUPPORTED:
        pytest.skip("the kernel cannot run BPF here (no bpffs or bpf() refused)")
    from ext.bpfmaps import Maps  # ImportError: the loader was not built

    pin = PIN + "-guard"
    Maps.unpin(pin)
    m = Maps.load(pin, max_slots=1, n_zones=1, default_zone=0)
    try:
        assert m.test_run(0, frame(bytes(20), False))[0] == 0
        assert m.stats()["malformed"] == (1, 20)
    finally:
        m.close()
        Maps.unpin(pin)
