"""The whole NetFlow/IPFIX collector under hostile input (issue 11, item 5):
hypothesis builds datagrams from the v5, v9 and IPFIX layouts (headers,
template, options template and data sets) with lengths, counts, ids and
counters drawn from the edges (0, 1, 2**32 - 1, 2**32, 2**64 - 1), then damages
some of them, and feeds them to the source's datagram handler with a real
engine, both of them (ids c, py).

Whatever the datagram: no exception escapes and none is swallowed as a bug
(``malformed_exception`` stays 0), the work stays within the datagram's length
(``last_steps``: no loop), the counters add up, the state stays within its
caps, and the engine was charged exactly what the source says it rated. Where
the datagram is valid, the bytes and packets charged are those worked out here
from the records that went in. ``benches/bench_netflow_fuzz.py`` runs the same
strategies for longer and reports datagrams per second and the slowest one.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ext
from ext import ZoneRule
from ext.constants import PRICE_SCALE
from gateway.sources import netflow
from gateway.sources.netflow import NetflowSource

EDGE_COUNTERS = [0, 1, (1 << 32) - 1, 1 << 32, (1 << 64) - 1]
SUBSCRIBERS = {1: "100.64.1.2", 2: "100.64.2.2"}
SUBSCRIBERS6 = {1: "2001:db8:100:1::2", 2: "2001:db8:100:2::2"}
UPSTREAM, UPSTREAM6 = "198.18.0.2", "2001:db8:198::2"
EXPORTERS = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
BALANCE = 10 ** 18


def make_engine(name: str):
    e = ext.engine_class(name)(2, 1, default_zone=1)
    e.set_zones([ZoneRule("100.64.0.0/10", 0), ZoneRule("2001:db8:100::/48", 0)])
    e.set_tariff(1, [PRICE_SCALE] * 4)  # one unit per byte
    for sid in SUBSCRIBERS:
        e.add_subscriber(sid, 1, BALANCE)
        e.add_address(sid, f"{SUBSCRIBERS[sid]}/32")
        e.add_address(sid, f"{SUBSCRIBERS6[sid]}/128")
    return e


def entries(nbytes: int, packets: int) -> int:
    """Engine aggregates a record takes: 2**20 bytes and 2**32 - 1 packets each, one at least."""
    return max(1, -(-nbytes // (1 << 20)), -(-packets // ((1 << 32) - 1)))


def plausible(nbytes: int, packets: int) -> bool:
    return nbytes <= 1 << 42 and packets <= (1 << 42) // 20  # netflow.MAX_RECORD_BYTES, MAX_RECORD_PACKETS


# ---- datagrams as the RFCs lay them out ----------------------------------------------------------------------------

def set_(set_id: int, body: bytes, length: int | None = None) -> bytes:
    pad = bytes(-len(body) % 4)
    return struct.pack("!HH", set_id, 4 + len(body) + len(pad) if length is None else length) + body + pad


def v9_header(seq: int, domain: int, count: int = 0) -> bytes:
    return struct.pack("!HHIIII", 9, count, 0, 0, seq, domain)


def ipfix_datagram(seq: int, domain: int, sets: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HHIII", 10, 16 + len(sets) if length is None else length, 0, seq, domain) + sets


def v5_datagram(seq: int, flows, sampling: int = 0, count: int | None = None) -> bytes:
    head = struct.pack("!HHIIIIBBH", 5, len(flows) if count is None else count, 0, 0, 0, seq, 0, 0, sampling)
    return head + b"".join(struct.pack("!4s4s4sHHIIIIHHBBBBHHBBH", socket.inet_aton(s), socket.inet_aton(d),
                                       bytes(4), 0, 0, pk, by, 0, 0, sp, dp, 0, 0, pr, 0, 0, 0, 0, 0, 0)
                           for s, d, pr, sp, dp, by, pk in flows)


# Valid templates: (fields, address length, counter length). Counters 8 or 4 bytes (RFC 7011 section 6.2).
LAYOUTS = {
    "v4/64": ([(8, 4), (12, 4), (4, 1), (7, 2), (11, 2), (1, 8), (2, 8)], 4, 8),
    "v4/32": ([(1, 4), (2, 4), (8, 4), (12, 4), (4, 1), (7, 2), (11, 2), (61, 1)], 4, 4),
    "v6/64": ([(27, 16), (28, 16), (4, 1), (7, 2), (11, 2), (85, 8), (86, 8)], 16, 8),
}


def record_bytes(layout: str, src: str, dst: str, proto: int, sport: int, dport: int, nbytes: int,
                 packets: int) -> bytes:
    fields, alen, _clen = LAYOUTS[layout]
    family = socket.AF_INET if alen == 4 else socket.AF_INET6
    values = {8: socket.inet_pton(family, src), 12: socket.inet_pton(family, dst),
              27: socket.inet_pton(family, src), 28: socket.inet_pton(family, dst)}
    out = b""
    for field, length in fields:
        if field in values:
            out += values[field]
        else:
            number = {4: proto, 7: sport, 11: dport, 1: nbytes, 85: nbytes, 2: packets, 86: packets}.get(field, 0)
            out += number.to_bytes(length, "big")
    return out


def template_record(tid: int, fields) -> bytes:
    return struct.pack("!HH", tid, len(fields)) + b"".join(struct.pack("!HH", f, n) for f, n in fields)


@st.composite
def flows(draw, counter_max: int = (1 << 64) - 1, v6: bool = False):
    """A flow between a subscriber and upstream, either way, with counters from the edges."""
    counter = st.one_of(st.sampled_from([c for c in EDGE_COUNTERS if c <= counter_max]),
                        st.integers(0, min(counter_max, 1 << 24)), st.integers(0, counter_max))
    sid = draw(st.sampled_from(sorted(SUBSCRIBERS)))
    ours, theirs = (SUBSCRIBERS6[sid], UPSTREAM6) if v6 else (SUBSCRIBERS[sid], UPSTREAM)
    upload = draw(st.booleans())
    src, dst = (ours, theirs) if upload else (theirs, ours)
    return (src, dst, draw(st.sampled_from([6, 17, 1])), draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
            draw(counter), draw(counter))


@st.composite
def valid_datagrams(draw):
    """``(datagram, exporter, [(bytes, packets) charged per record])``: a valid v5, v9
    or IPFIX datagram (template and data together), and what each record is."""
    version = draw(st.sampled_from([5, 9, 10]))
    exporter = draw(st.sampled_from(EXPORTERS))
    seq = draw(st.integers(0, (1 << 32) - 1))
    if version == 5:
        recs = draw(st.lists(flows(counter_max=(1 << 32) - 1), min_size=1, max_size=6))
        rate = draw(st.sampled_from([0, 1, 10, 0x3FFF]))
        sampling = draw(st.sampled_from([0, 1, 2])) << 14 | rate
        return v5_datagram(seq, recs, sampling), exporter, [(r[5] * (rate or 1), r[6] * (rate or 1)) for r in recs]
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    fields, alen, clen = LAYOUTS[layout]
    recs = draw(st.lists(flows(counter_max=(1 << (8 * clen)) - 1, v6=alen == 16), max_size=6))
    # a domain of its own: a valid datagram is read with its own template, whatever came before
    domain = draw(st.integers(1000, 1 << 31))
    tid = draw(st.integers(256, 65535))
    data = b"".join(record_bytes(layout, *r) for r in recs)
    sets = set_(0 if version == 9 else 2, template_record(tid, fields)) + (set_(tid, data) if recs else b"")
    datagram = v9_header(seq, domain) + sets if version == 9 else ipfix_datagram(seq, domain, sets)
    return datagram, exporter, [(r[5], r[6]) for r in recs]


# ---- and as nobody should send them --------------------------------------------------------------------------------

FIELD_IDS = [1, 2, 4, 7, 8, 11, 12, 27, 28, 34, 85, 86, 149, 305, 0x8000 | 12]
FIELD_LENGTHS = [0, 1, 2, 3, 4, 5, 8, 9, 16, 0xFFFE, 0xFFFF]
EDGE_16 = [0, 1, 2, 3, 4, 255, 256, 0xFFFF]


@st.composite
def template_sets_bodies(draw, ipfix: bool, options: bool):
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        tid = draw(st.one_of(st.sampled_from([300, 301, 302]), st.sampled_from(EDGE_16), st.integers(0, 65535)))
        # a real layout with a length or two changed, or fields from nowhere
        fields = draw(st.one_of(
            st.sampled_from(sorted(LAYOUTS)).flatmap(lambda name: st.lists(
                st.tuples(st.integers(0, len(LAYOUTS[name][0]) - 1), st.sampled_from(FIELD_LENGTHS)), max_size=2
            ).map(lambda changes, fields=LAYOUTS[name][0]: [
                (f, dict(changes).get(k, n)) for k, (f, n) in enumerate(fields)])),
            st.lists(st.tuples(st.one_of(st.sampled_from(FIELD_IDS), st.integers(0, 65535)),
                               st.one_of(st.sampled_from(FIELD_LENGTHS), st.integers(0, 65535))), max_size=8)))
        count = draw(st.one_of(st.just(len(fields)), st.sampled_from(EDGE_16)))
        spec = b"".join(struct.pack("!HH", f, n) + (struct.pack("!I", 29305) if ipfix and f & 0x8000 else b"")
                        for f, n in fields)
        if options and ipfix:
            out += struct.pack("!HHH", tid, count, draw(st.sampled_from([0, 1, count, count + 1])) & 0xFFFF) + spec
        elif options:
            out += struct.pack("!HHH", tid, draw(st.sampled_from(EDGE_16)), 4 * count & 0xFFFF) + spec
        else:
            out += struct.pack("!HH", tid, count) + spec
    return out


@st.composite
def hostile_datagrams(draw):
    """``(datagram, exporter)``: headers, sets and templates from the layouts with
    edge values everywhere, valid ones among them, then perhaps damaged."""
    exporter = draw(st.sampled_from(EXPORTERS))
    kind = draw(st.sampled_from(["v5", "v9", "ipfix", "valid", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=300)), exporter
    if kind == "valid":
        data = draw(valid_datagrams())[0]
    elif kind == "v5":
        recs = draw(st.lists(flows(counter_max=(1 << 32) - 1), max_size=4))
        data = v5_datagram(draw(st.integers(0, (1 << 32) - 1)), recs, draw(st.integers(0, 0xFFFF)),
                           draw(st.one_of(st.just(len(recs)), st.sampled_from([0, 1, 30, 31, 0xFFFF]))))
    else:
        ipfix = kind == "ipfix"
        sets = b""
        for _ in range(draw(st.integers(0, 4))):
            what = draw(st.sampled_from(["templates", "options", "data", "flows"]))
            meant = {"templates": 2 if ipfix else 0, "options": 3 if ipfix else 1}.get(what, 300)
            set_id = draw(st.one_of(st.just(meant), st.sampled_from([meant, 0, 1, 2, 3, 4, 255, 256, 301, 302, 0xFFFF]),
                                    st.integers(0, 65535)))
            if what in ("templates", "options"):
                body = draw(template_sets_bodies(ipfix, what == "options"))
            elif what == "flows":  # records laid out as the 8-byte template says, for a data set id
                body = b"".join(record_bytes("v4/64", *r) for r in draw(st.lists(flows(), max_size=3)))
            else:
                body = draw(st.binary(max_size=64))
            length = draw(st.one_of(st.none(), st.none(), st.sampled_from(EDGE_16), st.integers(0, 65535)))
            sets += set_(set_id, body, length)
        seq = draw(st.one_of(st.sampled_from([0, 1, (1 << 31), (1 << 32) - 1]), st.integers(0, (1 << 32) - 1)))
        domain = draw(st.sampled_from([0, 1, 7, (1 << 32) - 1]))
        if ipfix:
            data = ipfix_datagram(seq, domain, sets, draw(st.one_of(st.none(), st.sampled_from(EDGE_16))))
        else:
            data = v9_header(seq, domain, draw(st.sampled_from(EDGE_16))) + sets
    damage = draw(st.sampled_from(["none", "none", "truncate", "bytes", "append"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "bytes" and data:
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data)
    elif damage == "append":
        data += draw(st.binary(min_size=1, max_size=40))
    return data, exporter


# ---- the checks ------------------------------------------------------------------------------------------------

class Harness:
    """A source with a real engine, and the checks every datagram must pass."""

    def __init__(self, engine_name: str) -> None:
        self.engine = make_engine(engine_name)
        self.source = NetflowSource(self.engine, lambda events: None, listen="127.0.0.1:0")
        # the pure-Python engine rates aggregates one by one (some 7 us each): a smaller budget keeps it quick
        self.budget = BUDGETS[engine_name]
        self.source.collector.max_entries_per_datagram = self.budget
        self.datagrams = 0
        self.engine_bytes = 0

    def close(self) -> None:
        self.source.close()

    def feed(self, data: bytes, exporter: str) -> tuple[int, int]:
        """Handle one datagram; check the invariants; returns the (bytes, packets) the engine was charged."""
        before = self.source.stats()
        rated = self.source.handle(data, exporter)
        self.datagrams += 1
        stats = self.source.stats()
        collector = self.source.collector
        assert stats["malformed_exception"] == 0 and stats["rating_errors"] == 0, "a bug, caught per datagram"
        assert collector.last_steps <= len(data), "more work than the datagram has bytes"
        assert sum(n for k, n in stats.items() if k.startswith("malformed_")) == stats["malformed"]
        assert stats["datagrams"] == before["datagrams"] + 1
        assert stats["exporters"] <= netflow.MAX_EXPORTERS
        assert stats["templates_held"] <= netflow.MAX_EXPORTERS * netflow.MAX_TEMPLATES_PER_EXPORTER
        for state in collector.exporters.values():
            assert len(state.domains) <= netflow.MAX_DOMAINS_PER_EXPORTER
            assert state.n_templates == sum(len(d.templates) for d in state.domains.values())
            assert state.n_templates <= netflow.MAX_TEMPLATES_PER_EXPORTER
        assert rated == stats["rated_bytes"] - before["rated_bytes"]
        seen = self.engine.stats().bytes
        assert seen - self.engine_bytes == rated, "the engine saw every byte the source rated"
        self.engine_bytes = seen
        rows = self.engine.drain()  # drained every datagram: no engine counter fills up
        return sum(r.bytes for r in rows), sum(r.packets for r in rows)


ENGINE_IDS = sorted(ext.ENGINES)
BUDGETS = {"c": netflow.MAX_ENTRIES_PER_DATAGRAM, "py": 1 << 13}  # 4 TiB, and 8 GiB, of aggregates a datagram
# fewer through the pure-Python engine: a 4 GiB record is 4,096 aggregates for it to rate one by one
EXAMPLES = {"c": (1500, 400), "py": (200, 80)}


@pytest.mark.parametrize("engine_name", ENGINE_IDS)
def test_hostile_datagrams_are_survived(engine_name):
    harness = Harness(engine_name)
    hostile, _valid = EXAMPLES[engine_name]

    @settings(max_examples=hostile, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile_datagrams())
    def check(case):
        harness.feed(*case)

    try:
        check()
        stats = harness.source.stats()
        if hostile >= 1000:  # the strategies reach the paths they are meant to (the draws are the same each run)
            reached = {k: stats[k] for k in ("templates", "records", "no_template", "malformed_set_length",
                                             "malformed_template_field_length", "malformed_oversized_record",
                                             "malformed_version", "malformed_short", "malformed_options_scope",
                                             "sequence_outliers")}
            assert all(reached.values()), reached
    finally:
        harness.close()


@pytest.mark.parametrize("engine_name", ENGINE_IDS)
def test_valid_datagrams_are_charged_exactly(engine_name):
    harness = Harness(engine_name)
    _hostile, valid = EXAMPLES[engine_name]

    @settings(max_examples=valid, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(valid_datagrams())
    def check(case):
        data, exporter, recs = case
        before = harness.source.stats()
        budget = harness.budget
        want_bytes = want_packets = refused = 0
        for nbytes, packets in recs:
            if not plausible(nbytes, packets) or entries(nbytes, packets) > budget:
                refused += 1
                continue
            budget -= entries(nbytes, packets)
            want_bytes += nbytes
            want_packets += packets
        assert harness.feed(data, exporter) == (want_bytes, want_packets)
        stats = harness.source.stats()
        assert stats["records"] - before["records"] == len(recs) - refused
        assert stats["malformed"] - before["malformed"] == refused
        assert stats["no_template"] == before["no_template"]

    try:
        check()
    finally:
        harness.close()


def test_the_strategies_build_what_the_rfcs_describe():
    """The fuzzer's valid datagrams are read back by hand here, so a mistake in
    building them cannot pass for the collector's."""
    data = v9_header(7, 1000) + set_(0, template_record(300, LAYOUTS["v4/64"][0])) + set_(
        300, record_bytes("v4/64", "100.64.1.2", "198.18.0.2", 6, 1, 2, 1 << 32, 5))
    assert len(data) == 20 + (4 + 4 + 7 * 4) + (4 + 29 + 3)  # header, template set, data set padded to 4
    assert data[20 + 36 + 4 + 8:20 + 36 + 4 + 13] == bytes([6, 0, 1, 0, 2])  # protocol, then ports
    assert int.from_bytes(data[20 + 36 + 4 + 13:20 + 36 + 4 + 21], "big") == 1 << 32
    assert ipfix_datagram(0, 1, b"\x00" * 4)[2:4] == struct.pack("!H", 20)
    assert entries(5 << 30, 1) == 5120 and entries(0, 1 << 32) == 2 and entries(0, 0) == 1
