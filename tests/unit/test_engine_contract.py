"""The compiled engine's contract: its constants are the twin's, and every
refused call is an EngineError in both engines that changes nothing."""

from __future__ import annotations

import os
import struct
from array import array

import pytest

import ext
import ext.errors
from ext import PacketBatch, ZoneRule, constants
from ext.constants import (
    BLOCK_LIMIT,
    BLOCK_MANUAL,
    MAX_PRICE,
    MAX_SUBSCRIBER_ID,
    NF_ACCEPT,
    PRICE_SCALE,
)
from ext.errors import EngineError

T = 1_800_000_000 * 10 ** 9

if ext.EngineC is None:
    if os.environ.get("TOLLGATE_NO_EXT", "") not in ("", "0"):  # asked for the twin alone: nothing to compare
        pytest.skip("TOLLGATE_NO_EXT is set and ext.engine is not built", allow_module_level=True)
    pytest.fail(f"the compiled engine is not built: {ext.EXT_IMPORT_ERROR}", pytrace=False)

ENGINES = pytest.mark.parametrize("cls", [ext.EngineC, ext.EnginePy], ids=["c", "py"])


def test_constants_agree():
    from ext import engine

    assert set(engine.CONSTANTS) >= {"NF_DROP", "NF_ACCEPT", "UPLOAD", "DOWNLOAD", "BLOCK_LIMIT", "EV_BLOCK",
                                     "EV_UNBLOCK", "EV_WARN", "PRICE_SCALE", "MAX_WIRE_LEN", "MAX_BUCKETS",
                                     "MAX_WARN_LEVELS"}
    for name, value in engine.CONSTANTS.items():
        if name == "MAX_EVENTS_PER_PACKET":
            # two subscribers per packet, each a volume block, a limit block and every warning level
            assert value >= 2 * (2 + constants.MAX_WARN_LEVELS)
            continue
        assert getattr(constants, name) == value, name
    # the counters keep the carry in 20 bits
    assert constants.PRICE_SCALE < 1 << 20
    # len * price + carry stays inside int64
    assert constants.MAX_WIRE_LEN * constants.MAX_PRICE + constants.PRICE_SCALE < 1 << 63


@pytest.mark.parametrize("name", ["c", "py"])
def test_engine_class_by_name(name):
    assert ext.engine_class(name).implementation == name


def test_unknown_engine_name_is_a_clear_error():
    with pytest.raises(ext.errors.TollgateError, match="not available"):
        ext.engine_class("rust")


def test_same_public_interface():
    public = {n for n in dir(ext.EnginePy) if not n.startswith("_")}
    assert public <= set(dir(ext.EngineC)), public - set(dir(ext.EngineC))


# ---- refused calls ------------------------------------------------------------

def world(cls):
    e = cls(4, 2, default_zone=1)
    e.set_zones([ZoneRule("198.18.0.0/15", 2), ZoneRule("198.19.0.0/16", 3, 6, 443, 443),
                 ZoneRule("2001:db8:198::/48", 2)])
    e.set_allowlist([ZoneRule("198.18.0.53/32", 0, 17, 53, 53)])
    e.set_tariff(1, [PRICE_SCALE] * 16, [(0b0100, 3)], [500])
    e.set_tariff(2, [0] * 16)
    e.set_timeline([T, T + 10 ** 9], [0, 1])
    e.add_subscriber(1, 1, 1000, 100, [300])
    e.add_address(1, "100.64.0.1/32")
    e.add_address(1, "2001:db8:100:1::/64")
    e.add_subscriber(2, 2, 50)
    e.add_address(2, "100.64.0.0/24")
    return e


def probe(e):
    """Everything observable, after a batch that exercises the tables."""
    def v4(src, dst, proto, size, sport=1000, dport=443):
        l4 = struct.pack("!HH", sport, dport) + bytes(size - 24)
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, proto, 0, bytes(src), bytes(dst)) + l4

    pkts = [v4([100, 64, 0, 1], [198, 19, 0, 9], 6, 400), v4([198, 18, 1, 1], [100, 64, 0, 1], 17, 300),
            v4([100, 64, 0, 7], [198, 18, 0, 53], 17, 100, 53, 53), v4([100, 64, 0, 1], [100, 64, 0, 9], 6, 60)]
    batch = PacketBatch.of([(p, len(p), T + 5 * 10 ** 8 * i) for i, p in enumerate(pkts)])
    events = e.process(batch)
    return (events, list(batch.verdict[:batch.n]), e.drain(), e.stats(),
            [(sid, e.subscriber(sid)) for sid in e.subscribers()],
            [e.lookup_subscriber(a) for a in ("100.64.0.1", "100.64.0.2", "2001:db8:100:1::5", "100.65.0.1")],
            [e.lookup_zone(a, 6, 443) for a in ("198.19.1.1", "198.18.1.1", "2001:db8:198::1", "8.8.8.8")])


