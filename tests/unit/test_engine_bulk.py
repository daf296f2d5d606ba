"""The engine filled in bulk (``add_subscribers``, ``add_addresses``: a start's chunks) ends as the
same calls one by one leave it: subscriber states, every address's owner, the events, and where a
call is refused, the same error at the same item; a bulk call refused changes nothing. Both engines,
hypothesis over subscribers and prefixes (v4, v6, /0 to /128, overlaps, malformed text, balances at
the ends of 64 bits)."""

from __future__ import annotations

import ipaddress
import os
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ext
from ext.errors import EngineError, TollgateError

if ext.EngineC is None and os.environ.get("TOLLGATE_NO_EXT", "") in ("", "0"):
    pytest.fail(f"the compiled engine is not built: {ext.EXT_IMPORT_ERROR}", pytrace=False)
IMPLS = ["py"] + ([] if ext.EngineC is None else ["c"])

V4 = ["100.64.0.1", "100.64.0.2", "100.64.1.0", "100.64.255.255", "198.18.0.1", "0.0.0.0", "255.255.255.255"]
V6 = ["2001:db8:100:1::", "2001:db8:100:1::1", "2001:db8:100:2::", "2001:db8::", "::", "ffff::1",
      "2001:db8:100:ffff::12:3456"]
# text ext/netaddr.py's fast path does not take: host bits, other spellings, mapped, no length, garbage
MALFORMED = ["100.64.0.1/24", "2001:DB8:100:1::/64", "2001:db8:100:0001::/64", "100.64.0.1", "100.64.0.1/33",
             "100.64.0.1/032", "100.64.0.1/+32", " 100.64.0.1/32", "100.64.0.1/32\x00", "::ffff:100.64.0.1/128",
             "::ffff:6440:1/128", "2001:db8::1/129", "x/32", "/32", "100.64.0.1/", "", "100.64.1/32",
             "2001:db8:100:1::/064", "1.2.3.4/3\u0662", "2001:db8::/32/1", "100.64.00.1/32", "0.0.0.0/0",
             "\ud800/32",  # (a lone surrogate: no UTF-8; the compiled engine raised UnicodeEncodeError)
             # IPv4 text the C fast path takes from inet_pton alone (no print back to compare)
             "100.64.0.256/32", "100.64.0.1.5/32", "010.64.0.1/32", "100..0.1/32", "100.64.0.1./32", ".100.64.0/32",
             "100.64.0.1e/32", "100.64.0x1/32", "1.2.3.4/32x", "255.255.255.255/33", "0.0.0.00/32", "4294967295/32"]


def text_of(address: str, plen: int) -> str:
    return str(ipaddress.ip_network(f"{address}/{plen}", strict=False))


prefixes = st.one_of(
    st.builds(text_of, st.sampled_from(V4), st.sampled_from([0, 1, 8, 10, 16, 24, 31, 32])),
    st.builds(text_of, st.sampled_from(V6), st.sampled_from([0, 1, 32, 48, 63, 64, 96, 127, 128])),
    st.sampled_from(MALFORMED),
)
int64s = st.one_of(st.sampled_from([0, -1, 1, 2 ** 63 - 1, -2 ** 63]), st.integers(-2 ** 63, 2 ** 63 - 1))
subscribers = st.tuples(
    st.one_of(st.integers(1, 12), st.sampled_from([0, 1 << 24, 5000])),  # an id (0 and 2^24: refused)
    st.sampled_from([0, 0, 1, 7]),  # tariff: 7 is not defined
    int64s,  # balance
    st.one_of(st.just(0), st.sampled_from([-1, 2 ** 63 - 1]), st.integers(0, 10 ** 12)),  # credit
    st.sampled_from([(), (5,), (0, 0), (-1,), (1, 2, 3)]),  # allowance (tariff 1 has two buckets)
    st.one_of(st.none(), st.sampled_from([-1, 0, 2 ** 63 - 1]), st.integers(-10, 10 ** 9)),  # volume left
)


