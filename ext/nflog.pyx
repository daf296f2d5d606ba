# cython: language_level=3
"""The passive data plane: a batched nfnetlink_log reader, no Python per packet.

``LogReader(group, engine)`` binds one NFLOG group over a raw netlink socket
and ``run()`` loops without the GIL: ``recvmmsg`` takes up to ``batch_size``
datagrams, each holding many logged packets (the kernel gathers them up to the
rule's ``queue-threshold`` or its flush timeout), into preallocated buffers;
the compiled engine rates them in place (``EngineC.process_c``, pointing into
the receive buffers, zero copy).

The packets are copies: the originals were forwarded already (NFLOG holds
nothing up), so each is rated as traffic that has passed, charged even past
the limit (the engine's aggregate of one packet). Stopping a subscriber is the
kernel's business: the blocked sets, and the per-subscriber quotas of
``policy.nft`` that cut traffic at the byte while this reader catches up.

Nothing is lost silently: the kernel numbers each logged packet of the group
(``NFULNL_CFG_F_SEQ``, attribute ``NFULA_SEQ``); a datagram the socket could
not take is dropped whole by the kernel, and its numbers are missing here.
``stats()`` counts the gaps and the packets in them, and the ``ENOBUFS``
reports the socket gets when it overruns (``NETLINK_NO_ENOBUFS`` stays off).

Bytes are the IP length the packet's own header states (nfnetlink_log has no
original-length attribute, unlike nfnetlink_queue's ``NFQA_CAP_LEN``): the
IPv4 total length or 40 + the IPv6 payload length, equal to ``skb->len`` in
the forward hook, GSO packets included. A header that states no length (a
jumbogram) is rated at its copied length and counted as ``unknown_length``.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, ENOBUFS, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

from .engine cimport EngineC, TG_MAX_EVENTS_PER_PACKET, tg_batch, tg_event
from .netlink cimport *

import os

from .engine_py import Event
from .errors import LogError  # noqa: F401  (raised below; importable from here as before)

cdef extern from "nflog_netlink.h" nogil:
    enum:
        NFULNL_CFG_CMD_UNBIND
        NFULNL_CFG_F_SEQ
        NLMSG_HDRLEN
    struct tg_nful_packet:
        uint32_t payload_off
        uint32_t payload_len
        uint32_t wire_len
        uint32_t seq
        int has_seq
    int tg_nful_cmd(int fd, uint16_t group, uint8_t cmd, uint32_t seq)
    int tg_nful_bind(int fd, uint16_t group, uint32_t copy_range, uint32_t nlbufsiz, uint32_t qthresh,
                     uint32_t timeout_cs, uint16_t flags, uint32_t seq)
    int tg_nful_parse(const nlmsghdr *nlh, const char *base, tg_nful_packet *out)
    int64_t tg_now_ns()
    uint32_t NLMSG_ALIGN(uint32_t)

cdef enum:
    MIN_MESSAGE = 64           # the smallest packet message: headers, a sequence number, an IPv4 header
    MAX_NLBUFSIZ = 131072      # the kernel's limit for NFULA_CFG_NLBUFSIZ



cdef class LogReader:
    """One NFLOG group, read in batches into the compiled engine. See the module docstring.

    ``copy_range``: bytes of each packet copied (the nft rule's ``snaplen``
    caps it too); ``nlbufsiz``: the kernel's buffer per datagram (and the size
    of each receive slot); ``qthresh``: packets per datagram unless the rule
    sets ``queue-threshold``; ``flush_ms``: how long the kernel holds a
    datagram that is not full (10 ms steps); ``batch_size``: datagrams per
    ``recvmmsg``; ``rcvbuf``: the socket's receive buffer (``SO_RCVBUFFORCE``).
    """

    cdef readonly int group, batch_size, fd, slot
    cdef readonly uint32_t capacity
    cdef EngineC engine
    cdef object on_events
    cdef char *rx
    cdef mmsghdr *msgs
    cdef iovec *iovs
    cdef uint32_t *offset
    cdef uint32_t *caplen
    cdef uint32_t *wirelen
    cdef uint32_t *ones
    cdef int64_t *ts
    cdef uint8_t *verdict
    cdef tg_event *events
    cdef volatile bint stopping
    cdef uint32_t next_seq
    cdef uint64_t n_packets, n_bytes, n_batches, n_datagrams, n_recv_errors, n_enobufs, n_malformed
    cdef uint64_t n_truncated, n_gaps, n_lost, n_unknown_length, n_overflow, n_events, n_no_seq
    cdef readonly int rcvbuf

    def __cinit__(self, int group, EngineC engine not None, *, int batch_size=16, int copy_range=128,
                  int nlbufsiz=65536, int qthresh=64, int flush_ms=10, int rcvbuf=64 << 20, on_events=None):
        self.fd = -1
        if not 0 <= group <= 65535:
            raise ValueError("group must be 0..65535")
        if not 1 <= batch_size <= 256:
            raise ValueError("batch_size must be 1..256")
        if not 4096 <= nlbufsiz <= MAX_NLBUFSIZ:
            raise ValueError(f"nlbufsiz must be 4096..{MAX_NLBUFSIZ}")
        if not 40 <= copy_range <= 0xFFFF or not 1 <= qthresh <= 65535 or not 0 <= flush_ms <= 100000:
            raise ValueError("copy_range 40..65535, qthresh 1..65535, flush_ms 0..100000")
        self.group = group
        self.batch_size = batch_size
        self.engine = engine
        self.on_events = on_events
        # a slot holds the biggest datagram the kernel sends: its buffer, or one packet that needed more
        self.slot = max(nlbufsiz, copy_range + 4096)
        self.capacity = <uint32_t> batch_size * (self.slot // MIN_MESSAGE)
        self.rx = <char *> PyMem_Malloc(<size_t> batch_size * self.slot)
        self.msgs = <mmsghdr *> PyMem_Malloc(batch_size * sizeof(mmsghdr))
        self.iovs = <iovec *> PyMem_Malloc(batch_size * sizeof(iovec))
        self.offset = <uint32_t *> PyMem_Malloc(self.capacity * sizeof(uint32_t))
        self.caplen = <uint32_t *> PyMem_Malloc(self.capacity * sizeof(uint32_t))
        self.wirelen = <uint32_t *> PyMem_Malloc(self.capacity * sizeof(uint32_t))
        self.ones = <uint32_t *> PyMem_Malloc(self.capacity * sizeof(uint32_t))
        self.ts = <int64_t *> PyMem_Malloc(self.capacity * sizeof(int64_t))
        self.verdict = <uint8_t *> PyMem_Malloc(self.capacity * sizeof(uint8_t))
        self.events = <tg_event *> PyMem_Malloc(self.capacity * TG_MAX_EVENTS_PER_PACKET * sizeof(tg_event))
        if not (self.rx and self.msgs and self.iovs and self.offset and self.caplen and self.wirelen and self.ones
                and self.ts and self.verdict and self.events):
            raise MemoryError()
        cdef uint32_t k
        for k in range(self.capacity):
            self.ones[k] = 1  # each entry is one packet that has passed (see the module docstring)
        cdef int i
        memset(self.msgs, 0, batch_size * sizeof(mmsghdr))
        for i in range(batch_size):
            self.iovs[i].iov_base = self.rx + <size_t> i * self.slot
            self.iovs[i].iov_len = self.slot
            self.msgs[i].msg_hdr.msg_iov = &self.iovs[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
        self._open(copy_range, nlbufsiz, qthresh, (flush_ms + 9) // 10, rcvbuf)

    cdef _open(self, int copy_range, int nlbufsiz, int qthresh, int timeout_cs, int rcvbuf):
        cdef sockaddr_nl addr
        cdef timeval tv
        cdef int zero = 0, rc
        cdef unsigned int optlen = sizeof(int)
        self.fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
        if self.fd < 0:
            raise LogError(errno, f"netlink socket: {os.strerror(errno)}")
        # a large receive buffer absorbs bursts while a batch is being rated
        if setsockopt(self.fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(int)) < 0:
            setsockopt(self.fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(int))  # without CAP_NET_ADMIN: capped
        getsockopt(self.fd, SOL_SOCKET, SO_RCVBUF, &self.rcvbuf, &optlen)
        # losses must show: keep ENOBUFS reports on (counted in stats)
        setsockopt(self.fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &zero, sizeof(int))
        tv.tv_sec = 0
        tv.tv_usec = 100000  # the loop looks at stop() at least every 100 ms
        setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv))
        memset(&addr, 0, sizeof(addr))
        addr.nl_family = AF_NETLINK
        if bind(self.fd, <void *> &addr, sizeof(addr)) < 0:
            raise LogError(errno, f"netlink bind: {os.strerror(errno)}")
        rc = tg_nful_bind(self.fd, self.group, copy_range, nlbufsiz, qthresh, timeout_cs, NFULNL_CFG_F_SEQ, 1)
        if rc < 0:
            raise LogError(-rc, f"binding NFLOG group {self.group}: {os.strerror(-rc)}"
                                + (" (another program holds it?)" if -rc == 16 else ""))

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        PyMem_Free(self.rx); PyMem_Free(self.msgs); PyMem_Free(self.iovs); PyMem_Free(self.offset)
        PyMem_Free(self.caplen); PyMem_Free(self.wirelen); PyMem_Free(self.ones); PyMem_Free(self.ts)
        PyMem_Free(self.verdict); PyMem_Free(self.events)

    def stop(self):
        """Ask ``run`` to return after the batch in hand."""
        self.stopping = True

    def close(self):
        """Unbind the group and close the socket (the kernel then logs to nobody)."""
        if self.fd >= 0:
            tg_nful_cmd(self.fd, self.group, NFULNL_CFG_CMD_UNBIND, 3)
            close(self.fd)
            self.fd = -1

    def stats(self):
        """Counters since the start. ``lost_packets``: sequence numbers never
        seen (the kernel dropped their datagram); ``seq_gaps``: how many times
        that happened; ``enobufs``: overrun reports of the socket."""
        return {"packets": self.n_packets, "bytes": self.n_bytes, "batches": self.n_batches,
                "datagrams": self.n_datagrams, "seq_gaps": self.n_gaps, "lost_packets": self.n_lost,
                "enobufs": self.n_enobufs, "recv_errors": self.n_recv_errors,
                "malformed_messages": self.n_malformed, "truncated_datagrams": self.n_truncated,
                "unknown_length": self.n_unknown_length, "no_sequence": self.n_no_seq,
                "overflow": self.n_overflow, "events": self.n_events, "next_seq": self.next_seq,
                "rcvbuf": self.rcvbuf}

    def run(self, uint64_t stop_after_packets=0):
        """Read and rate batches until ``stop()`` (or that many packets).

        Releases the GIL except to hand engine events to ``on_events`` (a
        callable taking a list of ``(Event, ts_ns)``), which happens only for
        batches that produced events."""
        cdef Py_ssize_t n_events
        cdef uint64_t until = self.n_packets + stop_after_packets if stop_after_packets else 0
        while not self.stopping:
            with nogil:
                n_events = 0
                while n_events == 0 and not self.stopping and (until == 0 or self.n_packets < until):
                    n_events = self._one_batch()
            if n_events > 0:
                self.n_events += n_events
                if self.on_events is not None:
                    self.on_events([(Event(self.events[k].kind, self.events[k].subscriber, self.events[k].index,
                                           self.events[k].reason, self.events[k].balance),
                                     self.ts[self.events[k].index]) for k in range(n_events)])
            if until and self.n_packets >= until:
                break

    cdef inline void _sequence(self, uint32_t seq) noexcept nogil:
        """Count the numbers skipped before ``seq`` (modulo 2**32)."""
        cdef uint32_t missing = seq - self.next_seq
        if missing != 0 and missing < 0x80000000u:
            self.n_gaps += 1
            self.n_lost += missing
        self.next_seq = seq + 1

    cdef Py_ssize_t _one_batch(self) noexcept nogil:
        """One recvmmsg, one engine call. Returns the number of events."""
        cdef int n = recvmmsg(self.fd, self.msgs, self.batch_size, MSG_WAITFORONE, NULL)
        cdef int i
        cdef uint32_t k = 0
        cdef int64_t now
        if n < 0:
            if errno == ENOBUFS:
                self.n_enobufs += 1
            elif errno != EAGAIN and errno != EINTR:
                self.n_recv_errors += 1
            return 0
        now = tg_now_ns()
        self.n_datagrams += n
        for i in range(n):
            if self.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.n_truncated += 1  # the packets cut off show as a sequence gap
            k = self._walk(<size_t> i * self.slot, self.msgs[i].msg_len, k, now)
        return self._rate(k)

    cdef uint32_t _walk(self, size_t start, int remaining, uint32_t k, int64_t now) noexcept nogil:
        """Take the packet messages of the datagram at ``rx + start`` into the
        batch from entry ``k`` on; returns the new number of entries."""
        cdef const nlmsghdr *nlh = <const nlmsghdr *> (self.rx + start)
        cdef tg_nful_packet pkt
        cdef int rc
        while remaining >= NLMSG_HDRLEN and nlh.nlmsg_len >= NLMSG_HDRLEN and nlh.nlmsg_len <= <uint32_t> remaining:
            rc = tg_nful_parse(nlh, self.rx, &pkt)
            if rc < 0:
                self.n_malformed += 1
            elif rc > 0:
                if pkt.has_seq:
                    self._sequence(pkt.seq)
                else:
                    self.n_no_seq += 1
                if k >= self.capacity:
                    self.n_overflow += 1  # cannot happen while MIN_MESSAGE holds; counted if it does
                else:
                    if pkt.wire_len == 0:
                        self.n_unknown_length += 1
                        pkt.wire_len = pkt.payload_len
                    self.offset[k] = pkt.payload_off
                    self.caplen[k] = pkt.payload_len
                    self.wirelen[k] = pkt.wire_len
                    self.ts[k] = now
                    self.n_bytes += pkt.wire_len
                    k += 1
            if NLMSG_ALIGN(nlh.nlmsg_len) >= <uint32_t> remaining:
                break
            remaining -= NLMSG_ALIGN(nlh.nlmsg_len)
            nlh = <const nlmsghdr *> ((<const char *> nlh) + NLMSG_ALIGN(nlh.nlmsg_len))
        if remaining > 0 and (remaining < NLMSG_HDRLEN or nlh.nlmsg_len < NLMSG_HDRLEN
                              or nlh.nlmsg_len > <uint32_t> remaining):
            self.n_malformed += 1  # trailing bytes that are no whole message
        return k

    cdef Py_ssize_t _rate(self, uint32_t k) noexcept nogil:
        cdef tg_batch b
        if k == 0:
            return 0
        b.buf = <const unsigned char *> self.rx
        b.offset = self.offset
        b.caplen = self.caplen
        b.wirelen = self.wirelen
        b.ts = self.ts
        b.verdict = self.verdict
        b.packets = self.ones
        b.n = k
        self.n_batches += 1
        self.n_packets += k
        return self.engine.process_c(&b, self.events)

    def feed(self, const unsigned char[:] datagram):
        """Rate ``datagram`` as if it had been received (tests: damaged input
        goes through the same parser); returns the engine's events."""
        if datagram.shape[0] > self.slot:
            raise ValueError(f"a datagram of at most {self.slot} bytes")
        cdef Py_ssize_t i, n_events
        for i in range(datagram.shape[0]):
            self.rx[i] = datagram[i]
        with nogil:
            n_events = self._rate(self._walk(0, <int> datagram.shape[0], 0, tg_now_ns()))
        self.n_datagrams += 1
        self.n_events += n_events
        return [Event(self.events[i].kind, self.events[i].subscriber, self.events[i].index, self.events[i].reason,
                      self.events[i].balance) for i in range(n_events)]
