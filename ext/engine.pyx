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
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX, INT64_MIN, UINT64_MAX, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

import ipaddress
from array import array

from .constants import (BLOCK_LIMIT as _BLOCK_LIMIT, BLOCK_VOLUME as _BLOCK_VOLUME, EV_BLOCK as _EV_BLOCK,
                        EV_UNBLOCK as _EV_UNBLOCK, MAX_SUBSCRIBER_ID, NF_ACCEPT as _NF_ACCEPT)
from .engine_py import (CounterRow, EngineStats, Event, SubscriberState, check_grant_allowance, check_reason,
                        check_bulk_lengths, check_subscriber_id, check_volume,
                        check_volume_left, compile_rules, parse_network, validate_engine_args, validate_tariff,
                        validate_timeline)
from .errors import EngineError

cdef extern from "engine_atomic.h" nogil:
    void tg_lock(uint8_t *l)
    void tg_unlock(uint8_t *l)
    void tg_add_u64(uint64_t *p, uint64_t v)
    uint32_t tg_fetch_add_u32(uint32_t *p, uint32_t v)
    uint8_t tg_load_u8(const uint8_t *p)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlockattr_init(pthread_rwlockattr_t *)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t *)
    # glibc; Python.h has defined _GNU_SOURCE before pthread.h is read
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *, int)
    int PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP
    int pthread_rwlock_init(pthread_rwlock_t *, const pthread_rwlockattr_t *)
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
    BLOCK_VOLUME = 4
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
    bint __builtin_add_overflow(int64_t a, int64_t b, int64_t *res) nogil
    bint __builtin_sub_overflow(int64_t a, int64_t b, int64_t *res) nogil
    # rate_volume multiplies up to 2**64 - 1 bytes by a price below 2**40:
    # 104 bits, which GCC and Clang compute exactly in one unsigned __int128
    ctypedef unsigned long long tg_u128 "unsigned __int128"

cdef enum:
    CARRY_BITS = 20                     # tg_counter.packets_carry: packets << 20 | carry
    CARRY_MASK = (1 << CARRY_BITS) - 1  # PRICE_SCALE (10**6) < 2**20
    DRAIN_CHUNK = 4096                  # subscribers drained per read-lock hold

cdef int64_t PRICE_SCALE = 1000000
cdef uint64_t MAX_COUNTER_PACKETS = (<uint64_t> 1 << (64 - CARRY_BITS)) - 1  # ext/constants.py
cdef uint32_t MAX_WIRE_LEN = 1 << 20

CONSTANTS = {"NF_DROP": NF_DROP, "NF_ACCEPT": NF_ACCEPT, "UPLOAD": UPLOAD, "DOWNLOAD": DOWNLOAD,
             "BLOCK_LIMIT": BLOCK_LIMIT, "BLOCK_VOLUME": BLOCK_VOLUME, "EV_BLOCK": EV_BLOCK, "EV_UNBLOCK": EV_UNBLOCK, "EV_WARN": EV_WARN,
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


cdef inline void emit(tg_event *events, Py_ssize_t *n_events, int kind, uint32_t sid, int64_t index, int reason,
                      int64_t balance) noexcept nogil:
    """Append one event; the caller's buffer has room for TG_MAX_EVENTS_PER_PACKET a packet."""
    cdef tg_event *ev = &events[n_events[0]]
    n_events[0] += 1
    ev.kind = kind
    ev.subscriber = sid
    ev.index = index
    ev.reason = reason
    ev.balance = balance


cdef int64_t as_int64(value, str what) except? -1:
    """``value`` as an int64, or EngineError: the C state holds money and
    volumes in 64 bits, where the twin has Python's unbounded ints."""
    value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise EngineError(f"{what} {value} does not fit in 64 bits")
    return value


cdef inline bint in_debt(const tg_sub *s) noexcept nogil:
    """balance < -credit: a debt beyond the credit, what blocks outside a
    packet (credit is 0..INT64_MAX, so -credit cannot overflow). At exactly
    -credit it is not blocked: free traffic passes, the first priced packet
    breaches."""
    return s.balance < -s.credit


cdef inline void count_volume(uint64_t volume_zones, tg_sub *s, int zone, uint32_t length) noexcept nogil:
    """Bytes counted in a volume zone come off the volume left (under the subscriber's lock)."""
    if s.vol_on and (volume_zones >> zone) & 1:
        s.volume_left -= length


cdef inline bint breaches(const tg_sub *s, int64_t cost) noexcept nogil:
    """balance - cost < -credit, i.e. balance + credit < cost, overflow-safe."""
    cdef int64_t sum_
    if __builtin_add_overflow(s.balance, s.credit, &sum_):
        return False
    return sum_ < cost


cdef inline void wrlock(EngineC e) noexcept:
    """Take the write side of the engine's rwlock, letting the GIL go while
    waiting (a queue thread holding the read side never needs the GIL)."""
    with nogil:
        pthread_rwlock_wrlock(&e.rwlock)


def _key(int family, object net):
    return (<object> net).to_bytes(4 if family == 4 else 16, "big")


# ---- the index of owned prefixes (tg_owners, see engine.pxd) ---------------------

cdef inline void key_words(const uint8_t *k, bint v6, uint64_t *hi, uint64_t *lo) noexcept nogil:
    """A trie key (network bytes, big-endian) as the index's two words."""
    cdef int i
    hi[0] = 0
    lo[0] = 0
    if not v6:
        lo[0] = <uint64_t> k[0] << 24 | <uint64_t> k[1] << 16 | <uint64_t> k[2] << 8 | <uint64_t> k[3]
        return
    for i in range(8):
        hi[0] = hi[0] << 8 | k[i]
        lo[0] = lo[0] << 8 | k[8 + i]


cdef inline void words_key(uint64_t hi, uint64_t lo, bint v6, uint8_t *k) noexcept nogil:
    """The index's words as a trie key (32 bytes, zero-padded)."""
    cdef int i
    memset(k, 0, 32)
    if not v6:
        for i in range(4):
            k[i] = (lo >> (24 - 8 * i)) & 0xFF
        return
    for i in range(8):
        k[i] = (hi >> (56 - 8 * i)) & 0xFF
        k[8 + i] = (lo >> (56 - 8 * i)) & 0xFF


cdef inline void mask_words(uint64_t *hi, uint64_t *lo, int plen, bint v6) noexcept nogil:
    """The network's first ``plen`` bits kept, the rest cleared (no shift by 64: undefined in C)."""
    if plen == 0:
        hi[0] = lo[0] = 0
    elif not v6:
        lo[0] = (lo[0] >> (32 - plen) << (32 - plen)) & <uint64_t> 0xFFFFFFFF
    elif plen <= 64:
        hi[0] = hi[0] >> (64 - plen) << (64 - plen)
        lo[0] = 0
    else:
        lo[0] = lo[0] >> (128 - plen) << (128 - plen)


cdef inline size_t owner_hash(uint64_t hi, uint64_t lo, int plen, bint v6) noexcept nogil:
    cdef uint64_t h = hi * <uint64_t> 0x9E3779B97F4A7C15 ^ lo * <uint64_t> 0xC2B2AE3D27D4EB4F ^ \
        (<uint64_t> plen << 1 | v6) * <uint64_t> 0x165667B19E3779F9
    h ^= h >> 31
    h *= <uint64_t> 0xD6E8FEB86659FD93
    h ^= h >> 32
    return <size_t> h


cdef inline tg_owner *owner_slot(const tg_owners *t, uint64_t hi, uint64_t lo, int plen, bint v6) noexcept nogil:
    """The slot holding the prefix, or the empty one where it would go."""
    cdef size_t mask = t.cap - 1
    cdef size_t i = owner_hash(hi, lo, plen, v6) & mask
    cdef tg_owner *s
    while True:
        s = &t.slots[i]
        if s.sid == 0 or (s.lo == lo and s.hi == hi and s.plen == plen and s.v6 == v6):
            return s
        i = (i + 1) & mask


cdef int owners_init(tg_owners *t, size_t cap) except -1:
    t.slots = <tg_owner *> calloc(cap, sizeof(tg_owner))
    if t.slots == NULL:
        raise MemoryError()
    t.cap = cap
    t.n = 0
    return 0


cdef int owner_put(tg_owners *t, uint64_t hi, uint64_t lo, int plen, bint v6, uint32_t sid) except -1:
    """Record (or re-own) a prefix; the table doubles before it is half full."""
    cdef tg_owners grown
    cdef size_t i
    cdef tg_owner *s
    if (t.n + 1) * 2 > t.cap:
        owners_init(&grown, t.cap * 2)
        for i in range(t.cap):
            if t.slots[i].sid:
                s = owner_slot(&grown, t.slots[i].hi, t.slots[i].lo, t.slots[i].plen, t.slots[i].v6)
                s[0] = t.slots[i]
        grown.n = t.n
        free(t.slots)
        t[0] = grown
    s = owner_slot(t, hi, lo, plen, v6)
    if s.sid == 0:
        t.n += 1
    s.hi, s.lo, s.plen, s.v6, s.sid = hi, lo, plen, v6, sid
    return 0


cdef tg_owner *grow_owners(tg_owner *a, Py_ssize_t used, Py_ssize_t *cap) except NULL:
    """``a`` (``cap`` entries, ``used`` of them taken) with room for one more: doubled when full."""
    cdef tg_owner *grown
    if used < cap[0]:
        return a
    grown = <tg_owner *> realloc(a, 2 * cap[0] * sizeof(tg_owner))
    if grown == NULL:
        raise MemoryError()  # (``a`` is still the caller's, and freed by it)
    cap[0] *= 2
    return grown


cdef void owner_del(tg_owners *t, uint64_t hi, uint64_t lo, int plen, bint v6) noexcept nogil:
    """Take a prefix out, moving back the entries after it that probed past its slot (no tombstones)."""
    cdef size_t mask = t.cap - 1
    cdef tg_owner *s = owner_slot(t, hi, lo, plen, v6)
    if s.sid == 0:
        return
    cdef size_t i = s - t.slots, j = i, home
    while True:
        j = (j + 1) & mask
        if t.slots[j].sid == 0:
            break
        home = owner_hash(t.slots[j].hi, t.slots[j].lo, t.slots[j].plen, t.slots[j].v6) & mask
        # the entry at j stays if its home lies cyclically in (i, j]; else it moves into the hole at i
        if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
            continue
        t.slots[i] = t.slots[j]
        i = j
    t.slots[i].sid = 0
    t.n -= 1


cdef int network_words(str network, uint8_t *k, uint64_t *hi, uint64_t *lo, int *plen, bint *v6) except -1:
    """A network's text parsed (C for canonical text, else ``parse_network`` and its error): its trie
    key in ``k`` (32 bytes) and its index words."""
    cdef int family = 0
    if not fast_network(network, k, &family, plen):
        family, net, plen[0] = parse_network(network)
        slow = _key(family, net)
        memset(k, 0, 32)
        memcpy(k, <const char *> slow, len(slow))
    v6[0] = family == 6
    key_words(k, v6[0], hi, lo)
    return 0


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, uint32_t size)

cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_INET
        AF_INET6


cdef int fast_network(str text, uint8_t *key, int *family, int *plen) except -1:
    """``ext/netaddr.py``'s fast path in C: 1 and the 16-byte key (v4 in its first 4), family and
    prefix length of a network in canonical text with no host bits set; 0 for anything else (the
    Python ``parse_network`` decides it, with its error). The same libc inet_pton and inet_ntop
    as Python's ``socket`` module, so the same texts pass."""
    cdef Py_ssize_t n
    cdef const char *p
    try:
        p = PyUnicode_AsUTF8AndSize(text, &n)  # an ASCII str's own bytes, no copy
    except UnicodeEncodeError:  # a lone surrogate: no network's text; parse_network refuses it, as the twin does
        return 0
    return fast_network_utf8(p, n, key, family, plen)


cdef int fast_network_utf8(const char *p, Py_ssize_t n, uint8_t *key, int *family, int *plen) noexcept:
    """:func:`fast_network` of a text's UTF-8 bytes (``n`` of them at ``p``; a piece of a longer text:
    ``add_networks_texts``)."""
    cdef Py_ssize_t slash = -1, i
    cdef char addr[64]
    cdef char back[64]
    cdef int length = 0, bits, af
    for i in range(n):
        if <uint8_t> p[i] >= 128:  # not ASCII: not the canonical text
            return 0
    for i in range(n):
        if p[i] == 47:  # "/"
            slash = i
            break
    if slash < 1 or slash >= 63 or n - slash - 1 < 1 or n - slash - 1 > 3:
        return 0
    if p[slash + 1] == 48 and n - slash - 1 > 1:  # a leading zero: not the canonical text
        return 0
    for i in range(slash + 1, n):
        if not 48 <= p[i] <= 57:
            return 0
        length = length * 10 + (p[i] - 48)
    af = AF_INET
    for i in range(slash):
        if p[i] == 58:  # ":"
            af = AF_INET6
        elif p[i] == 0:
            return 0
    if af == AF_INET6:
        for i in range(slash):
            if p[i] == 46:  # "." in IPv6 text: a mapped address ipaddress prints otherwise
                return 0
    bits = 128 if af == AF_INET6 else 32
    if length > bits:
        return 0
    memset(addr, 0, 64)
    for i in range(slash):
        addr[i] = p[i]
    memset(key, 0, 16)
    if inet_pton(af, addr, key) != 1:
        return 0
    # IPv4 text inet_pton takes is its canonical text already (four decimal octets up to 255, no
    # leading zero: glibc's inet_pton4, as POSIX has it), so only IPv6's is printed back to compare
    # (a sprintf an IPv4 network: most of its parse, 0.3 s of a million subscribers' start)
    if af == AF_INET6:
        if inet_ntop(af, key, back, 64) == NULL:
            return 0
        for i in range(slash + 1):  # the same text back (its NUL where the text has "/")
            if back[i] != (addr[i] if i < slash else 0):
                return 0
    for i in range(length, bits):  # host bits
        if key[i >> 3] & (0x80 >> (i & 7)):
            return 0
    family[0] = 6 if af == AF_INET6 else 4
    plen[0] = length
    return 1


# ---- packets -----------------------------------------------------------------