def make(impl: str):
    e = ext.engine_class(impl)(2)
    e.set_tariff(0, [1000] * 4, [], [])
    e.set_tariff(1, [1000] * 4, [(0b11, 0b11, 0), (0b10, 0b01, 0)], [500, 0])
    return e


def one_by_one(e, subs, addrs):
    """(events, the first refusal as (stage, index, message) or None)."""
    events = []
    for i, s in enumerate(subs):
        try:
            events += e.add_subscriber(*s)
        except EngineError as exc:
            return events, ("subscribers", i, str(exc))
    for i, (sid, network) in enumerate(addrs):
        try:
            e.add_address(sid, network)
        except EngineError as exc:
            return events, ("addresses", i, str(exc))
    return events, None


def in_bulk(e, subs, addrs):
    events = []
    try:
        events = e.add_subscribers(*(array("q", [s[k] for s in subs]) for k in range(4)),
                                   [s[4] for s in subs], [s[5] for s in subs])
    except EngineError as exc:
        return events, ("subscribers", exc.index, str(exc))
    try:
        e.add_addresses(array("q", [sid for sid, _ in addrs]), [network for _, network in addrs])
    except EngineError as exc:
        return events, ("addresses", exc.index, str(exc))
    return events, None


def probes(addrs) -> list[str]:
    """Every address of interest: the pools, and the first and last of each valid prefix given."""
    out = set(V4) | set(V6)
    for _sid, text in addrs:
        try:
            net = ipaddress.ip_network(text)
        except ValueError:
            continue
        out |= {str(net.network_address), str(net.broadcast_address)}
    return sorted(out)


def state(e, sids, addresses):
    subs = {}
    for sid in sorted(set(sids)):
        try:
            subs[sid] = e.subscriber(sid)
        except EngineError:
            subs[sid] = None
    return subs, {a: e.lookup_subscriber(a) for a in addresses}


@st.composite
def worlds(draw):
    """Subscribers, mostly valid ones, and prefixes, mostly of those subscribers (or of one not there)."""
    valid = st.tuples(st.integers(1, 12), st.just(0), int64s, st.just(0), st.just(()),
                      st.one_of(st.none(), st.integers(-1, 10)))
    subs = draw(st.lists(st.one_of(valid, valid, valid, subscribers), max_size=8))
    owners = st.sampled_from([s[0] for s in subs] + [13]) if subs else st.just(13)
    ok_prefixes = st.one_of(
        st.builds(text_of, st.sampled_from(V4), st.sampled_from([0, 24, 31, 32])),
        st.builds(text_of, st.sampled_from(V6), st.sampled_from([0, 48, 64, 128])))
    addrs = draw(st.lists(st.tuples(owners, st.one_of(ok_prefixes, ok_prefixes, prefixes)), max_size=14))
    return subs, addrs


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds())
def test_bulk_is_the_calls_one_by_one(impl, world):
    subs, addrs = world
    sids = [s[0] for s in subs] + [sid for sid, _ in addrs]
    where = probes(addrs)
    single, bulk = make(impl), make(impl)
    events1, refused1 = one_by_one(single, subs, addrs)
    events2, refused2 = in_bulk(bulk, subs, addrs)
    assert refused2 == refused1
    if refused1 is None:
        assert events2 == events1
        assert state(bulk, sids, where) == state(single, sids, where)
        return
    stage, _index, _message = refused1
    # a refused bulk call changes nothing: the subscribers alone (addresses refused), or none at all
    before = make(impl)
    if stage == "addresses":
        assert events2 == events1
        for s in subs:
            before.add_subscriber(*s)
    assert state(bulk, sids, where) == state(before, sids, where)


