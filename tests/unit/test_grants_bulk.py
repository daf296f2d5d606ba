"""``GrantKeeper.refresh_many`` (ext/grants.pyx ``refresh_idle``, the start's
grants in C) against ``GrantKeeper.refresh`` one by one: the same grants to
the byte, the same watched (refused) set, the same counts, over subscribers
hypothesis makes: balances (0 among them), credits, volume limits (0 and
negative among them), free and priced pairs, grants in force (0, some, free,
above a new limit), what was used, charged and refunded, blocked ones, tariffs
with up to four buckets (free volume, tiers dearer or cheaper than the price
after them, shared by several pairs) and what is left in them, busy pairs (a
rate: left to the Python refresh).

The maps here are plain buffers in the layout of the real ones
(ext/bpfmaps.pyx: eight uint64 a counter, ``used`` then ``grant``), so the C
side writes where the kernel would read.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ext
from ext.constants import BLOCK_LIMIT, BLOCK_VOLUME, PRICE_SCALE
from gateway.daemon import grants as grants_mod
from gateway.daemon.grants import GRANT_FREE, GrantKeeper

pytestmark = pytest.mark.skipif(ext.EngineC is None or grants_mod.refresh_idle is None,
                                reason="the compiled engine and ext.grants are not built")

T0 = 1_800_000_000 * 10 ** 9
MAX_SLOTS = 12


class BufMaps:
    """The maps' counters as the real ones lay them out, in a bytearray."""

    def __init__(self, n_zones: int) -> None:
        self.n_zones = n_zones
        self.n_counters = MAX_SLOTS * n_zones * 2
        self.buf = bytearray(self.n_counters * 64)
        self.q = memoryview(self.buf).cast("Q")
        self.blocked: dict[int, bool] = {}

    def _i(self, sid, z, d) -> int:
        return (sid * self.n_zones + z) * 2 + d

    def counters(self):
        return memoryview(self.buf).cast("Q", (self.n_counters, 8))

    def grant(self, sid, z, d) -> int:
        return self.q[8 * self._i(sid, z, d) + 1]

    def set_grant(self, sid, z, d, n) -> None:
        if not 0 <= n <= GRANT_FREE:
            raise ValueError(n)
        self.q[8 * self._i(sid, z, d) + 1] = n

    def counter(self, sid, z, d):
        return SimpleNamespace(used=self.q[8 * self._i(sid, z, d)])

    def set_blocked(self, sid, blocked) -> None:
        self.blocked[sid] = blocked


