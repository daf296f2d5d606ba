# The compiled engine's C-level contract, for other Cython modules (the
# nfqueue reader calls process_c from its own nogil loop, one thread per queue).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass

cdef enum:
    # 2 subscribers x (a volume block, a limit block and up to 4 warns: an
    # aggregate past both limits is still charged, so all of them can fire)
    TG_MAX_EVENTS_PER_PACKET = 12
    TG_MAX_BUCKETS = 4
    TG_MAX_WARN = 4

# One batch of packet headers (see ext/batch.py for the Python side).
cdef struct tg_batch:
    const unsigned char *buf     # packet i starts at buf + offset[i]
    const uint32_t *offset
    const uint32_t *caplen
    const uint32_t *wirelen
    const int64_t *ts            # ns since the epoch
    uint8_t *verdict             # written: NF_ACCEPT (1) / NF_DROP (0)
    const uint32_t *packets      # NULL: real packets; else flow aggregates of packets[i] packets
    uint32_t n

cdef struct tg_event:
    int kind
    uint32_t subscriber
    int64_t index
    int reason
    int64_t balance

# A multibit trie, stride 8, leaf-pushed: each slot holds the child node (0:
# none; the root is never a child) and the value of the longest prefix
# covering it, packed as value << 8 | prefix length.
cdef struct tg_slot:
    uint32_t child
    uint32_t vp

cdef struct tg_trie:
    tg_slot *nodes               # n_nodes * 256 slots; node 0 is the root
    uint32_t n_nodes
    uint32_t cap_nodes
    uint32_t depth               # 4 (IPv4) or 16 (IPv6) bytes

# Rules hung on a prefix: first match wins, else the fallback group (the
# longest shorter prefix), else the default.
cdef struct tg_rules:
    uint32_t *start
    uint32_t *count
    int32_t *fallback
    uint8_t *proto
    uint16_t *port_lo
    uint16_t *port_hi
    uint8_t *zone
    uint32_t n_groups

cdef struct tg_tariff:
    int64_t *prices              # (zone * 2 + direction) * n_slots + slot
    uint64_t bucket_zones[TG_MAX_BUCKETS]
    uint8_t bucket_dirs[TG_MAX_BUCKETS]
    int64_t bucket_price[TG_MAX_BUCKETS]   # price of a byte drawn from the bucket (0: free volume)
    int n_buckets
    int64_t warn[TG_MAX_WARN]
    int n_warn
    bint defined

cdef struct tg_sub:
    int64_t balance
    int64_t credit
    uint64_t dropped_bytes
    uint64_t dropped_packets     # cumulative: 32 bits would wrap in an hour at 1 Mpps
    uint64_t rated_bytes         # cumulative bytes counted, both directions: what a kernel quota is kept against
    int64_t volume_left          # bytes of the volume zones left this period (vol_on); < 0 after aggregates past it
    uint16_t tariff
    uint8_t blocked
    uint8_t warned
    uint8_t lock
    uint8_t dirty
    uint8_t exists
    uint8_t vol_on               # a volume limit applies (volume_left counts); 0: none

# Counters of one (subscriber, zone, direction) since the last drain. The
# packet count and the carry (remainder below one minor unit, scaled by
# PRICE_SCALE < 2**20) share one word: packets << 20 | carry, so the record
# stays 24 bytes without a 32-bit packet count that could wrap between
# drains. The carry survives drains.
cdef struct tg_counter:
    uint64_t bytes
    int64_t charged
    uint64_t packets_carry

# One parsed packet header (pointers into the batch buffer).
cdef struct tg_packet:
    const uint8_t *src
    const uint8_t *dst
    uint32_t length
    uint32_t count               # packets it stands for (1 unless an aggregate)
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t v6
    uint8_t has_ports
    uint8_t aggregate            # traffic that already passed (a flow source): see EnginePy

cdef struct tg_stats:
    uint64_t packets
    uint64_t bytes
    uint64_t malformed_packets
    uint64_t malformed_bytes
    uint64_t unknown_packets
    uint64_t unknown_bytes
    uint64_t dropped_packets
    uint64_t dropped_bytes
    uint64_t over_limit_bytes    # flow records rated past the limit: traffic that passed a passive source

