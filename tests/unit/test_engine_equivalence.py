"""Property tests: the compiled engine and its pure-Python twin agree.

Hypothesis draws whole worlds (zones with nested prefixes and port rules,
tariffs with time slots, allowance buckets and warning levels, subscribers
with IPv4 and IPv6 prefixes, balances and credit) and streams of raw packets
(v4, v6 with extension headers and fragments, padding, garbage) with control
operations interleaved. Both engines get the same, and every answer must be
the same: verdicts, events, exceptions, drained counters, subscriber states
and statistics. 1,000+ examples in all.
"""

from __future__ import annotations

import os
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ext
from ext import PacketBatch, ZoneRule
from ext.constants import BLOCK_LIMIT, BLOCK_MANUAL, PRICE_SCALE
from ext.errors import EngineError

if ext.EngineC is None:
    if os.environ.get("TOLLGATE_NO_EXT", "") not in ("", "0"):  # asked for the twin alone: nothing to compare
        pytest.skip("TOLLGATE_NO_EXT is set and ext.engine is not built", allow_module_level=True)
    pytest.fail(f"the compiled engine is not built: {ext.EXT_IMPORT_ERROR}", pytrace=False)

T = 1_800_000_000 * 10 ** 9
V4_POOL = [bytes([100, 64, a, b]) for a in (0, 1, 2) for b in (1, 2, 9, 130)] + \
          [bytes([198, 18, a, b]) for a in (0, 5) for b in (1, 77)] + [bytes([203, 0, 113, 9])]
V6_POOL = [bytes.fromhex(f"20010db80100{a:04x}00000000000000{b:02x}") for a in (1, 2, 0x300) for b in (1, 2)] + \
          [bytes.fromhex(f"20010db80198{a:04x}0000000000000001") for a in (0, 0x10)] + \
          [bytes.fromhex("20010db8beef00000000000000000001")]


def network(addr: bytes, plen: int) -> str:
    bits = len(addr) * 8
    n = int.from_bytes(addr, "big") >> (bits - plen) << (bits - plen) if plen else 0
    import ipaddress

    return str(ipaddress.ip_network((n, plen)) if bits == 32 else ipaddress.IPv6Network((n, plen)))


