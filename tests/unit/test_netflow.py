"""The NetFlow/IPFIX collector: datagrams built by hand from the layouts of
the Cisco v5/v9 documents and RFC 7011, and thousands of damaged datagrams."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from gateway.sources.netflow import Collector


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
    assert (c.counts["sequence_gaps"], c.counts["lost"]) == (1, 3)


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
