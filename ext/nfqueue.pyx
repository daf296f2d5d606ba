# cython: language_level=3
"""The inline data plane: a batched nfnetlink_queue reader, no Python per packet.

``QueueReader(queue, engine)`` binds one queue over a raw netlink socket and
``run()`` loops without the GIL: ``recvmmsg`` fills preallocated buffers with
up to ``batch_size`` queued packets (copy range ~128 bytes; the true length
comes from ``NFQA_CAP_LEN``), the compiled engine rates the batch in place
(``EngineC.process_c``, pointing into the receive buffers, zero copy), and the
verdicts go back as one ``NFQNL_MSG_VERDICT_BATCH`` per run of equal
verdicts, all in one ``sendto``. Several queues: one reader and one thread
each (``--queue-balance`` spreads flows over them); the engine's locks make
that safe.

Failure mode: with ``fail_open`` (the default) the kernel accepts packets it
cannot queue (``NFQA_CFG_F_FAIL_OPEN``) and the queue rule carries
``--queue-bypass``, so subscriber traffic flows if the daemon dies; blocks
still hold because the blocked sets are evaluated before the queue rule.
``fail_open=False`` drops instead.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, ENOBUFS, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset

from .engine cimport EngineC, TG_MAX_EVENTS_PER_PACKET, tg_batch, tg_event
from .netlink cimport *

import os

from .engine_py import Event
from .errors import QueueError  # noqa: F401  (raised below; importable from here as before)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "nfq_netlink.h" nogil:
    enum:
        NFQNL_CFG_CMD_BIND
        NFQNL_CFG_CMD_UNBIND
        NFQA_CFG_F_FAIL_OPEN
        NFQA_CFG_F_GSO
        NLMSG_HDRLEN
    struct tg_nfq_packet:
        uint32_t id
        uint32_t payload_off
        uint32_t payload_len
        uint32_t wire_len
    int tg_nfq_cmd(int fd, uint16_t queue, uint8_t cmd, uint32_t seq)
    int tg_nfq_params(int fd, uint16_t queue, uint32_t copy_range, uint32_t maxlen, uint32_t flags, uint32_t seq)
    int tg_nfq_parse(const nlmsghdr *nlh, const char *base, tg_nfq_packet *out)
    void tg_nfq_verdict(char *buf, size_t *used, uint16_t queue, int batch, uint32_t id, uint32_t verdict)
    int64_t tg_now_ns()
    uint32_t NLMSG_ALIGN(uint32_t)

cdef enum:
    SLOT = 2048          # receive buffer per datagram: copy range + netlink headers, with room
    MAX_PER_DATAGRAM = 8  # packet messages the kernel may pack into one datagram



cdef class QueueReader:
    """One nfqueue, read in batches into the compiled engine. See the module docstring."""

    cdef readonly int queue_num, batch_size, fd
    cdef readonly long linger_ns
    cdef readonly bint fail_open
    cdef EngineC engine
    cdef object on_events
    cdef char *rx                    # batch_size * SLOT receive buffers
    cdef mmsghdr *msgs
    cdef iovec *iovs
    cdef uint32_t *offset
    cdef uint32_t *caplen
    cdef uint32_t *wirelen
    cdef uint32_t *ids
    cdef int64_t *ts
    cdef uint8_t *verdict
    cdef tg_event *events
    cdef char *tx                    # verdict messages
    cdef volatile bint stopping
    cdef uint64_t n_packets, n_bytes, n_batches, n_verdict_msgs, n_recv_errors, n_enobufs, n_malformed
    cdef uint64_t n_send_errors, n_events
    # held from rating a batch to sending its verdicts: a drain taken while it is held (hold()) never
    # sees counters of packets whose verdicts are not with the kernel yet. Otherwise a flush could write
    # bytes that a SIGKILL then stops from being forwarded (the kernel drops queued packets when the
    # socket goes): charged, never delivered, and the kernel's count would trail the ledger's mark.
    cdef pthread_mutex_t rating

    def __cinit__(self, int queue_num, EngineC engine not None, *, int batch_size=64, int copy_range=128,
                  int queue_maxlen=8192, int rcvbuf=64 << 20, bint fail_open=True, bint gso=True, on_events=None,
                  int linger_us=0):
        self.fd = -1
        pthread_mutex_init(&self.rating, NULL)
        self.linger_ns = linger_us * 1000
        if not 1 <= batch_size <= 1024:
            raise ValueError("batch_size must be 1..1024")
        cdef int cap = batch_size * MAX_PER_DATAGRAM
        self.queue_num = queue_num
        self.batch_size = batch_size
        self.fail_open = fail_open
        self.engine = engine
        self.on_events = on_events
        self.rx = <char *> PyMem_Malloc(<size_t> batch_size * SLOT)
        self.msgs = <mmsghdr *> PyMem_Malloc(batch_size * sizeof(mmsghdr))
        self.iovs = <iovec *> PyMem_Malloc(batch_size * sizeof(iovec))
        self.offset = <uint32_t *> PyMem_Malloc(cap * sizeof(uint32_t))
        self.caplen = <uint32_t *> PyMem_Malloc(cap * sizeof(uint32_t))
        self.wirelen = <uint32_t *> PyMem_Malloc(cap * sizeof(uint32_t))
        self.ids = <uint32_t *> PyMem_Malloc(cap * sizeof(uint32_t))
        self.ts = <int64_t *> PyMem_Malloc(cap * sizeof(int64_t))
        self.verdict = <uint8_t *> PyMem_Malloc(cap * sizeof(uint8_t))
        self.events = <tg_event *> PyMem_Malloc(cap * TG_MAX_EVENTS_PER_PACKET * sizeof(tg_event))
        self.tx = <char *> PyMem_Malloc(cap * 64)
        if not (self.rx and self.msgs and self.iovs and self.offset and self.caplen and self.wirelen and self.ids
                and self.ts and self.verdict and self.events and self.tx):
            raise MemoryError()
        cdef int i
        memset(self.msgs, 0, batch_size * sizeof(mmsghdr))
        for i in range(batch_size):
            self.iovs[i].iov_base = self.rx + <size_t> i * SLOT
            self.iovs[i].iov_len = SLOT
            self.msgs[i].msg_hdr.msg_iov = &self.iovs[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
        self._open(copy_range, queue_maxlen, rcvbuf, gso)

    cdef _open(self, int copy_range, int queue_maxlen, int rcvbuf, bint gso):
        cdef sockaddr_nl addr
        cdef timeval tv
        cdef int zero = 0, rc
        self.fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)
        if self.fd < 0:
            raise QueueError(errno, f"netlink socket: {os.strerror(errno)}")
        # a large receive buffer absorbs bursts while a batch is being rated
        setsockopt(self.fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(int))
        # losses must show: keep ENOBUFS reports on (counted in stats)
        setsockopt(self.fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &zero, sizeof(int))
        tv.tv_sec = 0
        tv.tv_usec = 100000  # the loop looks at stop() at least every 100 ms
        setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv))
        memset(&addr, 0, sizeof(addr))
        addr.nl_family = AF_NETLINK
        if bind(self.fd, <void *> &addr, sizeof(addr)) < 0:
            raise QueueError(errno, f"netlink bind: {os.strerror(errno)}")
        rc = tg_nfq_cmd(self.fd, self.queue_num, NFQNL_CFG_CMD_BIND, 1)
        if rc < 0:
            raise QueueError(-rc, f"binding queue {self.queue_num}: {os.strerror(-rc)}"
                                  + (" (another program holds it?)" if -rc == 16 else ""))
        cdef uint32_t flags = (NFQA_CFG_F_FAIL_OPEN if self.fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
        rc = tg_nfq_params(self.fd, self.queue_num, copy_range, queue_maxlen, flags, 2)
        if rc < 0:
            raise QueueError(-rc, f"configuring queue {self.queue_num}: {os.strerror(-rc)}")

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        PyMem_Free(self.rx); PyMem_Free(self.msgs); PyMem_Free(self.iovs); PyMem_Free(self.offset)
        PyMem_Free(self.caplen); PyMem_Free(self.wirelen); PyMem_Free(self.ids); PyMem_Free(self.ts)
        PyMem_Free(self.verdict); PyMem_Free(self.events); PyMem_Free(self.tx)

    def hold(self):
        """Wait until no batch is between rating and verdict, and keep it so
        until ``release()``: the daemon drains the engine in between."""
        with nogil:
            pthread_mutex_lock(&self.rating)

    def release(self):
        pthread_mutex_unlock(&self.rating)

    def stop(self):
        """Ask ``run`` to return after the batch in hand."""
        self.stopping = True

    def close(self):
        """Unbind the queue and close the socket (packets then follow the bypass/fail choice)."""
        if self.fd >= 0:
            tg_nfq_cmd(self.fd, self.queue_num, NFQNL_CFG_CMD_UNBIND, 3)
            close(self.fd)
            self.fd = -1

    def stats(self):
        return {"packets": self.n_packets, "bytes": self.n_bytes, "batches": self.n_batches,
                "verdict_messages": self.n_verdict_msgs, "recv_errors": self.n_recv_errors,
                "enobufs": self.n_enobufs, "malformed_messages": self.n_malformed,
                "send_errors": self.n_send_errors, "events": self.n_events}

    def run(self, uint64_t stop_after_packets=0):
        """Read, rate and answer batches until ``stop()`` (or that many packets).

        Releases the GIL except to hand engine events to ``on_events`` (a
        callable taking a list of ``(Event, ts_ns)``), which happens only for
        batches that produced events."""
        cdef Py_ssize_t n_events
        cdef uint64_t start = self.n_packets
        cdef uint64_t until = start + stop_after_packets if stop_after_packets else 0
        if self.linger_ns:
            prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # this thread's sleeps may be late by 1 us, not 50
        while not self.stopping:
            # stay without the GIL batch after batch; come back only to hand over events
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

    cdef Py_ssize_t _one_batch(self) noexcept nogil:
        """One recvmmsg, one engine call, one sendto. Returns the number of events."""
        cdef int n = recvmmsg(self.fd, self.msgs, self.batch_size, MSG_WAITFORONE, NULL)
        cdef int more
        cdef timespec pause
        cdef int i, rc, remaining
        cdef uint32_t k = 0
        cdef const char *base
        cdef const nlmsghdr *nlh
        cdef tg_nfq_packet pkt
        cdef tg_batch b
        cdef int64_t now
        cdef size_t used = 0
        cdef Py_ssize_t n_events
        if n < 0:
            if errno == ENOBUFS:
                self.n_enobufs += 1
            elif errno != EAGAIN and errno != EINTR:
                self.n_recv_errors += 1
            return 0
        if self.linger_ns and 0 < n < self.batch_size // 4:
            # a thin batch: let a few more packets queue up, then take them in the
            # same recvmmsg, so that system calls are paid per batch, not per packet
            pause.tv_sec = 0
            pause.tv_nsec = self.linger_ns
            nanosleep(&pause, NULL)
            more = recvmmsg(self.fd, self.msgs + n, self.batch_size - n, MSG_DONTWAIT, NULL)
            if more > 0:
                n += more
        now = tg_now_ns()
        for i in range(n):
            base = self.rx + <size_t> i * SLOT
            remaining = self.msgs[i].msg_len
            if self.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.n_malformed += 1
            nlh = <const nlmsghdr *> base
            while remaining >= NLMSG_HDRLEN and nlh.nlmsg_len >= NLMSG_HDRLEN and nlh.nlmsg_len <= <uint32_t> remaining:
                rc = tg_nfq_parse(nlh, self.rx, &pkt)
                if rc != 0 and k < <uint32_t> (self.batch_size * MAX_PER_DATAGRAM):
                    if rc < 0:
                        self.n_malformed += 1
                        pkt.payload_len = 0
                    self.ids[k] = pkt.id
                    self.offset[k] = pkt.payload_off
                    self.caplen[k] = pkt.payload_len
                    self.wirelen[k] = pkt.wire_len
                    self.ts[k] = now
                    k += 1
                remaining -= NLMSG_ALIGN(nlh.nlmsg_len)
                nlh = <const nlmsghdr *> ((<const char *> nlh) + NLMSG_ALIGN(nlh.nlmsg_len))
        if k == 0:
            return 0
        b.buf = <const unsigned char *> self.rx
        b.offset = self.offset
        b.caplen = self.caplen
        b.wirelen = self.wirelen
        b.ts = self.ts
        b.verdict = self.verdict
        b.packets = NULL  # real packets
        b.n = k
        pthread_mutex_lock(&self.rating)
        n_events = self.engine.process_c(&b, self.events)
        # verdicts: one batch verdict per run of equal verdicts, in id order
        cdef uint32_t j = 0
        while j < k:
            while j + 1 < k and self.verdict[j + 1] == self.verdict[j] and self.ids[j + 1] > self.ids[j]:
                j += 1
            tg_nfq_verdict(self.tx, &used, self.queue_num, 1, self.ids[j], self.verdict[j])
            self.n_verdict_msgs += 1
            j += 1
        cdef sockaddr_nl kernel
        memset(&kernel, 0, sizeof(kernel))
        kernel.nl_family = AF_NETLINK
        if sendto(self.fd, self.tx, used, 0, <void *> &kernel, sizeof(kernel)) < 0:
            self.n_send_errors += 1
        pthread_mutex_unlock(&self.rating)
        self.n_batches += 1
        self.n_packets += k
        for i in range(<int> k):
            self.n_bytes += self.wirelen[i]
        return n_events
