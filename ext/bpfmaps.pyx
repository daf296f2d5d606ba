# cython: language_level=3
"""The maps of the tc/eBPF data path (``ext/bpf/tollgate.bpf.c``): load, pin,
reopen, fill, read. One module, one job; attaching to interfaces is
``policy/bpf.py``'s.

Contract
--------
``Maps.load(pin_dir, max_slots=..., n_zones=..., ...)`` opens
``ext/bpf/tollgate.bpf.o`` through libbpf, sizes every map, loads the two
programs (``tollgate_ingress``: UPLOAD, ``tollgate_egress``: DOWNLOAD), pins
maps and programs under ``pin_dir`` (default ``/sys/fs/bpf/tollgate``, bpffs
mounted there if it is not) and writes the configuration (``tg_info``). It
refuses to load over an existing pin directory: ``Maps.open(pin_dir)``
reopens what is pinned (a daemon restart: counters and grants are the
kernel's, nothing is lost), ``Maps.unpin(pin_dir)`` removes it.

Subscribers are *slots*: dense indices 0..max_slots-1 chosen by the caller
(the daemon maps subscriber ids to slots). ``set_subscribers(slots,
prefixes)`` binds prefixes (CIDR strings; /32 and /128 and IPv6 /64 go to
hash maps, other lengths to LPM tries) to slots in bulk, batched;
``remove_subscribers(prefixes)`` unbinds them. ``set_subscriber_networks(slots,
texts)`` binds each slot's networks given as one text joined by spaces, and
``set_subscriber_networks_arena(arena, words, present)`` the same read straight
from a subscriber table's arena (a start's million subscribers, no str made).
Every argument is checked before anything is written: a bad one raises
``BpfError`` and changes nothing.

Counters: one entry per (slot, zone, direction), index
``counter_index(slot, zone, direction) = (slot * n_zones + zone) * 2 +
direction``, eight uint64 each, in ``COUNTER_FIELDS`` order (used, grant,
packets, dropped_bytes, dropped_packets, allowed_bytes, allowed_packets,
flags). ``counters()`` is a zero-copy ``memoryview`` (format ``Q``, shape
``(n_counters, 8)``) of the mmapped array: read it to take deltas. ``used``
and ``packets`` are monotonic and never reset by anyone; ``grant`` is the
cumulative byte limit: a packet passes only while ``used + length <=
grant``. ``set_grant(slot, zone, direction, nbytes)`` stores it (one atomic
64-bit store, no system call); ``GRANT_FREE`` (2**64-1) never stops a
packet. A new slot's grant is 0: nothing passes until one is written. When a
slot is reused, its ``used`` goes on from where it was: grants are absolute,
so the caller keeps ``used`` at the moment it took the slot as its base.
``set_blocked(slot, blocked)`` mirrors the engine's blocked state: a blocked
slot's packets are dropped unless allow-listed, and allow-listed ones pass
without touching the grant (``allowed_*``). ``set_redirected(slot, on)``:
nft's blocked set holds the slot's networks, so its tcp/80 uploads, which
nft redirects to the block page, pass uncounted (set only after the nft
block, cleared before the nft unblock: "Redirected" in tollgate.bpf.c;
``set_blocked(slot, False)`` clears it too). ``set_zones(rules)`` and
``set_allowlist(rules)`` take the engine's ``ZoneRule``s (same semantics,
compiled with ``ext.engine_py.compile_rules``); each map element is replaced
atomically, the table as a whole is not (a packet during the change may see
part old, part new).

Refunds: what the kernel dropped after the program counted it in an
entry's ``used`` and ``packets`` (``tollgate_drop`` on skb:kfree_skb,
"Refunds" in tollgate.bpf.c), per entry, monotonic: ``refund(slot, zone,
direction)`` and ``refunds_view()`` (zero-copy, shape ``(n_counters, 2)``).
The program's link is pinned with the maps (``unpin`` detaches it);
``refunds_attached()`` and ``attach_refunds()`` are the heartbeat's.
``refunds`` says whether the pinned maps have them at all (a kernel without
BTF or ``bpf_cast_to_kern_ctx`` loads the programs without; ``refunds_error``
says why). ``set_verdicts`` sets the malformed and unknown verdicts.

``stats()``: the program's global counters (per-CPU, summed). ``test_run``:
BPF_PROG_TEST_RUN of one program on an Ethernet frame (tests, benches).
``map_memory()``: what each map takes (the kernel's memlock figure).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memset, memcpy, strerror
from libc.stdlib cimport malloc, free, realloc
from libc.errno cimport errno
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE, PyBUF_FORMAT

import ipaddress
import mmap as _mmap
import os
from collections import namedtuple
from pathlib import Path

from ext.constants import TEXT_LENGTH_BITS
from ext.errors import BpfError, TollgateError
from ext.engine_py import ZoneRule, compile_rules

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    int AF_INET
    int AF_INET6

cdef extern from "<bpf/libbpf.h>" nogil:
    struct bpf_object:
        pass
    struct bpf_map:
        pass
    struct bpf_program:
        pass
    struct bpf_object_open_opts:
        pass
    bpf_object *bpf_object__open_file(const char *path, const bpf_object_open_opts *opts)
    int bpf_object__load(bpf_object *obj)
    void bpf_object__close(bpf_object *obj)
    bpf_map *bpf_object__find_map_by_name(const bpf_object *obj, const char *name)
    bpf_program *bpf_object__find_program_by_name(const bpf_object *obj, const char *name)
    int bpf_map__set_max_entries(bpf_map *map, uint32_t max_entries)
    int bpf_map__fd(const bpf_map *map)
    int bpf_program__fd(const bpf_program *prog)
    int bpf_program__pin(bpf_program *prog, const char *path)
    int bpf_map__pin(bpf_map *map, const char *path)
    long libbpf_get_error(const void *ptr)
    int libbpf_num_possible_cpus()
    struct bpf_link:
        pass
    int bpf_program__set_autoload(bpf_program *prog, bint autoload)
    bpf_link *bpf_program__attach(const bpf_program *prog)
    int bpf_link__pin(bpf_link *link, const char *path)
    void bpf_link__disconnect(bpf_link *link)
    int bpf_link__destroy(bpf_link *link)

cdef extern from "<bpf/bpf.h>" nogil:
    struct bpf_map_batch_opts:
        size_t sz
        uint64_t elem_flags
        uint64_t flags
    struct bpf_test_run_opts:
        size_t sz
        const void *data_in
        void *data_out
        uint32_t data_size_in
        uint32_t data_size_out
        uint32_t retval
        int repeat
        uint32_t duration
        const void *ctx_in
        uint32_t ctx_size_in
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags)
    int bpf_map_lookup_elem(int fd, const void *key, void *value)
    int bpf_map_delete_elem(int fd, const void *key)
    int bpf_map_get_next_key(int fd, const void *key, void *next_key)
    int bpf_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count,
                             const bpf_map_batch_opts *opts)
    int bpf_map_delete_batch(int fd, const void *keys, uint32_t *count, const bpf_map_batch_opts *opts)
    int bpf_obj_get(const char *pathname)
    int bpf_obj_pin(int fd, const char *pathname)
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len)
    int bpf_raw_tracepoint_open(const char *name, int prog_fd)
    int bpf_prog_test_run_opts(int prog_fd, bpf_test_run_opts *opts)

cdef extern from "<linux/bpf.h>" nogil:
    ctypedef struct sk_buff_ctx "struct __sk_buff":
        uint32_t ingress_ifindex
    struct bpf_prog_info:
        uint32_t id
    struct bpf_link_info:
        uint32_t id
        uint32_t prog_id

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

# 64-bit atomics on the mmapped counters (the program reads them on other CPUs)
cdef extern from *:
    """
    static inline void tg_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline uint64_t tg_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void tg_or64(uint64_t *p, uint64_t v) { __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
    static inline void tg_and64(uint64_t *p, uint64_t v) { __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
    static inline uint64_t tg_xchg64(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
    """
    void tg_store64(uint64_t *p, uint64_t v) nogil
    uint64_t tg_load64(uint64_t *p) nogil
    void tg_or64(uint64_t *p, uint64_t v) nogil
    void tg_and64(uint64_t *p, uint64_t v) nogil
    int __builtin_ctzll(unsigned long long x) nogil
    uint64_t tg_xchg64(uint64_t *p, uint64_t v) nogil

# ---- the program's ABI (keep in step with ext/bpf/tollgate.bpf.c) -------------

TG_MAGIC = 0x54474154454c4c54
TG_ABI = 5  # 2: tg_dirty; 3: ZONE_NOT_FORWARDED, the "local" stat, tg_scratch, the F_SUB* flags; 4: C_REDIRECTED,
# the "redirected" stat; 5: tg_refunds, tg_inflight, tollgate_drop and its link, the "refunded" stat
MAX_RULES = 32  # TG_MAX_RULES: rules along a prefix's chain (its own, then its shorter prefixes')
# TG_ZONE_NOT_FORWARDED: the zone of a rule whose addresses the gateway delivers to itself; the program passes
# such packets uncounted, as the forward hook never sees them (see "Not forwarded" in tollgate.bpf.c)
ZONE_NOT_FORWARDED = 0xFF
F_MALFORMED_DROP = 1
F_UNKNOWN_DROP = 2
# which subscriber maps may hold entries (the /128 hash, the LPM tries): the program skips the lookups that
# cannot match (most subscribers own a /32 or a /64; a lookup costs ~8-10 ns even in an empty map)
F_SUB4_LPM = 4  # tg_sub4_lpm is not empty
F_SUB6_LPM = 8  # tg_sub6_lpm is not empty
F_SUB6_LONG = 16  # tg_sub6_lpm may hold a prefix longer than /64 (looked up before the /64 hash)
F_SUB6_HOST = 32  # tg_sub6, the /128 hash, is not empty
# some slot is blocked: an upload's destination is looked up too (a packet to a blocked subscriber is dropped
# before its sender is charged, as in the engine)
F_ANY_BLOCKED = 64
F_SUB_LPM = F_SUB4_LPM | F_SUB6_LPM | F_SUB6_LONG | F_SUB6_HOST
C_BLOCKED = 1
C_REDIRECTED = 2  # nft's blocked set holds the slot's networks: its tcp/80 goes to the block page, uncounted
GRANT_FREE = (1 << 64) - 1
TC_ACT_OK = 0
TC_ACT_SHOT = 2

COUNTER_FIELDS = ("used", "grant", "packets", "dropped_bytes", "dropped_packets", "allowed_bytes",
                  "allowed_packets", "flags")
Counter = namedtuple("Counter", COUNTER_FIELDS)
STATS = ("unknown", "malformed", "passed", "dropped", "allowed", "nonip", "cas_exhausted", "unconfigured",
         "noslot", "local", "redirected", "refunded")
MAPS = ("tg_sub4", "tg_sub6", "tg_sub6_64", "tg_sub4_lpm", "tg_sub6_lpm", "tg_zone4", "tg_zone6",
        "tg_zone_groups", "tg_allow4", "tg_allow6", "tg_allow_groups", "tg_counters", "tg_dirty", "tg_stats",
        "tg_info", "tg_scratch", "tg_refunds", "tg_inflight")
PROGRAMS = ("tollgate_ingress", "tollgate_egress")  # index = direction (UPLOAD 0, DOWNLOAD 1)
# the same without refunds (a kernel without bpf_cast_to_kern_ctx or BTF), pinned under PROGRAMS' names
PLAIN_PROGRAMS = ("tollgate_ingress_plain", "tollgate_egress_plain")
DROP_PROGRAM = "tollgate_drop"  # tp_btf/kfree_skb: the refunds ("Refunds" in tollgate.bpf.c)
DROP_LINK = "tollgate_drop_link"  # its attachment, pinned: refunds go on while no daemon runs
DEFAULT_PIN_DIR = "/sys/fs/bpf/tollgate"
OBJECT = Path(__file__).resolve().parent / "bpf" / "tollgate.bpf.o"

cdef enum:
    COUNTER_SIZE = 64
    REFUND_SIZE = 16
    GROUP_SIZE = 8 + 8 * 32
    BATCH = 65536

cdef packed struct tg_sub:
    uint32_t slot
    uint32_t plen

cdef packed struct tg_lpm4:
    uint32_t prefixlen
    uint8_t addr[4]

cdef packed struct tg_lpm6:
    uint32_t prefixlen
    uint8_t addr[16]

cdef packed struct tg_info:
    uint64_t magic
    uint32_t abi
    uint32_t n_zones
    uint32_t default_zone
    uint32_t flags
    uint32_t max_slots
    uint32_t reserved
    uint32_t egress_groups
    uint32_t pad

cdef packed struct tg_rule:
    uint8_t proto
    uint8_t zone
    uint16_t port_lo
    uint16_t port_hi
    uint16_t reserved

cdef packed struct tg_group:
    uint32_t n_rules
    uint32_t reserved
    tg_rule rules[32]


cdef int _err(long rc):
    return <int> (-rc if rc < 0 else errno)


cdef str _attach_drop(bpf_object *obj, pin):
    """``tollgate_drop`` pinned and attached, its link pinned (the kernel keeps both while the pins do):
    "" done, or why not (the program unpinned again: the maps run without refunds)."""
    cdef bpf_program *prog = bpf_object__find_program_by_name(obj, DROP_PROGRAM.encode())
    cdef bpf_link *link
    cdef long rc = bpf_program__pin(prog, str(pin / DROP_PROGRAM).encode())
    if rc:
        return f"cannot pin {DROP_PROGRAM}: {strerror(_err(rc)).decode()}"
    link = bpf_program__attach(prog)
    rc = libbpf_get_error(link)
    if rc == 0:
        rc = bpf_link__pin(link, str(pin / DROP_LINK).encode())
        bpf_link__disconnect(link)  # the pin holds the attachment, not our fd
        bpf_link__destroy(link)
    if rc:
        (pin / DROP_PROGRAM).unlink()
        return f"cannot attach {DROP_PROGRAM} to skb:kfree_skb: {strerror(_err(rc)).decode()}"
    return ""


cdef bpf_object *_load_object(str path, dict sizes, bint refunds) except NULL:
    """``path`` opened, its maps sized and loaded: with refunds, the tc programs that remember what they
    counted and ``tollgate_drop``; without, the plain tc programs only (nothing of the kernel's BTF needed)."""
    cdef bpf_object *obj
    cdef bpf_map *m
    cdef bpf_program *prog
    cdef long rc
    cdef bytes cpath = path.encode()
    cdef const char *cp = cpath
    # without the GIL: the ELF and BTF parsed here, the verifier and the maps' allocation in bpf_object__load
    # (seconds at a million slots) run while the daemon's other thread reads the ledger (gateway/sources/ebpf.py
    # MapsLoad)
    with nogil:
        obj = bpf_object__open_file(cp, NULL)
    rc = libbpf_get_error(obj)
    if rc:
        raise BpfError(f"cannot open {path}", _err(rc))
    try:
        for name, size in sizes.items():
            m = bpf_object__find_map_by_name(obj, name.encode())
            if m == NULL:
                raise BpfError(f"{path} has no map {name}: built from another version?")
            rc = bpf_map__set_max_entries(m, size)
            if rc:
                raise BpfError(f"cannot size {name} to {size}", _err(rc))
        for names, on in ((PROGRAMS + (DROP_PROGRAM,), refunds), (PLAIN_PROGRAMS, not refunds)):
            for name in names:
                prog = bpf_object__find_program_by_name(obj, name.encode())
                if prog == NULL:
                    raise BpfError(f"{path} has no program {name}: built from another version?")
                bpf_program__set_autoload(prog, on)
        with nogil:
            rc = bpf_object__load(obj)
        if rc:
            raise BpfError(f"the kernel refused {path}{'' if refunds else ' (its programs without refunds)'} "
                           "(verifier log above, on stderr)", _err(rc))
    except BaseException:
        bpf_object__close(obj)
        raise
    return obj


def ensure_bpffs(path=DEFAULT_PIN_DIR):
    """Mount bpffs on /sys/fs/bpf if ``path`` lies under it and nothing is
    mounted there (what iproute2 does too); the host's other mounts are left
    alone."""
    path = Path(path)
    root = Path("/sys/fs/bpf")
    if root not in path.parents and path != root:
        return
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(root) and line.split()[2] == "bpf" for line in f):
            return
    import subprocess
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], capture_output=True, text=True)
    if proc.returncode:
        raise BpfError(f"cannot mount bpffs on {root}: {proc.stderr.strip()}")


cdef bint _parse_prefix(object text, int *family, uint8_t *addr, int *plen) except -1:
    """CIDR text -> family 4|6, network bytes, prefix length; host bits must be 0."""
    cdef bytes b
    cdef int i, bits, full, rem
    if not isinstance(text, str):
        raise BpfError(f"a prefix is a CIDR string, not {text!r}")
    addr_text, slash, len_text = text.partition("/")
    b = addr_text.encode()
    memset(addr, 0, 16)
    if inet_pton(AF_INET, b, addr) == 1:
        family[0], bits = 4, 32
    elif inet_pton(AF_INET6, b, addr) == 1:
        family[0], bits = 6, 128
    else:
        raise BpfError(f"bad prefix {text!r}: not an address")
    if not slash:
        plen[0] = bits
    elif len_text.isdigit() and int(len_text) <= bits:
        plen[0] = int(len_text)
    else:
        raise BpfError(f"bad prefix {text!r}: prefix length must be 0..{bits}")
    full, rem = plen[0] // 8, plen[0] % 8
    for i in range(full, bits // 8):
        if (addr[i] & (0xFF >> rem)) if (i == full and rem) else addr[i]:
            raise BpfError(f"bad prefix {text!r}: host bits set")
    return True


cdef int _parse_prefix_c(const char *p, Py_ssize_t n, int *family, uint8_t *addr, int *plen) noexcept nogil:
    """``_parse_prefix`` of ASCII text in C (a start parses 1.8M of them): 1 and the same results, or 0 for
    anything it does not take as is (``_parse_prefix`` then decides, with its error)."""
    cdef char buf[64]
    cdef Py_ssize_t slash = -1, i
    cdef int bits, full, rem, value = 0
    if n <= 0 or n >= 64:
        return 0
    for i in range(n):
        if p[i] == 47:  # '/'
            slash = i
            break
    memcpy(buf, p, n if slash < 0 else slash)
    buf[n if slash < 0 else slash] = 0
    memset(addr, 0, 16)
    if inet_pton(AF_INET, buf, addr) == 1:
        family[0], bits = 4, 32
    elif inet_pton(AF_INET6, buf, addr) == 1:
        family[0], bits = 6, 128
    else:
        return 0
    if slash < 0:
        plen[0] = bits
    else:
        if n - slash - 1 < 1 or n - slash - 1 > 3:
            return 0
        for i in range(slash + 1, n):
            if not 48 <= p[i] <= 57:
                return 0
            value = value * 10 + (p[i] - 48)
        if value > bits:
            return 0
        plen[0] = value
    full, rem = plen[0] // 8, plen[0] % 8
    for i in range(full, bits // 8):
        if (addr[i] & (0xFF >> rem)) if (i == full and rem) else addr[i]:
            return 0
    return 1


cdef struct _NetRef:
    # what ``Maps._bind`` parses: one prefix, or one text of networks joined by spaces, and the slot it binds to
    const char *p  # (into a str's UTF-8 or a subscriber table's arena, held by the caller meanwhile)
    Py_ssize_t length
    uint32_t slot


cdef const char *_utf8(str text, Py_ssize_t *length) except NULL:
    """``text``'s UTF-8 (cached by the str), or BpfError for one that has none (a lone surrogate)."""
    try:
        return PyUnicode_AsUTF8AndSize(text, length)
    except UnicodeEncodeError:
        raise BpfError(f"bad prefix {text!r}: not an address") from None


# a subscriber table's arena (gateway/subscriber_table.py): a slot's word is start << this | length
cdef unsigned int _TEXT_LENGTH_BITS = TEXT_LENGTH_BITS
cdef unsigned long long _TEXT_MAX = (1 << TEXT_LENGTH_BITS) - 1


def pinned_program_ids(pin_dir=DEFAULT_PIN_DIR):
    """The kernel's ids of the tc programs pinned under ``pin_dir`` (ingress, egress): what the attach and the
    heartbeat compare tc's filters with (policy/bpf.py). Only the programs' pins are opened: ``Maps.open``
    would map the counters and refunds too (320 MB at a million slots, resident while mapped: a second
    mapping of them, next to the daemon's, was the start's peak). BpfError if one is not pinned."""
    cdef bpf_prog_info info
    cdef uint32_t n
    cdef int fd
    ids = []
    for name in PROGRAMS:
        fd = bpf_obj_get(str(Path(pin_dir) / name).encode())
        if fd < 0:
            raise BpfError(f"no program {name} pinned at {pin_dir}", _err(fd))
        try:
            memset(&info, 0, sizeof(info))
            n = sizeof(info)
            if bpf_obj_get_info_by_fd(fd, &info, &n):
                raise BpfError(f"cannot read the id of {name} pinned at {pin_dir}", errno)
            ids.append(info.id)
        finally:
            close(fd)
    return ids[0], ids[1]


cdef class _Mapped:
    """An array map made BPF_F_MMAPABLE, shared with the program: mapped into this process (whole pages),
    its buffer held, so that ``ptr`` stays valid until ``close``."""

    cdef object mm
    cdef Py_buffer buf
    cdef bint held
    cdef uint64_t *ptr

    def __cinit__(self, int fd, str name, nbytes):
        size = (nbytes + _mmap.PAGESIZE - 1) // _mmap.PAGESIZE * _mmap.PAGESIZE
        try:
            self.mm = _mmap.mmap(fd, size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE)
        except OSError as exc:
            raise BpfError(f"cannot mmap {name} (BPF_F_MMAPABLE)", exc.errno) from None
        PyObject_GetBuffer(self.mm, &self.buf, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self.held = True
        self.ptr = <uint64_t *> self.buf.buf

    cdef object view(self, unsigned long long n, unsigned int width):
        """The first ``n`` entries of ``width`` uint64 each, zero-copy: format ``Q``, shape ``(n, width)``."""
        return memoryview(self.mm).cast("B")[:n * width * 8].cast("Q", (n, width))

    cdef close(self):
        self.ptr = NULL
        if self.held:
            PyBuffer_Release(&self.buf)
            self.held = False
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view handed out is still alive: unmapped when the last one goes
                pass
            self.mm = None

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.buf)


cdef class Maps:
    """The loaded program's maps; see the module docstring."""

    cdef readonly str pin_dir
    cdef readonly unsigned int n_zones, max_slots, default_zone, flags
    cdef readonly unsigned long long n_counters
    cdef readonly unsigned int load_id  # random at each load: the counters of another load start again at 0
    cdef dict fds
    cdef int prog_fds[2]
    cdef _Mapped _cmap  # tg_counters
    cdef uint64_t *_counters
    cdef _Mapped _dmap  # tg_dirty
    cdef uint64_t *_dirty
    cdef unsigned long long n_words
    cdef _Mapped _rmap  # tg_refunds
    cdef uint64_t *_refunds
    cdef int drop_fd  # tollgate_drop, pinned: -1 without refunds
    # the kernel takes back what it drops after the program counted it (tg_refunds, tollgate_drop pinned)
    cdef readonly bint refunds
    cdef readonly str refunds_error  # why a load runs without refunds ("": it has them, or was not loaded here)
    cdef int ncpus
    cdef object _blocked  # the blocked slots (None: not read from the counters yet)

    def __cinit__(self):
        self.fds = {}
        self._blocked = None
        self.prog_fds[0] = self.prog_fds[1] = -1
        self.drop_fd = -1
        self.refunds_error = ""
        self._counters = NULL
        self._dirty = NULL
        self._refunds = NULL

    # ---- life cycle -----------------------------------------------------------

    @staticmethod
    def load(pin_dir=DEFAULT_PIN_DIR, *, unsigned int max_slots, unsigned int n_zones, unsigned int default_zone=1,
             max_hosts4=None, max_hosts6=None, max_nets6_64=None, unsigned int max_nets4=65536,
             unsigned int max_nets6=65536, unsigned int max_zone_prefixes=4096, unsigned int max_allow_prefixes=1024,
             bint malformed_drop=False, bint unknown_drop=False, obj_path=None, bint refunds=True):
        """Load, size, pin and configure a fresh program and its maps.

        ``max_hosts4``/``max_hosts6``/``max_nets6_64`` size the hash maps of
        /32, /128 and /64 subscriber prefixes (default: ``max_slots``);
        ``max_nets4``/``max_nets6`` the LPM tries of other lengths. The
        counters take ``max_slots * n_zones * 2 * 64`` bytes, their refunds
        ``* 16``.

        Refunds (``refunds``, the default): ``tollgate_drop`` is loaded and
        attached to skb:kfree_skb, its link pinned with the maps. A kernel
        that refuses it (no BTF, no bpf_cast_to_kern_ctx: before 6.3) gets
        the programs without refunds, and ``refunds_error`` says why; so does
        ``refunds=False``."""
        cdef Maps self = Maps.__new__(Maps)
        cdef bpf_object *obj
        cdef bpf_map *m
        cdef bpf_program *prog
        cdef long rc
        cdef int i
        if not 1 <= n_zones <= 64 or not default_zone < n_zones:
            raise BpfError(f"n_zones must be 1..64 and default_zone one of them, not {n_zones}/{default_zone}")
        if max_slots < 1 or <unsigned long long> max_slots * n_zones * 2 > 0xFFFFFFFF:
            raise BpfError(f"max_slots * n_zones * 2 must fit in 32 bits (max_slots {max_slots})")
        pin = Path(pin_dir)
        ensure_bpffs(pin)
        if pin.exists() and any(pin.iterdir()):
            raise BpfError(f"{pin} holds a loaded program already: open it with Maps.open() or unpin it first")
        path = str(obj_path or OBJECT)
        if not Path(path).exists():
            raise BpfError(f"{path} is not built: run `make build` (needs clang)")
        sizes = {"tg_sub4": max_hosts4 or max_slots, "tg_sub6": max_hosts6 or max_slots,
                 "tg_sub6_64": max_nets6_64 or max_slots, "tg_sub4_lpm": max_nets4, "tg_sub6_lpm": max_nets6,
                 "tg_zone4": max_zone_prefixes, "tg_zone6": max_zone_prefixes, "tg_zone_groups": 2 * max_zone_prefixes,
                 "tg_allow4": max_allow_prefixes, "tg_allow6": max_allow_prefixes,
                 "tg_allow_groups": max_allow_prefixes, "tg_counters": max_slots * n_zones * 2,
                 "tg_dirty": (max_slots * n_zones * 2 + 63) // 64}
        sizes["tg_refunds"] = max_slots * n_zones * 2
        if refunds:
            try:
                obj = _load_object(path, sizes, True)
            except BpfError as exc:
                refunds, self.refunds_error = False, str(exc)
        else:
            self.refunds_error = "loaded without refunds"
        if not refunds:
            obj = _load_object(path, sizes, False)
        try:
            pin.mkdir(parents=True, exist_ok=True)
            try:
                for name in MAPS:
                    m = bpf_object__find_map_by_name(obj, name.encode())
                    rc = bpf_map__pin(m, str(pin / name).encode())
                    if rc:
                        raise BpfError(f"cannot pin {name} at {pin}", _err(rc))
                for i, name in enumerate(PROGRAMS):
                    prog = bpf_object__find_program_by_name(obj, (name if refunds else PLAIN_PROGRAMS[i]).encode())
                    rc = bpf_program__pin(prog, str(pin / name).encode())
                    if rc:
                        raise BpfError(f"cannot pin {name} at {pin}", _err(rc))
                if refunds:
                    self.refunds_error = _attach_drop(obj, pin)
            except BaseException:
                Maps.unpin(pin)
                raise
        finally:
            # the pins hold the maps and programs; our own fds come from the pins
            bpf_object__close(obj)
        try:
            self._open(pin)
            self._write_info(n_zones, default_zone, max_slots,
                             (F_MALFORMED_DROP if malformed_drop else 0) | (F_UNKNOWN_DROP if unknown_drop else 0))
        except BaseException:
            self.close()
            Maps.unpin(pin)
            raise
        return self

    @staticmethod
    def open(pin_dir=DEFAULT_PIN_DIR):
        """Reopen the maps and programs pinned under ``pin_dir`` (after a restart)."""
        cdef Maps self = Maps.__new__(Maps)
        self._open(Path(pin_dir))
        return self

    @staticmethod
    def unpin(pin_dir=DEFAULT_PIN_DIR):
        """Remove the pins under ``pin_dir`` (and the directory). The kernel
        frees the maps and programs once nothing (no tc filter, no open fd)
        holds them any more."""
        pin = Path(pin_dir)
        if not pin.exists():
            return
        for entry in pin.iterdir():
            if entry.name in MAPS or entry.name in PROGRAMS or entry.name in (DROP_PROGRAM, DROP_LINK):
                entry.unlink()  # the link's pin is its last holder: unpinned, tollgate_drop is detached
        try:
            pin.rmdir()
        except OSError as exc:
            raise BpfError(f"{pin} holds files that are not ours", exc.errno) from None

    cdef _open(self, pin):
        cdef int fd, i
        cdef tg_info info
        cdef uint32_t zero = 0
        self.pin_dir = str(pin)
        try:
            for name in MAPS:
                fd = bpf_obj_get(str(pin / name).encode())
                if fd < 0:
                    raise BpfError(f"no map {name} pinned at {pin}", _err(fd))
                self.fds[name] = fd
            for i, name in enumerate(PROGRAMS):
                fd = bpf_obj_get(str(pin / name).encode())
                if fd < 0:
                    raise BpfError(f"no program {name} pinned at {pin}", _err(fd))
                self.prog_fds[i] = fd
            fd = bpf_obj_get(str(pin / DROP_PROGRAM).encode())
            self.drop_fd = fd if fd >= 0 else -1
            self.refunds = fd >= 0
            self.ncpus = libbpf_num_possible_cpus()
            if bpf_map_lookup_elem(self.fds["tg_info"], &zero, &info) == 0 and info.magic == TG_MAGIC:
                if info.abi != TG_ABI:
                    raise BpfError(f"the program pinned at {pin} has ABI {info.abi}, this loader {TG_ABI}")
                self._set_config(info.n_zones, info.default_zone, info.max_slots, info.flags)
                self.load_id = info.reserved
        except BaseException:
            self.close()
            raise

    cdef _set_config(self, unsigned int n_zones, unsigned int default_zone, unsigned int max_slots,
                     unsigned int flags):
        self.n_zones, self.default_zone, self.max_slots, self.flags = n_zones, default_zone, max_slots, flags
        self.n_counters = <unsigned long long> max_slots * n_zones * 2
        self.n_words = (self.n_counters + 63) // 64
        if self._cmap is None:
            self._cmap = _Mapped(self.fds["tg_counters"], "tg_counters", int(self.n_counters) * COUNTER_SIZE)
            self._counters = self._cmap.ptr
        if self._dmap is None:
            self._dmap = _Mapped(self.fds["tg_dirty"], "tg_dirty", int(self.n_words) * 8)
            self._dirty = self._dmap.ptr
        if self._rmap is None:
            self._rmap = _Mapped(self.fds["tg_refunds"], "tg_refunds", int(self.n_counters) * REFUND_SIZE)
            self._refunds = self._rmap.ptr

    cdef _write_info(self, unsigned int n_zones, unsigned int default_zone, unsigned int max_slots,
                     unsigned int flags):
        cdef tg_info info
        cdef uint32_t zero = 0
        memset(&info, 0, sizeof(info))
        info.magic, info.abi, info.n_zones, info.default_zone = TG_MAGIC, TG_ABI, n_zones, default_zone
        info.flags, info.max_slots = flags, max_slots
        info.reserved = int.from_bytes(os.urandom(4), "little") or 1  # the load's id (see load_id)
        self.load_id = info.reserved
        info.egress_groups = self._max_entries("tg_zone_groups") // 2
        self._set_config(n_zones, default_zone, max_slots, flags)  # mmap first: a failure leaves it unconfigured
        if bpf_map_update_elem(self.fds["tg_info"], &zero, &info, 0):
            raise BpfError("cannot write tg_info", errno)

    def close(self):
        """Close our fds and the mmap (the pins keep everything loaded)."""
        cdef int i
        self._counters = self._dirty = self._refunds = NULL
        for mapped in (self._cmap, self._dmap, self._rmap):
            if mapped is not None:
                (<_Mapped> mapped).close()
        self._cmap = self._dmap = self._rmap = None
        if self.drop_fd >= 0:
            close(self.drop_fd)
            self.drop_fd = -1
        for fd in self.fds.values():
            close(fd)
        self.fds.clear()
        for i in range(2):
            if self.prog_fds[i] >= 0:
                close(self.prog_fds[i])
                self.prog_fds[i] = -1

    def __dealloc__(self):
        cdef int i
        if self.drop_fd >= 0:
            close(self.drop_fd)
        for fd in (self.fds or {}).values():
            close(fd)
        for i in range(2):
            if self.prog_fds[i] >= 0:
                close(self.prog_fds[i])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def prog_fd(self, int direction):
        """The fd of the program of ``direction`` (0 ingress/upload, 1 egress/download)."""
        if direction not in (0, 1) or self.prog_fds[direction] < 0:
            raise BpfError(f"no program for direction {direction}")
        return self.prog_fds[direction]

    def map_fd(self, str name):
        return self.fds[name]

    # ---- subscribers ------------------------------------------------------------

    def set_subscribers(self, slots, prefixes):
        """Bind ``prefixes[i]`` (CIDR text) to ``slots[i]``, in bulk. A prefix
        bound already is rebound. Checked first; BpfError changes nothing."""
        self._subscribers(slots, prefixes, False)

    def remove_subscribers(self, prefixes):
        """Unbind ``prefixes``; one that is not bound is ignored."""
        self._subscribers(None, prefixes, True)

    def set_subscriber_networks(self, slots, texts):
        """``set_subscribers`` of every network of ``texts[i]`` (networks joined by single spaces, as the
        Accountant holds them: ``SubscriberInfo.networks_text``; "" for none) to ``slots[i]``, in the same
        order, parsed here in C: a list of a text and a slot for each network took longer than the binding.
        Checked first; BpfError changes nothing. (A start binds from the table's arena instead:
        ``set_subscriber_networks_arena``.)"""
        cdef Py_ssize_t n = len(texts), i, m = 0, length
        cdef const char *p
        cdef _NetRef *refs
        if len(slots) != n:
            raise BpfError(f"{len(slots)} slots for {n} texts")
        texts = list(texts)  # (held until bound: the records point into its strs' bytes)
        refs = <_NetRef *> malloc(sizeof(_NetRef) * n + 1)
        if refs == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                text = texts[i]
                if not isinstance(text, str):
                    raise BpfError(f"networks are a text, not {text!r}")
                p = _utf8(text, &length)
                if length:
                    slot_obj = slots[i]
                    if not 0 <= slot_obj < self.max_slots:
                        raise self._slot_error(slot_obj, text)
                    refs[m].p, refs[m].length, refs[m].slot = p, length, slot_obj
                    m += 1
            self._bind(refs, m, True)
        finally:
            free(refs)

    def set_subscriber_networks_arena(self, arena, words, present):
        """``set_subscriber_networks`` of the networks' texts of a subscriber table, read straight from its
        arena (``SubscriberTable.networks_arena()``: no str made; a start's million subscribers decoded to
        strs first was 0.4 s of it): each slot ``sid`` with ``present[sid]`` set binds the networks of
        ``arena[start:start + length]``, joined by single spaces ("" for none), where ``words[sid]`` (an
        ``array('Q')``) is ``start << TEXT_LENGTH_BITS | length``. The same checks and errors as
        ``set_subscriber_networks`` (BpfError changes nothing), and a word that points outside ``arena``
        is one. The caller keeps the three as they are until it returns (the table's lock)."""
        cdef Py_buffer data, slot_words, held
        cdef int got = 0
        cdef Py_ssize_t n, sid, m = 0
        cdef unsigned long long word, start, length, size
        cdef const char *base
        cdef const unsigned long long *w
        cdef const unsigned char *is_held
        cdef _NetRef *refs = NULL
        try:
            PyObject_GetBuffer(arena, &data, PyBUF_SIMPLE)  # (a bytearray's: it cannot resize meanwhile)
            got = 1
            PyObject_GetBuffer(words, &slot_words, PyBUF_SIMPLE | PyBUF_FORMAT)
            got = 2
            PyObject_GetBuffer(present, &held, PyBUF_SIMPLE)
            got = 3
            if slot_words.itemsize != 8 or slot_words.format == NULL or slot_words.format not in (b"Q", b"L"):
                raise BpfError(f"the words are 64-bit unsigned (an array('Q')), not {words!r:.40}")
            n, size = held.len, <unsigned long long> data.len
            if slot_words.len // 8 < n:
                raise BpfError(f"{slot_words.len // 8} words for {n} slots")
            base, w, is_held = <const char *> data.buf, <const unsigned long long *> slot_words.buf, \
                <const unsigned char *> held.buf
            refs = <_NetRef *> malloc(sizeof(_NetRef) * n + 1)
            if refs == NULL:
                raise MemoryError()
            for sid in range(n):
                word = w[sid]
                length = word & _TEXT_MAX
                if not is_held[sid] or not length:
                    continue
                start = word >> _TEXT_LENGTH_BITS
                if start > size or length > size - start:
                    raise BpfError(f"the text of slot {sid} is at {start}..{start + length}, beyond the arena's "
                                   f"{size} bytes")
                if sid >= self.max_slots:
                    raise self._slot_error(sid, base[start:start + length].decode("utf-8", "replace"))
                refs[m].p, refs[m].length, refs[m].slot = base + start, length, sid
                m += 1
            self._bind(refs, m, True)
        finally:
            free(refs)
            if got >= 3:
                PyBuffer_Release(&held)
            if got >= 2:
                PyBuffer_Release(&slot_words)
            if got >= 1:
                PyBuffer_Release(&data)

    cdef _slot_error(self, slot, text):
        return BpfError(f"slot {slot!r} of {text!r} is not in 0..{self.max_slots - 1}")

    cdef _subscribers(self, slots, prefixes, bint remove):
        cdef Py_ssize_t n = len(prefixes), i, length
        cdef const char *p
        cdef _NetRef *refs
        cdef int family, plen
        cdef uint8_t addr[16]
        if not remove and len(slots) != n:
            raise BpfError(f"{len(slots)} slots for {n} prefixes")
        prefixes = list(prefixes)  # (held until bound: the records point into its strs' bytes)
        refs = <_NetRef *> malloc(sizeof(_NetRef) * n + 1)
        if refs == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                prefix = prefixes[i]
                if not isinstance(prefix, str):
                    _parse_prefix(prefix, &family, addr, &plen)  # (raises: not a CIDR string)
                p = _utf8(prefix, &length)
                refs[i].p, refs[i].length, refs[i].slot = p, length, 0
                if not remove:
                    slot_obj = slots[i]
                    if not 0 <= slot_obj < self.max_slots:
                        raise self._slot_error(slot_obj, prefix)
                    refs[i].slot = slot_obj
            self._bind(refs, n, False, remove)
        finally:
            free(refs)

    cdef _bind(self, _NetRef *refs, Py_ssize_t m, bint split, bint remove=False):
        """Parse the prefixes of the ``m`` records, then write them: each record is one prefix of its slot,
        or (``split``) a text of networks joined by single spaces (not empty), each of its slot. Every entry
        point (a str list, a table's arena, a list of prefixes) makes the records; only this parses."""
        cdef Py_ssize_t i, j, k, n = m, start, end, length
        cdef int family, plen
        cdef uint8_t addr[16]
        cdef uint32_t slot = 0
        cdef tg_sub *vals[5]
        cdef uint8_t *keys[5]
        cdef Py_ssize_t counts[5]
        cdef int ksize[5]
        cdef int which
        cdef const char *p = NULL
        if split:  # a network after each space, one more each
            for i in range(m):
                p = refs[i].p
                for j in range(refs[i].length):
                    if p[j] == 32:
                        n += 1
        names = ("tg_sub4", "tg_sub6", "tg_sub6_64", "tg_sub4_lpm", "tg_sub6_lpm")
        ksize[0], ksize[1], ksize[2], ksize[3], ksize[4] = 4, 16, 8, 8, 20
        for k in range(5):
            counts[k] = 0
            keys[k] = <uint8_t *> malloc(ksize[k] * n + 1)
            vals[k] = <tg_sub *> malloc(sizeof(tg_sub) * n + 1)
        try:
            for k in range(5):
                if keys[k] == NULL or vals[k] == NULL:
                    raise MemoryError()
            for i in range(m):
                p, length, slot = refs[i].p, refs[i].length, refs[i].slot
                start = 0
                while True:  # each network of the record: up to the next space (split), or all of it
                    end = start
                    if split:
                        while end < length and p[end] != 32:
                            end += 1
                    else:
                        end = length
                    if not _parse_prefix_c(p + start, end - start, &family, addr, &plen):
                        _parse_prefix(p[start:end].decode("utf-8", "replace"), &family, addr, &plen)
                    if family == 4:
                        which = 0 if plen == 32 else 3
                    else:
                        which = 1 if plen == 128 else (2 if plen == 64 else 4)
                    k = counts[which]
                    if which == 0:
                        memcpy(keys[0] + 4 * k, addr, 4)
                    elif which == 1:
                        memcpy(keys[1] + 16 * k, addr, 16)
                    elif which == 2:
                        memcpy(keys[2] + 8 * k, addr, 8)
                    elif which == 3:
                        (<tg_lpm4 *> (keys[3] + 8 * k)).prefixlen = plen
                        memcpy((<tg_lpm4 *> (keys[3] + 8 * k)).addr, addr, 4)
                    else:
                        (<tg_lpm6 *> (keys[4] + 20 * k)).prefixlen = plen
                        memcpy((<tg_lpm6 *> (keys[4] + 20 * k)).addr, addr, 16)
                    vals[which][k].slot = slot
                    vals[which][k].plen = plen
                    counts[which] = k + 1
                    if end >= length:
                        break
                    start = end + 1
            if not remove:  # the flags before the entries: a lookup too many, never one too few
                need = (F_SUB4_LPM if counts[3] else 0) | (F_SUB6_LPM if counts[4] else 0) | \
                    (F_SUB6_HOST if counts[1] else 0)
                for k in range(counts[4]):
                    if vals[4][k].plen > 64:
                        need |= F_SUB6_LONG
                        break
                if need & ~self.flags:
                    self._update_flags(need, 0)
            for k in range(5):
                if counts[k]:
                    self._write(names[k], keys[k], ksize[k], <uint8_t *> vals[k], sizeof(tg_sub), counts[k],
                                remove)
            if remove and (counts[1] or counts[3] or counts[4]):  # after the entries went: what is left
                now = self._lpm_flags()
                self._update_flags(now, F_SUB_LPM & ~now)
        finally:
            for k in range(5):
                free(keys[k])
                free(vals[k])

    cdef _lpm_flags(self):
        """F_SUB* of what tg_sub6, tg_sub4_lpm and tg_sub6_lpm hold (walks the IPv6 trie's keys: it is small)."""
        cdef uint8_t key[20]
        cdef uint8_t nxt[20]
        out = 0
        if bpf_map_get_next_key(self.fds["tg_sub4_lpm"], NULL, nxt) == 0:
            out |= F_SUB4_LPM
        if bpf_map_get_next_key(self.fds["tg_sub6"], NULL, nxt) == 0:
            out |= F_SUB6_HOST
        rc = bpf_map_get_next_key(self.fds["tg_sub6_lpm"], NULL, nxt)
        while rc == 0:
            out |= F_SUB6_LPM
            if (<uint32_t *> nxt)[0] > 64:
                return out | F_SUB6_LONG
            memcpy(key, nxt, 20)
            rc = bpf_map_get_next_key(self.fds["tg_sub6_lpm"], key, nxt)
        return out

    def set_verdicts(self, bint malformed_drop, bint unknown_drop):
        """What the program does with malformed packets and with forwarded packets of no subscriber (the
        config's ``malformed``/``unknown`` verdicts; ``Maps.load`` sets them at a load, a reopen by a daemon
        whose config changed meanwhile sets them here). An unknown address's packets to the gateway itself
        pass either way, as the forward hook never sees them."""
        want = (F_MALFORMED_DROP if malformed_drop else 0) | (F_UNKNOWN_DROP if unknown_drop else 0)
        self._update_flags(want, (F_MALFORMED_DROP | F_UNKNOWN_DROP) & ~want)

    cdef _update_flags(self, unsigned int add, unsigned int clear):
        """Set ``add`` and clear ``clear`` in tg_info's flags (the rest as the kernel has it)."""
        cdef tg_info info
        cdef uint32_t zero = 0
        if bpf_map_lookup_elem(self.fds["tg_info"], &zero, &info):
            raise BpfError("cannot read tg_info", errno)
        info.flags = (info.flags & ~clear) | add
        if bpf_map_update_elem(self.fds["tg_info"], &zero, &info, 0):
            raise BpfError("cannot write tg_info", errno)
        self.flags = info.flags

    cdef _write(self, str name, uint8_t *keys, int ksize, uint8_t *vals, int vsize, Py_ssize_t n, bint remove):
        """Batched update (or delete) of ``n`` elements; element by element
        where the map type has no batch operations (LPM tries)."""
        cdef int fd = self.fds[name]
        cdef bpf_map_batch_opts opts
        cdef uint32_t count
        cdef Py_ssize_t done = 0, i
        cdef int rc = 0, err = 0
        memset(&opts, 0, sizeof(opts))
        opts.sz = sizeof(opts)
        with nogil:
            while done < n:
                count = <uint32_t> min(n - done, <Py_ssize_t> BATCH)
                if remove:
                    rc = bpf_map_delete_batch(fd, keys + done * ksize, &count, &opts)
                else:
                    rc = bpf_map_update_batch(fd, keys + done * ksize, vals + done * vsize, &count, &opts)
                if rc == 0:
                    done += count
                    continue
                err = -rc if rc < 0 else errno
                if err == 2 and remove:  # ENOENT: the batch stops at a missing key; go on one by one
                    err = 0
                if err not in (0, 22, 95, 524):  # EINVAL/EOPNOTSUPP/ENOTSUPP: no batch ops for this map
                    break
                err = 0
                for i in range(done, n):
                    if remove:
                        rc = bpf_map_delete_elem(fd, keys + i * ksize)
                        if rc and (-rc if rc < 0 else errno) != 2:
                            err = -rc if rc < 0 else errno
                            break
                    else:
                        rc = bpf_map_update_elem(fd, keys + i * ksize, vals + i * vsize, 0)
                        if rc:
                            err = -rc if rc < 0 else errno
                            break
                done = n
        if err:
            raise BpfError(f"cannot {'delete from' if remove else 'update'} {name}"
                           + (" (full? size it with Maps.load)" if err == 7 else ""), err)

    def subscriber_count(self):
        """Entries per subscriber map (walks the maps: for tests and checks)."""
        return {name: self._count_keys(name) for name in ("tg_sub4", "tg_sub6", "tg_sub6_64", "tg_sub4_lpm",
                                                           "tg_sub6_lpm")}

    cdef Py_ssize_t _count_keys(self, str name):
        cdef uint8_t key[32]
        cdef uint8_t nxt[32]
        cdef int fd = self.fds[name]
        cdef Py_ssize_t n = 0
        cdef int rc
        with nogil:
            rc = bpf_map_get_next_key(fd, NULL, nxt)
            while rc == 0:
                n += 1
                memcpy(key, nxt, 32)
                rc = bpf_map_get_next_key(fd, key, nxt)
        return n

    # ---- grants and counters ----------------------------------------------------------

    cpdef unsigned long long counter_index(self, unsigned int slot, unsigned int zone, unsigned int direction) except? 0:
        if slot >= self.max_slots or zone >= self.n_zones or direction > 1:
            raise BpfError(f"no counter for slot {slot}, zone {zone}, direction {direction}")
        return (<unsigned long long> slot * self.n_zones + zone) * 2 + direction

    cdef uint64_t *_entry(self, unsigned int slot, unsigned int zone, unsigned int direction) except NULL:
        if self._counters == NULL:
            raise BpfError("the maps are closed or not configured")
        return self._counters + self.counter_index(slot, zone, direction) * 8

    def set_grant(self, unsigned int slot, unsigned int zone, unsigned int direction, nbytes):
        """The cumulative byte limit of (slot, zone, direction): packets pass
        while ``used + length <= grant``. One atomic store."""
        if not 0 <= nbytes <= GRANT_FREE:
            raise BpfError(f"a grant is 0..2**64-1 bytes, not {nbytes}")
        cdef uint64_t value = nbytes
        cdef uint64_t *e = self._entry(slot, zone, direction)
        tg_store64(&e[1], value)

    def grant(self, unsigned int slot, unsigned int zone, unsigned int direction):
        """The grant of (slot, zone, direction) in force: one atomic load."""
        return tg_load64(&self._entry(slot, zone, direction)[1])

    def set_blocked(self, unsigned int slot, bint blocked):
        """Mirror the engine's blocked state of ``slot`` (every zone and direction)."""
        cdef unsigned int z, d
        cdef uint64_t *e
        self._entry(slot, 0, 0)  # slot checked before anything changes
        if self._blocked is None:
            self.blocked_slots()
        if blocked:
            self._blocked.add(slot)
            if not self.flags & F_ANY_BLOCKED:  # before the slot's flags: a lookup too many, never one too few
                self._update_flags(F_ANY_BLOCKED, 0)
        for z in range(self.n_zones):
            for d in range(2):
                e = self._entry(slot, z, d)
                if blocked:
                    tg_or64(&e[7], <uint64_t> C_BLOCKED)
                else:  # redirected goes with it: a slot blocked again starts without (fail closed)
                    tg_and64(&e[7], ~(<uint64_t> (C_BLOCKED | C_REDIRECTED)))
        if not blocked:
            self._blocked.discard(slot)
            if not self._blocked and self.flags & F_ANY_BLOCKED:
                self._update_flags(0, F_ANY_BLOCKED)

    def blocked_slots(self):
        """The slots whose blocked flag is set (a set; read from the counters once, then kept)."""
        cdef unsigned int s
        if self._counters == NULL:
            raise BpfError("the maps are closed or not configured")
        if self._blocked is None:  # the flags a previous process left
            self._blocked = {s for s in range(self.max_slots) if tg_load64(&self._entry(s, 0, 1)[7]) & C_BLOCKED}
        return set(self._blocked)

    def mirror_blocked(self, blocked, among):
        """``set_blocked(slot, slot in blocked)`` for every slot of ``among`` (a container of slots, such as
        a start's subscribers), in what the blocked ones cost: a slot is only written where its flag is to
        change (set for ``blocked``, cleared for the others flagged now), and F_ANY_BLOCKED follows as
        ``set_blocked`` leaves it. ``blocked`` must be a subset of ``among``. A slot of ``among`` whose
        flag is clear and stays clear keeps its redirected flag (``set_blocked(slot, False)`` would clear
        it: a start's are cleared before, ``clear_redirected``)."""
        blocked = set(blocked)
        for slot in blocked:
            if slot not in among:
                raise BpfError(f"slot {slot!r} to block is not one of those mirrored")
            self._entry(slot, 0, 0)  # every slot checked before anything changes
        flagged = self.blocked_slots()
        if blocked and not self.flags & F_ANY_BLOCKED:  # as set_blocked(slot, True) leaves it, flagged or not
            self._update_flags(F_ANY_BLOCKED, 0)
        for slot in sorted(blocked - flagged):
            self.set_blocked(slot, True)
        for slot in sorted(flagged - blocked):
            if slot in among:
                self.set_blocked(slot, False)
        if not self._blocked and self.flags & F_ANY_BLOCKED and len(among) > len(blocked):
            self._update_flags(0, F_ANY_BLOCKED)  # as set_blocked(slot, False) of one of among leaves it

    def refusals_into(self, snapshot, slots):
        """A start's refusals from before it, which are not news: ``dropped_packets`` of every counter of
        ``slots`` copied into ``snapshot`` (``scan``'s, its third field), and ``{counter index:
        dropped_bytes}`` of those whose ``dropped_bytes`` is not 0 returned. One C pass (a Python loop over
        the counters' view was 1.7 s at a million subscribers)."""
        cdef Py_buffer view
        cdef uint64_t *snap
        cdef uint64_t *e
        cdef unsigned long long i, first, per = 2 * self.n_zones
        cdef uint64_t nbytes
        if self._counters == NULL:
            raise BpfError("the maps are closed or not configured")
        out = {}
        PyObject_GetBuffer(snapshot, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if view.len != <Py_ssize_t> (self.n_counters * 24):
                raise BpfError(f"a scan snapshot is {self.n_counters * 24} bytes, not {view.len}")
            snap = <uint64_t *> view.buf
            for slot in slots:
                first = self.counter_index(slot, 0, 0)
                for i in range(first, first + per):
                    e = self._counters + i * 8
                    snap[3 * i + 2] = tg_load64(&e[4])
                    nbytes = tg_load64(&e[3])
                    if nbytes:
                        out[i] = nbytes
        finally:
            PyBuffer_Release(&view)
        return out

    def set_redirected(self, unsigned int slot, bint on):
        """nft's blocked set holds (``on``) or is about to lose (not ``on``) the networks of ``slot``: while
        set and the slot blocked, its tcp/80 uploads (which nft redirects to the block page and never forwards)
        pass uncounted. Set it only after the nft block is committed, clear it before the nft unblock ("Redirected"
        in tollgate.bpf.c). Every zone and direction, atomic per entry; the program reads the upload entry of
        the packet's zone."""
        cdef unsigned int z, d
        cdef uint64_t *e
        self._entry(slot, 0, 0)  # slot checked before anything changes
        for z in range(self.n_zones):
            for d in range(2):
                e = self._entry(slot, z, d)
                if on:
                    tg_or64(&e[7], <uint64_t> C_REDIRECTED)
                else:
                    tg_and64(&e[7], ~(<uint64_t> C_REDIRECTED))

    def clear_redirected(self):
        """Clear every slot's redirected flag (a start, before nft's sets are restored); returns how many had it."""
        cdef unsigned long long i
        cdef uint64_t *e
        cdef unsigned long long n = 0
        if self._counters == NULL:
            raise BpfError("the maps are closed or not configured")
        for i in range(self.n_counters):
            e = self._counters + i * 8
            if tg_load64(&e[7]) & C_REDIRECTED:
                tg_and64(&e[7], ~(<uint64_t> C_REDIRECTED))
                n += 1
        return n // (2 * self.n_zones)

    def counter(self, unsigned int slot, unsigned int zone, unsigned int direction):
        """One entry as a ``Counter`` (a copy)."""
        cdef uint64_t *e = self._entry(slot, zone, direction)
        return Counter(*[tg_load64(&e[k]) for k in range(8)])

    def counters(self):
        """The whole counter array, zero-copy: a memoryview of format ``Q``
        and shape ``(n_counters, 8)`` over the mmapped map. Valid until close()."""
        if self._cmap is None:
            raise BpfError("the maps are closed or not configured")
        return self._cmap.view(self.n_counters, COUNTER_SIZE // 8)

    def refund(self, unsigned int slot, unsigned int zone, unsigned int direction):
        """``(bytes, packets)`` the kernel dropped after the program counted them in this entry's ``used``
        and ``packets`` (monotonic, never reset; 0 without refunds)."""
        cdef unsigned long long i = self.counter_index(slot, zone, direction)
        if self._refunds == NULL:
            raise BpfError("the maps are closed or not configured")
        return tg_load64(&self._refunds[2 * i]), tg_load64(&self._refunds[2 * i + 1])

    def refunds_view(self):
        """Every entry's refund, zero-copy: a memoryview of format ``Q`` and shape ``(n_counters, 2)``
        (bytes, packets) over the mmapped tg_refunds. Valid until close()."""
        if self._rmap is None:
            raise BpfError("the maps are closed or not configured")
        return self._rmap.view(self.n_counters, REFUND_SIZE // 8)

    def refunds_attached(self):
        """``tollgate_drop`` attached through the link pinned here (the heartbeat's question): False
        without refunds, or if the link's pin is gone or holds another program."""
        cdef bpf_link_info link
        cdef bpf_prog_info prog
        cdef uint32_t n
        cdef int fd
        if self.drop_fd < 0:
            return False
        fd = bpf_obj_get(str(Path(self.pin_dir) / DROP_LINK).encode())
        if fd < 0:
            return False
        try:
            memset(&link, 0, sizeof(link))
            n = sizeof(link)
            if bpf_obj_get_info_by_fd(fd, &link, &n):
                return False
        finally:
            close(fd)
        memset(&prog, 0, sizeof(prog))
        n = sizeof(prog)
        if bpf_obj_get_info_by_fd(self.drop_fd, &prog, &n):
            return False
        return link.prog_id == prog.id

    def attach_refunds(self):
        """Attach the pinned ``tollgate_drop`` to skb:kfree_skb again and pin the new link (the heartbeat,
        when ``refunds_attached`` is False). BpfError if it cannot."""
        cdef int fd
        if self.drop_fd < 0:
            raise BpfError("these maps run without refunds")
        path = Path(self.pin_dir) / DROP_LINK
        fd = bpf_raw_tracepoint_open(NULL, self.drop_fd)
        if fd < 0:
            raise BpfError(f"cannot attach {DROP_PROGRAM} to skb:kfree_skb", _err(fd))
        try:
            if path.exists():
                path.unlink()  # a link of another program, or detached: its pin goes
            if bpf_obj_pin(fd, str(path).encode()):
                raise BpfError(f"cannot pin {DROP_LINK} at {self.pin_dir}", errno)
        finally:
            close(fd)

    SCAN_FIELDS = ("used", "packets", "dropped_packets")

    def scan(self, snapshot, bint full=False):
        """What moved since the last scan: ``[(index, used, packets,
        dropped_packets, old used, old packets, old dropped_packets)]`` of every counter whose ``used``, ``packets`` or
        ``dropped_packets`` differs from ``snapshot`` (a writable buffer of
        ``n_counters * 24`` bytes, three uint64 per counter, zeroed by the
        caller at first), which is brought up to date. Without the GIL.

        Only the counters whose bit the program set in ``tg_dirty`` are
        read (each nonzero word swapped to 0 first): the cost is the bitmap
        (n_counters / 8 bytes, 1M subscribers x 2 zones: 512 KiB, read
        word by word) plus what moved. ``full``: every counter, as
        before the bitmap (a start: what a previous process swapped out and
        never charged is only in the counters, against the ledger's marks);
        the bitmap is cleared as it goes."""
        cdef Py_buffer view
        cdef uint64_t *snap
        cdef uint64_t *e
        cdef uint64_t used, packets, dropped
        cdef unsigned long long i, j = 0, n = self.n_counters, k = 0, cap = 1024, w, nw = self.n_words
        cdef uint64_t bits
        cdef int W = 7
        cdef unsigned long long *hits
        cdef unsigned long long *grown
        cdef bint oom = False
        if self._counters == NULL:
            raise BpfError("the maps are closed or not configured")
        PyObject_GetBuffer(snapshot, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if view.len != <Py_ssize_t> (n * 24):
                raise BpfError(f"a scan snapshot is {n * 24} bytes, not {view.len}")
            snap = <uint64_t *> view.buf
            hits = <unsigned long long *> malloc(cap * W * sizeof(unsigned long long))
            if hits == NULL:
                raise MemoryError()
            try:
                with nogil:
                    i = 0
                    w = 0
                    bits = 0
                    while True:
                        if full:
                            if i >= n:
                                break
                            if i % 64 == 0:
                                tg_xchg64(&self._dirty[i // 64], 0)
                            j = i
                            i += 1
                        else:
                            while bits == 0:
                                if w >= nw:
                                    break
                                if tg_load64(&self._dirty[w]) != 0:
                                    bits = tg_xchg64(&self._dirty[w], 0)
                                w += 1
                            if bits == 0:
                                break
                            j = (w - 1) * 64 + <unsigned long long> __builtin_ctzll(bits)
                            bits &= bits - 1
                            if j >= n:
                                continue
                        e = self._counters + j * 8
                        used = tg_load64(&e[0])
                        packets = tg_load64(&e[2])
                        dropped = tg_load64(&e[4])
                        if used == snap[3 * j] and packets == snap[3 * j + 1] and dropped == snap[3 * j + 2]:
                            continue
                        if k == cap:
                            grown = <unsigned long long *> realloc(hits, cap * 2 * W * sizeof(unsigned long long))
                            if grown == NULL:
                                oom = True
                                break
                            hits, cap = grown, cap * 2
                        hits[W * k], hits[W * k + 1], hits[W * k + 2], hits[W * k + 3] = j, used, packets, dropped
                        hits[W * k + 4], hits[W * k + 5], hits[W * k + 6] = snap[3 * j], snap[3 * j + 1], snap[3 * j + 2]
                        snap[3 * j], snap[3 * j + 1], snap[3 * j + 2] = used, packets, dropped  # only once reported
                        k += 1
                if oom:
                    raise MemoryError()
                return [(hits[W * i], hits[W * i + 1], hits[W * i + 2], hits[W * i + 3], hits[W * i + 4],
                         hits[W * i + 5], hits[W * i + 6]) for i in range(k)]
            finally:
                free(hits)
        finally:
            PyBuffer_Release(&view)

    # ---- zones and the allow-list -----------------------------------------------

    def set_zones(self, rules, not_forwarded=()):
        """Replace the zone rules (``ZoneRule``s, the engine's semantics);
        ``not_forwarded``: networks (CIDR strings) the gateway delivers to
        itself: uploads to them pass uncounted (they take precedence over a
        zone rule of the same prefix; downloads from them, forwarded, are
        rated as the engine rates them: egress reads a copy of the groups
        without them, from index ``max_entries / 2`` on)."""
        own = [ZoneRule(str(net), ZONE_NOT_FORWARDED)
               for net in dict.fromkeys(ipaddress.ip_network(n) for n in not_forwarded)]
        rules = [ZoneRule(*r) for r in rules]
        for rule in rules:
            if not 0 <= rule.zone < self.n_zones:
                raise BpfError(f"rule {rule}: zone out of range")
        # first in their prefix's group (compile_rules keeps the order): at ingress they match before anything,
        # at egress the program skips them and the engine's rules of the same prefix follow
        self._rules(own + rules, "tg_zone4", "tg_zone6", "tg_zone_groups", self.n_zones)

    def set_allowlist(self, rules):
        """Replace the allow-list (``ZoneRule``s; ``zone`` is ignored)."""
        self._rules(rules, "tg_allow4", "tg_allow6", "tg_allow_groups", None)

    cdef _rules(self, rules, str lpm4, str lpm6, str groups_name, n_zones):
        cdef tg_group g
        cdef tg_lpm6 key6
        cdef tg_lpm4 key4
        cdef uint32_t gi, value
        cdef int rc
        try:
            compiled = compile_rules(rules, None)  # zones checked by set_zones (ZONE_NOT_FORWARDED is none)
        except TollgateError as exc:
            raise BpfError(str(exc)) from None
        capacity = self._max_entries(groups_name)
        egress = n_zones is not None  # the zones: a copy of the groups for egress (see set_zones)
        if egress:
            capacity //= 2
        if len(compiled) > capacity:
            raise BpfError(f"{len(compiled)} prefixes, {groups_name} holds {capacity}")
        chains = []  # each prefix's rules, then those of its shorter prefixes, in order (the program's one loop)
        for i, (family, net, plen, group_rules, fallback) in enumerate(compiled):
            chain, j = [ZoneRule(*r) for r in group_rules], fallback
            while j >= 0:
                chain += [ZoneRule(*r) for r in compiled[j][3]]
                j = compiled[j][4]
            if len(chain) > MAX_RULES:
                raise BpfError(f"{len(chain)} rules for {ipaddress.ip_network((net, plen))} and the prefixes "
                               f"around it: the program takes {MAX_RULES}")
            chains.append(chain)
        fd = self.fds[groups_name]
        for i, chain in enumerate(chains):
            # egress reads a copy without the not-forwarded rules (see set_zones)
            for half, rules_ in ((0, chain), (1, [r for r in chain if r.zone != ZONE_NOT_FORWARDED])):
                if half and not egress:
                    break
                memset(&g, 0, sizeof(g))
                g.n_rules = len(rules_)
                for r, rule in enumerate(rules_):
                    g.rules[r].proto = rule.proto
                    g.rules[r].zone = rule.zone if n_zones is not None else 0
                    g.rules[r].port_lo = rule.port_lo
                    g.rules[r].port_hi = rule.port_hi
                gi = i + half * capacity
                if bpf_map_update_elem(fd, &gi, &g, 0):
                    raise BpfError(f"cannot write {groups_name}", errno)
        wanted = {4: set(), 6: set()}
        for i, (family, net, plen, group_rules, fallback) in enumerate(compiled):
            value = i
            if family == 4:
                key4.prefixlen = plen
                memcpy(key4.addr, PyBytes_AS_STRING(net.to_bytes(4, "big")), 4)
                rc = bpf_map_update_elem(self.fds[lpm4], &key4, &value, 0)
            else:
                key6.prefixlen = plen
                memcpy(key6.addr, PyBytes_AS_STRING(net.to_bytes(16, "big")), 16)
                rc = bpf_map_update_elem(self.fds[lpm6], &key6, &value, 0)
            if rc:
                raise BpfError(f"cannot write {lpm4 if family == 4 else lpm6} (full?)", errno)
            wanted[family].add((plen, net))
        self._prune(lpm4, 4, wanted[4])
        self._prune(lpm6, 16, wanted[6])

    cdef _prune(self, str name, int alen, set keep):
        """Delete the LPM keys not in ``keep`` ((plen, net) pairs)."""
        cdef uint8_t key[20]
        cdef uint8_t nxt[20]
        cdef int fd = self.fds[name]
        stale = []
        rc = bpf_map_get_next_key(fd, NULL, nxt)
        while rc == 0:
            plen = (<uint32_t *> nxt)[0]
            net = int.from_bytes((<char *> nxt)[4:4 + alen], "big")
            if (plen, net) not in keep:
                stale.append((<char *> nxt)[:4 + alen])
            memcpy(key, nxt, 20)
            rc = bpf_map_get_next_key(fd, key, nxt)
        for k in stale:
            bpf_map_delete_elem(fd, PyBytes_AS_STRING(k))

    cdef uint32_t _max_entries(self, str name):
        return int(self.map_info(name)["max_entries"])

    # ---- the program's own counters, memory, test runs ----------------------------------

    def stats(self):
        """The program's global counters, summed over CPUs: {name: (packets, bytes)}."""
        cdef uint32_t key
        cdef int c
        cdef uint64_t *buf = <uint64_t *> malloc(16 * self.ncpus)
        if buf == NULL:
            raise MemoryError()
        out = {}
        try:
            for key in range(len(STATS)):
                if bpf_map_lookup_elem(self.fds["tg_stats"], &key, buf):
                    raise BpfError("cannot read tg_stats", errno)
                out[STATS[key]] = (sum(buf[2 * c] for c in range(self.ncpus)),
                                   sum(buf[2 * c + 1] for c in range(self.ncpus)))
        finally:
            free(buf)
        return out

    def map_info(self, str name):
        """``/proc/self/fdinfo`` of the map: map_type, max_entries, memlock (bytes), ..."""
        info = {}
        with open(f"/proc/self/fdinfo/{self.fds[name]}") as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
        return info

    def map_memory(self):
        """{map name: bytes the kernel charges for it (memlock)}."""
        return {name: int(self.map_info(name).get("memlock", 0)) for name in MAPS}

    def test_run(self, int direction, frame, int repeat=1, int ingress_ifindex=1):
        """BPF_PROG_TEST_RUN of the program of ``direction`` on ``frame`` (an
        Ethernet frame, 14..~3.5k bytes): ``(retval, duration_ns)``, the
        duration being the kernel's average per repetition.
        ``ingress_ifindex``: the interface the packet came in on (skb_iif);
        0 is a packet the gateway sent itself, which egress passes uncounted."""
        cdef bytes data = bytes(frame)
        cdef bpf_test_run_opts opts
        cdef sk_buff_ctx ctx
        cdef int fd = self.prog_fd(direction)
        cdef int rc
        memset(&opts, 0, sizeof(opts))
        memset(&ctx, 0, sizeof(ctx))
        ctx.ingress_ifindex = ingress_ifindex
        opts.sz = sizeof(opts)
        opts.data_in = PyBytes_AS_STRING(data)
        opts.data_size_in = PyBytes_GET_SIZE(data)
        opts.ctx_in = &ctx
        opts.ctx_size_in = sizeof(ctx)
        opts.repeat = repeat
        with nogil:
            rc = bpf_prog_test_run_opts(fd, &opts)
        if rc:
            raise BpfError(f"BPF_PROG_TEST_RUN of {PROGRAMS[direction]}", _err(rc))
        return opts.retval, opts.duration