REFUSED = [
    ("set_zones", ([ZoneRule("198.18.0.1/15", 2)],), {}),          # host bits set
    ("set_zones", ([ZoneRule("not a network", 2)],), {}),
    ("set_zones", ([ZoneRule("198.18.0.0/15", 4)],), {}),          # zone out of range
    ("set_zones", ([ZoneRule("198.18.0.0/15", 2, 256)],), {}),
    ("set_zones", ([ZoneRule("198.18.0.0/15", 2, 6, 80, 79)],), {}),
    ("set_zones", ([ZoneRule("198.18.0.0/15", 2, 6, 0, 65536)],), {}),
    ("set_allowlist", ([ZoneRule("2001:db8::/129", 0)],), {}),
    ("set_tariff", (-1, [0] * 16), {}),
    ("set_tariff", (65536, [0] * 16), {}),
    ("set_tariff", (3, [0] * 15), {}),
    ("set_tariff", (3, [-1] + [0] * 15), {}),
    ("set_tariff", (3, [MAX_PRICE + 1] + [0] * 15), {}),
    ("set_tariff", (3, [0] * 16, [(1, 1)] * 5), {}),
    ("set_tariff", (3, [0] * 16, (), [5, 4, 3, 2, 1]), {}),
    ("set_tariff", (3, [0] * 16, (), [5, 5]), {}),
    ("set_tariff", (1, [0] * 16, [(1, 1), (2, 2)]), {}),             # bucket count, while in use
    ("set_timeline", ([], []), {}),
    ("set_timeline", ([1, 2], [0]), {}),
    ("set_timeline", ([2, 1], [0, 1]), {}),
    ("set_timeline", ([1], [2]), {}),
    ("add_subscriber", (0, 1, 100), {}),
    ("add_subscriber", (MAX_SUBSCRIBER_ID + 1, 1, 100), {}),
    ("add_subscriber", (1, 1, 100), {}),                             # exists
    ("add_subscriber", (3, 1, 100, -1), {}),
    ("add_subscriber", (3, 9, 100), {}),                             # unknown tariff
    ("add_subscriber", (3, 70000, 100), {}),
    ("add_subscriber", (3, 1, 100, 0, [1, 2]), {}),                  # more volumes than buckets
    ("add_subscriber", (3, 1, 100, 0, [-1]), {}),
    ("remove_subscriber", (3,), {}),
    ("set_subscriber", (3,), {"credit": 5}),
    ("set_subscriber", (1,), {"tariff": 9}),
    ("set_subscriber", (1,), {"credit": -5}),
    ("set_subscriber", (1,), {"allowance": [1, 2]}),
    ("add_address", (3, "100.64.0.3/32"), {}),
    ("add_address", (2, "100.64.0.1/32"), {}),                       # belongs to 1
    ("add_address", (2, "100.64.0.1/24"), {}),
    ("add_networks_texts", (array("q", [2, 3]), ["100.64.0.9/32", ""]), {}),         # 3 is unknown
    ("add_networks_texts", (array("q", [2]), ["100.64.0.9/32 100.64.0.1/32"]), {}),  # belongs to 1
    ("add_networks_texts", (array("q", [2, 2]), ["100.64.0.9/32", "100.64.0.9/32"]), {}),  # given twice
    ("add_networks_texts", (array("q", [2]), ["100.64.0.9/32 100.64.0.1/24"]), {}),  # host bits
    ("add_networks_texts", (array("q", [2]), ["100.64.0.9/32 "]), {}),              # an empty network
    ("add_networks_texts", (array("q", [2]), [["100.64.0.9/32"]]), {}),             # not a text
    ("remove_address", ("100.64.0.2/32",), {}),                      # inside 2's /24, not itself owned
    ("remove_address", ("2001:db8:100::/48",), {}),
    ("adjust_balance", (3, 10), {}),
    ("block", (3, BLOCK_MANUAL), {}),
    ("unblock", (3, BLOCK_LIMIT), {}),
    ("subscriber", (3,), {}),
    ("add_subscriber", (3, 1, 100, 0, [], 1.5), {}),                 # volume_left: None or bytes
    ("add_subscriber", (3, 1, 100, 0, [], "10 kB"), {}),
    ("set_volume", (3, 100), {}),                                    # unknown subscriber
    ("set_volume", (1, True), {}),
    ("rate_volume", (3, 2, 0, 100, 1, T), {}),                       # unknown subscriber
    ("rate_volume", (1, 4, 0, 100, 1, T), {}),                       # zone out of range
    ("rate_volume", (1, -1, 0, 100, 1, T), {}),
    ("rate_volume", (1, 2, 2, 100, 1, T), {}),                       # no such direction
    ("rate_volume", (1, 2, 0, -1, 1, T), {}),
    ("rate_volume", (1, 2, 0, 1 << 64, 1, T), {}),
    ("rate_volume", (1, 2, 0, 100, -1, T), {}),
    ("rate_volume", (1, 2, 0, 100, 1 << 64, T), {}),
    ("rate_volume", (1, 2, 0, 100, 1, 1 << 63), {}),
    ("rate_volume", (1, 2, 0, 100.0, 1, T), {}),                     # bytes are integers
    ("rate_volume", (1, 2, 0, True, 1, T), {}),
]