@pytest.mark.parametrize("impl", IMPLS)
def test_bulk_columns_of_different_lengths_are_refused(impl):
    e = make(impl)
    with pytest.raises(EngineError, match="different lengths"):
        e.add_subscribers(array("q", [1, 2]), array("q", [0]), array("q", [0, 0]), array("q", [0, 0]),
                          [(), ()], [None, None])
    e.add_subscribers(array("q", [1]), array("q", [0]), array("q", [5]), array("q", [0]), [()], [None])
    with pytest.raises(EngineError, match="different lengths"):
        e.add_addresses(array("q", [1]), ["100.64.0.1/32", "100.64.0.2/32"])
    with pytest.raises(EngineError, match="not text") as exc:
        e.add_addresses(array("q", [1, 1]), ["100.64.0.1/32", 7])
    assert exc.value.index == 1 and e.lookup_subscriber("100.64.0.1") == 0


def accountant():
    import tomllib

    from gateway.config import parse_config
    from gateway.lab import lab_config
    from gateway.runtime import Accountant

    return Accountant(parse_config(tomllib.loads(lab_config(1))), None, IMPLS[-1])


def test_a_malformed_prefix_in_the_ledger_names_the_subscriber():
    rows = [{"id": i, "name": f"b{i}", "tariff": "lab", "balance": 100, "credit_limit": 0,
             "addresses": (f"100.64.10.{i}/32",)} for i in range(1, 6)]
    rows[3]["addresses"] = ("100.64.10.4/32", "2001:db8:100:1::1/64")
    with pytest.raises(TollgateError, match=r"subscriber 'b4': bad network '2001:db8:100:1::1/64'"):
        accountant().load_subscribers(rows)
    rows[3]["addresses"] = ("100.64.10.1/32",)
    with pytest.raises(TollgateError, match=r"subscriber 'b4': 100.64.10.1/32 already belongs to subscriber 1"):
        accountant().load_subscribers(iter(rows))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text", MALFORMED + [text_of(a, p) for a in V4 for p in (0, 8, 32)]
                         + [text_of(a, p) for a in V6 for p in (0, 64, 128)])
def test_each_text_is_taken_or_refused_as_add_address_does(impl, text):
    single, bulk = make(impl), make(impl)
    for e in (single, bulk):
        e.add_subscriber(1, 0, 100)
    refused1 = refused2 = None
    try:
        single.add_address(1, text)
    except EngineError as exc:
        refused1 = str(exc)
    try:
        bulk.add_addresses(array("q", [1]), [text])
    except EngineError as exc:
        refused2 = str(exc)
    assert refused2 == refused1
    where = probes([(1, text)])
    assert state(bulk, [1], where) == state(single, [1], where)


@pytest.mark.skipif("c" not in IMPLS, reason="the compiled engine's parse against the twin's")
@pytest.mark.parametrize("text", MALFORMED + [text_of(a, p) for a in V4 for p in (0, 8, 24, 31, 32)]
                         + [text_of(a, p) for a in V6 for p in (0, 64, 127, 128)])
def test_each_text_is_taken_or_refused_by_both_engines_alike(text):
    """The compiled engine's C parse of canonical text (ext/engine.pyx fast_network) against the twin's
    (Python's ipaddress): the same texts taken, the same refused, with the same message."""
    out = []
    for impl in ("c", "py"):
        e = make(impl)
        e.add_subscriber(1, 0, 100)
        try:
            e.add_address(1, text)
            out.append(("ok", state(e, [1], probes([(1, text)]))))
        except EngineError as exc:
            out.append(("refused", str(exc)))
    assert out[0] == out[1]