prefixes = st.one_of(
    st.builds(network, st.sampled_from(V4_POOL), st.sampled_from([0, 8, 10, 16, 20, 24, 25, 29, 31, 32])),
    st.builds(network, st.sampled_from(V6_POOL), st.sampled_from([0, 32, 40, 48, 56, 63, 64, 96, 127, 128])),
)
ports = st.one_of(st.just((0, 65535)), st.tuples(st.integers(0, 100), st.integers(0, 100)).map(sorted).map(tuple))
prices = st.one_of(st.just(0), st.just(PRICE_SCALE), st.just(PRICE_SCALE // 3), st.integers(0, 3 * PRICE_SCALE))


@st.composite
def worlds(draw):
    n_zones = draw(st.integers(2, 6))
    n_slots = draw(st.integers(1, 3))
    rules = draw(st.lists(st.builds(lambda net, z, proto, pr: ZoneRule(net, z, proto, *pr), prefixes,
                                    st.integers(0, n_zones - 1), st.sampled_from([0, 0, 6, 17]), ports), max_size=10))
    allow = draw(st.lists(st.builds(lambda net, proto, pr: ZoneRule(net, 0, proto, *pr), prefixes,
                                    st.sampled_from([0, 6, 17]), ports), max_size=3))
    tariffs = {}
    for tid in range(draw(st.integers(1, 3))):
        buckets = draw(st.lists(st.one_of(
            st.tuples(st.integers(0, (1 << n_zones) - 1), st.integers(0, 3)),  # free volume
            st.tuples(st.integers(0, (1 << n_zones) - 1), st.integers(0, 3), prices)),  # a volume tier
            max_size=3))
        warn = sorted(set(draw(st.lists(st.integers(-200, 3000), max_size=3))), reverse=True)
        tariffs[tid] = (draw(st.lists(prices, min_size=n_zones * 2 * n_slots, max_size=n_zones * 2 * n_slots)),
                        buckets, warn)
    starts = sorted(set(draw(st.lists(st.integers(-5, 400), min_size=1, max_size=4))))
    timeline = ([T + s * 10 ** 6 for s in starts], [draw(st.integers(0, n_slots - 1)) for _ in starts])
    subs = []
    for sid in draw(st.lists(st.integers(1, 40), min_size=1, max_size=20, unique=True)):
        tid = draw(st.integers(0, len(tariffs) - 1))
        n_b = len(tariffs[tid][1])
        balance = draw(st.one_of(st.sampled_from([0, 100, 200, 300, 1000]), st.integers(-100, 6000)))
        subs.append((sid, tid, balance, draw(st.sampled_from([0, 0, 100, 500])),
                     draw(st.lists(st.integers(0, 3000), max_size=n_b)), draw(st.lists(prefixes, min_size=1, max_size=3)),
                     draw(st.one_of(st.none(), st.sampled_from([0, 100, 200, 1000]), st.integers(-50, 4000)))))
    # the zones that count toward volume limits: all (None), or a mask (usually without the local zone 0)
    volume_zones = draw(st.one_of(st.none(), st.integers(0, (1 << n_zones) - 1), st.just(((1 << n_zones) - 1) & ~1)))
    return n_zones, n_slots, rules, allow, tariffs, timeline, subs, volume_zones


def ipv4(src, dst, proto, l4, pad, frag, options=b""):
    total = 20 + len(options) + len(l4)
    vihl = 0x40 | (5 + len(options) // 4)
    return struct.pack("!BBHHHBBH4s4s", vihl, 0, total, 0, frag, 64, proto, 0, src, dst) + options + l4, pad


def ipv6(src, dst, proto, l4, ext_headers, pad):
    chain = b""
    nxt = proto
    for kind, frag_offset in reversed(ext_headers):
        if kind == 44:
            chain = struct.pack("!BBHI", nxt, 0, frag_offset << 3, 1) + chain
        elif kind == 51:  # AH counts 4-octet units, minus 2 (RFC 4302)
            chain = struct.pack("!BBH8x", nxt, 1, 0) + chain
        else:
            chain = struct.pack("!BB6x", nxt, 0) + chain
        nxt = kind
    payload = chain + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nxt, 64, src, dst) + payload, pad


@st.composite
def packets(draw):
    kind = draw(st.sampled_from(["v4", "v4", "v6", "v6", "garbage"]))
    proto = draw(st.sampled_from([6, 17, 1, 58, 132, 47]))
    sport, dport = draw(st.integers(0, 120)), draw(st.integers(0, 120))
    # round sizes (v4 + ports: 100 and 200 bytes) make balances run out exactly at zero
    body = bytes(draw(st.one_of(st.sampled_from([76, 176]), st.integers(0, 1500))))
    l4 = struct.pack("!HH", sport, dport) + body if proto in (6, 17, 132) else body
    pad = draw(st.sampled_from([0, 0, 0, 6, 18]))
    if kind == "v4":
        frag = draw(st.sampled_from([0, 0, 0x2000, 10]))
        options = draw(st.sampled_from([b"", b"", b"", b"\x01\x01\x01\x00", bytes(8)]))  # NOPs, EOLs
        data, pad = ipv4(draw(st.sampled_from(V4_POOL)), draw(st.sampled_from(V4_POOL)), proto, l4, pad, frag,
                         options)
    elif kind == "v6":
        exts = draw(st.lists(st.tuples(st.sampled_from([0, 43, 60, 44, 51]), st.sampled_from([0, 0, 7])),
                             max_size=3))
        data, pad = ipv6(draw(st.sampled_from(V6_POOL)), draw(st.sampled_from(V6_POOL)), proto, l4, exts, pad)
    else:
        data = draw(st.binary(max_size=60))
    wirelen = len(data) + pad
    cut = draw(st.sampled_from([None, None, None, 128, 30, 10]))  # copy range / truncation
    if draw(st.integers(0, 30)) == 0:
        wirelen = max(0, wirelen - draw(st.integers(1, 40)))  # header claims more than the wire
    # mostly in time order, sometimes out of it (several queues, clock steps)
    jitter = draw(st.one_of(st.just(0), st.just(0), st.integers(-200, 450)))
    return (data[:cut] if cut else data), wirelen, jitter * 10 ** 6


def address(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


# flow records (conntrack, NetFlow): sizes past MAX_WIRE_LEN are split into several entries
flows = st.one_of(
    st.tuples(st.sampled_from(V4_POOL).map(address), st.sampled_from(V4_POOL).map(address)),
    st.tuples(st.sampled_from(V6_POOL).map(address), st.sampled_from(V6_POOL).map(address)),
).flatmap(lambda ends: st.tuples(st.just(ends[0]), st.just(ends[1]), st.sampled_from([6, 17, 1, 58, 132]),
                                 st.integers(0, 120), st.integers(0, 120),
                                 st.one_of(st.sampled_from([0, 100, 200]), st.integers(0, 3 << 20)),
                                 st.integers(0, 3000), st.integers(-200, 450)))

ops = st.one_of(
    st.tuples(st.just("batch"), st.lists(packets(), min_size=1, max_size=40)),
    st.tuples(st.just("flows"), st.lists(flows, min_size=1, max_size=10)),
    st.tuples(st.just("adjust_balance"), st.integers(0, 41), st.integers(-3000, 3000)),
    st.tuples(st.just("set_tariff"), st.integers(0, 3), st.integers(0, 2 * PRICE_SCALE), st.integers(0, 2),
              st.lists(st.integers(-100, 2000), max_size=2)),
    st.tuples(st.just("set_timeline"), st.lists(st.integers(-5, 400), min_size=1, max_size=3), st.integers(0, 2)),
    # reasons: the bits alone and together, and values that are no reason (refused alike)
    st.tuples(st.just("block"), st.integers(0, 41), st.sampled_from([BLOCK_LIMIT, BLOCK_MANUAL, 4, 8, 3, 0, 16, 256])),
    st.tuples(st.just("unblock"), st.integers(0, 41), st.sampled_from([BLOCK_LIMIT, BLOCK_MANUAL, 4, 8, 12, 0, 16])),
    st.tuples(st.just("add_address"), st.integers(0, 41), prefixes),
    st.tuples(st.just("remove_address"), prefixes),
    # a start's chunk: each subscriber's networks one text (some with an empty network, some owned already)
    st.tuples(st.just("add_networks_texts"),
              st.lists(st.tuples(st.integers(0, 41), st.lists(st.one_of(prefixes, st.just("")), max_size=4)
                                 .map(" ".join)), max_size=4)),
    st.tuples(st.just("set_subscriber"), st.integers(0, 41), st.integers(0, 3), st.integers(-1, 300)),
    st.tuples(st.just("remove_subscriber"), st.integers(0, 41)),
    st.tuples(st.just("drain"),),
    st.tuples(st.just("set_volume"), st.integers(0, 41),
              st.one_of(st.none(), st.sampled_from([0, 100, 300]), st.integers(-100, 5000))),
    # traffic the engine never saw, rated as one aggregate (zone and direction
    # sometimes out of range; volumes from nothing to past 2**64, refused alike)
    st.tuples(st.just("rate_volume"), st.integers(0, 41), st.integers(-1, 6), st.integers(0, 2),
              st.one_of(st.sampled_from([0, 100, 200, 3000]), st.integers(0, 3 << 20), st.integers(0, (1 << 64) + 1)),
              st.one_of(st.integers(0, 3000), st.integers(0, 1 << 45)), st.integers(-200, 450)),
)


def outcome(fn, *args, **kw):
    try:
        return ("ok", fn(*args, **kw))
    except EngineError:
        return ("error",)


def build(cls, world):
    n_zones, n_slots, rules, allow, tariffs, timeline, subs, volume_zones = world
    e = cls(n_zones, n_slots, default_zone=n_zones - 1, volume_zones=volume_zones)
    out = [outcome(e.set_zones, rules), outcome(e.set_allowlist, allow)]
    for tid, (p, b, w) in tariffs.items():
        out.append(outcome(e.set_tariff, tid, p, b, w))
    out.append(outcome(e.set_timeline, *timeline))
    for sid, tid, balance, credit, allowance, nets, volume_left in subs:
        out.append(outcome(e.add_subscriber, sid, tid, balance, credit, allowance, volume_left))
        for net in nets:
            out.append(outcome(e.add_address, sid, net))
    return e, out


def run(e, stream, clock):
    out = []
    for op in stream:
        name, args = op[0], op[1:]
        if name == "batch":
            batch = PacketBatch.of([(data, wirelen, clock + 3_000_000 * k + jitter)
                                    for k, (data, wirelen, jitter) in enumerate(args[0])])
            out.append(("events", e.process(batch), list(batch.verdict[:batch.n])))
            clock += 3_000_000 * len(args[0])
        elif name == "flows":
            batch = PacketBatch(64, aggregates=True)
            for k, (src, dst, proto, sport, dport, nbytes, npackets, jitter) in enumerate(args[0]):
                batch.append_flow(src, dst, proto, sport, dport, nbytes, npackets, clock + 3_000_000 * k + jitter)
            out.append(("events", e.process(batch), list(batch.verdict[:batch.n]), list(batch.packets[:batch.n])))
            clock += 3_000_000 * len(args[0])
        elif name == "set_tariff":
            tid, price, n_buckets, warn = args
            n_zones, n_slots = e.n_zones, e.n_slots
            out.append(outcome(e.set_tariff, tid, [price] * (n_zones * 2 * n_slots),
                               [((1 << n_zones) - 1, 3)] * n_buckets, sorted(set(warn), reverse=True)))
        elif name == "set_timeline":
            starts, slot = args
            starts = sorted(set(starts))
            out.append(outcome(e.set_timeline, [T + s * 10 ** 6 for s in starts], [slot] * len(starts)))
        elif name == "rate_volume":
            sid, zone, direction, nbytes, npackets, jitter = args
            out.append(outcome(e.rate_volume, sid, zone, direction, nbytes, npackets, clock + jitter * 10 ** 6))
        elif name == "add_networks_texts":
            try:
                out.append(("ok", e.add_networks_texts(array("q", [sid for sid, _ in args[0]]),
                                                       [text for _, text in args[0]])))
            except EngineError as exc:  # which subscriber, and why: the same in both
                out.append(("error", exc.index, str(exc)))
        elif name == "set_subscriber":
            sid, tariff, credit = args
            out.append(outcome(e.set_subscriber, sid, tariff=tariff, credit=None if credit < 0 else credit))
        else:
            out.append(outcome(getattr(e, name), *args))
    return out


def final(e):
    return (e.drain(), [(sid, e.subscriber(sid)) for sid in e.subscribers()], e.stats())


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(worlds(), st.lists(ops, max_size=12))
def test_engines_agree(world, stream):
    c, c_setup = build(ext.EngineC, world)
    p, p_setup = build(ext.EnginePy, world)
    assert c_setup == p_setup
    assert run(c, stream, T) == run(p, stream, T)
    assert final(c) == final(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.lists(packets(), min_size=1, max_size=120), st.lists(st.integers(1, 60), max_size=6))
def test_batching_does_not_change_results(world, pkts, cuts):
    """The same stream in one batch or cut anywhere: same charges and counters
    (per engine, and the same between engines)."""
    stream_one = [("batch", pkts)]
    pieces, rest = [], list(pkts)
    for cut in cuts:
        if rest:
            pieces.append(("batch", rest[:cut]))
            rest = rest[cut:]
    if rest:
        pieces.append(("batch", rest))
    results = []
    for cls in (ext.EngineC, ext.EnginePy):
        for stream in (stream_one, pieces):
            e, _ = build(cls, world)
            verdicts = []
            for r in run(e, stream, T):
                if r[0] == "events":
                    verdicts += r[2]
            drained = {}
            for row in e.drain():
                key = (row.subscriber, row.zone, row.direction)
                drained[key] = row[3:]
            results.append((verdicts, drained, [e.subscriber(s) for s in e.subscribers()]))
    assert all(r == results[0] for r in results[1:])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 5 * PRICE_SCALE), st.lists(st.integers(0, 1400), min_size=1, max_size=200))
def test_per_packet_charging_equals_one_shot_rating(price, sizes):
    """Charged packet by packet, the total is floor(total bytes * price / scale):
    the remainder is carried, never rounded away or up."""
    for cls in (ext.EngineC, ext.EnginePy):
        e = cls(2, 1, default_zone=1)
        e.set_tariff(0, [price] * 4)
        e.add_subscriber(1, 0, 10 ** 15)
        e.add_address(1, "100.64.0.1/32")
        pkts = [ipv4(bytes([198, 18, 0, 1]), bytes([100, 64, 0, 1]), 17, struct.pack("!HH", 1, 2) + bytes(n), 0, 0)[0]
                for n in sizes]
        e.process(PacketBatch.of([(d, len(d), T) for d in pkts]))
        total_bytes = sum(len(d) for d in pkts)
        assert sum(r.charged for r in e.drain()) == total_bytes * price // PRICE_SCALE


# ---- several threads on one compiled engine ------------------------------------

def _threads(targets):
    import threading

    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    return threads


def test_two_threads_never_overspend():
    """Two threads rate one subscriber at once (the GIL is released for each
    batch): the balance buys exactly K packets, and together they take exactly
    K, charge exactly their cost, never go below -credit, and drop the rest."""
    e = ext.EngineC(2, 1, default_zone=1)
    e.set_tariff(0, [0, 0, PRICE_SCALE, PRICE_SCALE])  # 1 unit per byte outside zone 0
    credit, k, size = 5_000, 7_777, 120
    e.add_subscriber(1, 0, size * k - credit, credit)
    e.add_address(1, "100.64.0.1/32")
    e.add_address(1, "2001:db8:100:1::/64")
    up = ipv4(bytes([100, 64, 0, 1]), bytes([198, 18, 0, 1]), 17, struct.pack("!HH", 1, 2) + bytes(size - 24), 0, 0)[0]
    down = ipv6(bytes.fromhex("20010db8019800000000000000000001"), bytes.fromhex("20010db8010000010000000000000001"),
                6, struct.pack("!HH", 80, 9) + bytes(size - 44), [], 0)[0]
    assert len(up) == len(down) == size
    n_batches = 40
    work = [[PacketBatch.of([(p, size, T)] * 256) for _ in range(n_batches)] for p in (up, down)]
    results = [[], []]

    def worker(i):
        def run_batches():
            for b in work[i]:
                events = e.process(b)
                results[i].append((events, sum(b.verdict[:b.n])))
        return run_batches

    lowest = []
    threads = _threads([worker(0), worker(1)])
    while any(t.is_alive() for t in threads) and len(lowest) < 100_000:  # watch the balance meanwhile
        lowest.append(e.subscriber(1).balance)
    for t in threads:
        t.join()
    accepted = sum(a for r in results for _ev, a in r)
    events = [ev for r in results for evs, _a in r for ev in evs]
    total = 2 * n_batches * 256
    state = e.subscriber(1)
    assert accepted == k
    assert min(lowest + [state.balance]) >= -credit
    assert state.balance == -credit
    assert state.dropped_packets == total - k and state.dropped_bytes == (total - k) * size
    assert accepted + state.dropped_packets == total
    assert sum(r.charged for r in e.drain()) == k * size  # the cost of the accepted packets, no more
    assert [ev.kind for ev in events] == [ext.constants.EV_BLOCK]  # the one breaching packet
    assert e.stats().dropped_packets == total - k


def test_drain_while_two_threads_rate():
    """Draining while queue threads rate loses and doubles nothing: the rows
    drained meanwhile and at the end add up to what was sent, and the carried
    remainder makes the charge floor(total bytes * price / scale)."""
    price = PRICE_SCALE // 7 + 3
    e = ext.EngineC(2, 1, default_zone=1)
    e.set_tariff(0, [price] * 4)
    n_subs = 50
    for sid in range(1, n_subs + 1):
        e.add_subscriber(sid, 0, 10 ** 15)
        e.add_address(sid, f"100.64.1.{sid}/32")
    sizes = [40 + (7 * i) % 1400 for i in range(256)]
    batches = [[PacketBatch.of([(ipv4(bytes([100, 64, 1, 1 + (i + j + t) % n_subs]), bytes([198, 18, 0, 1]), 17,
                                      struct.pack("!HH", 1, 2) + bytes(s - 24), 0, 0)[0], s, T)
                                for i, s in enumerate(sizes)]) for j in range(30)] for t in range(2)]
    sent = {}
    for per_thread in batches:
        for b in per_thread:
            for i in range(b.n):
                sid = b.packet(i)[15]
                sent[sid] = sent.get(sid, 0) + b.wirelen[i]
    drained = {}

    def take(rows):
        for r in rows:
            assert (r.zone, r.direction) == (1, 0)
            got = drained.setdefault(r.subscriber, [0, 0, 0])
            got[0] += r.bytes
            got[1] += r.packets
            got[2] += r.charged

    def worker(t):
        def run_batches():
            for b in batches[t]:
                e.process(b)
        return run_batches

    threads = _threads([worker(0), worker(1)])
    for _ in range(10_000):  # bounded; drains as often as it can while they run
        take(e.drain())
        if not any(t.is_alive() for t in threads):
            break
    for t in threads:
        t.join()
    take(e.drain())
    assert {sid: v[0] for sid, v in drained.items()} == sent
    assert sum(v[1] for v in drained.values()) == 2 * 30 * 256
    for sid, (nbytes, _packets, charged) in drained.items():
        assert charged == nbytes * price // PRICE_SCALE
        assert e.subscriber(sid).balance == 10 ** 15 - charged
    assert e.drain() == []