price = st.one_of(st.just(0), st.integers(1, 3 * PRICE_SCALE // 1000), st.integers(1, 10 ** 9))
big = st.one_of(st.just(0), st.integers(0, 4 << 20), st.integers(0, 1 << 62))


@st.composite
def subscriber(draw, n_zones):
    return {
        "tariff": draw(st.integers(0, 2)),
        "balance": draw(st.one_of(st.just(0), st.integers(-5000, 20_000), st.integers(0, 10 ** 12))),
        "credit": draw(st.one_of(st.just(0), st.integers(0, 2000))),
        "volume": draw(st.one_of(st.none(), st.just(0), st.integers(-1000, 8 << 20))),
        "blocked": draw(st.sampled_from([0, 0, 0, BLOCK_LIMIT, BLOCK_VOLUME])),
        "pairs": [(draw(big), draw(st.one_of(st.just(0), st.just(GRANT_FREE), big)), draw(big), draw(big))
                  for _ in range(2 * n_zones)],  # (live used, grant, charged, refunded)
        "rated": draw(st.lists(st.tuples(st.integers(0, 2 * n_zones - 1), st.integers(1, 5000)), max_size=2)),
        "busy": draw(st.sampled_from([False, False, False, True])),
        "allowance": draw(st.lists(st.one_of(st.just(0), st.integers(0, 8 << 20), st.integers(0, 1 << 62)),
                                   min_size=3, max_size=3)),
    }


@st.composite
def worlds(draw):
    n_zones = draw(st.integers(1, 3))
    tariffs = []
    for t in range(3):
        prices = draw(st.lists(price, min_size=2 * n_zones, max_size=2 * n_zones))
        buckets = [] if t == 0 else draw(st.lists(st.tuples(st.integers(1, (1 << n_zones) - 1), st.integers(1, 3),
                                                            st.one_of(st.just(0), price)), max_size=2 * t))
        tariffs.append((prices, buckets))
    subs = draw(st.lists(subscriber(n_zones), min_size=1, max_size=MAX_SLOTS - 2))
    volume_zones = draw(st.integers(0, (1 << n_zones) - 1))
    return n_zones, tariffs, volume_zones, subs


def build(world):
    n_zones, tariffs, volume_zones, subs = world
    e = ext.EngineC(n_zones, 1, default_zone=0, volume_zones=volume_zones)
    for t, (prices, buckets) in enumerate(tariffs):
        e.set_tariff(t, prices, buckets)
    maps = BufMaps(n_zones)
    charged = memoryview(bytearray(maps.n_counters * 16)).cast("Q")
    refunds = memoryview(bytearray(maps.n_counters * 16)).cast("Q")
    for k, sub in enumerate(subs):
        sid = k + 1
        allowance = [sub.get("allowance", [3 << 20] * 3)[b % 3] for b in range(len(tariffs[sub["tariff"]][1]))]
        e.add_subscriber(sid, sub["tariff"], sub["balance"], sub["credit"], allowance, sub["volume"])
        if sub["blocked"]:
            e.block(sid, sub["blocked"])
        for p, nbytes in sub["rated"]:  # a carry below one minor unit in the counters
            e.rate_volume(sid, p // 2, p % 2, nbytes, 1, T0)
        for p, (live, grant, done, refunded) in enumerate(sub["pairs"]):
            i = (sid * n_zones + p // 2) * 2 + p % 2
            maps.q[8 * i], maps.q[8 * i + 1] = live, grant
            charged[2 * i], refunds[2 * i] = done, refunded
    gw = SimpleNamespace(acct=SimpleNamespace(engine=e))
    keeper = GrantKeeper(gw, maps, lambda i: charged[2 * i] + refunds[2 * i], settled_views=(charged, refunds))
    keeper.masks = {t: [(b[0], b[1]) for b in buckets] for t, (_prices, buckets) in enumerate(tariffs)}
    for k, sub in enumerate(subs):
        if sub["busy"]:
            keeper.rate[keeper.index(k + 1, 0, 1)] = 1000.0
    keeper.refused = {1, 5}  # watched from before: kept or dropped as refresh would
    return e, maps, keeper


def outcome(e, maps, keeper):
    return bytes(maps.buf), keeper.refused, dict(keeper.stats), [e.subscriber(s) for s in e.subscribers()]


def one_by_one(world):
    e, maps, keeper = build(world)
    events, errors = [], {}
    for sid in e.subscribers():
        try:
            events += keeper.refresh(sid, T0)
        except ValueError as exc:  # a grant beyond 2**64 - 1: the maps refuse it
            errors[sid] = str(exc)
    return outcome(e, maps, keeper), events, errors


def in_bulk(world):
    e, maps, keeper = build(world)
    sids = e.subscribers()
    charged, refunds = keeper.settled_views
    counters = maps.counters()
    left, raises, reclaims = grants_mod.refresh_idle(e, counters, charged, refunds, sids, T0, maps.n_zones,
                                                     grants_mod.SLICE_MIN, grants_mod.RECLAIM_KEEP, keeper.refused,
                                                     keeper.rate)
    counters.release()
    keeper.stats["raises"] += raises
    keeper.stats["reclaims"] += reclaims
    events, errors = [], {}
    for sid in left:
        try:
            events += keeper.refresh(sid, T0)
        except ValueError as exc:
            errors[sid] = str(exc)
    return outcome(e, maps, keeper), events, errors, left


@given(world=worlds())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_bulk_equals_one_by_one(world):
    want, want_events, want_errors = one_by_one(world)
    got, events, errors, left = in_bulk(world)
    assert got == want, repr(world)
    assert events == want_events == []
    assert errors == want_errors
    _n, tariffs, _vz, subs = world
    for k, sub in enumerate(subs):  # what C leaves to Python: a busy pair
        if sub["busy"]:
            assert k + 1 in left


def test_the_cases_by_hand():
    """A blocked subscriber, a balance of exactly 0, a free zone, a priced one with a grant in force and
    one that was free: granted in C (nothing left to Python), as one by one."""
    world = (2, [([0, 0, 1000, 2000], []), ([0, 0, 0, 0], []), ([5, 5, 5, 5], [(1, 3, 0)])], 0b10, [
        {"tariff": 0, "balance": 10_000, "credit": 0, "volume": None, "blocked": 0, "rated": [], "busy": False,
         "pairs": [(0, 0, 0, 0)] * 4},  # fresh: free local, priced external
        {"tariff": 0, "balance": 0, "credit": 0, "volume": None, "blocked": 0, "rated": [], "busy": False,
         "pairs": [(0, 0, 0, 0)] * 4},  # a balance of exactly 0: nothing priced granted
        {"tariff": 0, "balance": 500, "credit": 100, "volume": None, "blocked": BLOCK_LIMIT, "rated": [],
         "busy": False, "pairs": [(7, 7, 7, 0)] * 4},  # blocked: granted all the same, watched
        {"tariff": 0, "balance": 10 ** 9, "credit": 0, "volume": 3 << 20, "blocked": 0, "rated": [],
         "busy": False, "pairs": [(0, 0, 0, 0), (0, 0, 0, 0), (100, GRANT_FREE, 50, 10), (900, 5 << 20, 400, 100)]},
        {"tariff": 1, "balance": 1, "credit": 0, "volume": None, "blocked": 0, "rated": [], "busy": False,
         "pairs": [(0, 5, 0, 0)] * 4},  # all free
        {"tariff": 2, "balance": 300, "credit": 0, "volume": None, "blocked": 0, "rated": [], "busy": False,
         "pairs": [(0, 0, 0, 0)] * 4},  # a free-volume bucket on the local zone, both ways
    ])
    want, _events, _errors = one_by_one(world)
    got, _events, _errors, left = in_bulk(world)
    assert left == []
    assert got == want
    buf, refused, stats, _states = got
    q = memoryview(buf).cast("Q")

    def grant(sid, z, d):
        return q[8 * ((sid * 2 + z) * 2 + d) + 1]

    assert [grant(1, 0, d) for d in (0, 1)] == [GRANT_FREE, GRANT_FREE]
    assert [grant(1, 1, d) for d in (0, 1)] == [1 << 20, 1 << 20]  # a slice each, well within the balance
    assert [grant(2, 1, d) for d in (0, 1)] == [999, 499]  # 0 EUR: what one minor unit less a carry of 0 buys
    assert 3 in refused and 1 not in refused and 5 not in refused
    assert grant(4, 1, 0) <= 50 + 10 + (3 << 20)  # the volume limit shares out
    assert stats["raises"] > 0


def test_an_engine_it_cannot_read_is_left_whole():
    e = ext.EnginePy(1, 1, default_zone=0)
    e.set_tariff(0, [1, 1])
    e.add_subscriber(1, 0, 100)
    maps = BufMaps(1)
    views = memoryview(bytearray(maps.n_counters * 16)).cast("Q")
    counters = maps.counters()
    assert grants_mod.refresh_idle(e, counters, views, views, [1], T0, 1, 1, 1, set(), {}) == ([1], 0, 0)
    counters.release()


def test_the_edges_of_need_and_reclaim():
    """Exactly ``RECLAIM_KEEP`` outstanding is not needy; a spare of exactly what the needy pairs want
    reclaims nothing; one less does."""
    keep, slice_ = grants_mod.RECLAIM_KEEP, grants_mod.SLICE_MIN
    # one zone at 1000 per PRICE_SCALE bytes: quote(n) = n // 1000
    held = 100_000  # outstanding on the upload: 100 committed; the download needs quote(SLICE_MIN) = 1048
    world = (1, [([1000, 1000], []), ([0, 0], []), ([0, 0], [])], 0, [
        {"tariff": 0, "balance": 500, "credit": 0, "volume": None, "blocked": 0, "rated": [], "busy": False,
         "pairs": [(0, keep, 0, 0), (0, 0, 0, 0)]},
        {"tariff": 0, "balance": 100 + 1048, "credit": 0, "volume": None, "blocked": 0, "rated": [],
         "busy": False, "pairs": [(0, held, 0, 0), (0, 0, 0, 0)]},
        {"tariff": 0, "balance": 100 + 1047, "credit": 0, "volume": None, "blocked": 0, "rated": [],
         "busy": False, "pairs": [(0, held, 0, 0), (0, 0, 0, 0)]},
    ])
    want, _events, _errors = one_by_one(world)
    got, _events, _errors, left = in_bulk(world)
    assert left == []
    assert got == want
    q = memoryview(got[0]).cast("Q")

    def grant(sid, d):
        return q[8 * (sid * 2 + d) + 1]

    assert grant(1, 0) == keep  # not needy: kept as it was
    assert (grant(2, 0), grant(2, 1)) == (held, slice_)  # the spare pays the slice: nothing reclaimed
    assert grant(3, 0) == keep  # one minor unit short: the idle upload is cut to what it keeps


def test_a_shared_bucket_belongs_to_the_first_of_the_cheapest():
    """Two pairs at the same price share a free-volume bucket: the first (upload) counts on it, the other
    gets what the money buys; as one by one."""
    world = (1, [([0, 0], []), ([1000, 1000], [(1, 3, 0)]), ([0, 0], [])], 0, [
        {"tariff": 1, "balance": 0, "credit": 0, "volume": None, "blocked": 0, "rated": [], "busy": False,
         "allowance": [2 << 20] * 3, "pairs": [(0, 0, 0, 0)] * 2},
    ])
    want, _events, _errors = one_by_one(world)
    got, _events, _errors, left = in_bulk(world)
    assert left == []
    assert got == want
    q = memoryview(got[0]).cast("Q")
    assert (q[8 * 2 + 1], q[8 * 3 + 1]) == (grants_mod.SLICE_MIN, 999)
