"""The NetFlow/IPFIX collector: datagrams built by hand from the layouts of
the Cisco v5/v9 documents and RFC 3954 / RFC 7011, thousands of damaged
datagrams, and the defects an outside check found (issue 11, item 5), each
driven through the source's own receive loop with a real engine."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import pytest

import ext
from ext import ZoneRule
from ext.constants import PRICE_SCALE
from gateway.sources.netflow import MAX_GAP_PACKETS, MAX_GAP_RECORDS, Collector, NetflowSource

def v5(seq: int, flows, sampling: int = 0) -> bytes:
    head = struct.pack("!HHIIIIBBH", 5, len(flows), 0, 0, 0, seq, 0, 0, sampling)
    body = b"".join(struct.pack("!4s4s4sHHIIIIHHBBBBHHBBH", socket.inet_aton(s), socket.inet_aton(d), bytes(4), 0, 0,
                                pk, by, 0, 0, sp, dp, 0, 0, pr, 0, 0, 0, 0, 0, 0)
                    for s, d, pr, sp, dp, by, pk in flows)
    return head + body


TEMPLATE = [(8, 4), (12, 4), (4, 1), (7, 2), (11, 2), (1, 8), (2, 8)]  # v4 addresses, proto, ports, bytes, packets


def records(flows) -> bytes:
    return b"".join(socket.inet_aton(s) + socket.inet_aton(d) + struct.pack("!BHHQQ", pr, sp, dp, by, pk)
                    for s, d, pr, sp, dp, by, pk in flows)


def flowset(set_id: int, body: bytes) -> bytes:
    pad = bytes(-len(body) % 4)
    return struct.pack("!HH", set_id, 4 + len(body) + len(pad)) + body + pad


def template_body(tid: int, fields) -> bytes:
    return struct.pack("!HH", tid, len(fields)) + b"".join(struct.pack("!HH", f, n) for f, n in fields)


def v9(seq: int, sets: bytes, domain: int = 7) -> bytes:
    return struct.pack("!HHIIII", 9, 0, 0, 0, seq, domain) + sets


def ipfix(seq: int, sets: bytes, domain: int = 7) -> bytes:
    return struct.pack("!HHIII", 10, 16 + len(sets), 0, seq, domain) + sets


FLOWS = [("100.64.1.2", "198.18.0.2", 6, 40000, 80, 123456, 100), ("198.18.0.2", "100.64.1.2", 6, 80, 40000, 5_000_000, 3500)]


def test_v5_with_sampling_and_a_sequence_gap():
    c = Collector()
    assert c.parse(v5(0, FLOWS[:1]), "192.0.2.1") == [FLOWS[0]]
    sampled = c.parse(v5(1, FLOWS[1:], sampling=(1 << 14) | 10), "192.0.2.1")  # 1 in 10, mode bits set
    assert sampled == [FLOWS[1][:5] + (50_000_000, 35_000)]
    c.parse(v5(5, FLOWS[:1]), "192.0.2.1")  # flows 2..4 never arrived
    assert c.counts["sequence_gaps"] == 0  # not yet: a jump counts once the next datagram goes on from it
    c.parse(v5(6, FLOWS[:1]), "192.0.2.1")
    assert (c.counts["sequence_gaps"], c.counts["lost_records"]) == (1, 3)


@pytest.mark.parametrize("build,template_set", [(v9, 0), (ipfix, 2)], ids=["v9", "ipfix"])
def test_templates_per_exporter_and_domain(build, template_set):
    c = Collector()
    data = flowset(300, records(FLOWS))
    assert c.parse(build(0, data), "192.0.2.1") == []  # no template yet: counted, dropped
    assert c.counts["no_template"] == 1
    c.parse(build(1, flowset(template_set, template_body(300, TEMPLATE))), "192.0.2.1")
    assert c.parse(build(2, data), "192.0.2.1") == FLOWS
    assert c.parse(build(0, data), "192.0.2.9") == []  # another exporter's template 300 is unknown
    assert c.parse(build(3, data, domain=8), "192.0.2.1") == []  # and another domain's


def test_ipfix_sampling_from_options_data():
    c = Collector()
    options = struct.pack("!HHH", 400, 2, 1) + struct.pack("!HHHH", 149, 4, 305, 4)  # scope: domain id; interval
    c.parse(ipfix(0, flowset(3, options) + flowset(2, template_body(300, TEMPLATE))), "192.0.2.1")
    c.parse(ipfix(0, flowset(400, struct.pack("!II", 7, 100))), "192.0.2.1")
    (flow,) = c.parse(ipfix(0, flowset(300, records(FLOWS[:1]))), "192.0.2.1")
    assert flow[5:] == (12_345_600, 10_000)


def test_damaged_datagrams_are_counted_and_dropped():
    c = Collector()
    good = [v5(1, FLOWS), v9(1, flowset(0, template_body(300, TEMPLATE)) + flowset(300, records(FLOWS))),
            ipfix(1, flowset(2, template_body(300, TEMPLATE)) + flowset(300, records(FLOWS)))]
    rng = random.Random(11)
    for _ in range(6000):
        data = bytearray(rng.choice(good))
        how = rng.randrange(3)
        if how == 0:
            data = data[:rng.randrange(len(data))]
        elif how == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randrange(200)))
        for record in c.parse(bytes(data), "192.0.2.1"):  # never raises
            assert len(record) == 7
    assert c.counts["malformed"] > 1000
    assert sum(n for k, n in c.stats().items() if k.startswith("malformed_")) == c.counts["malformed"]


# ---- the collector's receive loop, with a real engine ------------------------------------------------------------

ALICE, BOB = "100.64.1.2", "100.64.2.2"
UPSTREAM = "198.18.0.2"


@pytest.fixture(params=sorted(ext.ENGINES))
def engine(request):
    """Both engines (ids c, py); one unit of balance per byte, zone "local" free of nothing."""
    e = ext.engine_class(request.param)(2, 1, default_zone=1)
    e.set_zones([ZoneRule("100.64.0.0/10", 0)])
    e.set_tariff(1, [PRICE_SCALE] * 4)
    for sid, address in ((1, ALICE), (2, BOB)):
        e.add_subscriber(sid, 1, 10 ** 18)
        e.add_address(sid, f"{address}/32")
    return e


@pytest.fixture
def source(engine):
    s = NetflowSource(engine, lambda events: None, listen="127.0.0.1:0")
    yield s
    s.close()


def deliver(source, datagrams) -> None:
    """Send ``datagrams`` to the source's socket over loopback and run its own
    receive loop until it has taken them all; the loop must still be running."""
    before = source.stats()["datagrams"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for data in datagrams:
            tx.sendto(data, source.sock.getsockname())
    died = []

    def loop():
        try:
            source.run()
        except BaseException as exc:  # the defect under test: the collector thread dies
            died.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    give_up = time.monotonic() + 20  # a bound on waiting, not a timing being tested
    while thread.is_alive() and source.stats()["datagrams"] < before + len(datagrams) and time.monotonic() < give_up:
        time.sleep(0.005)
    source.stop()
    thread.join(5)
    assert not died, f"the receive loop died: {died[0]!r}"
    assert not thread.is_alive(), "the receive loop is stuck in one datagram"
    assert source.stats()["datagrams"] == before + len(datagrams)
    source.stopping.clear()


def usage(engine) -> dict:
    """{(subscriber, direction): (bytes, packets)} since the last drain."""
    out = {}
    for row in engine.drain():
        b, p = out.get((row.subscriber, row.direction), (0, 0))
        out[(row.subscriber, row.direction)] = (b + row.bytes, p + row.packets)
    return out


UP, DOWN = 0, 1


def test_regression_2_to_the_32_packets_in_an_8_byte_field(engine, source):
    """Issue 11.5: 2**32 packets in an 8-byte packet counter raised OverflowError in
    ext/batch.py (the entry's count is 32 bits) and the collector thread died.
    Now the record takes two entries of 2**31 packets and is charged whole."""
    template = v9(0, flowset(0, template_body(300, TEMPLATE)))
    huge = v9(1, flowset(300, records([(ALICE, UPSTREAM, 17, 5000, 53, 1_000_000, 1 << 32)])))
    after = v9(2, flowset(300, records([(UPSTREAM, BOB, 6, 80, 40000, 3000, 2)])))
    deliver(source, [template, huge, after])
    assert usage(engine) == {(1, UP): (1_000_000, 4_294_967_296), (2, DOWN): (3000, 2)}
    assert engine.subscriber(1).balance == 10 ** 18 - 1_000_000


def test_regression_a_template_field_of_length_0_cannot_loop(engine, source):
    """Issue 11.5: a v9 template whose one field has length 0 made records of 0
    bytes, and the data set after it was read forever (94% CPU, nothing charged
    again). Now such a template is refused and counted; the loop goes on."""
    zero = v9(0, flowset(0, template_body(400, [(8, 0)]) + template_body(401, [(8, 4), (12, 4), (1, 0)])))
    data = v9(1, flowset(400, bytes(8)) + flowset(401, bytes(8)))
    good = v9(2, flowset(0, template_body(300, TEMPLATE)) + flowset(300, records(FLOWS)))
    deliver(source, [zero, data, good])
    stats = source.stats()
    assert stats["malformed_template_field_length"] == 1  # the first bad template ends its template set
    assert stats["no_template"] == 2
    assert usage(engine) == {(1, UP): (123_456, 100), (1, DOWN): (5_000_000, 3500)}


def test_regression_5_gib_with_64_bit_counters_is_charged_to_the_byte(engine, source):
    """Issue 11.5: a 5 GiB record (a 1 Gbit/s flow over a 60 s active timeout is
    more than 4 GiB) took 5,120 entries, more than a batch of 4,096, and was
    dropped as malformed. Now it goes over two batches, charged exactly."""
    nbytes, packets = 5 * 2 ** 30, 3_579_140
    deliver(source, [v9(0, flowset(0, template_body(300, TEMPLATE))
                        + flowset(300, records([(UPSTREAM, ALICE, 6, 443, 40000, nbytes, packets)])))])
    assert usage(engine) == {(1, DOWN): (5_368_709_120, 3_579_140)}
    assert engine.subscriber(1).balance == 10 ** 18 - 5_368_709_120
    assert source.stats()["malformed"] == 0


def test_counters_at_the_edges_are_charged_exactly(engine, source):
    """Bytes and packets at 0, 1, 2**32 - 1, 2**32 in 8-byte fields: each record
    charged as it is (0 bytes over 5 packets counts the packets); 2**64 - 1
    bytes is refused as implausible, alone."""
    edges = [(0, 0), (0, 5), (1, 1), ((1 << 32) - 1, (1 << 32) - 1), (1 << 32, 1 << 32), ((1 << 64) - 1, 1)]
    flows = [(ALICE, UPSTREAM, 17, 1, 2, nbytes, packets) for nbytes, packets in edges]
    rated = source.handle(v9(0, flowset(0, template_body(300, TEMPLATE)) + flowset(300, records(flows))), "192.0.2.1")
    # 0 + 0 + 1 + (2**32 - 1) + 2**32 bytes = 2**33; packets the same plus 5
    assert rated == 8_589_934_592
    assert usage(engine) == {(1, UP): (8_589_934_592, 8_589_934_597)}
    assert (source.stats()["malformed_oversized_record"], source.stats()["records"]) == (1, 5)


def test_regression_garbage_sequence_numbers_do_not_count_loss():
    """Issue 11.5: sequence numbers from garbage pushed "lost flows" to 2.9e11.
    A v9 stream of export packets 0..99 with garbage interleaved (same exporter
    and source id): jumps ahead by less than 2**31, by 2**20 + 1, to 2**32 - 1,
    back to 0, back by 5. None of it is loss. Then three packets really go
    missing (v9 counts export packets, RFC 3954 section 5.1): lost is 3."""
    c = Collector()
    rng = random.Random(5)
    for seq in range(100):
        c.parse(v9(seq, b""), "192.0.2.1")
        garbage = [seq + rng.randrange(2, 1 << 31), seq + (1 << 20) + 1, (1 << 32) - 1, 0, max(0, seq - 5),
                   rng.randrange(1 << 32)][seq % 6]
        c.parse(v9(garbage, b""), "192.0.2.1")
    assert sum(n for k, n in c.counts.items() if k.startswith("lost")) == 0
    assert c.counts["sequence_gaps"] == 0
    for seq in (100, 104, 105):  # 101, 102, 103 never arrive
        c.parse(v9(seq, b""), "192.0.2.1")
    assert (c.counts["sequence_gaps"], c.counts["lost_export_packets"], c.counts["lost_records"]) == (1, 3, 0)
    resets = c.counts["sequence_resets"]
    for seq in (106 + MAX_GAP_PACKETS + 1, 106 + MAX_GAP_PACKETS + 2):  # a confirmed jump past the bound
        c.parse(v9(seq, b""), "192.0.2.1")
    assert (c.counts["sequence_resets"], c.counts["lost_export_packets"]) == (resets + 1, 3)


# ---- sequence numbers in each version's unit ---------------------------------------------------------------------

def test_ipfix_sequence_counts_data_records_of_every_kind_but_not_templates():
    """RFC 7011 section 3.1: the sequence number counts data records (options
    data too, and records of templates without addresses); template records
    do not count."""
    c = Collector()
    no_addresses = template_body(301, [(1, 8)])
    options = struct.pack("!HHH", 400, 2, 1) + struct.pack("!HHHH", 149, 4, 305, 4)
    c.parse(ipfix(0, flowset(2, template_body(300, TEMPLATE) + no_addresses) + flowset(3, options)), "192.0.2.1")
    c.parse(ipfix(0, flowset(300, records(FLOWS))), "192.0.2.1")  # 2 records
    c.parse(ipfix(2, flowset(400, struct.pack("!II", 7, 1)) + flowset(301, bytes(24))), "192.0.2.1")  # 1 + 3
    c.parse(ipfix(6, flowset(300, records(FLOWS[:1]))), "192.0.2.1")
    assert (c.counts["sequence_gaps"], c.counts["sequence_outliers"], c.counts["skipped_records"]) == (0, 0, 3)
    c.parse(ipfix(17, flowset(300, records(FLOWS[:1]))), "192.0.2.1")  # records 7..16 lost
    c.parse(ipfix(18, flowset(300, records(FLOWS[:1]))), "192.0.2.1")
    assert (c.counts["sequence_gaps"], c.counts["lost_records"]) == (1, 10)


def test_late_datagrams_and_restarts_are_not_loss():
    """UDP reorders: flows 2 and 3 (v5 counts flows) arrive after 4; an
    exporter that restarts begins again at 0: a reset, not 2**32 - 8 lost."""
    c = Collector()
    for seq in (0, 1, 4, 2, 3, 5, 6):  # one flow each
        c.parse(v5(seq, FLOWS[:1]), "192.0.2.1")
    assert (c.counts["sequence_gaps"], c.counts["lost_records"]) == (0, 0)
    c.parse(v5(0, FLOWS[:1]), "192.0.2.1")
    c.parse(v5(1, FLOWS[:1]), "192.0.2.1")
    assert (c.counts["sequence_resets"], c.counts["lost_records"]) == (1, 0)
    c.parse(v5(9, FLOWS[:1]), "192.0.2.1")  # 2..8: 7 flows lost, and the gap holds
    c.parse(v5(10, FLOWS[:1]), "192.0.2.1")
    assert (c.counts["sequence_gaps"], c.counts["lost_records"]) == (1, 7)
    c.parse(v5(10 + MAX_GAP_RECORDS + 2, FLOWS[:1]), "192.0.2.1")  # too far to be loss: confirmed, a reset
    c.parse(v5(10 + MAX_GAP_RECORDS + 3, FLOWS[:1]), "192.0.2.1")
    assert (c.counts["sequence_resets"], c.counts["lost_records"]) == (2, 7)


# ---- bounded state -----------------------------------------------------------------------------------------------

def test_exporters_domains_and_templates_are_bounded_and_evictions_counted():
    c = Collector(max_exporters=2, max_domains=2, max_templates_per_domain=3, max_templates_per_exporter=5)
    for k in range(3):
        c.parse(v9(0, b"", domain=1), f"192.0.2.{k}")
    assert (len(c.exporters), c.counts["evicted_exporters"]) == (2, 1)
    assert "192.0.2.0" not in c.exporters  # the least recently heard went
    templates = flowset(0, b"".join(template_body(300 + k, TEMPLATE) for k in range(4)))
    c.parse(v9(1, templates, domain=1), "192.0.2.1")  # 4 templates, 3 kept: 300 evicted
    assert sorted(c.exporters["192.0.2.1"].domains[(9, 1)].templates) == [301, 302, 303]
    # Domain 2: 300 and 301 fit (the exporter holds 5); 302 is past 5 and the least recently used domain (1)
    # gives up its oldest (301); 303 is past 3 in domain 2, whose oldest (300) goes.
    c.parse(v9(0, templates, domain=2), "192.0.2.1")
    domains = c.exporters["192.0.2.1"].domains
    assert (sorted(domains[(9, 1)].templates), sorted(domains[(9, 2)].templates)) == ([302, 303], [301, 302, 303])
    assert (c.stats()["templates_held"], c.counts["evicted_templates"]) == (5, 3)
    c.parse(v9(0, b"", domain=3), "192.0.2.1")  # a third domain: the oldest (1) goes, templates and all
    assert sorted(domains) == [(9, 2), (9, 3)]
    assert (c.counts["evicted_domains"], c.stats()["templates_held"]) == (1, 3)


# ---- the allow-list ----------------------------------------------------------------------------------------------

def test_only_allowed_exporters_are_parsed(engine):
    from gateway.sources import parse_source_options

    assert parse_source_options("netflow", ["exporters=198.18.0.1,2001:db8:198::/64"]) == {
        "exporters": "198.18.0.1,2001:db8:198::/64"}
    with pytest.raises(ValueError, match="'198.18.0.256'"):
        NetflowSource(engine, lambda events: None, listen="127.0.0.1:0", exporters="198.18.0.1,198.18.0.256")
    datagram = v9(0, flowset(0, template_body(300, TEMPLATE)) + flowset(300, records(FLOWS)))
    elsewhere = NetflowSource(engine, lambda events: None, listen="127.0.0.1:0",
                              exporters="198.18.0.1, 2001:db8:198::/64")
    try:
        deliver(elsewhere, [datagram, b"\x00\x09 not even a header"])  # from 127.0.0.1
        stats = elsewhere.stats()
        assert (stats["unknown_exporter"], stats["templates"], stats["malformed"]) == (2, 0, 0)
        assert elsewhere.handle(datagram, "::ffff:198.18.0.1") == 5_123_456  # IPv4-mapped from a v6 socket
        assert elsewhere.handle(datagram, "2001:db8:198::9") == 5_123_456
    finally:
        elsewhere.close()
    local = NetflowSource(engine, lambda events: None, listen="127.0.0.1:0", exporters="127.0.0.0/8")
    try:
        deliver(local, [datagram])
        assert local.stats()["unknown_exporter"] == 0 and local.stats()["rated_bytes"] == 5_123_456
    finally:
        local.close()


# ---- every kind of damage, counted by reason ---------------------------------------------------------------------

def ipfix_options(tid: int, scope: int, fields) -> bytes:
    return struct.pack("!HHH", tid, len(fields), scope) + b"".join(struct.pack("!HH", f, n) for f, n in fields)


DAMAGE = [
    ("short", b"\x00\x09"),
    ("short", struct.pack("!HH", 9, 0)),
    ("version", struct.pack("!H", 7) + bytes(30)),
    ("v5_length", v5(0, FLOWS)[:-48]),
    ("v5_length", v5(0, [])),
    ("ipfix_length", ipfix(0, b"")[:-1] + b"\x00\x00"),
    ("set_length", v9(0, struct.pack("!HH", 300, 2))),
    ("set_length", v9(0, struct.pack("!HH", 300, 400) + bytes(8))),
    ("set_length", v9(0, b"\x01\x2c")),
    ("set_id", v9(0, flowset(5, bytes(4)))),
    ("set_id", ipfix(0, flowset(1, bytes(4)))),
    ("template_id", v9(0, flowset(0, template_body(100, TEMPLATE)))),
    ("template_truncated", v9(0, flowset(0, struct.pack("!HH", 300, 5) + struct.pack("!HH", 8, 4)))),
    ("template_field_length", v9(0, flowset(0, template_body(300, [(8, 4), (12, 0)])))),
    ("template_field_length", v9(0, flowset(0, template_body(300, [(8, 5), (12, 4)])))),
    ("template_field_length", ipfix(0, flowset(2, template_body(300, [(8, 4), (12, 4), (1, 9)])))),
    ("template_variable_length", ipfix(0, flowset(2, template_body(300, [(8, 4), (12, 4), (82, 65535)])))),
    ("template_empty", v9(0, flowset(0, template_body(300, [])))),
    ("options_scope", ipfix(0, flowset(3, ipfix_options(400, 0, [(149, 4), (305, 4)])))),
    ("options_scope", ipfix(0, flowset(3, ipfix_options(400, 3, [(149, 4), (305, 4)])))),
    ("options_scope", v9(0, flowset(1, struct.pack("!HHH", 400, 3, 4) + struct.pack("!HHHH", 1, 4, 34, 4)))),
    ("oversized_record", v9(0, flowset(0, template_body(300, TEMPLATE))
                            + flowset(300, records([(ALICE, UPSTREAM, 6, 1, 2, (1 << 64) - 1, 1)])))),
    ("oversized_record", v9(0, flowset(0, template_body(300, TEMPLATE))
                            + flowset(300, records([(ALICE, UPSTREAM, 6, 1, 2, 1500, (1 << 64) - 1)])))),
]


@pytest.mark.parametrize("reason,datagram", DAMAGE, ids=[f"{r}-{i}" for i, (r, _d) in enumerate(DAMAGE)])
def test_each_kind_of_damage_is_counted_by_its_reason(reason, datagram):
    c = Collector()
    assert c.parse(datagram, "192.0.2.1") == []
    stats = c.stats()
    assert stats["malformed"] == 1 and stats[f"malformed_{reason}"] == 1, {k: n for k, n in stats.items() if n}
    assert c.last_steps <= len(datagram)


def test_sampling_interval_and_the_datagram_budget():
    c = Collector(max_entries_per_datagram=10)
    options = struct.pack("!HHH", 400, 2, 1) + struct.pack("!HHHH", 149, 4, 305, 4)
    c.parse(ipfix(0, flowset(3, options) + flowset(2, template_body(300, TEMPLATE))), "192.0.2.1")
    c.parse(ipfix(0, flowset(400, struct.pack("!II", 7, 1 << 30))), "192.0.2.1")  # 1 in 2**30: refused
    assert c.malformed["sampling_interval"] == 1
    six_mib = (ALICE, UPSTREAM, 6, 1, 2, 6 << 20, 4000)  # 6 entries each: the second is past 10
    assert c.parse(ipfix(1, flowset(300, records([six_mib, six_mib]))), "192.0.2.1") == [six_mib]
    assert c.malformed["over_budget"] == 1


def test_ipfix_template_withdrawal_and_enterprise_fields():
    c = Collector()
    enterprise = struct.pack("!HH", 300, 8) + b"".join(struct.pack("!HH", f, n) for f, n in TEMPLATE)
    enterprise += struct.pack("!HHI", 0x8000 | 12, 4, 29305)  # a private element, skipped over
    c.parse(ipfix(0, flowset(2, enterprise)), "192.0.2.1")
    body = b"".join(r + bytes(4) for r in (records(FLOWS[:1]), records(FLOWS[1:])))
    assert c.parse(ipfix(0, flowset(300, body)), "192.0.2.1") == FLOWS
    c.parse(ipfix(2, flowset(2, struct.pack("!HH", 300, 0))), "192.0.2.1")  # RFC 7011 section 8.1
    assert c.parse(ipfix(2, flowset(300, body)), "192.0.2.1") == []
    assert (c.counts["template_withdrawals"], c.counts["no_template"], c.counts["malformed"]) == (1, 1, 0)


@pytest.mark.parametrize("nbytes,packets", [(0, 0), (0, 1 << 32), (5 << 30, 3_579_140), ((1 << 32) - 1, (1 << 32) - 1),
                                            (1 << 32, 1 << 32), (3 * (1 << 20) + 10, 9 * (1 << 32) + 7)])
def test_a_record_is_split_into_aggregates_that_add_up_exactly(nbytes, packets):
    """ext/batch.py: entries of at most 2**20 bytes (MAX_WIRE_LEN) and 2**32 - 1
    packets (tg_batch.packets is 32 bits), over as many batches of 1,000 as it takes."""
    from ext import PacketBatch
    from ext.batch import split_flow

    got_bytes = got_packets = batches = 0
    for part, share in split_flow(nbytes, packets, 1000):
        batch = PacketBatch(1000, aggregates=True)
        batch.append_flow(ALICE, UPSTREAM, 6, 1, 2, part, share, 0)
        assert all(w <= 1 << 20 for w in batch.wirelen[:batch.n])
        assert all(p <= (1 << 32) - 1 for p in batch.packets[:batch.n])
        got_bytes += sum(batch.wirelen[:batch.n])
        got_packets += sum(batch.packets[:batch.n])
        batches += 1
    assert (got_bytes, got_packets) == (nbytes, packets)
    # 5 GiB is 5,120 entries of 1 MiB: six batches of 1,000 (the last holds 120)
    assert batches == {5 << 30: 6, 1 << 32: 5, (1 << 32) - 1: 5}.get(nbytes, 1)
