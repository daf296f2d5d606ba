"""The conntrack source: the kernel's per-connection byte counters, read over
ctnetlink, rated as flow records.

Every ``interval`` seconds one dump with ``IPCTNL_MSG_CT_GET_CTRZERO`` reads
every connection's counters and sets them to zero in the same step, so long
flows are charged as they go; a second socket listens to DESTROY events, which
carry what a connection counted since the last dump when it ends, so ended
flows are never missed and nothing is counted twice. Lost events (the
socket's buffer ran over: ENOBUFS) are counted in ``stats()``, never silent.

Direction and NAT: the original tuple is the connection as its first packet
saw it, before the gateway's masquerade (a subscriber's own address), so its
counters are that source's upload and the reply counters its download, both
rated with the original tuple's addresses and ports.

The netlink side is policy/ctnetlink.py. Needs ``net.netfilter.nf_conntrack_acct=1``
(set on start; connections from before that have no counters).

Only what was forwarded is charged. Conntrack counts a packet where it first
sees it (prerouting), before the forward hook where a blocked subscriber's
packets, and those past its kernel quota, are dropped: a flood toward a
blocked subscriber fills the connection's counters with bytes that never
arrived. Given ``bound_by(forwarded)`` (the daemon does), each subscriber and
direction is charged at most what our table's counters say the gateway
forwarded; the rest is counted as ``not_forwarded_bytes``.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time

from ext import PacketBatch
from ext.batch import flow_entries, split_flow
from policy.ctnetlink import (IPCTNL_MSG_CT_DELETE, NETLINK_ADD_MEMBERSHIP, NETLINK_NETFILTER,
                              NFNLGRP_CONNTRACK_DESTROY, SOL_NETLINK, dump, messages, open_socket,
                              parse_conntrack)

from . import process_flows

__all__ = ["ConntrackSource", "parse_conntrack"]

log = logging.getLogger("tollgate.sources.conntrack")

ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"
BATCH = 4096  # engine entries per call (of at most 1 MiB and 2**32-1 packets each)


class ConntrackSource:
    """See the module docstring; the daemon runs it for ``--source conntrack``."""

    OPTIONS = {"interval": "seconds between zero-on-read dumps (default 1)",
               "rcvbuf": "receive buffer of the event socket in bytes (default 16 MiB)"}

    def __init__(self, engine, on_events, interval: str = "1", rcvbuf: str = str(16 << 20)) -> None:
        self.engine = engine
        self.on_events = on_events
        self.interval = float(interval)
        if not 0.05 <= self.interval <= 60:
            raise ValueError("interval is 0.05..60 seconds")
        self._enable_accounting()
        self.dumper = open_socket()
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.events.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(rcvbuf))
        self.events.bind((0, 0))
        self.events.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
        self.stopping = threading.Event()
        self.seq = 0
        self.counts = {"dumps": 0, "records": 0, "bytes": 0, "destroy_events": 0, "enobufs": 0, "malformed": 0,
                       "not_forwarded_bytes": 0}
        self.forwarded = None  # see bound_by
        self.fed: dict[tuple[int, int], int] = {}  # (subscriber, direction) -> bytes rated since bound_by

    def bound_by(self, forwarded) -> None:
        """Charge no subscriber more than the gateway forwarded for it:
        ``forwarded(sids)`` returns ``{subscriber: (upload bytes, download
        bytes)}`` of those subscribers that the kernel's forward counters hold
        and the ledger did not when this was called; it is asked after each
        read of the connections, so everything conntrack counted by then that
        the gateway forwarded is in it."""
        self.forwarded = forwarded
        self.fed = {}

    @staticmethod
    def _enable_accounting() -> None:
        try:
            with open(ACCT_SYSCTL) as f:
                if f.read().strip() == "1":
                    return
            with open(ACCT_SYSCTL, "w") as f:
                f.write("1\n")
            log.warning("enabled net.netfilter.nf_conntrack_acct: connections from before now have no counters")
        except OSError as exc:
            raise OSError(f"conntrack accounting is needed and could not be enabled ({ACCT_SYSCTL}): {exc}") from None

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        next_dump = time.monotonic()
        while not self.stopping.is_set():
            wait = max(0.0, next_dump - time.monotonic())
            ready, _w, _x = select.select([self.events], [], [], min(wait, 0.2))
            if ready:
                self._read_events()
            if time.monotonic() >= next_dump:
                self.dump()
                next_dump += self.interval

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.dump()  # what the connections counted since the last round
        self.dumper.close()
        self.events.close()

    def stats(self) -> dict:
        return dict(self.counts)

    # ---- reading ------------------------------------------------------------------------

    def dump(self) -> None:
        """One zero-on-read dump of every connection, rated."""
        self.seq += 1
        records = dump(self.dumper, self.seq, zero=True)
        self.counts["dumps"] += 1
        self._rate(records)

    def _read_events(self) -> None:
        while True:
            try:
                data = self.events.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == 105:  # ENOBUFS: the kernel dropped events for us
                    self.counts["enobufs"] += 1
                    log.warning("conntrack events lost (ENOBUFS): those flows' last bytes are missing")
                    continue
                raise
            payloads = [p for t, p in messages(data) if t & 0xFF == IPCTNL_MSG_CT_DELETE]
            self.counts["destroy_events"] += len(payloads)
            self._rate(payloads)

    def _rate(self, payloads: list) -> None:
        now = time.time_ns()
        flows = []
        for payload in payloads:
            try:
                flow = parse_conntrack(payload)
            except (KeyError, ValueError, struct.error, IndexError):
                self.counts["malformed"] += 1
                continue
            if flow is not None:
                flows.append(flow)
        budget = None
        if self.forwarded is not None and flows:  # the counters of just the subscribers of these flows
            sids = {self.engine.lookup_subscriber(a) for f in flows for a in f[:2]} - {0}
            budget = self.forwarded(sids)
        batch = PacketBatch(BATCH, aggregates=True)
        for src, dst, proto, sport, dport, orig, reply in flows:
            for (a, b, pa, pb), (nbytes, npackets) in (((src, dst, sport, dport), orig),
                                                       ((dst, src, dport, sport), reply)):
                if not nbytes and not npackets:
                    continue
                if budget is not None:
                    nbytes, npackets = self._forwarded_part(budget, a, b, nbytes, npackets)
                    if not nbytes:
                        continue
                for part, share in split_flow(nbytes, npackets, BATCH):  # any size, exactly (ext/batch.py)
                    if batch.room() < flow_entries(part, share):
                        self._process(batch)
                    batch.append_flow(a, b, proto, pa, pb, part, share, now)
                self.counts["records"] += 1
                self.counts["bytes"] += nbytes
        self._process(batch)

    def _forwarded_part(self, budget: dict, src: str, dst: str, nbytes: int, npackets: int) -> tuple[int, int]:
        """The bytes (and, in proportion, packets) of one direction of a
        connection that fit in what the gateway forwarded for its
        subscribers: the source's upload, the destination's download."""
        keys = [(sid, d) for sid, d in ((self.engine.lookup_subscriber(src), 0),
                                         (self.engine.lookup_subscriber(dst), 1)) if sid]
        allowed = nbytes
        for sid, d in keys:
            allowed = min(allowed, budget.get(sid, (0, 0))[d] - self.fed.get((sid, d), 0))
        allowed = max(0, allowed)
        if allowed < nbytes:
            self.counts["not_forwarded_bytes"] += nbytes - allowed
            npackets = -(-npackets * allowed // nbytes)
        for key in keys:
            self.fed[key] = self.fed.get(key, 0) + allowed
        return allowed, npackets

    def _process(self, batch: PacketBatch) -> None:
        process_flows(self.engine, self.on_events, batch)