@pytest.mark.skipif("c" not in IMPLS, reason="the compiled engine's index against the twin")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32), n=st.integers(1500, 4000))
def test_thousands_of_prefixes_added_and_taken_out_as_the_twin_does(seed, n):
    """The compiled engine's index of owned prefixes (an open-addressing table that grows from 1,024
    slots and takes entries out by moving back the ones after them) against the twin's dicts: nested
    prefixes of a few networks (so that a prefix taken out hands its addresses to the longest shorter
    owner), subscribers removed whole, the owner of every address looked up after."""
    import random

    rnd = random.Random(seed)
    nets = []
    for _ in range(n):
        if rnd.random() < 0.5:
            base = (100 << 24 | 64 << 16) + rnd.randrange(1 << 12) * 16
            nets.append(text_of(str(ipaddress.IPv4Address(base + rnd.randrange(16))), rnd.choice([28, 30, 32])))
        else:
            base = 0x20010DB8_0100_0000 << 64 | rnd.randrange(1 << 10) << 64
            nets.append(text_of(str(ipaddress.IPv6Address(base + rnd.randrange(4))), rnd.choice([56, 64, 127, 128])))
    nets = list(dict.fromkeys(nets))
    owners = array("q", [1 + rnd.randrange(300) for _ in nets])
    c, py = make("c"), make("py")
    for e in (c, py):
        e.add_subscribers(*(array("q", v) for v in (range(1, 301), [0] * 300, [100] * 300, [0] * 300)),
                          [()] * 300, [None] * 300)
        e.add_addresses(owners, nets)
    gone = rnd.sample(nets, len(nets) // 2)
    for e in (c, py):
        for network in gone:
            e.remove_address(network)
        for sid in range(1, 301, 7):
            e.remove_subscriber(sid)
    probes = sorted({str(ipaddress.ip_network(t)[k]) for t in nets for k in (0, -1)})
    assert [c.lookup_subscriber(a) for a in probes] == [py.lookup_subscriber(a) for a in probes]
    kept = [(sid, t) for sid, t in zip(owners, nets) if t not in set(gone) and (sid - 1) % 7]
    with pytest.raises(EngineError, match="already belongs") as exc:  # the index still knows every owner
        c.add_addresses(array("q", [2] * len(kept)), [t for _, t in kept])
    assert exc.value.index == 0
    for e in (c, py):
        for _sid, network in kept:
            e.remove_address(network)
    assert {c.lookup_subscriber(a) for a in probes} == {0}


# ---- add_networks_texts: a start's chunk, each subscriber's networks one text (Ledger.subscriber_rows) ----

def as_texts(addrs):
    """``addrs`` [(sid, network)] as the runs of one subscriber joined: (sids, texts, for each address the
    index of its text)."""
    sids, texts, of = [], [], []
    for sid, network in addrs:
        if not sids or sids[-1] != sid:
            sids.append(sid)
            texts.append([])
        texts[-1].append(network)
        of.append(len(sids) - 1)
    return sids, [" ".join(t) for t in texts], of


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds())
def test_texts_are_the_calls_one_by_one(impl, world):
    """``add_networks_texts`` of the networks joined per subscriber is ``add_address`` of each: the same
    engine after, or the same refusal (its index the subscriber's text) and the engine as before."""
    subs, addrs = world
    addrs = [(sid, n) for sid, n in addrs if n and " " not in n]  # (a space or nothing: texts of their own, below)
    sids = [s[0] for s in subs] + [sid for sid, _ in addrs]
    where = probes(addrs)
    single, bulk = make(impl), make(impl)
    events1, refused1 = one_by_one(single, subs, addrs)
    events2, refused2 = in_bulk(bulk, subs, [])
    if refused2 is not None:
        assert refused1 == refused2
        return
    owners, texts, of = as_texts(addrs)
    try:
        bulk.add_networks_texts(array("q", owners), texts)
    except EngineError as exc:
        refused2 = ("addresses", exc.index, str(exc))
    assert events2 == events1
    if refused1 is None:
        assert refused2 is None
        assert state(bulk, sids, where) == state(single, sids, where)
        return
    assert refused2 == ("addresses", of[refused1[1]], refused1[2])
    before = make(impl)
    for s in subs:
        before.add_subscriber(*s)
    assert state(bulk, sids, where) == state(before, sids, where)


MANY = [text_of(f"100.64.{i >> 8}.{i & 255}", 32) for i in range(0, 1500, 3)] + \
    [text_of(f"2001:db8:100:{i:x}::", 64) for i in range(300)]