cdef inline bint parse_packet(const uint8_t *p, uint32_t n, uint32_t wirelen, bint aggregate,
                              tg_packet *out) noexcept nogil:
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
        if ihl < 20 or total < ihl or (total > wirelen and not aggregate):
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
        if length > wirelen and not aggregate:
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
    if length == 0 or aggregate:
        length = wirelen
    out.length = length
    out.aggregate = aggregate
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
        # Writers first: several queue threads keep the read side busy almost
        # all the time, and a control operation must not starve behind them.
        cdef pthread_rwlockattr_t attr
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.rwlock, &attr)
        pthread_rwlockattr_destroy(&attr)
        trie_init(&self.owners4, 4); trie_init(&self.owners6, 16)
        owners_init(&self.owned, 1024)
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
                 int unknown_verdict=_NF_ACCEPT, volume_zones=None):
        self.volume_zones = validate_engine_args(n_zones, n_slots, default_zone, malformed_verdict, unknown_verdict,
                                                 volume_zones)
        self.n_zones = n_zones
        self.n_slots = n_slots
        self.default_zone = default_zone
        self.malformed_verdict = malformed_verdict
        self.unknown_verdict = unknown_verdict
        self._grow(1024)

    def __dealloc__(self):
        cdef int i
        trie_free(&self.owners4); trie_free(&self.owners6)
        free(self.owned.slots)
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
    #
    # Every control operation that changes tables or may move arrays runs
    # under the write side of the rwlock, validation included, so that two
    # Python threads driving the control plane cannot interleave between a
    # check and the change it guards (the GIL is released while waiting for
    # the lock). adjust_balance/block/unblock touch one subscriber record and
    # need only its spinlock.

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
        f4.nodes = f6.nodes = NULL
        cdef uint32_t k = 0
        cdef bytes key
        try:
            if (fresh.start == NULL or fresh.count == NULL or fresh.fallback == NULL or fresh.proto == NULL
                    or fresh.port_lo == NULL or fresh.port_hi == NULL or fresh.zone == NULL):
                raise MemoryError()
            trie_init(&f4, 4)
            trie_init(&f6, 16)
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
        # the tables are built apart; the swap is all the write lock covers
        wrlock(self)
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

    def set_tariff(self, tariff, prices, buckets=(), warn_levels=()):
        """Define or redefine a tariff; see ``EnginePy.set_tariff``."""
        prices, buckets, warn_levels = validate_tariff(self.n_zones, self.n_slots, tariff, prices, buckets,
                                                       warn_levels)
        for level in warn_levels:
            as_int64(level, "warning level")
        cdef int tid = tariff
        cdef int64_t *p = <int64_t *> calloc(len(prices), sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        for i, price in enumerate(prices):
            p[i] = price
        cdef tg_tariff *t = &self.tariffs[tid]
        cdef uint32_t sid
        cdef bint used = False
        wrlock(self)
        try:
            if t.defined and t.n_buckets != len(buckets):
                for sid in range(1, self.cap_subs):
                    if self.subs[sid].exists and self.subs[sid].tariff == tid:
                        used = True
                        break
                if used:
                    raise EngineError(f"tariff {tid}: cannot change the number of buckets while subscribers use it")
            self._widen_buckets(len(buckets))
        except BaseException:
            pthread_rwlock_unlock(&self.rwlock)
            free(p)
            raise
        free(t.prices)
        t.prices = p
        t.n_buckets = len(buckets)
        for b, (zones, dirs, price) in enumerate(buckets):
            t.bucket_zones[b] = zones
            t.bucket_dirs[b] = dirs
            t.bucket_price[b] = price
        t.n_warn = len(warn_levels)
        for w, level in enumerate(warn_levels):
            t.warn[w] = level
        t.defined = True
        pthread_rwlock_unlock(&self.rwlock)

    def set_timeline(self, starts, slots):
        """Time slots; see ``EnginePy.set_timeline``."""
        starts, slots = validate_timeline(self.n_slots, starts, slots)
        cdef size_t n = len(starts)
        for start in starts:
            as_int64(start, "timeline start")
        cdef int64_t *s = <int64_t *> calloc(n, sizeof(int64_t))
        cdef uint8_t *k = <uint8_t *> calloc(n, sizeof(uint8_t))
        if s == NULL or k == NULL:
            free(s); free(k)
            raise MemoryError()
        for i in range(n):
            s[i] = starts[i]
            k[i] = slots[i]
        wrlock(self)
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
        for a in allowance:
            as_int64(a, "allowance")
        return allowance + [0] * (n - len(allowance))

    cdef int _set_allowance(self, uint32_t sid, list allowance) except -1:
        cdef int b
        cdef int64_t *allow = self.allowance + <size_t> sid * self.bucket_stride
        for b in range(self.bucket_stride):
            allow[b] = allowance[b] if b < len(allowance) else 0
        return 0

    cdef int _levels_below(self, tg_sub *s) noexcept nogil:
        cdef const tg_tariff *t = &self.tariffs[s.tariff]
        cdef int w, n = 0
        for w in range(t.n_warn):
            if s.balance < t.warn[w]:
                n += 1
        return n

    cdef int _put_subscriber(self, uint32_t id_, int tariff, int64_t bal, int64_t cred, list allowance,
                             bint vol_on, int64_t left) except -1:
        """A checked subscriber into its slot (under the write lock, the arrays grown to hold ``id_``)."""
        cdef tg_sub *s = &self.subs[id_]
        cdef uint8_t dirty = s.dirty  # it may still sit in the dirty list from a removed namesake
        memset(s, 0, sizeof(tg_sub))
        s.dirty = dirty
        memset(self.counters + <size_t> id_ * self.n_zones * 2, 0, self.n_zones * 2 * sizeof(tg_counter))
        s.tariff = <uint16_t> tariff
        s.balance = bal
        s.credit = cred
        self._set_allowance(id_, allowance)
        s.warned = self._levels_below(s)
        s.vol_on = vol_on
        s.volume_left = left
        if in_debt(s):
            s.blocked |= BLOCK_LIMIT
        if s.vol_on and s.volume_left < 0:
            s.blocked |= BLOCK_VOLUME
        s.exists = 1
        return 0

    cdef int _grow_to(self, uint32_t id_) except -1:
        cdef uint32_t cap = self.cap_subs
        while cap <= id_:
            cap *= 2
        self._grow(min(cap, MAX_SUBSCRIBER_ID + 1))
        return 0

    def add_subscriber(self, sid, tariff, balance, credit=0, allowance=(), volume_left=None):
        """Add a subscriber (no addresses yet); a block event if it is in debt
        beyond its credit or past its volume limit (see EnginePy)."""
        check_subscriber_id(sid)
        cdef int64_t bal = as_int64(balance, "balance"), cred = as_int64(credit, "credit")
        left = check_volume_left(volume_left)
        cdef uint8_t blocked_bits = 0
        cdef uint32_t id_ = sid
        wrlock(self)
        try:
            if id_ < self.cap_subs and self.subs[id_].exists:
                raise EngineError(f"subscriber {sid} exists")
            if cred < 0:
                raise EngineError("credit must not be negative")
            if not isinstance(tariff, int) or not 0 <= tariff < 65536:
                raise EngineError(f"unknown tariff {tariff}")
            allowance = self._check_allowance(tariff, allowance)
            self._grow_to(id_)
            self._put_subscriber(id_, tariff, bal, cred, allowance, left is not None, left if left is not None else 0)
            blocked_bits = self.subs[id_].blocked
        finally:
            pthread_rwlock_unlock(&self.rwlock)
        if blocked_bits:  # one event, naming the first reason (as block() would)
            return [Event(_EV_BLOCK, sid, -1, blocked_bits & -blocked_bits, bal)]
        return []

    def add_subscribers(self, const int64_t[:] ids, const int64_t[:] tariffs, const int64_t[:] balances,
                        const int64_t[:] credits, allowances, volume_left):
        """``add_subscriber`` for many at once, all or nothing (see EnginePy): every one is checked
        before the first is added, under one write lock."""
        check_bulk_lengths(ids, tariffs, balances, credits, allowances, volume_left)
        cdef Py_ssize_t n = ids.shape[0], i
        cdef int64_t sid, tariff, max_id = 0
        checked = {}  # (tariff, id of an allowance) -> (the allowance, padded): a start shares one per tariff
        padded, lefts, seen = [None] * n, [None] * n, set()
        for i in range(n):
            sid, tariff = ids[i], tariffs[i]
            try:
                check_subscriber_id(sid)
                if (sid < self.cap_subs and self.subs[sid].exists) or sid in seen:
                    raise EngineError(f"subscriber {sid} exists")
                seen.add(sid)
                if credits[i] < 0:
                    raise EngineError("credit must not be negative")
                if not 0 <= tariff < 65536:
                    raise EngineError(f"unknown tariff {tariff}")
                allowance = allowances[i]
                key = (tariff, id(allowance))
                hit = checked.get(key)
                if hit is None:
                    hit = checked[key] = (allowance, self._check_allowance(tariff, allowance))
                padded[i] = hit[1]
                lefts[i] = check_volume_left(volume_left[i])
            except EngineError as exc:
                exc.index = i
                raise
            max_id = max(max_id, sid)
        events = []
        cdef tg_sub *s
        wrlock(self)
        try:
            if n:
                self._grow_to(<uint32_t> max_id)
            for i in range(n):
                left = lefts[i]
                self._put_subscriber(<uint32_t> ids[i], <int> tariffs[i], balances[i], credits[i], padded[i],
                                     left is not None, left if left is not None else 0)
                s = &self.subs[<uint32_t> ids[i]]
                if s.blocked:
                    events.append(Event(_EV_BLOCK, ids[i], -1, s.blocked & -s.blocked, balances[i]))
        finally:
            pthread_rwlock_unlock(&self.rwlock)
        return events

    def remove_subscriber(self, sid):
        """Forget ``sid`` and its addresses; returns its undrained counters."""
        cdef list rows, owned = []
        cdef size_t i
        cdef tg_owner *o
        wrlock(self)
        try:
            self._sub(sid)
            for i in range(self.owned.cap):  # (found first: taking one out moves others)
                o = &self.owned.slots[i]
                if o.sid == <uint32_t> sid:
                    owned.append((o.hi, o.lo, o.plen, o.v6))
            for hi, lo, plen, v6 in owned:
                self._remove_prefix_locked(hi, lo, plen, v6)
            rows = self._take_counters(sid)
            self.subs[<uint32_t> sid].exists = 0
        finally:
            pthread_rwlock_unlock(&self.rwlock)
        return rows

    def set_subscriber(self, sid, *, tariff=None, credit=None, allowance=None):
        """Change tariff, credit limit or allowance; re-evaluates the limit."""
        cdef tg_sub *s
        wrlock(self)
        try:
            s = self._sub(sid)
            new_tariff = s.tariff if tariff is None else tariff
            if not isinstance(new_tariff, int) or not 0 <= new_tariff < 65536:
                raise EngineError(f"unknown tariff {new_tariff}")
            if allowance is None:
                allowance = self._allowance_of(sid) if new_tariff == s.tariff else ()
            allowance = self._check_allowance(new_tariff, allowance)
            if credit is not None:
                credit = as_int64(credit, "credit")
                if credit < 0:
                    raise EngineError("credit must not be negative")
            tg_lock(&s.lock)
            s.tariff = <uint16_t> new_tariff
            self._set_allowance(sid, allowance)
            if credit is not None:
                s.credit = credit
            tg_unlock(&s.lock)
        finally:
            pthread_rwlock_unlock(&self.rwlock)
        return self._reevaluate(sid)

    cdef tuple _allowance_of(self, uint32_t sid):
        cdef int n = self.tariffs[self.subs[sid].tariff].n_buckets
        cdef int64_t *allow = self.allowance + <size_t> sid * self.bucket_stride
        return tuple([allow[b] for b in range(n)])

    def add_address(self, sid, str network):
        """Give ``network`` (a CIDR prefix) to ``sid``; longest prefix wins."""
        if not isinstance(sid, int) or not 1 <= sid < 1 << 32:
            self._sub(sid)  # its error, not the array's (out of range: no array read without the lock)
        self.add_addresses(array("q", [sid]), [network])

    def add_addresses(self, const int64_t[:] sids, networks):
        """``add_address(sids[i], networks[i])`` for each i, all or nothing (see EnginePy), under one
        write lock; canonical network text is parsed here in C (``fast_network``), anything else
        as ``add_address`` parses it."""
        check_bulk_lengths(sids, networks)
        cdef Py_ssize_t n = sids.shape[0], i = 0, j
        cdef uint8_t k[32]
        cdef uint64_t hi, lo
        cdef int plen = 0
        cdef bint v6 = False
        cdef uint32_t owner
        cdef tg_owner *added = <tg_owner *> calloc(n if n else 1, sizeof(tg_owner))  # to undo them
        if added == NULL:
            raise MemoryError()
        wrlock(self)
        try:
            for i in range(n):
                network = networks[i]
                if type(network) is not str:
                    raise EngineError(f"bad network {network!r}: not text")
                if not (1 <= sids[i] < self.cap_subs and self.subs[<uint32_t> sids[i]].exists):
                    self._sub(sids[i])  # its error (before the network's, as the twin checks)
                network_words(network, k, &hi, &lo, &plen, &v6)
                owner = owner_slot(&self.owned, hi, lo, plen, v6).sid
                if owner:
                    raise EngineError(f"{network} already belongs to subscriber {owner}")
                trie_insert(&self.owners6 if v6 else &self.owners4, k, plen, <uint32_t> sids[i], False, 0)
                owner_put(&self.owned, hi, lo, plen, v6, <uint32_t> sids[i])
                added[i].hi, added[i].lo, added[i].plen, added[i].v6 = hi, lo, plen, v6
        except BaseException as exc:
            for j in range(i - 1, -1, -1):  # the engine as it was: the ones before it out again
                self._remove_prefix_locked(added[j].hi, added[j].lo, added[j].plen, added[j].v6)
            if isinstance(exc, EngineError):
                exc.index = i
            raise
        finally:
            pthread_rwlock_unlock(&self.rwlock)
            free(added)

    def add_networks_texts(self, const int64_t[:] sids, texts):
        """Subscriber ``sids[i]`` gets every network of ``texts[i]``, its networks joined by single spaces
        ("" for none: a start's row, ``Ledger.subscriber_rows``), all or nothing (see EnginePy), under one
        write lock: the text walked here in C, each canonical network parsed in place (no str, list or
        tuple made for it: a million subscribers' 1.8M networks), anything else as ``add_address``
        parses it. The first refused leaves the engine as it was; its EngineError's ``index`` is i."""
        check_bulk_lengths(sids, texts)
        cdef Py_ssize_t n = sids.shape[0], i = 0, j, size = 0, start, end, done = 0, cap = 2 * n + 16
        cdef const char *p
        cdef uint32_t sid
        cdef tg_owner *added = <tg_owner *> malloc(cap * sizeof(tg_owner))  # to undo them
        if added == NULL:
            raise MemoryError()
        wrlock(self)
        try:
            for i in range(n):
                text = texts[i]
                if type(text) is not str:
                    raise EngineError(f"bad networks {text!r}: not text")
                if not (1 <= sids[i] < self.cap_subs and self.subs[<uint32_t> sids[i]].exists):
                    self._sub(sids[i])  # its error (before the text's, as the twin checks)
                sid = <uint32_t> sids[i]
                try:
                    p = PyUnicode_AsUTF8AndSize(text, &size)  # an ASCII str's own bytes, no copy
                except UnicodeEncodeError:  # a lone surrogate: no network's text; its pieces as str, refused
                    for piece in text.split(" "):
                        added = grow_owners(added, done, &cap)
                        self._own_network(NULL, 0, piece, text, sid, &added[done])
                        done += 1
                    continue
                start = 0
                while size:  # each piece up to the next space or the end; "" has none
                    end = start
                    while end < size and p[end] != 32:  # " "
                        end += 1
                    added = grow_owners(added, done, &cap)
                    self._own_network(p + start, end - start, None, text, sid, &added[done])
                    done += 1
                    if end == size:
                        break
                    start = end + 1
        except BaseException as exc:
            for j in range(done - 1, -1, -1):  # the engine as it was: the ones before it out again
                self._remove_prefix_locked(added[j].hi, added[j].lo, added[j].plen, added[j].v6)
            if isinstance(exc, EngineError):
                exc.index = i
            raise
        finally:
            pthread_rwlock_unlock(&self.rwlock)
            free(added)

    cdef int _own_network(self, const char *p, Py_ssize_t n, str piece, str text, uint32_t sid,
                          tg_owner *out) except -1:
        """One network of ``text`` given to ``sid``, under the write lock: its UTF-8 (``n`` bytes at ``p``)
        or else ``piece`` parsed (:func:`fast_network_utf8`, else as ``add_address`` parses it), refused
        if empty or owned already (by another subscriber, or given before in this text or call), then
        in the trie and the index, and noted in ``out`` (to undo)."""
        cdef uint8_t k[32]
        cdef uint64_t hi, lo
        cdef int plen = 0, family = 0
        cdef bint v6 = False
        cdef uint32_t owner
        if (n == 0) if piece is None else not piece:
            raise EngineError(f"bad networks {text!r}: an empty network (one space between networks, "
                              f"none before the first or after the last)")
        if piece is None and fast_network_utf8(p, n, k, &family, &plen):
            v6 = family == 6
            key_words(k, v6, &hi, &lo)
        else:
            if piece is None:
                piece = PyUnicode_DecodeUTF8(p, n, NULL)
            network_words(piece, k, &hi, &lo, &plen, &v6)
        owner = owner_slot(&self.owned, hi, lo, plen, v6).sid
        if owner:
            if piece is None:
                piece = PyUnicode_DecodeUTF8(p, n, NULL)
            raise EngineError(f"{piece} already belongs to subscriber {owner}")
        trie_insert(&self.owners6 if v6 else &self.owners4, k, plen, sid, False, 0)
        owner_put(&self.owned, hi, lo, plen, v6, sid)
        out.hi, out.lo, out.plen, out.v6 = hi, lo, plen, v6
        return 0

    def remove_address(self, str network):
        """Take ``network`` away from its subscriber."""
        cdef uint8_t k[32]
        cdef uint64_t hi, lo
        cdef int plen = 0
        cdef bint v6 = False
        network_words(network, k, &hi, &lo, &plen, &v6)
        wrlock(self)
        try:
            if owner_slot(&self.owned, hi, lo, plen, v6).sid == 0:
                raise EngineError(f"{network} belongs to no subscriber")
            self._remove_prefix_locked(hi, lo, plen, v6)
        finally:
            pthread_rwlock_unlock(&self.rwlock)

    cdef int _remove_prefix_locked(self, uint64_t hi, uint64_t lo, int plen, bint v6) except -1:
        """Take a prefix out of the owners' trie (under the write lock): its
        slots go back to the longest shorter prefix still owned, which the
        control plane's index knows without walking the trie."""
        cdef uint32_t repl = 0, owner
        cdef uint64_t mhi, mlo
        cdef int shorter
        cdef uint8_t k[32]
        for shorter in range(plen - 1, -1, -1):
            mhi, mlo = hi, lo
            mask_words(&mhi, &mlo, shorter, v6)
            owner = owner_slot(&self.owned, mhi, mlo, shorter, v6).sid
            if owner:
                repl = (owner << 8) | <uint32_t> shorter
                break
        words_key(hi, lo, v6, k)
        trie_insert(&self.owners6 if v6 else &self.owners4, k, plen, 0, True, repl)
        owner_del(&self.owned, hi, lo, plen, v6)
        return 0

    def adjust_balance(self, sid, delta):
        """Add ``delta`` (a payment, or a negative adjustment) to the balance."""
        cdef int64_t d = as_int64(delta, "delta"), result
        cdef tg_sub *s = self._sub(sid)
        cdef bint overflow
        tg_lock(&s.lock)
        overflow = __builtin_add_overflow(s.balance, d, &result)
        if not overflow:
            s.balance = result
        tg_unlock(&s.lock)
        if overflow:
            raise EngineError(f"balance of subscriber {sid} would leave the 64-bit range")
        return self._reevaluate(sid)

    def block(self, sid, reason):
        """Block for ``reason`` (a BLOCK_* bit); an event if it was not blocked at all."""
        check_reason(reason)
        cdef uint8_t bits = reason
        cdef tg_sub *s = self._sub(sid)
        tg_lock(&s.lock)
        cdef uint8_t was = s.blocked
        s.blocked |= bits
        cdef int64_t balance = s.balance
        tg_unlock(&s.lock)
        if was:  # already blocked (for this or another reason): nothing new to enforce
            return []
        return [Event(_EV_BLOCK, sid, -1, reason, balance)]

    def unblock(self, sid, reason):
        """Lift ``reason``; an event when no reason is left."""
        check_reason(reason)
        cdef uint8_t bits = reason
        cdef tg_sub *s = self._sub(sid)
        tg_lock(&s.lock)
        cdef uint8_t was = s.blocked
        s.blocked &= ~bits
        cdef uint8_t now = s.blocked
        cdef int64_t balance = s.balance
        tg_unlock(&s.lock)
        if not was & bits or now:
            return []
        return [Event(_EV_UNBLOCK, sid, -1, reason, balance)]

    cdef list _reevaluate(self, uint32_t sid):
        """Re-arm warnings and set or lift BLOCK_LIMIT from the headroom, in
        one step under the subscriber's lock (a queue thread may be rating it)."""
        cdef tg_sub *s = &self.subs[sid]
        cdef int kind = 0
        tg_lock(&s.lock)
        cdef int below = self._levels_below(s)
        if s.warned > below:
            s.warned = below
        cdef uint8_t was = s.blocked
        if in_debt(s):
            s.blocked |= BLOCK_LIMIT
            if not was:
                kind = EV_BLOCK
        else:
            s.blocked &= ~BLOCK_LIMIT
            if was == BLOCK_LIMIT:
                kind = EV_UNBLOCK
        cdef int64_t balance = s.balance
        tg_unlock(&s.lock)
        return [Event(kind, sid, -1, _BLOCK_LIMIT, balance)] if kind else []

    def set_volume(self, sid, volume_left):
        """Bytes of the volume zones ``sid`` may still pass (None: no limit);
        see ``EnginePy.set_volume``."""
        left = check_volume_left(volume_left)
        cdef tg_sub *s = self._sub(sid)
        tg_lock(&s.lock)
        s.vol_on = left is not None
        s.volume_left = left if left is not None else 0
        tg_unlock(&s.lock)
        if left is not None and left < 0:
            return self.block(sid, _BLOCK_VOLUME)
        return self.unblock(sid, _BLOCK_VOLUME)

    # ---- queries -----------------------------------------------------------

    def subscriber(self, sid):
        """The subscriber's state, read in one step under its lock."""
        cdef tg_sub *s = self._sub(sid)
        cdef tg_sub copy
        cdef int64_t allow[TG_MAX_BUCKETS]
        cdef int64_t *src = self.allowance + <size_t> (<uint32_t> sid) * self.bucket_stride
        cdef int b, n
        tg_lock(&s.lock)
        copy = s[0]
        n = self.tariffs[copy.tariff].n_buckets
        for b in range(n):
            allow[b] = src[b]
        tg_unlock(&s.lock)
        return SubscriberState(copy.tariff, copy.balance, copy.credit, copy.blocked,
                               tuple([allow[b] for b in range(n)]), copy.warned, copy.dropped_packets,
                               copy.dropped_bytes, copy.rated_bytes, copy.volume_left if copy.vol_on else None)

    def subscribers(self):
        """Ids of all subscribers, ascending."""
        cdef list out = []
        cdef uint32_t sid
        for sid in range(1, self.cap_subs):
            if self.subs[sid].exists:
                out.append(sid)
        return out

    def blocked_subscribers(self):
        """Ids of the blocked subscribers, ascending (a start mirrors them in bulk: the eBPF maps' flags; a
        ``subscriber`` call each was a second of a start at a million subscribers, for a few blocked)."""
        cdef list out = []
        cdef uint32_t sid
        for sid in range(1, self.cap_subs):
            if self.subs[sid].exists and self.subs[sid].blocked:
                out.append(sid)
        return out

    def owner(self, str network):
        """The subscriber that owns exactly ``network`` (a prefix it was given, not one around it), 0 for
        none."""
        cdef uint8_t k[32]
        cdef uint64_t hi, lo
        cdef int plen = 0
        cdef bint v6 = False
        network_words(network, k, &hi, &lo, &plen, &v6)
        return owner_slot(&self.owned, hi, lo, plen, v6).sid

    def lookup_subscriber(self, str address):
        """The subscriber owning ``address`` (longest prefix), 0 for none."""
        addr = ipaddress.ip_address(address)
        cdef bytes key = addr.packed
        return trie_lookup(&self.owners4 if addr.version == 4 else &self.owners6, key)

    def lookup_zone(self, str address, int proto=0, port=None):
        """The zone of a remote ``address`` for ``proto``/``port``."""
        addr = ipaddress.ip_address(address)
        cdef bytes key = addr.packed
        cdef uint32_t g = trie_lookup(&self.zones4 if addr.version == 4 else &self.zones6, key)
        cdef int zone = rules_find(&self.zone_rules, g, proto, port is not None, port or 0)
        return self.default_zone if zone < 0 else zone

    def stats(self):
        """Engine-wide packet and byte counts since the engine was made."""
        s = self.stats_
        return EngineStats(s.packets, s.bytes, s.malformed_packets, s.malformed_bytes, s.unknown_packets,
                           s.unknown_bytes, s.dropped_packets, s.dropped_bytes, s.over_limit_bytes)

    cdef list _take_counters(self, uint32_t sid):
        """Rows of ``sid``'s non-zero counters, which are reset (the carry
        stays). Under the write lock, or the read lock and the subscriber's."""
        cdef list rows = []
        cdef tg_counter *c = self.counters + <size_t> sid * self.n_zones * 2
        cdef int k
        cdef uint64_t packets
        for k in range(self.n_zones * 2):
            packets = c[k].packets_carry >> CARRY_BITS
            if c[k].bytes or packets or c[k].charged:
                rows.append(CounterRow(sid, k >> 1, k & 1, c[k].bytes, packets, c[k].charged))
                c[k].bytes = 0
                c[k].charged = 0
                c[k].packets_carry &= CARRY_MASK
        return rows

    def drain(self):
        """Counters since the last drain, sorted, and reset to zero.

        Only subscribers on the dirty list are visited. The write lock is
        held just to take the list; the counters are then read and reset a
        chunk of subscribers at a time under the read lock and each
        subscriber's spinlock, so queue threads keep rating meanwhile (a
        packet rated in between lands in this drain or the next, never both).
        """
        cdef list rows = []
        cdef uint32_t *taken
        cdef uint32_t *fresh
        cdef uint32_t n_taken, i, j, end, sid
        cdef tg_sub *s
        cdef tg_counter *c
        cdef tg_counter *out
        cdef uint32_t *out_key  # sid * per + counter index
        cdef uint32_t n_out
        cdef int k, per = self.n_zones * 2
        wrlock(self)
        fresh = <uint32_t *> malloc(<size_t> self.cap_subs * sizeof(uint32_t))
        if fresh == NULL:
            pthread_rwlock_unlock(&self.rwlock)
            raise MemoryError()
        taken = self.dirty
        n_taken = self.n_dirty
        self.dirty = fresh
        self.n_dirty = 0
        for i in range(n_taken):
            self.subs[taken[i]].dirty = 0
        pthread_rwlock_unlock(&self.rwlock)
        out = <tg_counter *> malloc(<size_t> DRAIN_CHUNK * per * sizeof(tg_counter))
        out_key = <uint32_t *> malloc(<size_t> DRAIN_CHUNK * per * sizeof(uint32_t))
        try:
            if out == NULL or out_key == NULL:
                raise MemoryError()
            i = 0
            while i < n_taken:
                end = i + DRAIN_CHUNK if i + DRAIN_CHUNK < n_taken else n_taken
                n_out = 0
                with nogil:
                    pthread_rwlock_rdlock(&self.rwlock)
                    for j in range(i, end):
                        sid = taken[j]
                        s = &self.subs[sid]
                        tg_lock(&s.lock)
                        if s.exists:
                            c = self.counters + <size_t> sid * per
                            for k in range(per):
                                if c[k].bytes or c[k].packets_carry >> CARRY_BITS or c[k].charged:
                                    out[n_out] = c[k]
                                    out_key[n_out] = sid * per + k
                                    n_out += 1
                                    c[k].bytes = 0
                                    c[k].charged = 0
                                    c[k].packets_carry &= CARRY_MASK
                        tg_unlock(&s.lock)
                    pthread_rwlock_unlock(&self.rwlock)
                for j in range(n_out):
                    k = out_key[j] % per
                    rows.append(CounterRow(out_key[j] // per, k >> 1, k & 1, out[j].bytes,
                                           out[j].packets_carry >> CARRY_BITS, out[j].charged))
                i = end
        finally:
            free(taken); free(out); free(out_key)
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

    cdef int _drop(self, tg_sub *s, const tg_packet *pk, tg_stats *st) noexcept nogil:
        s.dropped_packets += pk.count
        s.dropped_bytes += pk.length
        st.dropped_packets += pk.count
        st.dropped_bytes += pk.length
        return NF_DROP

    cdef int _rate(self, uint32_t sid, int zone, int direction, const tg_packet *pk, int slot, int64_t index,
                   int allowed, tg_event *events, Py_ssize_t *n_events, tg_stats *st) noexcept nogil:
        """Rate one side of a packet under the subscriber's lock; returns its
        verdict. ``allowed``: whether the remote side is allow-listed, or -1
        when the caller has not looked (it saw the subscriber unblocked; if a
        block landed since, the allow-list is consulted here, under the lock)."""
        cdef tg_sub *s = &self.subs[sid]
        cdef tg_counter *c = &self.counters[(<size_t> sid * self.n_zones + zone) * 2 + direction]
        cdef const tg_tariff *t
        cdef uint32_t length = pk.length
        cdef int64_t remaining = length, take, cost, amount
        cdef int64_t drawn[TG_MAX_BUCKETS]
        cdef int64_t *allow
        cdef int b, verdict = NF_ACCEPT
        tg_lock(&s.lock)
        if s.blocked:
            if allowed < 0:
                if direction == UPLOAD:
                    allowed = self._allowed(pk.dst, pk.v6, pk.proto, pk.has_ports, pk.dport)
                else:
                    allowed = self._allowed(pk.src, pk.v6, pk.proto, pk.has_ports, pk.sport)
            if allowed:
                c.bytes += length
                s.rated_bytes += length
                count_volume(self.volume_zones, s, zone, length)
                c.packets_carry += <uint64_t> pk.count << CARRY_BITS
                self._mark(sid, s)
                tg_unlock(&s.lock)
                return verdict
            if not pk.aggregate:
                verdict = self._drop(s, pk, st)
                tg_unlock(&s.lock)
                return verdict
            # an aggregate of a blocked subscriber already passed: rated below
        if s.vol_on and (self.volume_zones >> zone) & 1 and <int64_t> length > s.volume_left:
            # The volume limit first: the packet that would take the period's
            # volume past it is dropped before anything is drawn or charged,
            # so the limit holds at the byte the way money does (and not at
            # the next flush, as when the biller checked it).
            if not s.blocked & BLOCK_VOLUME:
                s.blocked |= BLOCK_VOLUME
                emit(events, n_events, EV_BLOCK, sid, index, BLOCK_VOLUME, s.balance)
            if not pk.aggregate:
                verdict = self._drop(s, pk, st)
                tg_unlock(&s.lock)
                return verdict
            verdict = NF_DROP  # an aggregate already passed: counted (volume_left goes below 0) and charged
        t = &self.tariffs[s.tariff]
        allow = self.allowance + <size_t> sid * self.bucket_stride
        for b in range(t.n_buckets):
            drawn[b] = 0
        amount = 0
        for b in range(t.n_buckets):
            if remaining == 0:
                break
            if (t.bucket_zones[b] >> zone) & 1 and (t.bucket_dirs[b] >> direction) & 1 and allow[b] > 0:
                take = remaining if remaining < allow[b] else allow[b]
                allow[b] -= take
                remaining -= take
                drawn[b] = take
                amount += take * t.bucket_price[b]
        # the bytes drawn plus the rest are <= MAX_WIRE_LEN (2**20), every price <= MAX_PRICE (2**40 - 1):
        # the sum stays below 2**60, no overflow
        amount += remaining * t.prices[(zone * 2 + direction) * self.n_slots + slot] + <int64_t> (
            c.packets_carry & CARRY_MASK)
        cost = amount // PRICE_SCALE
        if cost > 0 and breaches(s, cost):
            if not s.blocked & BLOCK_LIMIT:
                s.blocked |= BLOCK_LIMIT
                emit(events, n_events, EV_BLOCK, sid, index, BLOCK_LIMIT, s.balance)
            if not pk.aggregate:
                for b in range(t.n_buckets):
                    allow[b] += drawn[b]
                verdict = self._drop(s, pk, st)
                tg_unlock(&s.lock)
                return verdict
            verdict = NF_DROP  # charged all the same: the traffic already passed
            st.over_limit_bytes += length
        s.balance -= cost
        c.bytes += length
        s.rated_bytes += length
        count_volume(self.volume_zones, s, zone, length)
        c.charged += cost
        c.packets_carry = ((c.packets_carry >> CARRY_BITS) + pk.count) << CARRY_BITS | <uint64_t> (
            amount % PRICE_SCALE)
        self._mark(sid, s)
        if cost > 0:
            while s.warned < t.n_warn and s.balance < t.warn[s.warned]:
                emit(events, n_events, EV_WARN, sid, index, s.warned, s.balance)
                s.warned += 1
        tg_unlock(&s.lock)
        return verdict

    cdef uint32_t _slot_index(self, int64_t ts) noexcept nogil:
        """The timeline entry of ``ts``: the rightmost start <= ts; before the first start, the first."""
        cdef uint32_t lo = 0, hi = self.tl_len, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tl_starts[mid] <= ts:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1 if lo > 0 else 0

    cdef int _rate_volume(self, uint32_t sid, int zone, int direction, uint64_t nbytes, uint64_t npackets,
                          int slot, tg_event *events, Py_ssize_t *n_events) noexcept nogil:
        """``_rate`` of one aggregate of any size (see ``rate_volume``), under
        the subscriber's lock; -1 (nothing changed) when a result would not fit.

        Why not the packet path: it holds length * price in int64 because a
        packet is at most 2**20 bytes. Here nbytes goes up to 2**64 - 1, so
        the amount (bytes * price + carry, < 2**104) is one unsigned __int128;
        cutting it into 2**20-byte pieces would give the same cost (the carry
        makes any cut exact) but take up to 2**44 steps for one call.
        Everything is computed first and written only once it is known to fit
        the 64-bit state, so a refusal leaves the subscriber untouched."""
        cdef tg_sub *s = &self.subs[sid]
        cdef tg_counter *c = &self.counters[(<size_t> sid * self.n_zones + zone) * 2 + direction]
        cdef const tg_tariff *t
        cdef int64_t *allow
        cdef uint64_t remaining = nbytes, take, packets
        cdef uint64_t drawn[TG_MAX_BUCKETS]
        cdef tg_u128 amount = 0
        cdef int64_t cost, balance, charged
        cdef bint breach, by_volume, past_volume = False
        cdef int b
        tg_lock(&s.lock)
        t = &self.tariffs[s.tariff]
        allow = self.allowance + <size_t> sid * self.bucket_stride
        for b in range(t.n_buckets):
            drawn[b] = 0
            if remaining and (t.bucket_zones[b] >> zone) & 1 and (t.bucket_dirs[b] >> direction) & 1 and allow[b] > 0:
                take = remaining if remaining < <uint64_t> allow[b] else <uint64_t> allow[b]
                remaining -= take
                drawn[b] = take
                amount += <tg_u128> take * <tg_u128> t.bucket_price[b]
        amount += <tg_u128> remaining * <tg_u128> t.prices[(zone * 2 + direction) * self.n_slots + slot]
        amount += <tg_u128> (c.packets_carry & CARRY_MASK)
        packets = c.packets_carry >> CARRY_BITS
        if (amount / <tg_u128> PRICE_SCALE > <tg_u128> INT64_MAX
                or __builtin_sub_overflow(s.balance, <int64_t> (amount / <tg_u128> PRICE_SCALE), &balance)):
            tg_unlock(&s.lock)
            return -1
        cost = <int64_t> (amount / <tg_u128> PRICE_SCALE)
        breach = cost > 0 and breaches(s, cost)
        by_volume = s.vol_on and (self.volume_zones >> zone) & 1
        if by_volume:
            # past the limit if it does not fit what is left; nbytes beyond INT64_MAX never does
            past_volume = nbytes > <uint64_t> INT64_MAX or <int64_t> nbytes > s.volume_left
        if (__builtin_add_overflow(c.charged, cost, &charged) or nbytes > UINT64_MAX - c.bytes
                or npackets > MAX_COUNTER_PACKETS - packets or nbytes > UINT64_MAX - s.rated_bytes
                # volume_left - nbytes must stay >= INT64_MIN: room is volume_left + 2**63, in uint64
                or (by_volume and nbytes > <uint64_t> s.volume_left - <uint64_t> INT64_MIN)
                or (breach and nbytes > UINT64_MAX - self.stats_.over_limit_bytes)):
            tg_unlock(&s.lock)
            return -1
        for b in range(t.n_buckets):
            allow[b] -= <int64_t> drawn[b]
        if past_volume and not s.blocked & BLOCK_VOLUME:
            s.blocked |= BLOCK_VOLUME
            emit(events, n_events, EV_BLOCK, sid, -1, BLOCK_VOLUME, s.balance)
        if breach:
            if not s.blocked & BLOCK_LIMIT:
                s.blocked |= BLOCK_LIMIT
                emit(events, n_events, EV_BLOCK, sid, -1, BLOCK_LIMIT, s.balance)
            tg_add_u64(&self.stats_.over_limit_bytes, nbytes)
        s.balance = balance
        c.bytes += nbytes
        s.rated_bytes += nbytes
        if by_volume:  # in range (checked above); two's complement does the rest
            s.volume_left = <int64_t> (<uint64_t> s.volume_left - nbytes)
        c.charged = charged
        c.packets_carry = (packets + npackets) << CARRY_BITS | <uint64_t> (amount % <tg_u128> PRICE_SCALE)
        self._mark(sid, s)
        if cost > 0:
            while s.warned < t.n_warn and s.balance < t.warn[s.warned]:
                emit(events, n_events, EV_WARN, sid, -1, s.warned, s.balance)
                s.warned += 1
        tg_unlock(&s.lock)
        return 0

    def rate_volume(self, sid, zone, direction, nbytes, npackets, ts_ns):
        """Rate a volume the engine never saw as one aggregate flow record; see
        ``EnginePy.rate_volume``.

        It holds the GIL throughout, as adjust_balance does: every control
        operation that moves arrays or frees a tariff's prices or the
        timeline does so holding the GIL, so none can run in between; queue
        threads rating the same subscriber meanwhile are kept out by its
        spinlock."""
        zone, direction, nbytes, npackets, ts_ns = check_volume(self.n_zones, zone, direction, nbytes, npackets,
                                                                ts_ns)
        self._sub(sid)
        cdef tg_event events[2 + TG_MAX_WARN]
        cdef Py_ssize_t n_events = 0
        if self._rate_volume(sid, zone, direction, nbytes, npackets, self.tl_slots[self._slot_index(ts_ns)], events, &n_events) < 0:
            raise EngineError(f"rate_volume: {nbytes} bytes would take subscriber {sid}'s balance or counters "
                              f"out of 64 bits; drain first or rate less at once")
        return events_to_python(events, n_events)

    # ---- grants (the eBPF data path: gateway/daemon/grants.py) ----------------

    cdef bint _plain_volume(self, object zone, object direction, object ts_ns):
        """The grant keeper's calls, told apart cheaply from everything check_volume must look at (and word
        the error of): ints, not bools, in range. It calls these some ten times a grant, a million grants
        at a start, and check_volume (Python) was a third of a grant's time."""
        return (type(zone) is int and type(direction) is int and type(ts_ns) is int
                and 0 <= zone < self.n_zones and (direction == 0 or direction == 1)
                and INT64_MIN <= ts_ns <= INT64_MAX)

    def quote_bytes(self, sid, zone, direction, nbytes, ts_ns, allowance=None):
        """What ``rate_volume`` of ``nbytes`` would charge now; see ``EnginePy.quote_bytes``."""
        if not self._plain_volume(zone, direction, ts_ns):
            zone, direction, _n, _p, ts_ns = check_volume(self.n_zones, zone, direction, 0, 0, ts_ns)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= UINT64_MAX:
            raise EngineError(f"quote_bytes: nbytes must be 0..2**64-1, not {nbytes!r}")
        cdef int64_t view[TG_MAX_BUCKETS]
        cdef uint64_t n = nbytes, take
        cdef tg_u128 amount = 0
        cdef int b, z = zone, d = direction
        cdef tg_sub *s = self._grant_view(sid, allowance, view)
        cdef const tg_tariff *t = &self.tariffs[s.tariff]
        cdef tg_counter *c = &self.counters[(<size_t> (<uint32_t> sid) * self.n_zones + z) * 2 + d]
        cdef int slot = self.tl_slots[self._slot_index(ts_ns)]
        tg_lock(&s.lock)
        for b in range(t.n_buckets):
            if n and (t.bucket_zones[b] >> z) & 1 and (t.bucket_dirs[b] >> d) & 1 and view[b] > 0:
                take = n if n < <uint64_t> view[b] else <uint64_t> view[b]
                n -= take
                amount += <tg_u128> take * <tg_u128> t.bucket_price[b]
        amount += <tg_u128> n * <tg_u128> t.prices[(z * 2 + d) * self.n_slots + slot]
        amount += <tg_u128> (c.packets_carry & CARRY_MASK)
        tg_unlock(&s.lock)
        return ((int(<uint64_t> (amount >> 64)) << 64) | int(<uint64_t> amount)) // PRICE_SCALE

    def affordable_bytes(self, sid, zone, direction, ts_ns, budget=None, allowance=None):
        """The most bytes ``sid`` can pass in ``zone``/``direction`` now; see ``EnginePy.affordable_bytes``."""
        if not self._plain_volume(zone, direction, ts_ns):
            zone, direction, _n, _p, ts_ns = check_volume(self.n_zones, zone, direction, 0, 0, ts_ns)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise EngineError(f"affordable_bytes: budget is None or an int, not {budget!r}")
        cdef int64_t view[TG_MAX_BUCKETS]
        cdef int b, z = zone, d = direction
        cdef tg_sub *s = self._grant_view(sid, allowance, view)
        cdef const tg_tariff *t = &self.tariffs[s.tariff]
        cdef tg_counter *c = &self.counters[(<size_t> (<uint32_t> sid) * self.n_zones + z) * 2 + d]
        cdef int slot = self.tl_slots[self._slot_index(ts_ns)]
        cdef int64_t price, q, balance, credit, carry, volume_left
        cdef bint vol
        tg_lock(&s.lock)
        price = t.prices[(z * 2 + d) * self.n_slots + slot]
        balance, credit, carry = s.balance, s.credit, <int64_t> (c.packets_carry & CARRY_MASK)
        vol = s.vol_on and (self.volume_zones >> z) & 1
        volume_left = s.volume_left
        tg_unlock(&s.lock)
        # the arithmetic in Python ints (no overflow to reason about; this is not per packet)
        if budget is None:
            budget = balance + credit
        room = (max(budget, 0) + 1) * PRICE_SCALE - 1 - carry
        n = 0
        finite = False
        for b in range(t.n_buckets):
            if not ((t.bucket_zones[b] >> z) & 1 and (t.bucket_dirs[b] >> d) & 1 and view[b] > 0):
                continue
            q = t.bucket_price[b]
            cost = <object> view[b] * q  # a Python int: a bucket's bytes times its price passes 2**63
            if q == 0 or cost <= room:
                n += view[b]
                room -= cost
            else:
                n += room // q
                finite = True
                break
        if not finite:
            n = UINT64_MAX if price == 0 else n + room // price
        n = min(n, UINT64_MAX)
        if vol:
            n = min(n, max(0, volume_left))
        return n

    cdef tg_sub *_grant_view(self, sid, allowance, int64_t *view) except NULL:
        """The subscriber, and in ``view`` the bucket bytes to draw on (its own, or ``allowance``)."""
        cdef tg_sub *s = self._sub(sid)
        cdef int b, n = self.tariffs[s.tariff].n_buckets
        cdef int64_t *own = self.allowance + <size_t> (<uint32_t> sid) * self.bucket_stride
        if allowance is None:
            tg_lock(&s.lock)
            for b in range(n):
                view[b] = own[b]
            tg_unlock(&s.lock)
        else:
            values = check_grant_allowance(allowance, (), n)
            for b in range(n):
                view[b] = values[b]
        return s

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
        cdef uint32_t i, j, base, end, wirelen, sid, count
        cdef int verdict, cur_slot = 0
        cdef int dst_allowed
        cdef int64_t ts, lo_ts = 1, hi_ts = 0  # cached timeline interval [lo_ts, hi_ts)
        cdef uint32_t lo
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
                count = b.packets[i] if b.packets != NULL else 1
                st.packets += count
                st.bytes += wirelen
                if not parse_packet(b.buf + b.offset[i], b.caplen[i], wirelen, b.packets != NULL, &pk[j]):
                    st.malformed_packets += count
                    st.malformed_bytes += wirelen
                    b.verdict[i] = self.malformed_verdict
                    kind[j] = KIND_DONE
                    continue
                pk[j].count = count
                owners = &self.owners6 if pk[j].v6 else &self.owners4
                src_sid[j] = trie_lookup(owners, pk[j].src)
                dst_sid[j] = trie_lookup(owners, pk[j].dst)
                if src_sid[j] == 0 and dst_sid[j] == 0:
                    st.unknown_packets += count
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
                if not (lo_ts <= ts < hi_ts):  # outside the cached slot's window: look it up
                    lo = self._slot_index(ts)
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
                dst_allowed = -1
                if dst_sid[j]:
                    # a blocked destination drops the packet before anyone is
                    # charged; the allow-list is only looked at when blocked
                    if not pk[j].aggregate and tg_load_u8(&self.subs[dst_sid[j]].blocked):
                        dst_allowed = self._allowed(pk[j].src, pk[j].v6, pk[j].proto, pk[j].has_ports, pk[j].sport)
                        if not dst_allowed:
                            tg_lock(&self.subs[dst_sid[j]].lock)
                            verdict = self._drop(&self.subs[dst_sid[j]], &pk[j], &st)
                            tg_unlock(&self.subs[dst_sid[j]].lock)
                if verdict == NF_ACCEPT and src_sid[j]:
                    verdict = self._rate(src_sid[j], up_zone[j], UPLOAD, &pk[j], slot[j], i, -1, events,
                                         &n_events, &st)
                if dst_sid[j] and (verdict == NF_ACCEPT or pk[j].aggregate):
                    if self._rate(dst_sid[j], down_zone[j], DOWNLOAD, &pk[j], slot[j], i, dst_allowed,
                                  events, &n_events, &st) == NF_DROP:
                        verdict = NF_DROP
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
        tg_add_u64(&self.stats_.over_limit_bytes, st.over_limit_bytes)
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
        cdef const uint32_t[::1] packets = batch.packets if batch.aggregates else None
        if n > offset.shape[0] or n > caplen.shape[0] or n > wirelen.shape[0] or n > ts.shape[0] \
                or n > verdict.shape[0] or (packets is not None and n > packets.shape[0]):
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
        b.packets = &packets[0] if packets is not None else NULL
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
