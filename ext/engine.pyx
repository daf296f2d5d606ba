# cython: language_level=3
"""The compiled engine: ``EngineC``, per-packet accounting and enforcement.

Same interface and, by contract, same results as the pure-Python twin
``ext.engine_py.EnginePy`` (whose docstring states the semantics). Here the
per-packet loop runs without the GIL and without a Python object per packet:
addresses are looked up in stride-8 multibit tries straight from the packet
bytes, subscribers and counters live in dense C arrays indexed by subscriber
id, and each subscriber's rating step runs under its own one-byte spinlock so
several queue threads can share one engine without overspending.

Locking: ``process_c`` holds the read side of a pthread rwlock for a whole
batch; every control operation that changes tables or may move arrays holds
the write side.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT64_MAX, INT64_MIN, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memset

import ipaddress

from .constants import (BLOCK_LIMIT as _BLOCK_LIMIT, EV_BLOCK as _EV_BLOCK, EV_UNBLOCK as _EV_UNBLOCK,
                        MAX_SUBSCRIBER_ID, NF_ACCEPT as _NF_ACCEPT)
from .engine_py import (CounterRow, EngineStats, Event, SubscriberState, check_subscriber_id, compile_rules,
                        parse_network, validate_engine_args, validate_tariff, validate_timeline)
from .errors import EngineError

cdef extern from "engine_atomic.h" nogil:
    void tg_lock(uint8_t *l)
    void tg_unlock(uint8_t *l)
    void tg_add_u64(uint64_t *p, uint64_t v)
    uint32_t tg_fetch_add_u32(uint32_t *p, uint32_t v)
    uint8_t tg_load_u8(const uint8_t *p)

cdef extern from "<pthread.h>" nogil:
    int pthread_rwlock_init(pthread_rwlock_t *, void *)
    int pthread_rwlock_destroy(pthread_rwlock_t *)
    int pthread_rwlock_rdlock(pthread_rwlock_t *)
    int pthread_rwlock_wrlock(pthread_rwlock_t *)
    int pthread_rwlock_unlock(pthread_rwlock_t *)

# Kept in step with ext/constants.py (tests/unit/test_engine_contract.py checks).
cdef enum:
    NF_DROP = 0
    NF_ACCEPT = 1
    UPLOAD = 0
    DOWNLOAD = 1
    BLOCK_LIMIT = 1
    EV_BLOCK = 1
    EV_UNBLOCK = 2
    EV_WARN = 3
    IPV6_HOPOPTS = 0
    IPV6_ROUTING = 43
    IPV6_FRAGMENT = 44
    IPV6_AH = 51
    IPV6_DSTOPTS = 60

cdef enum:
    CHUNK = 32        # packets looked up together before rating (see process_c)
    KIND_DONE = 0     # verdict already written (malformed, unknown)
    KIND_RATE = 1

cdef extern from *:
    void __builtin_prefetch(const void *addr) nogil

cdef int64_t PRICE_SCALE = 1000000
cdef uint32_t MAX_WIRE_LEN = 1 << 20

CONSTANTS = {"NF_DROP": NF_DROP, "NF_ACCEPT": NF_ACCEPT, "UPLOAD": UPLOAD, "DOWNLOAD": DOWNLOAD,
             "BLOCK_LIMIT": BLOCK_LIMIT, "EV_BLOCK": EV_BLOCK, "EV_UNBLOCK": EV_UNBLOCK, "EV_WARN": EV_WARN,
             "PRICE_SCALE": PRICE_SCALE, "MAX_WIRE_LEN": MAX_WIRE_LEN, "MAX_BUCKETS": TG_MAX_BUCKETS,
             "MAX_WARN_LEVELS": TG_MAX_WARN, "MAX_EVENTS_PER_PACKET": TG_MAX_EVENTS_PER_PACKET}


# ---- the trie ---------------------------------------------------------------

cdef int trie_init(tg_trie *t, uint32_t depth) except -1:
    t.nodes = <tg_slot *> calloc(256, sizeof(tg_slot))
    if t.nodes == NULL:
        raise MemoryError()
    t.n_nodes = 1
    t.cap_nodes = 1
    t.depth = depth
    return 0


cdef void trie_free(tg_trie *t) noexcept:
    free(t.nodes)
    t.nodes = NULL
    t.n_nodes = t.cap_nodes = 0


cdef uint32_t trie_new_node(tg_trie *t, uint32_t vp) except 0:
    cdef uint32_t cap
    cdef tg_slot *grown
    if t.n_nodes == t.cap_nodes:
        cap = t.cap_nodes * 2
        grown = <tg_slot *> realloc(t.nodes, <size_t> cap * 256 * sizeof(tg_slot))
        if grown == NULL:
            raise MemoryError()
        t.nodes = grown
        t.cap_nodes = cap
    cdef uint32_t node = t.n_nodes
    cdef tg_slot *slots = t.nodes + <size_t> node * 256
    cdef int i
    for i in range(256):
        slots[i].child = 0
        slots[i].vp = vp
    t.n_nodes += 1
    return node


cdef void trie_push(tg_trie *t, uint32_t node, int s, uint32_t vp, int plen) noexcept:
    """Give slot ``s`` of ``node`` (and what hangs below it) the prefix
    ``vp`` wherever no longer prefix is there already."""
    cdef tg_slot *slot = t.nodes + <size_t> node * 256 + s
    cdef int i
    if <int> (slot.vp & 0xFF) <= plen:
        slot.vp = vp
    if slot.child:
        for i in range(256):
            trie_push(t, slot.child, i, vp, plen)


cdef void trie_pop(tg_trie *t, uint32_t node, int s, int plen, uint32_t repl) noexcept:
    """Undo trie_push: slots holding a prefix of length ``plen`` (in this
    range there is only the one being removed) get ``repl`` instead."""
    cdef tg_slot *slot = t.nodes + <size_t> node * 256 + s
    cdef int i
    if <int> (slot.vp & 0xFF) == plen:
        slot.vp = repl
    if slot.child:
        for i in range(256):
            trie_pop(t, slot.child, i, plen, repl)


cdef int trie_insert(tg_trie *t, const uint8_t *key, int plen, uint32_t value, bint remove, uint32_t repl) except -1:
    """Insert (or, with ``remove``, take out in favour of ``repl``) a prefix."""
    cdef uint32_t node = 0
    cdef int level = 0
    cdef int span, first, s
    cdef uint32_t vp = (value << 8) | <uint32_t> plen
    cdef tg_slot *slot
    cdef uint32_t child
    while True:
        if plen <= 8 * (level + 1):
            span = 8 * (level + 1) - plen
            first = key[level] & ~((1 << span) - 1) & 0xFF if plen > 8 * level else 0
            for s in range(first, first + (1 << span)):
                if remove:
                    trie_pop(t, node, s, plen, repl)
                else:
                    trie_push(t, node, s, vp, plen)
            return 0
        slot = t.nodes + <size_t> node * 256 + key[level]
        if slot.child == 0:
            if remove:
                return 0
            child = trie_new_node(t, slot.vp)  # may move t.nodes: re-take the slot
            slot = t.nodes + <size_t> node * 256 + key[level]
            slot.child = child
        node = slot.child
        level += 1


cdef inline uint32_t trie_lookup(const tg_trie *t, const uint8_t *key) noexcept nogil:
    """Value of the longest prefix containing ``key`` (0: none)."""
    cdef const tg_slot *slot
    cdef uint32_t node = 0
    cdef uint32_t level = 0
    while True:
        slot = t.nodes + <size_t> node * 256 + key[level]
        if slot.child == 0 or level + 1 == t.depth:
            return slot.vp >> 8
        node = slot.child
        level += 1


# ---- rules on prefixes -------------------------------------------------------

cdef void rules_free(tg_rules *r) noexcept:
    free(r.start); free(r.count); free(r.fallback); free(r.proto); free(r.port_lo); free(r.port_hi); free(r.zone)
    memset(r, 0, sizeof(tg_rules))


cdef inline bint rule_matches(const tg_rules *r, uint32_t k, uint8_t proto, bint has_ports, uint16_t port) noexcept nogil:
    if r.proto[k] and r.proto[k] != proto:
        return False
    if r.port_lo[k] == 0 and r.port_hi[k] == 65535:
        return True
    return has_ports and r.port_lo[k] <= port <= r.port_hi[k]


cdef inline int rules_find(const tg_rules *r, uint32_t group_plus1, uint8_t proto, bint has_ports,
                           uint16_t port) noexcept nogil:
    """Zone of the first matching rule from the group on, falling back to
    shorter prefixes; -1 when none matches."""
    cdef int32_t g = <int32_t> group_plus1 - 1
    cdef uint32_t k
    while g >= 0:
        for k in range(r.start[g], r.start[g] + r.count[g]):
            if rule_matches(r, k, proto, has_ports, port):
                return r.zone[k]
        g = r.fallback[g]
    return -1


def _key(int family, object net):
    return (<object> net).to_bytes(4 if family == 4 else 16, "big")


# The control plane's index of owned prefixes is a dict keyed by one int per
# prefix (network << 9 | length << 1 | is_v6): a third of the memory of
# (family, network, length) tuples at a million subscribers.
def _pack(int family, object net, int plen):
    return (net << 9) | (plen << 1) | (family == 6)


def _unpack(object packed):
    return (6 if packed & 1 else 4), packed >> 9, (packed >> 1) & 0xFF


# ---- packets -----------------------------------------------------------------

cdef struct tg_packet:
    const uint8_t *src
    const uint8_t *dst
    uint32_t length
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t v6
    uint8_t has_ports


cdef inline bint parse_packet(const uint8_t *p, uint32_t n, uint32_t wirelen, tg_packet *out) noexcept nogil:
    """The twin's ``parse_packet`` in C; False for a malformed packet."""
    cdef uint32_t ihl, total, length, l4, payload, hdrlen
    cdef uint8_t proto, nxt
    cdef bint first_fragment = True
    if n < 1 or wirelen > MAX_WIRE_LEN:
        return False
    cdef int version = p[0] >> 4
    if version == 4:
        if n < 20:
            return False
        ihl = (p[0] & 0x0F) * 4
        total = (<uint32_t> p[2] << 8) | p[3]
        if ihl < 20 or total < ihl or total > wirelen:
            return False
        length = total
        l4 = ihl
        first_fragment = (((<uint32_t> p[6] << 8) | p[7]) & 0x1FFF) == 0
        proto = p[9]
        out.src = p + 12
        out.dst = p + 16
        out.v6 = 0
    elif version == 6:
        if n < 40:
            return False
        payload = (<uint32_t> p[4] << 8) | p[5]
        length = wirelen if payload == 0 else 40 + payload
        if length > wirelen:
            return False
        proto = p[6]
        out.src = p + 8
        out.dst = p + 24
        out.v6 = 1
        l4 = 40
        while (proto == IPV6_HOPOPTS or proto == IPV6_ROUTING or proto == IPV6_DSTOPTS
               or proto == IPV6_FRAGMENT or proto == IPV6_AH):
            if l4 + 8 > n:
                break
            nxt = p[l4]
            if proto == IPV6_FRAGMENT:
                first_fragment = (((<uint32_t> p[l4 + 2] << 8) | p[l4 + 3]) & 0xFFF8) == 0
                hdrlen = 8
            elif proto == IPV6_AH:
                hdrlen = (<uint32_t> p[l4 + 1] + 2) * 4
            else:
                hdrlen = (<uint32_t> p[l4 + 1] + 1) * 8
            proto = nxt
            l4 += hdrlen
    else:
        return False
    if length == 0:
        length = wirelen
    out.length = length
    out.proto = proto
    out.has_ports = first_fragment and (proto == 6 or proto == 17 or proto == 132 or proto == 136) and l4 + 4 <= n
    if out.has_ports:
        out.sport = (<uint16_t> p[l4] << 8) | p[l4 + 1]
        out.dport = (<uint16_t> p[l4 + 2] << 8) | p[l4 + 3]
    else:
        out.sport = out.dport = 0
    return True