@pytest.mark.parametrize("call", REFUSED, ids=[f"{c[0]}-{i}" for i, c in enumerate(REFUSED)])
def test_refused_calls_raise_engine_error_and_change_nothing(call):
    name, args, kw = call
    results = []
    for cls in (ext.EngineC, ext.EnginePy):
        e = world(cls)
        with pytest.raises(EngineError):
            getattr(e, name)(*args, **kw)
        untouched = world(cls)
        after = probe(e)
        assert after == probe(untouched), cls.implementation
        results.append(after)
    assert results[0] == results[1]


@ENGINES
def test_bad_constructor_arguments(cls):
    for args, kw in [((0,), {}), ((65,), {}), ((4, 0), {}), ((4, 257), {}), ((4,), {"default_zone": 4}),
                     ((4,), {"malformed_verdict": 2}), ((4,), {"unknown_verdict": -1}),
                     ((4,), {"volume_zones": 16}), ((4,), {"volume_zones": -1}), ((4,), {"volume_zones": "all"})]:
        with pytest.raises(EngineError):
            cls(*args, **kw)


@pytest.mark.parametrize("call", [
    ("add_subscriber", (3, 1, 1 << 63), {}),
    ("add_subscriber", (3, 1, 100, 1 << 63), {}),
    ("add_subscriber", (3, 1, 100, 0, [1 << 63]), {}),
    ("adjust_balance", (1, (1 << 63) - 1), {}),                      # 1000 + that leaves int64
    ("adjust_balance", (1, -(1 << 64)), {}),
    ("set_subscriber", (1,), {"credit": 1 << 63}),
    ("set_timeline", ([1 << 63], [0]), {}),
    ("set_tariff", (2, [0] * 16, (), [1 << 63]), {}),
    ("set_volume", (1, 1 << 63), {}),
    ("add_subscriber", (3, 1, 100, 0, [], -(1 << 63) - 1), {}),
    # 2**64 - 1 bytes at 1 unit a byte: a cost beyond int64
    ("rate_volume", (1, 2, 0, (1 << 64) - 1, 1, T), {}),
    # 2**63 bytes of subscriber 2 (free tariff) cost nothing, but the undrained
    # counter would then hold more packets than its 44 bits
    ("rate_volume", (2, 2, 0, 1 << 63, 1 << 44, T), {}),
])
@pytest.mark.parametrize("engine", ["c", "py"])
def test_both_engines_refuse_values_beyond_64_bits(call, engine):
    """The compiled engine's state is 64-bit; both say so with an EngineError
    (never an OverflowError, never a wrap) and change nothing."""
    name, args, kw = call
    cls = ext.ENGINES[engine]
    e = world(cls)
    with pytest.raises(EngineError, match="64"):
        getattr(e, name)(*args, **kw)
    assert probe(e) == probe(world(cls))


@pytest.mark.parametrize("engine", ["c", "py"])
def test_a_packet_outside_the_batch_buffer_is_refused(engine):
    e = world(ext.ENGINES[engine])
    batch = ext.PacketBatch(2)
    batch.append(bytes([0x45]) + bytes(39), 40, 0)
    batch.offset[0] = 10 ** 6
    with pytest.raises(EngineError, match="outside the batch buffer"):
        e.process(batch)


def test_extreme_balances_never_wrap():
    """A huge credit plus a huge balance must not overflow into 'no headroom',
    and a balance near the bottom of int64 must not wrap into riches."""
    for cls in (ext.EngineC, ext.EnginePy):
        e = world(cls)
        e.set_subscriber(1, credit=(1 << 63) - 1)
        e.adjust_balance(1, (1 << 62))
        assert not e.subscriber(1).blocked
        e.set_subscriber(1, credit=0)
        e.adjust_balance(1, -(1 << 62) - 1000)
        e.adjust_balance(1, -(1 << 63) + 10)  # 10 above the bottom of int64: blocked for the limit
        assert e.subscriber(1).blocked == BLOCK_LIMIT
        e.unblock(1, BLOCK_LIMIT)  # an operator lifts it anyway: the next charge must still be refused
        _events, verdicts, *_ = probe(e)
        assert verdicts[0] != NF_ACCEPT
        assert e.subscriber(1).balance == -(1 << 63) + 10