TEXTS_REFUSED = [  # (sids, texts, the index refused, the message)
    ([1, 2], ["100.64.0.1/32", "100.64.0.2/24"], 1, "bad network '100.64.0.2/24'"),      # host bits
    ([1, 2], ["100.64.0.1/32", "100.64.9.9/32 x"], 1, "bad network 'x'"),
    ([1, 2], ["100.64.9.9/32", "100.64.5.5/32"], 1, "100.64.5.5/32 already belongs to subscriber 3"),
    ([1], ["100.64.0.1/32 2001:db8::/64 100.64.0.1/32"], 0, "100.64.0.1/32 already belongs to subscriber 1"),
    ([1, 2], ["100.64.0.1/32", "100.64.0.1/32"], 1, "100.64.0.1/32 already belongs to subscriber 1"),
    ([1, 2], ["", " 100.64.0.1/32"], 1, "an empty network"),
    ([1, 2], ["100.64.0.1/32 ", ""], 0, "an empty network"),
    ([1], ["100.64.0.1/32  100.64.0.2/32"], 0, "an empty network"),
    ([1], [" "], 0, "an empty network"),
    ([1, 2], ["100.64.0.1/32", None], 1, "not text"),
    ([1, 2], ["100.64.0.1/32", b"100.64.0.2/32"], 1, "not text"),
    ([1, 2], ["100.64.0.1/32", ("100.64.0.2/32",)], 1, "not text"),
    ([1, 9], ["100.64.0.1/32", ""], 1, "unknown subscriber 9"),  # no network, still its subscriber checked
    ([1, 9], ["100.64.0.1/32", "100.64.0.2/32"], 1, "unknown subscriber 9"),
    ([1, 2], [" ".join(MANY), "100.66.0.1/32 100.66.0.2/32 2001:db8:66::/48 100.66.1.1/32\u0662"], 1, "bad network"),
    ([1, 2], [" ".join(MANY), "100.64.0.7/32 \ud800"], 1, "bad network '\\ud800'"),  # not UTF-8: no crash
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", TEXTS_REFUSED, ids=[str(i) for i in range(len(TEXTS_REFUSED))])
def test_a_refused_text_names_its_subscriber_and_changes_nothing(impl, case):
    sids, texts, index, message = case
    e, untouched = make(impl), make(impl)
    for x in (e, untouched):
        for sid in (1, 2, 3):
            x.add_subscriber(sid, 0, 100)
        x.add_address(3, "100.64.5.5/32")
    with pytest.raises(EngineError) as exc:
        e.add_networks_texts(array("q", sids), texts)
    assert exc.value.index == index and message in str(exc.value)
    where = probes([(0, t) for t in MANY]) + ["100.64.0.1", "100.64.0.2", "100.64.9.9", "100.64.5.5", "2001:db8::1"]
    assert state(e, [1, 2, 3], where) == state(untouched, [1, 2, 3], where)


@pytest.mark.parametrize("impl", IMPLS)
def test_texts_of_none_one_and_many_networks_are_taken(impl):
    e = make(impl)
    for sid in (1, 2, 3, 4):
        e.add_subscriber(sid, 0, 100)
    e.add_networks_texts(array("q", [1, 2, 3, 4]), ["", "100.64.0.1/32", " ".join(MANY), "2001:db8:1::/48"])
    assert e.lookup_subscriber("100.64.0.1") == 2 and e.lookup_subscriber("2001:db8:1:2::3") == 4
    assert {e.lookup_subscriber(str(ipaddress.ip_network(t)[-1])) for t in MANY} == {3}
    with pytest.raises(EngineError, match="different lengths"):
        e.add_networks_texts(array("q", [1]), ["", ""])
    e.add_networks_texts(array("q", []), [])


def test_both_engines_refuse_a_text_alike():
    if "c" not in IMPLS:
        pytest.skip("the compiled engine is not built")
    for sids, texts, _index, _message in TEXTS_REFUSED:
        out = []
        for impl in ("c", "py"):
            e = make(impl)
            for sid in (1, 2, 3):
                e.add_subscriber(sid, 0, 100)
            e.add_address(3, "100.64.5.5/32")
            try:
                e.add_networks_texts(array("q", sids), texts)
            except EngineError as exc:
                out.append((exc.index, str(exc)))
        assert out[0] == out[1]
