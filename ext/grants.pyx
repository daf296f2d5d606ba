# cython: language_level=3
"""The grant keeper's refresh of idle subscribers, in C, in bulk: a start's
(and a time-slot boundary's) grants for everyone.

``refresh_idle`` gives each subscriber the grants that
``GrantKeeper.refresh(sid, now)`` (gateway/daemon/grants.py) gives it, to the
byte, for the case a start is made of: no refusal to look at, no pair with a
recent rate. Those it cannot do so (a busy pair, a figure that would leave
the ranges reasoned about here, an engine that does not hold the subscriber)
it leaves untouched and returns, for the keeper's Python refresh. At a
million subscribers the Python refresh took some 30-50 us each: 50 s after
/healthz before everyone had a grant.

It is the keeper's rule (that module's docstring) written a second time, for
one case: change one and the other follows (tests/unit/test_grants_bulk.py
compares them, subscriber by subscriber, over tariffs with and without
buckets, balances, volume limits, grants in force, free and blocked
subscribers). For that case the refresh reduces to: the buckets each pair
counts on (``_views``: the cheapest pair now, first of equals, and every
pair for which drawing the bucket costs more than not); a free pair (nothing
it passes would cost: ``affordable_bytes`` of nothing is GRANT_FREE) gets
GRANT_FREE, committing what its tier buckets can cost; a priced pair whose
grant is GRANT_FREE (free before) is shrunk to what it used; every priced
pair with less than ``reclaim_keep`` outstanding is needy; if some are and
the spare (balance + credit less the cost of what is outstanding) cannot
raise them to ``slice_min``, the others are cut to ``reclaim_keep``
outstanding; then each needy pair, in order, gets an equal part of what is
left (of the volume left too, on the volume zones), up to ``slice_min``. The
quotes are the engine's (``quote_bytes``, ``affordable_bytes``) in 128-bit
integers.

The engine's figures are read under the subscriber's lock, once; the grants
are written with one atomic 64-bit store each, where they change. Called
with the gateway's ``engine_lock`` held (as ``refresh`` is).
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from libc.stdint cimport INT64_MAX, UINT64_MAX, int64_t, uint8_t, uint32_t, uint64_t

from ext.engine cimport TG_MAX_BUCKETS, EngineC, tg_sub, tg_tariff

from ext.constants import PRICE_SCALE as _PRICE_SCALE
from ext.errors import EngineError

cdef extern from "engine_atomic.h" nogil:
    void tg_lock(uint8_t *l)
    void tg_unlock(uint8_t *l)

cdef extern from *:
    """
    static inline void tg_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t tg_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    """
    void tg_store64(uint64_t *p, uint64_t v) nogil
    uint64_t tg_load64(uint64_t *p) nogil
    ctypedef unsigned long long u128 "unsigned __int128"
    ctypedef long long i128 "__int128"

cdef enum:
    MAX_PAIRS = 128  # 64 zones x 2 directions (Maps.load's limit)
    CARRY_MASK = (1 << 20) - 1  # the engine's tg_counter.packets_carry (ext/engine.pyx)
    COUNTER_WORDS = 8  # the maps' counter: used, grant, ... (ext/bpfmaps.pyx COUNTER_FIELDS)

cdef u128 SCALE = <u128> _PRICE_SCALE
cdef uint64_t UNIT = (<uint64_t> 1) << 32  # gateway/daemon/grants.py's: bytes quoted to rank pairs by price
cdef uint64_t BIG = (<uint64_t> 1) << 62  # ... and to price what a free grant can still cost (its tier buckets)
cdef i128 BUDGET_MAX = (<i128> 1) << 100  # budgets beyond this: the Python refresh (room * PRICE_SCALE in 128 bits)
GRANT_FREE = UINT64_MAX


cdef inline bint covers(const tg_tariff *t, int b, int p) noexcept nogil:
    """Bucket ``b`` of ``t`` covers pair ``p`` (zone p >> 1, direction p & 1)."""
    return (t.bucket_zones[b] >> (p >> 1)) & 1 and (t.bucket_dirs[b] >> (p & 1)) & 1


cdef inline i128 quote(uint64_t nbytes, int p, const tg_tariff *t, int64_t price, uint64_t carry,
                       const int64_t *view) noexcept nogil:
    """``EngineC.quote_bytes(..., allowance=view)``: the buckets of ``view`` first, in order, then the price.
    Below 2**127: every byte at a price below 2**63."""
    cdef u128 amount = 0
    cdef uint64_t n = nbytes, take
    cdef int b
    for b in range(t.n_buckets):
        if n and covers(t, b, p) and view[b] > 0:
            take = n if n < <uint64_t> view[b] else <uint64_t> view[b]
            n -= take
            amount += <u128> take * <u128> t.bucket_price[b]
    return <i128> ((amount + <u128> n * <u128> price + <u128> carry) / SCALE)


cdef inline uint64_t affordable(i128 budget, int p, const tg_tariff *t, int64_t price, uint64_t carry, bint vol,
                                int64_t volume_left, const int64_t *view) noexcept nogil:
    """``EngineC.affordable_bytes(..., budget, allowance=view)`` (budget below BUDGET_MAX)."""
    cdef u128 room, n = 0, cost
    cdef bint finite = False
    cdef int b
    cdef int64_t q
    if budget < 0:
        budget = 0
    room = <u128> (budget + 1) * SCALE - 1 - carry
    for b in range(t.n_buckets):
        if not (covers(t, b, p) and view[b] > 0):
            continue
        q = t.bucket_price[b]
        cost = <u128> view[b] * <u128> q
        if q == 0 or cost <= room:
            n += <u128> view[b]
            room -= cost
        else:
            n += room / <u128> q
            finite = True
            break
    if not finite:
        n = <u128> UINT64_MAX if price == 0 else n + room / <u128> price
    if n > UINT64_MAX:
        n = UINT64_MAX
    if vol:
        if volume_left <= 0:
            return 0
        if n > <u128> volume_left:
            n = <u128> volume_left
    return <uint64_t> n


cdef class _View:
    """A writable buffer of uint64, held for a call."""
    cdef Py_buffer buf
    cdef bint held
    cdef uint64_t *p
    cdef Py_ssize_t n

    def __cinit__(self, obj, Py_ssize_t words, str what):
        PyObject_GetBuffer(obj, &self.buf, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self.held = True
        if self.buf.len != words * 8:
            raise ValueError(f"{what}: {words * 8} bytes expected, not {self.buf.len}")
        self.p = <uint64_t *> self.buf.buf
        self.n = words

    cdef release(self):
        if self.held:
            PyBuffer_Release(&self.buf)
            self.held = False

    def __dealloc__(self):
        self.release()


def refresh_idle(engine, counters, charged, refunds, sids, int64_t now, int n_zones, uint64_t slice_min,
                 uint64_t reclaim_keep, set refused, dict rate):
    """``GrantKeeper.refresh(sid, now)`` for each of ``sids`` that it can do (see the module docstring):
    ``counters`` the maps' counters (``Maps.counters()``, 8 uint64 each), ``charged`` and ``refunds``
    the source's views (2 uint64 a counter each: what is settled of counter i is ``charged[2i] +
    refunds[2i]``), ``n_zones`` the maps'. ``refused``: the keeper's set, kept as ``refresh`` keeps it
    (a blocked subscriber added, any other taken out); ``rate``: the keeper's (counter index -> bytes per
    second), a subscriber with a pair in it is not idle. Returns ``(left, raises, reclaims)``: the ids left
    to the Python refresh, in order, and the keeper's two counts of what was done here."""
    cdef EngineC eng
    cdef _View cv, hv, rv
    cdef Py_ssize_t n_counters, k, j, n_priced, n_needy, n_vol
    cdef uint32_t sid, slot
    cdef tg_sub *s
    cdef const tg_tariff *t
    cdef int64_t balance, credit, volume_left
    cdef uint64_t live, total, want, new_out, vshare, g
    cdef i128 spare, vol_spare, vol_out, want_cost, budget, cost
    # per (zone, direction) pair (Cython wants each array declared alone)
    cdef int64_t price[MAX_PAIRS]
    cdef uint64_t carry[MAX_PAIRS]
    cdef uint64_t used[MAX_PAIRS]
    cdef uint64_t grant[MAX_PAIRS]
    cdef uint64_t old[MAX_PAIRS]
    cdef uint64_t outstanding[MAX_PAIRS]
    cdef i128 committed[MAX_PAIRS]
    cdef bint vol_on, blocked, ok
    cdef bint is_vol[MAX_PAIRS]
    cdef bint free_[MAX_PAIRS]
    cdef bint needy[MAX_PAIRS]
    cdef int64_t views[MAX_PAIRS][TG_MAX_BUCKETS]
    cdef int64_t allow[TG_MAX_BUCKETS]
    cdef int64_t zeros[TG_MAX_BUCKETS]
    cdef int64_t alone[TG_MAX_BUCKETS]
    cdef i128 unit[MAX_PAIRS]
    cdef int b, c, owner, n_buckets
    cdef int p, q, n_pairs = 2 * n_zones
    cdef uint64_t volume_zones
    cdef long raises = 0, reclaims = 0, n_raises, n_reclaims
    cdef uint64_t *e
    left = []
    if type(engine) is not EngineC or not 1 <= n_zones <= 64 or (<EngineC> engine).n_zones != n_zones:
        return list(sids), 0, 0
    eng = <EngineC> engine
    volume_zones = eng.volume_zones
    n_counters = len(counters)
    cv = _View(counters, n_counters * COUNTER_WORDS, "counters")
    hv = _View(charged, n_counters * 2, "charged")
    rv = _View(refunds, n_counters * 2, "refunds")
    try:
        slot = eng.tl_slots[eng._slot_index(now)]
        for sid_obj in sids:
            if (not 0 < sid_obj < eng.cap_subs
                    or <unsigned long long> sid_obj * n_pairs + n_pairs > <unsigned long long> n_counters):
                left.append(sid_obj)
                continue
            sid = sid_obj
            ok = True
            s = &eng.subs[sid]
            if not s.exists:
                left.append(sid_obj)
                continue
            if rate:  # a pair with a recent rate: its low-water mark and slice follow the rate (Python)
                for p in range(n_pairs):
                    if <unsigned long long> sid * n_pairs + p in rate:
                        ok = False
                        break
                if not ok:
                    left.append(sid_obj)
                    continue
            t = &eng.tariffs[s.tariff]
            n_buckets = t.n_buckets
            tg_lock(&s.lock)
            balance, credit, blocked = s.balance, s.credit, s.blocked != 0
            vol_on, volume_left = s.vol_on != 0, s.volume_left
            for p in range(n_pairs):
                carry[p] = eng.counters[<size_t> sid * n_pairs + p].packets_carry & CARRY_MASK
            for b in range(n_buckets):
                allow[b] = eng.allowance[<size_t> sid * eng.bucket_stride + b]
            tg_unlock(&s.lock)
            for p in range(n_pairs):
                price[p] = t.prices[p * eng.n_slots + slot]
                if price[p] < 0:
                    ok = False
            for b in range(n_buckets):
                zeros[b] = 0
                if t.bucket_price[b] < 0:
                    ok = False
            if not ok:
                left.append(sid_obj)
                continue
            # _views: the bucket bytes each pair's grant may count on (the owner, the cheapest pair now,
            # first of equals; and every pair for which drawing the bucket costs more than not)
            for p in range(n_pairs):
                for b in range(n_buckets):
                    views[p][b] = 0
                if n_buckets:
                    unit[p] = quote(UNIT, p, t, price[p], carry[p], zeros)
            for b in range(n_buckets):
                if allow[b] <= 0:
                    continue
                owner = -1
                for p in range(n_pairs):
                    if covers(t, b, p) and (owner < 0 or unit[p] < unit[owner]):
                        owner = p
                if owner < 0:
                    continue
                for c in range(n_buckets):
                    alone[c] = allow[b] if c == b else 0
                for p in range(n_pairs):
                    if covers(t, b, p) and (p == owner or quote(<uint64_t> allow[b], p, t, price[p], carry[p], alone)
                                            > quote(<uint64_t> allow[b], p, t, price[p], carry[p], zeros)):
                        views[p][b] = allow[b]
            # the pairs in refresh's order (zone, then direction: p = zone * 2 + direction = counter - first)
            n_priced = 0
            vol_out = 0
            spare = <i128> balance + credit
            for p in range(n_pairs):
                j = <Py_ssize_t> sid * n_pairs + p
                if hv.p[2 * j] > UINT64_MAX - rv.p[2 * j]:
                    ok = False
                    break
                used[p] = hv.p[2 * j] + rv.p[2 * j]
                e = cv.p + j * COUNTER_WORDS
                old[p] = grant[p] = tg_load64(&e[1])
                is_vol[p] = vol_on and (volume_zones >> (p >> 1)) & 1
                free_[p] = affordable(0, p, t, price[p], carry[p], is_vol[p], volume_left, views[p]) == UINT64_MAX
                needy[p] = False
                if free_[p]:
                    grant[p] = UINT64_MAX
                    spare -= quote(BIG, p, t, price[p], carry[p], views[p])  # what its tier buckets can cost
                    continue
                if grant[p] == UINT64_MAX:  # free before, priced now: shrink to what is used
                    live = tg_load64(&e[0])
                    grant[p] = used[p] if used[p] > live else live
                outstanding[p] = grant[p] - used[p] if grant[p] > used[p] else 0
                committed[p] = quote(outstanding[p], p, t, price[p], carry[p], views[p])
                spare -= committed[p]
                if is_vol[p]:
                    vol_out += outstanding[p]
                n_priced += 1
            if not ok:
                left.append(sid_obj)
                continue
            vol_spare = <i128> volume_left - vol_out
            n_needy = n_vol = 0
            for p in range(n_pairs):
                if not free_[p] and outstanding[p] < reclaim_keep:  # idle: low is reclaim_keep
                    needy[p] = True
                    n_needy += 1
                    if is_vol[p]:
                        n_vol += 1
            n_reclaims = n_raises = 0
            if n_needy and n_needy < n_priced:  # _reclaim
                want_cost = 0
                for p in range(n_pairs):
                    if needy[p]:
                        want_cost += quote(slice_min if slice_min > outstanding[p] else outstanding[p], p, t,
                                           price[p], carry[p], views[p]) - committed[p]
                if spare < want_cost:
                    for p in range(n_pairs):
                        if free_[p] or needy[p] or outstanding[p] <= reclaim_keep:
                            continue
                        e = cv.p + (<Py_ssize_t> sid * n_pairs + p) * COUNTER_WORDS
                        live = tg_load64(&e[0])
                        if used[p] > UINT64_MAX - reclaim_keep:
                            ok = False
                            break
                        g = used[p] + reclaim_keep
                        if live > g:
                            g = live
                        if g >= grant[p]:
                            continue
                        grant[p] = g
                        n_reclaims += 1
                        outstanding[p] = g - used[p]
                        cost = quote(outstanding[p], p, t, price[p], carry[p], views[p])
                        spare += committed[p] - cost
                        committed[p] = cost
            if not ok:
                left.append(sid_obj)
                continue
            k = 0
            for p in range(n_pairs):
                if not needy[p]:
                    continue
                budget = committed[p] + (spare if spare > 0 else 0) / (n_needy - k)
                k += 1
                if budget >= BUDGET_MAX:
                    ok = False
                    break
                total = affordable(budget, p, t, price[p], carry[p], is_vol[p], volume_left, views[p])
                want = slice_min if slice_min > outstanding[p] else outstanding[p]
                new_out = total if total < want else want
                if is_vol[p]:  # vol_on: a volume limit, shared among the needy pairs of the volume zones
                    vshare = <uint64_t> ((vol_spare if vol_spare > 0 else 0) / (n_vol if n_vol > 1 else 1))
                    n_vol -= 1
                    if <u128> outstanding[p] + vshare < <u128> new_out:
                        new_out = outstanding[p] + vshare
                    if new_out > outstanding[p]:
                        vol_spare -= new_out - outstanding[p]
                if new_out > outstanding[p]:
                    if used[p] > UINT64_MAX - new_out:  # set_grant would refuse it: the Python refresh says so
                        ok = False
                        break
                    grant[p] = used[p] + new_out
                    n_raises += 1
                    spare -= quote(new_out, p, t, price[p], carry[p], views[p]) - committed[p]
            if not ok:
                left.append(sid_obj)
                continue
            for p in range(n_pairs):
                if grant[p] != old[p]:
                    tg_store64(&(cv.p + (<Py_ssize_t> sid * n_pairs + p) * COUNTER_WORDS)[1], grant[p])
            raises += n_raises
            reclaims += n_reclaims
            if blocked:
                refused.add(sid_obj)
            else:
                refused.discard(sid_obj)
    finally:
        cv.release()
        hv.release()
        rv.release()
    return left, raises, reclaims