cdef list events_to_python(const tg_event *events, Py_ssize_t n):
    """Engine events as ``ext.Event`` tuples (after the nogil loop)."""
    return [Event(events[k].kind, events[k].subscriber, events[k].index, events[k].reason, events[k].balance)
            for k in range(n)]


# ---- the engine --------------------------------------------------------------

cdef class EngineC:
    """Per-packet accounting and enforcement; see ``ext/engine_py.py``."""

    implementation = "c"

    def __cinit__(self, *args, **kwargs):
        pthread_rwlock_init(&self.rwlock, NULL)
        trie_init(&self.owners4, 4); trie_init(&self.owners6, 16)
        trie_init(&self.zones4, 4); trie_init(&self.zones6, 16)
        trie_init(&self.allow4, 4); trie_init(&self.allow6, 16)
        self.tariffs = <tg_tariff *> calloc(65536, sizeof(tg_tariff))
        self.tl_starts = <int64_t *> calloc(1, sizeof(int64_t))
        self.tl_slots = <uint8_t *> calloc(1, sizeof(uint8_t))
        if self.tariffs == NULL or self.tl_starts == NULL or self.tl_slots == NULL:
            raise MemoryError()
        self.tl_starts[0] = INT64_MIN
        self.tl_len = 1

    def __init__(self, int n_zones, int n_slots=1, *, int default_zone=1, int malformed_verdict=_NF_ACCEPT,
                 int unknown_verdict=_NF_ACCEPT):
        validate_engine_args(n_zones, n_slots, default_zone, malformed_verdict, unknown_verdict)
        self.n_zones = n_zones
        self.n_slots = n_slots
        self.default_zone = default_zone
        self.malformed_verdict = malformed_verdict
        self.unknown_verdict = unknown_verdict
        self.owner_prefixes = {}
        self.tariff_buckets = {}
        self._grow(1024)

    def __dealloc__(self):
        cdef int i
        trie_free(&self.owners4); trie_free(&self.owners6)
        trie_free(&self.zones4); trie_free(&self.zones6)
        trie_free(&self.allow4); trie_free(&self.allow6)
        rules_free(&self.zone_rules); rules_free(&self.allow_rules)
        if self.tariffs != NULL:
            for i in range(65536):
                free(self.tariffs[i].prices)
            free(self.tariffs)
        free(self.subs); free(self.counters); free(self.allowance); free(self.dirty)
        free(self.tl_starts); free(self.tl_slots)
        pthread_rwlock_destroy(&self.rwlock)

    # ---- memory ----------------------------------------------------------

    cdef int _grow(self, uint32_t cap) except -1:
        """Make room for subscriber ids below ``cap`` (call under the write lock)."""
        if cap <= self.cap_subs:
            return 0
        cdef size_t per = <size_t> self.n_zones * 2
        cdef tg_sub *subs = <tg_sub *> realloc(self.subs, cap * sizeof(tg_sub))
        if subs == NULL:
            raise MemoryError()
        self.subs = subs
        cdef tg_counter *counters = <tg_counter *> realloc(self.counters, cap * per * sizeof(tg_counter))
        if counters == NULL:
            raise MemoryError()
        self.counters = counters
        cdef uint32_t *dirty = <uint32_t *> realloc(self.dirty, cap * sizeof(uint32_t))
        if dirty == NULL:
            raise MemoryError()
        self.dirty = dirty
        memset(self.subs + self.cap_subs, 0, (cap - self.cap_subs) * sizeof(tg_sub))
        memset(self.counters + self.cap_subs * per, 0, (cap - self.cap_subs) * per * sizeof(tg_counter))
        cdef int64_t *allowance
        if self.bucket_stride:
            allowance = <int64_t *> realloc(self.allowance, cap * self.bucket_stride * sizeof(int64_t))
            if allowance == NULL:
                raise MemoryError()
            self.allowance = allowance
            memset(self.allowance + self.cap_subs * self.bucket_stride, 0,
                   (cap - self.cap_subs) * self.bucket_stride * sizeof(int64_t))
        self.cap_subs = cap
        return 0

    cdef int _widen_buckets(self, int stride) except -1:
        """Room for ``stride`` allowance buckets per subscriber."""
        if stride <= self.bucket_stride:
            return 0
        cdef int64_t *grown = <int64_t *> calloc(<size_t> self.cap_subs * stride, sizeof(int64_t))
        if grown == NULL:
            raise MemoryError()
        cdef uint32_t sid
        cdef int b
        for sid in range(self.cap_subs):
            for b in range(self.bucket_stride):
                grown[sid * stride + b] = self.allowance[sid * self.bucket_stride + b]
        free(self.allowance)
        self.allowance = grown
        self.bucket_stride = stride
        return 0

    def memory_bytes(self):
        """Bytes the engine has allocated in C (tables, subscribers, counters)."""
        cdef size_t total = 0
        cdef int i
        cdef tg_trie *tries[6]
        tries[0] = &self.owners4; tries[1] = &self.owners6; tries[2] = &self.zones4
        tries[3] = &self.zones6; tries[4] = &self.allow4; tries[5] = &self.allow6
        for i in range(6):
            total += <size_t> tries[i].cap_nodes * 256 * sizeof(tg_slot)
        return total + self.cap_subs * self.bytes_per_subscriber()

    def bytes_per_subscriber(self):
        """The C state of one subscriber slot: record, dirty-list entry, a
        counter per zone and direction, its allowance buckets."""
        return (sizeof(tg_sub) + sizeof(uint32_t) + self.n_zones * 2 * sizeof(tg_counter)
                + self.bucket_stride * sizeof(int64_t))

    # ---- configuration ---------------------------------------------------

    cdef int _load_rules(self, object rules, object n_zones, tg_trie *t4, tg_trie *t6, tg_rules *r) except -1:
        groups = compile_rules(rules, n_zones)
        cdef uint32_t n_rules = sum(len(g[3]) for g in groups)
        cdef tg_rules fresh
        cdef tg_trie f4, f6
        memset(&fresh, 0, sizeof(tg_rules))
        cdef size_t ng = max(len(groups), 1), nr = max(n_rules, 1)
        fresh.start = <uint32_t *> calloc(ng, sizeof(uint32_t))
        fresh.count = <uint32_t *> calloc(ng, sizeof(uint32_t))
        fresh.fallback = <int32_t *> calloc(ng, sizeof(int32_t))
        fresh.proto = <uint8_t *> calloc(nr, sizeof(uint8_t))
        fresh.port_lo = <uint16_t *> calloc(nr, sizeof(uint16_t))
        fresh.port_hi = <uint16_t *> calloc(nr, sizeof(uint16_t))
        fresh.zone = <uint8_t *> calloc(nr, sizeof(uint8_t))
        fresh.n_groups = len(groups)
        trie_init(&f4, 4)
        trie_init(&f6, 16)
        cdef uint32_t k = 0
        cdef bytes key
        try:
            for g, (family, net, plen, group_rules, fallback) in enumerate(groups):
                fresh.start[g] = k
                fresh.count[g] = len(group_rules)
                fresh.fallback[g] = fallback
                for rule in group_rules:
                    fresh.proto[k] = rule.proto
                    fresh.port_lo[k] = rule.port_lo
                    fresh.port_hi[k] = rule.port_hi
                    fresh.zone[k] = rule.zone
                    k += 1
                key = _key(family, net) + bytes(16)
                trie_insert(&f4 if family == 4 else &f6, key, plen, g + 1, False, 0)
        except BaseException:
            rules_free(&fresh); trie_free(&f4); trie_free(&f6)
            raise
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        rules_free(r); trie_free(t4); trie_free(t6)
        r[0] = fresh
        t4[0] = f4
        t6[0] = f6
        pthread_rwlock_unlock(&self.rwlock)
        return 0

    def set_zones(self, rules):
        """Replace the zone map (atomically: on error the old one stays)."""
        self._load_rules(rules, self.n_zones, &self.zones4, &self.zones6, &self.zone_rules)

    def set_allowlist(self, rules):
        """Replace the allow-list for blocked subscribers (``zone`` is ignored)."""
        self._load_rules(rules, None, &self.allow4, &self.allow6, &self.allow_rules)

    def set_tariff(self, int tariff, prices, buckets=(), warn_levels=()):
        prices, buckets, warn_levels = validate_tariff(self.n_zones, self.n_slots, tariff, prices, buckets,
                                                       warn_levels)
        old = self.tariff_buckets.get(tariff)
        if old is not None and old != len(buckets):
            if any(self.subs[sid].exists and self.subs[sid].tariff == tariff for sid in range(self.cap_subs)):
                raise EngineError(f"tariff {tariff}: cannot change the number of buckets while subscribers use it")
        cdef int64_t *p = <int64_t *> calloc(len(prices), sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        for i, price in enumerate(prices):
            p[i] = price
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        try:
            self._widen_buckets(len(buckets))
        except BaseException:
            pthread_rwlock_unlock(&self.rwlock)
            free(p)
            raise
        cdef tg_tariff *t = &self.tariffs[tariff]
        free(t.prices)
        t.prices = p
        t.n_buckets = len(buckets)
        for b, (zones, dirs) in enumerate(buckets):
            t.bucket_zones[b] = zones
            t.bucket_dirs[b] = dirs
        t.n_warn = len(warn_levels)
        for w, level in enumerate(warn_levels):
            t.warn[w] = level
        t.defined = True
        pthread_rwlock_unlock(&self.rwlock)
        self.tariff_buckets[tariff] = len(buckets)

    def set_timeline(self, starts, slots):
        starts, slots = validate_timeline(self.n_slots, starts, slots)
        cdef size_t n = len(starts)
        cdef int64_t *s = <int64_t *> calloc(n, sizeof(int64_t))
        cdef uint8_t *k = <uint8_t *> calloc(n, sizeof(uint8_t))
        if s == NULL or k == NULL:
            free(s); free(k)
            raise MemoryError()
        for i in range(n):
            s[i] = starts[i]
            k[i] = slots[i]
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        free(self.tl_starts); free(self.tl_slots)
        self.tl_starts = s
        self.tl_slots = k
        self.tl_len = n
        pthread_rwlock_unlock(&self.rwlock)

    # ---- subscribers -------------------------------------------------------

    cdef tg_sub *_sub(self, sid) except NULL:
        if not isinstance(sid, int) or not 1 <= sid < self.cap_subs or not self.subs[<uint32_t> sid].exists:
            raise EngineError(f"unknown subscriber {sid}")
        return &self.subs[<uint32_t> sid]

    cdef list _check_allowance(self, int tariff, allowance):
        if not 0 <= tariff < 65536 or not self.tariffs[tariff].defined:
            raise EngineError(f"unknown tariff {tariff}")
        allowance = [int(a) for a in allowance]
        cdef int n = self.tariffs[tariff].n_buckets
        if len(allowance) > n or any(a < 0 for a in allowance):
            raise EngineError(f"allowance must be at most one non-negative volume per bucket of tariff {tariff}")
        return allowance + [0] * (n - len(allowance))

    cdef int _set_allowance(self, uint32_t sid, list allowance) except -1:
        cdef int b
        for b in range(self.bucket_stride):
            self.allowance[sid * self.bucket_stride + b] = allowance[b] if b < len(allowance) else 0
        return 0

    cdef int _levels_below(self, tg_sub *s) noexcept nogil:
        cdef const tg_tariff *t = &self.tariffs[s.tariff]
        cdef int w, n = 0
        for w in range(t.n_warn):
            if s.balance < t.warn[w]:
                n += 1
        return n

    def add_subscriber(self, sid, int tariff, balance, credit=0, allowance=()):
        check_subscriber_id(sid)
        if sid < self.cap_subs and self.subs[<uint32_t> sid].exists:
            raise EngineError(f"subscriber {sid} exists")
        if credit < 0:
            raise EngineError("credit must not be negative")
        allowance = self._check_allowance(tariff, allowance)
        cdef uint32_t cap = self.cap_subs
        while cap <= sid:
            cap *= 2
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        try:
            self._grow(min(cap, MAX_SUBSCRIBER_ID + 1))
            s = &self.subs[<uint32_t> sid]
            dirty = s.dirty  # it may still sit in the dirty list from a removed namesake
            memset(s, 0, sizeof(tg_sub))
            s.dirty = dirty
            memset(self.counters + <size_t> sid * self.n_zones * 2, 0, self.n_zones * 2 * sizeof(tg_counter))
            s.tariff = tariff
            s.balance = balance
            s.credit = credit
            s.exists = 1
            self._set_allowance(sid, allowance)
            s.warned = self._levels_below(s)
            if s.balance + s.credit <= 0:
                s.blocked |= BLOCK_LIMIT
                return [Event(_EV_BLOCK, sid, -1, _BLOCK_LIMIT, s.balance)]
            return []
        finally:
            pthread_rwlock_unlock(&self.rwlock)

    def remove_subscriber(self, sid):
        """Forget ``sid`` and its addresses; returns its undrained counters."""
        self._sub(sid)
        for packed, owner in list(self.owner_prefixes.items()):
            if owner == sid:
                self._remove_prefix(_unpack(packed))
        rows = self._take_counters(sid)
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        self.subs[<uint32_t> sid].exists = 0
        pthread_rwlock_unlock(&self.rwlock)
        return rows

    def set_subscriber(self, sid, *, tariff=None, credit=None, allowance=None):
        cdef tg_sub *s = self._sub(sid)
        new_tariff = s.tariff if tariff is None else tariff
        if allowance is None:
            allowance = self._allowance_of(sid) if new_tariff == s.tariff else ()
        allowance = self._check_allowance(new_tariff, allowance)
        if credit is not None and credit < 0:
            raise EngineError("credit must not be negative")
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        s.tariff = new_tariff
        self._set_allowance(sid, allowance)
        if credit is not None:
            s.credit = credit
        pthread_rwlock_unlock(&self.rwlock)
        return self._reevaluate(sid)

    cdef tuple _allowance_of(self, uint32_t sid):
        cdef int n = self.tariffs[self.subs[sid].tariff].n_buckets
        return tuple(self.allowance[sid * self.bucket_stride + b] for b in range(n))

    def add_address(self, sid, str network):
        self._sub(sid)
        family, net, plen = parse_network(network)
        owner = self.owner_prefixes.get(_pack(family, net, plen))
        if owner is not None:
            raise EngineError(f"{network} already belongs to subscriber {owner}")
        cdef bytes k = _key(family, net) + bytes(16)
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        try:
            trie_insert(&self.owners4 if family == 4 else &self.owners6, k, plen, sid, False, 0)
        finally:
            pthread_rwlock_unlock(&self.rwlock)
        self.owner_prefixes[_pack(family, net, plen)] = sid

    def remove_address(self, str network):
        key = parse_network(network)
        if _pack(*key) not in self.owner_prefixes:
            raise EngineError(f"{network} belongs to no subscriber")
        self._remove_prefix(key)

    cdef _remove_prefix(self, key):
        family, net, plen = key
        del self.owner_prefixes[_pack(family, net, plen)]
        # what covered this prefix before it was added: the longest shorter prefix still owned
        cdef uint32_t repl = 0
        bits = 32 if family == 4 else 128
        for shorter in range(plen - 1, -1, -1):
            masked = net >> (bits - shorter) << (bits - shorter) if shorter else 0
            owner = self.owner_prefixes.get(_pack(family, masked, shorter))
            if owner is not None:
                repl = (<uint32_t> owner << 8) | <uint32_t> shorter
                break
        cdef bytes k = _key(family, net) + bytes(16)
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        try:
            trie_insert(&self.owners4 if family == 4 else &self.owners6, k, plen, 0, True, repl)
        finally:
            pthread_rwlock_unlock(&self.rwlock)

    def adjust_balance(self, sid, delta):
        """Add ``delta`` (a payment, or a negative adjustment) to the balance."""
        cdef tg_sub *s = self._sub(sid)
        cdef int64_t d = delta
        tg_lock(&s.lock)
        s.balance += d
        tg_unlock(&s.lock)
        return self._reevaluate(sid)

    def block(self, sid, int reason):
        cdef tg_sub *s = self._sub(sid)
        tg_lock(&s.lock)
        cdef uint8_t was = s.blocked
        s.blocked |= reason
        cdef int64_t balance = s.balance
        tg_unlock(&s.lock)
        if was:  # already blocked (for this or another reason): nothing new to enforce
            return []
        return [Event(_EV_BLOCK, sid, -1, reason, balance)]

    def unblock(self, sid, int reason):
        cdef tg_sub *s = self._sub(sid)
        tg_lock(&s.lock)
        cdef uint8_t was = s.blocked
        s.blocked &= ~reason
        cdef uint8_t now = s.blocked
        cdef int64_t balance = s.balance
        tg_unlock(&s.lock)
        if not was & reason or now:
            return []
        return [Event(_EV_UNBLOCK, sid, -1, reason, balance)]

    cdef list _reevaluate(self, sid):
        cdef tg_sub *s = self._sub(sid)
        tg_lock(&s.lock)
        cdef int below = self._levels_below(s)
        if s.warned > below:
            s.warned = below
        cdef bint no_headroom = s.balance + s.credit <= 0
        tg_unlock(&s.lock)
        if no_headroom:
            return self.block(sid, _BLOCK_LIMIT)
        return self.unblock(sid, _BLOCK_LIMIT)

    # ---- queries -----------------------------------------------------------

    def subscriber(self, sid):
        cdef tg_sub *s = self._sub(sid)
        return SubscriberState(s.tariff, s.balance, s.credit, s.blocked, self._allowance_of(sid), s.warned,
                               s.dropped_packets, s.dropped_bytes)

    def subscribers(self):
        return [sid for sid in range(1, self.cap_subs) if self.subs[sid].exists]

    def lookup_subscriber(self, str address):
        addr = ipaddress.ip_address(address)
        cdef bytes key = addr.packed
        return trie_lookup(&self.owners4 if addr.version == 4 else &self.owners6, key)

    def lookup_zone(self, str address, int proto=0, port=None):
        addr = ipaddress.ip_address(address)
        cdef bytes key = addr.packed
        cdef uint32_t g = trie_lookup(&self.zones4 if addr.version == 4 else &self.zones6, key)
        cdef int zone = rules_find(&self.zone_rules, g, proto, port is not None, port or 0)
        return self.default_zone if zone < 0 else zone

    def stats(self):
        s = self.stats_
        return EngineStats(s.packets, s.bytes, s.malformed_packets, s.malformed_bytes, s.unknown_packets,
                           s.unknown_bytes, s.dropped_packets, s.dropped_bytes)

    cdef list _take_counters(self, uint32_t sid):
        cdef list rows = []
        cdef tg_counter *c
        cdef int z, d
        for z in range(self.n_zones):
            for d in range(2):
                c = &self.counters[(<size_t> sid * self.n_zones + z) * 2 + d]
                if c.bytes or c.packets or c.charged:
                    rows.append(CounterRow(sid, z, d, c.bytes, c.packets, c.charged))
                c.bytes = 0
                c.packets = 0
                c.charged = 0
        return rows

    def drain(self):
        """Counters since the last drain, sorted, and reset to zero."""
        cdef list rows = []
        cdef uint32_t i, sid
        with nogil:
            pthread_rwlock_wrlock(&self.rwlock)
        try:
            for i in range(self.n_dirty):
                sid = self.dirty[i]
                self.subs[sid].dirty = 0
                if self.subs[sid].exists:
                    rows += self._take_counters(sid)
            self.n_dirty = 0
        finally:
            pthread_rwlock_unlock(&self.rwlock)
        rows.sort()
        return rows

    # ---- the per-packet path -------------------------------------------------

    cdef bint _allowed(self, const uint8_t *addr, bint v6, uint8_t proto, bint has_ports,
                              uint16_t port) noexcept nogil:
        cdef uint32_t g = trie_lookup(&self.allow6 if v6 else &self.allow4, addr)
        return g != 0 and rules_find(&self.allow_rules, g, proto, has_ports, port) >= 0

    cdef int _zone(self, const uint8_t *addr, bint v6, uint8_t proto, bint has_ports,
                          uint16_t port) noexcept nogil:
        cdef uint32_t g = trie_lookup(&self.zones6 if v6 else &self.zones4, addr)
        cdef int zone = rules_find(&self.zone_rules, g, proto, has_ports, port) if g else -1
        return self.default_zone if zone < 0 else zone

    cdef void _mark(self, uint32_t sid, tg_sub *s) noexcept nogil:
        if not s.dirty:
            s.dirty = 1
            self.dirty[tg_fetch_add_u32(&self.n_dirty, 1)] = sid

    cdef int _drop(self, tg_sub *s, uint32_t length, tg_stats *st) noexcept nogil:
        s.dropped_packets += 1
        s.dropped_bytes += length
        st.dropped_packets += 1
        st.dropped_bytes += length
        return NF_DROP

    cdef int _rate(self, uint32_t sid, int zone, int direction, uint32_t length, int slot, int64_t index,
                          bint allowed, tg_event *events, Py_ssize_t *n_events, tg_stats *st) noexcept nogil:
        """Rate one side of a packet under the subscriber's lock; returns its verdict."""
        cdef tg_sub *s = &self.subs[sid]
        cdef tg_counter *c = &self.counters[(<size_t> sid * self.n_zones + zone) * 2 + direction]
        cdef const tg_tariff *t
        cdef int64_t remaining = length, take, cost, amount
        cdef int64_t drawn[TG_MAX_BUCKETS]
        cdef int64_t *allow
        cdef int b, verdict = NF_ACCEPT
        cdef tg_event *ev
        tg_lock(&s.lock)
        if s.blocked:
            if not allowed:
                verdict = self._drop(s, length, st)
            else:
                c.bytes += length
                c.packets += 1
                self._mark(sid, s)
            tg_unlock(&s.lock)
            return verdict
        t = &self.tariffs[s.tariff]
        allow = self.allowance + <size_t> sid * self.bucket_stride
        for b in range(t.n_buckets):
            drawn[b] = 0
        for b in range(t.n_buckets):
            if remaining == 0:
                break
            if (t.bucket_zones[b] >> zone) & 1 and (t.bucket_dirs[b] >> direction) & 1 and allow[b] > 0:
                take = remaining if remaining < allow[b] else allow[b]
                allow[b] -= take
                remaining -= take
                drawn[b] = take
        amount = remaining * t.prices[(zone * 2 + direction) * self.n_slots + slot] + c.carry
        cost = amount // PRICE_SCALE
        if cost > 0 and s.balance - cost < -s.credit:
            for b in range(t.n_buckets):
                allow[b] += drawn[b]
            s.blocked |= BLOCK_LIMIT
            ev = &events[n_events[0]]
            n_events[0] += 1
            ev.kind = EV_BLOCK
            ev.subscriber = sid
            ev.index = index
            ev.reason = BLOCK_LIMIT
            ev.balance = s.balance
            verdict = self._drop(s, length, st)
            tg_unlock(&s.lock)
            return verdict
        c.carry = <uint32_t> (amount % PRICE_SCALE)
        s.balance -= cost
        c.bytes += length
        c.packets += 1
        c.charged += cost
        self._mark(sid, s)
        if cost > 0:
            while s.warned < t.n_warn and s.balance < t.warn[s.warned]:
                ev = &events[n_events[0]]
                n_events[0] += 1
                ev.kind = EV_WARN
                ev.subscriber = sid
                ev.index = index
                ev.reason = s.warned
                ev.balance = s.balance
                s.warned += 1
        tg_unlock(&s.lock)
        return verdict

    cdef Py_ssize_t process_c(self, tg_batch *b, tg_event *events) noexcept nogil:
        """Account every packet of ``b`` and write its verdict; returns the
        number of events written to ``events`` (room for
        TG_MAX_EVENTS_PER_PACKET per packet).

        Packets go in chunks of CHUNK: first every packet of the chunk is
        parsed and looked up (tries only, no locks) and its subscriber's
        record and counter prefetched, so the cache misses of a chunk overlap;
        then the chunk is rated in order under the subscribers' locks, whose
        locked instructions would otherwise serialise those misses.
        """
        cdef tg_stats st
        cdef tg_packet pk[CHUNK]
        cdef uint32_t src_sid[CHUNK]
        cdef uint32_t dst_sid[CHUNK]
        cdef int up_zone[CHUNK]
        cdef int down_zone[CHUNK]
        cdef uint8_t kind[CHUNK]     # KIND_*
        cdef int slot[CHUNK]
        cdef Py_ssize_t n_events = 0
        cdef uint32_t i, j, base, end, wirelen, sid
        cdef int verdict, cur_slot = 0
        cdef bint dst_allowed, allowed
        cdef int64_t ts, lo_ts = 1, hi_ts = 0  # cached timeline interval [lo_ts, hi_ts)
        cdef uint32_t lo, hi, mid
        cdef const tg_trie *owners
        memset(&st, 0, sizeof(tg_stats))
        pthread_rwlock_rdlock(&self.rwlock)
        base = 0
        while base < b.n:
            end = base + CHUNK if base + CHUNK < b.n else b.n
            # phase 1: parse, look up, prefetch
            for i in range(base, end):
                j = i - base
                wirelen = b.wirelen[i]
                st.packets += 1
                st.bytes += wirelen
                if not parse_packet(b.buf + b.offset[i], b.caplen[i], wirelen, &pk[j]):
                    st.malformed_packets += 1
                    st.malformed_bytes += wirelen
                    b.verdict[i] = self.malformed_verdict
                    kind[j] = KIND_DONE
                    continue
                owners = &self.owners6 if pk[j].v6 else &self.owners4
                src_sid[j] = trie_lookup(owners, pk[j].src)
                dst_sid[j] = trie_lookup(owners, pk[j].dst)
                if src_sid[j] == 0 and dst_sid[j] == 0:
                    st.unknown_packets += 1
                    st.unknown_bytes += pk[j].length
                    b.verdict[i] = self.unknown_verdict
                    kind[j] = KIND_DONE
                    continue
                kind[j] = KIND_RATE
                if src_sid[j]:
                    up_zone[j] = self._zone(pk[j].dst, pk[j].v6, pk[j].proto, pk[j].has_ports, pk[j].dport)
                    sid = src_sid[j]
                    __builtin_prefetch(&self.subs[sid])
                    __builtin_prefetch(&self.counters[(<size_t> sid * self.n_zones + up_zone[j]) * 2 + UPLOAD])
                    __builtin_prefetch(self.allowance + <size_t> sid * self.bucket_stride)
                if dst_sid[j]:
                    down_zone[j] = self._zone(pk[j].src, pk[j].v6, pk[j].proto, pk[j].has_ports, pk[j].sport)
                    sid = dst_sid[j]
                    __builtin_prefetch(&self.subs[sid])
                    __builtin_prefetch(&self.counters[(<size_t> sid * self.n_zones + down_zone[j]) * 2 + DOWNLOAD])
                    __builtin_prefetch(self.allowance + <size_t> sid * self.bucket_stride)
                ts = b.ts[i]
                if not (lo_ts <= ts < hi_ts):
                    # rightmost start <= ts; before the first start, the first slot
                    lo = 0
                    hi = self.tl_len
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if self.tl_starts[mid] <= ts:
                            lo = mid + 1
                        else:
                            hi = mid
                    lo = lo - 1 if lo > 0 else 0
                    cur_slot = self.tl_slots[lo]
                    lo_ts = self.tl_starts[lo] if ts >= self.tl_starts[lo] else INT64_MIN
                    hi_ts = self.tl_starts[lo + 1] if lo + 1 < self.tl_len else INT64_MAX
                    if ts < self.tl_starts[0]:
                        hi_ts = self.tl_starts[0]
                slot[j] = cur_slot
            # phase 2: rate, in packet order
            for i in range(base, end):
                j = i - base
                if kind[j] != KIND_RATE:
                    continue
                verdict = NF_ACCEPT
                dst_allowed = False
                if dst_sid[j]:
                    if tg_load_u8(&self.subs[dst_sid[j]].blocked):
                        dst_allowed = self._allowed(pk[j].src, pk[j].v6, pk[j].proto, pk[j].has_ports, pk[j].sport)
                        if not dst_allowed:
                            tg_lock(&self.subs[dst_sid[j]].lock)
                            verdict = self._drop(&self.subs[dst_sid[j]], pk[j].length, &st)
                            tg_unlock(&self.subs[dst_sid[j]].lock)
                if verdict == NF_ACCEPT and src_sid[j]:
                    allowed = False
                    if tg_load_u8(&self.subs[src_sid[j]].blocked):
                        allowed = self._allowed(pk[j].dst, pk[j].v6, pk[j].proto, pk[j].has_ports, pk[j].dport)
                    verdict = self._rate(src_sid[j], up_zone[j], UPLOAD, pk[j].length, slot[j], i, allowed, events,
                                         &n_events, &st)
                if verdict == NF_ACCEPT and dst_sid[j]:
                    verdict = self._rate(dst_sid[j], down_zone[j], DOWNLOAD, pk[j].length, slot[j], i, dst_allowed,
                                         events, &n_events, &st)
                b.verdict[i] = verdict
            base = end
        pthread_rwlock_unlock(&self.rwlock)
        tg_add_u64(&self.stats_.packets, st.packets)
        tg_add_u64(&self.stats_.bytes, st.bytes)
        tg_add_u64(&self.stats_.malformed_packets, st.malformed_packets)
        tg_add_u64(&self.stats_.malformed_bytes, st.malformed_bytes)
        tg_add_u64(&self.stats_.unknown_packets, st.unknown_packets)
        tg_add_u64(&self.stats_.unknown_bytes, st.unknown_bytes)
        tg_add_u64(&self.stats_.dropped_packets, st.dropped_packets)
        tg_add_u64(&self.stats_.dropped_bytes, st.dropped_bytes)
        return n_events

    def process(self, batch):
        """Account every packet of ``batch``, write its verdicts, return events."""
        cdef uint32_t n = batch.n
        if n == 0:
            return []
        cdef const unsigned char[::1] buf = batch.buf
        cdef const uint32_t[::1] offset = batch.offset
        cdef const uint32_t[::1] caplen = batch.caplen
        cdef const uint32_t[::1] wirelen = batch.wirelen
        cdef const int64_t[::1] ts = batch.ts
        cdef uint8_t[::1] verdict = batch.verdict
        if n > offset.shape[0] or n > caplen.shape[0] or n > wirelen.shape[0] or n > ts.shape[0] \
                or n > verdict.shape[0]:
            raise EngineError("batch.n exceeds the batch arrays")
        cdef uint32_t i
        for i in range(n):  # a bad offset must not read outside the buffer
            if <size_t> offset[i] + caplen[i] > <size_t> buf.shape[0]:
                raise EngineError(f"packet {i} lies outside the batch buffer")
        cdef tg_batch b
        b.buf = &buf[0]
        b.offset = &offset[0]
        b.caplen = &caplen[0]
        b.wirelen = &wirelen[0]
        b.ts = &ts[0]
        b.verdict = &verdict[0]
        b.n = n
        cdef tg_event *events = <tg_event *> PyMem_Malloc(<size_t> n * TG_MAX_EVENTS_PER_PACKET * sizeof(tg_event))
        if events == NULL:
            raise MemoryError()
        cdef Py_ssize_t n_events
        try:
            with nogil:
                n_events = self.process_c(&b, events)
            return events_to_python(events, n_events)
        finally:
            PyMem_Free(events)