# The control plane's index of owned prefixes (add, remove, the longest shorter owner of a prefix
# taken out): open addressing, linear probing, at most half full. 24 bytes a prefix, where a dict of
# Python ints took ~140 (250 MB at 1.8M prefixes).
cdef struct tg_owner:
    uint64_t hi                  # the network: IPv6 bits 0-63; 0 for IPv4
    uint64_t lo                  # IPv6 bits 64-127; the IPv4 address
    uint32_t sid                 # its owner; 0: an empty slot
    uint8_t plen
    uint8_t v6

cdef struct tg_owners:
    tg_owner *slots
    size_t cap                   # a power of two
    size_t n

cdef class EngineC:
    cdef pthread_rwlock_t rwlock
    cdef readonly int n_zones, n_slots, default_zone, malformed_verdict, unknown_verdict
    cdef readonly uint64_t volume_zones  # zones whose bytes count toward volume limits (bit z: zone z)
    cdef tg_trie owners4, owners6, zones4, zones6, allow4, allow6
    cdef tg_rules zone_rules, allow_rules
    cdef tg_tariff *tariffs          # 65536 entries, by id
    cdef tg_sub *subs
    cdef tg_counter *counters        # cap_subs * n_zones * 2
    cdef int64_t *allowance          # cap_subs * bucket_stride
    cdef int bucket_stride
    cdef uint32_t cap_subs
    cdef uint32_t *dirty
    cdef uint32_t n_dirty
    cdef int64_t *tl_starts
    cdef uint8_t *tl_slots
    cdef uint32_t tl_len
    cdef tg_stats stats_
    cdef tg_owners owned             # every owned prefix and its subscriber: the control plane's view

    cdef Py_ssize_t process_c(self, tg_batch *b, tg_event *events) noexcept nogil
    cdef uint32_t _slot_index(self, int64_t ts) noexcept nogil
    cdef int _rate_volume(self, uint32_t sid, int zone, int direction, uint64_t nbytes, uint64_t npackets,
                          int slot, tg_event *events, Py_ssize_t *n_events) noexcept nogil

    # internals (Cython wants every C method of the type declared here)
    cdef int _grow(self, uint32_t cap) except -1
    cdef tg_sub *_grant_view(self, sid, allowance, int64_t *view) except NULL
    cdef bint _plain_volume(self, object zone, object direction, object ts_ns)
    cdef int _widen_buckets(self, int stride) except -1
    cdef int _load_rules(self, object rules, object n_zones, tg_trie *t4, tg_trie *t6, tg_rules *r) except -1
    cdef tg_sub *_sub(self, sid) except NULL
    cdef list _check_allowance(self, int tariff, allowance)
    cdef int _set_allowance(self, uint32_t sid, list allowance) except -1
    cdef int _put_subscriber(self, uint32_t id_, int tariff, int64_t bal, int64_t cred, list allowance,
                             bint vol_on, int64_t left) except -1
    cdef int _grow_to(self, uint32_t id_) except -1
    cdef int _levels_below(self, tg_sub *s) noexcept nogil
    cdef tuple _allowance_of(self, uint32_t sid)
    cdef int _remove_prefix_locked(self, uint64_t hi, uint64_t lo, int plen, bint v6) except -1
    cdef int _own_network(self, const char *p, Py_ssize_t n, str piece, str text, uint32_t sid,
                          tg_owner *out) except -1
    cdef list _reevaluate(self, uint32_t sid)
    cdef list _take_counters(self, uint32_t sid)
    cdef bint _allowed(self, const uint8_t *addr, bint v6, uint8_t proto, bint has_ports,
                       uint16_t port) noexcept nogil
    cdef int _zone(self, const uint8_t *addr, bint v6, uint8_t proto, bint has_ports, uint16_t port) noexcept nogil
    cdef void _mark(self, uint32_t sid, tg_sub *s) noexcept nogil
    cdef int _drop(self, tg_sub *s, const tg_packet *pk, tg_stats *st) noexcept nogil
    cdef int _rate(self, uint32_t sid, int zone, int direction, const tg_packet *pk, int slot, int64_t index,
                   int allowed, tg_event *events, Py_ssize_t *n_events, tg_stats *st) noexcept nogil
