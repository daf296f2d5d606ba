"""The engine's grant arithmetic (``quote_bytes``, ``affordable_bytes``), c and py.

Hypothesis draws a tariff (slot prices, free and tier buckets), a subscriber
(balance, credit, volume limit) and a history of rated volumes (so the carry
and the buckets are part-used), then asks both engines the same questions:

* the answers are the same in both engines;
* ``quote_bytes(n)`` is exactly what ``rate_volume(n)`` then takes off the
  balance (the grant keeper prices outstanding grants with it);
* ``affordable_bytes`` is the largest n that fits: ``quote(n)`` is 0 or at
  most the budget, ``quote(n + 1)`` is not (unless capped by the volume
  limit or the 2**64-1 ceiling), and rating n bytes never blocks.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ext
from ext.constants import BLOCK_LIMIT, EV_BLOCK, PRICE_SCALE
from ext.errors import EngineError

UINT64_MAX = (1 << 64) - 1
T0 = 1_800_000_000 * 10 ** 9
T1 = T0 + 3600 * 10 ** 9  # the second time slot
ENGINES = [pytest.param(ext.EnginePy, id="py")] + ([pytest.param(ext.EngineC, id="c")] if ext.EngineC else [])
prices = st.one_of(st.just(0), st.just(PRICE_SCALE), st.integers(1, 50), st.integers(0, 3 * PRICE_SCALE))


@st.composite
def worlds(draw):
    n_zones = draw(st.integers(1, 3))
    n_slots = 2
    tariff_prices = draw(st.lists(prices, min_size=n_zones * 2 * n_slots, max_size=n_zones * 2 * n_slots))
    buckets = draw(st.lists(st.tuples(st.integers(1, (1 << n_zones) - 1), st.integers(1, 3),
                                      st.one_of(st.just(0), prices)), max_size=3))
    allowance = [draw(st.integers(0, 5000)) for _ in buckets]
    balance = draw(st.one_of(st.integers(-1000, 10_000), st.integers(-10 ** 12, 10 ** 12)))
    credit = draw(st.integers(0, 2000))
    volume = draw(st.one_of(st.none(), st.integers(-100, 20_000)))
    history = draw(st.lists(st.tuples(st.integers(0, n_zones - 1), st.integers(0, 1), st.integers(0, 3000),
                                      st.sampled_from([T0, T1])), max_size=6))
    return n_zones, tariff_prices, buckets, allowance, balance, credit, volume, history


def build(cls, world):
    n_zones, tariff_prices, buckets, allowance, balance, credit, volume, history = world
    e = cls(n_zones, 2, default_zone=0)
    e.set_tariff(0, tariff_prices, buckets)
    e.set_timeline([T0, T1], [0, 1])
    e.add_subscriber(1, 0, balance, credit, allowance, volume)
    for zone, direction, nbytes, ts in history:
        e.rate_volume(1, zone, direction, nbytes, 1, ts)
    return e


def questions(world):
    n_zones = world[0]
    return [(z, d, ts) for z in range(n_zones) for d in (0, 1) for ts in (T0, T1)]


@given(world=worlds(), budget=st.one_of(st.none(), st.integers(-50, 5000)),
       share=st.one_of(st.none(), st.lists(st.integers(0, 4000), min_size=3, max_size=3)))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_both_engines_agree(world, budget, share):
    if ext.EngineC is None:
        pytest.fail(f"the compiled engine is not built: {ext.EXT_IMPORT_ERROR}")
    engines = [build(cls, world) for cls in (ext.EnginePy, ext.EngineC)]
    allowance = None if share is None else share[:len(world[2])]
    for zone, direction, ts in questions(world):
        answers = []
        for e in engines:
            try:
                answers.append((e.affordable_bytes(1, zone, direction, ts, budget, allowance),
                                [e.quote_bytes(1, zone, direction, n, ts, allowance) for n in (0, 1, 777, 10 ** 6)]))
            except EngineError as exc:
                answers.append(type(exc))
        assert answers[0] == answers[1], (zone, direction, ts)


@pytest.mark.parametrize("cls", ENGINES)
@given(world=worlds(), budget=st.one_of(st.none(), st.integers(-50, 5000)))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_affordable_is_the_most_that_fits(cls, world, budget):
    e = build(cls, world)
    for zone, direction, ts in questions(world):
        state = e.subscriber(1)
        limit = state.balance + state.credit if budget is None else budget
        n = e.affordable_bytes(1, zone, direction, ts, budget)
        cost = e.quote_bytes(1, zone, direction, n, ts)
        assert cost == 0 or cost <= limit
        volume_capped = state.volume_left is not None and n == max(0, state.volume_left)
        if n < UINT64_MAX and not volume_capped:
            more = e.quote_bytes(1, zone, direction, n + 1, ts)
            assert more > 0 and more > limit, (zone, direction, n)
        if n == UINT64_MAX:  # no end: past its buckets the traffic is free, and what they cost fits
            more = e.quote_bytes(1, zone, direction, 10 ** 15, ts)
            assert more == 0 or more <= limit


@pytest.mark.parametrize("cls", ENGINES)
@given(world=worlds())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_quote_is_what_rating_charges(cls, world):
    """Rating what affordable_bytes allows (within 2**40 bytes) takes exactly
    the quote off the balance and, within balance + credit, never blocks."""
    for zone, direction, ts in questions(world):
        e = build(cls, world)
        before = e.subscriber(1)
        n = min(e.affordable_bytes(1, zone, direction, ts), 1 << 40)
        cost = e.quote_bytes(1, zone, direction, n, ts)
        events = e.rate_volume(1, zone, direction, n, 1, ts)
        assert before.balance - e.subscriber(1).balance == cost
        if not before.blocked:
            assert not any(ev.kind == EV_BLOCK and ev.reason == BLOCK_LIMIT for ev in events)


@pytest.mark.parametrize("cls", ENGINES)
def test_refusals(cls):
    e = cls(2, 1)
    e.set_tariff(0, [0, 0, 10, 10], [(2, 3, 0)])
    e.add_subscriber(1, 0, 100, 0, [50])
    with pytest.raises(EngineError):
        e.affordable_bytes(2, 1, 0, T0)  # unknown subscriber
    with pytest.raises(EngineError):
        e.affordable_bytes(1, 2, 0, T0)  # zone out of range
    with pytest.raises(EngineError):
        e.quote_bytes(1, 1, 0, -1, T0)
    with pytest.raises(EngineError):
        e.affordable_bytes(1, 1, 0, T0, allowance=[1, 2])  # one per bucket
    with pytest.raises(EngineError):
        e.affordable_bytes(1, 1, 0, T0, budget=1.5)
    # 50 free bytes, then 100 minor units at 10 / PRICE_SCALE per byte
    assert e.affordable_bytes(1, 1, 0, T0) == 50 + (101 * PRICE_SCALE - 1) // 10
    assert e.affordable_bytes(1, 0, 0, T0) == UINT64_MAX
    assert e.affordable_bytes(1, 1, 0, T0, allowance=[0], budget=0) == (PRICE_SCALE - 1) // 10


@pytest.mark.parametrize("cls", ENGINES)
def test_a_tier_bucket_whose_bytes_times_price_pass_int64(cls):
    """A dear bucket of many bytes (212 GB at 43.5 per PRICE_SCALE bytes: 9.2e18, past 2**63) and nothing
    priced after it: with no money, nothing is affordable, not everything. The compiled engine multiplied
    in int64, the product wrapped negative and ``affordable_bytes`` said 2**64 - 1 (a free grant)."""
    e = cls(1, 1, default_zone=0)
    e.set_tariff(0, [0, 0], [(1, 1, 0), (1, 1, 43_505_359)])
    e.add_subscriber(1, 0, 0, 0, [0, 212_005_422_984])
    assert e.affordable_bytes(1, 0, 0, 10 ** 18, 0) == 0
    assert e.affordable_bytes(1, 0, 0, 10 ** 18) == 0
    budget = 10 ** 6  # 10**6 minor units: what they buy of the bucket, exactly
    assert e.affordable_bytes(1, 0, 0, 10 ** 18, budget) == ((budget + 1) * PRICE_SCALE - 1) // 43_505_359
    assert e.affordable_bytes(1, 0, 1, 10 ** 18, 0) == (1 << 64) - 1  # the download: no bucket, free
