"""The kernel's counters as the ground truth: crash recovery and drift.

Our table's per-subscriber counters are monotonic: ``Enforcer.install()`` and
``restore()`` keep them, so they survive a restart and a SIGKILL. The
ledger's kernel marks say how much of each count it already holds as usage
(every inline flush adds its bytes in the same transaction). So kernel - mark
is traffic the gateway forwarded and never charged: rated but not flushed
when the process died, or let through fail-open while no reader was bound
(start-up, downtime, a full queue). It is charged, at the default zone's
price at the current time slot (the kernel does not know zones), and so lands
in the ledger with the next flush.

A drift check reads the subscribers with traffic since the last check and a
rotating slice of the others (all of them every ``DRIFT_ROUNDS`` checks, the
slice never more than ``DRIFT_SLICE`` subscribers), so that it costs in
proportion to the active subscribers: at a million subscribers a thirtieth
is 33k subscribers, 60k elements asked for by value every 10 s (the 1M
bench before the cap: 26% of a core idle, the first traffic counted 208 s
after /healthz), so there the quiet ones are looked at over hours instead
of five minutes.

The drift thread (``loop``) reads the kernel, through a libnftables
context of its own, and hands the reading to the flusher, which compares it
with the marks right after its next flush, as before. The reading is off the
flusher's path because at a million subscribers nft 1.0.6 answers a ``get
element`` in seconds (it loads the whole set first): flushes, payments and
changes must not wait for it.

Locks: ``lock`` (its own) around the marks, the latest flush's bytes and the
active set, which the flusher thread writes and the drift thread reads. The
gateway's ``enforcer_lock`` is taken only around reads through the shared
context (start, a subscriber's networks leaving, the conntrack bound), the
``engine_lock`` around the charges of unrated traffic (never both at once).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger("tollgate.daemon")
DRIFT_ROUNDS = 30  # a drift check reads the active subscribers and 1/30 of the others (see sample)
DRIFT_SLICE = 2000  # ... but never more than this many of the others


class KernelTruth:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.marks: dict[tuple[int, int], list[int]] = {}  # the ledger's kernel marks, followed in memory
        self.last_flushed: dict[tuple[int, int], int] = {}  # bytes of the latest flush, per (subscriber, direction)
        self.active: set[int] = set()  # subscribers with traffic since the last drift check
        self.cursor = 0  # where the next drift check's slice of everyone begins
        self.ring: list[int] | None = None  # everyone, in the order the slices take them
        self.drift: dict[str, int] = {}  # subscriber -> kernel minus engine bytes, where beyond noise
        self.kernel_before: dict | None = None  # the previous drift check's kernel counters (passive sources)
        self.next_check = time.monotonic() + gw.opts.drift_interval
        self.lock = threading.Lock()
        self.readings: queue.Queue = queue.Queue(maxsize=1)  # (kernel, settled) for the flusher's next round
        self.reader = None  # policy.nft.Enforcer: the drift thread's own libnftables context

    def load_marks(self) -> None:
        self.marks = {key: list(v) for key, v in self.gw.ledger.kernel_marks().items()}

    def subscribers_changed(self) -> None:
        """Someone came or went: the drift ring is made again at the next check."""
        self.ring = None

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    # ---- what the flusher tells ---------------------------------------------

    def note_drained(self, rows) -> None:
        with self.lock:
            self.active |= {r.subscriber for r in rows}

    def note_flushed(self, rows) -> None:
        """A flush reached the ledger, its marks moved in the same transaction: follow them."""
        with self.lock:
            self.last_flushed = {}
            for sid, _zone, direction, _minute, nbytes, packets, _charged in rows:
                self.last_flushed[(sid, direction)] = self.last_flushed.get((sid, direction), 0) + nbytes
                mark = self.marks.setdefault((sid, direction), [0, 0])
                mark[0] += nbytes
                mark[1] += packets

    # ---- reading the kernel -------------------------------------------------

    def counts(self, sids=None, listing: dict | None = None, reader=None) -> dict[int, tuple]:
        """``{subscriber: ((up bytes, up packets), (down bytes, down packets))}``
        of every subscriber from ``listing`` (the per-network counters
        ``Enforcer.restore`` read at start: the only whole listing), or of just
        ``sids`` (their elements asked for by value; through ``reader``, a
        context of the caller's own, without the shared one's lock)."""
        gw = self.gw
        table = gw.acct.subscribers
        if listing is not None:  # sid -> its networks, everyone's read from the table's column at once
            counters = listing
            subs = dict(zip(*table.networks_by_id()))
            subs = {sid: text.split(" ") if text else () for sid, text in subs.items()}
        else:
            subs = {sid: table[sid].addresses for sid in sids if sid in table}
            networks = [n for nets in subs.values() for n in nets]
            if reader is not None:
                counters = reader.counters_of(networks)
            else:
                with gw.enforcer_lock:
                    counters = gw.enforcer.counters_of(networks)
        out = {}
        for sid, nets in subs.items():
            rows = [counters[n] for n in nets if n in counters]
            out[sid] = tuple((sum(r[f"{way}_bytes"] for r in rows), sum(r[f"{way}_packets"] for r in rows))
                             for way in ("up", "down"))
        return out

    def total_bytes(self, sids, reader=None) -> dict[int, int]:
        """Up plus down bytes of these subscribers (passive sources)."""
        return {sid: sum(b for b, _p in ways) for sid, ways in self.counts(sids, reader=reader).items()}

    def sample(self) -> list[int]:
        """Whom a drift check reads: every subscriber with traffic since the
        last check, and the next slice of the others in turn: traffic that
        bypasses the engine for a subscriber it never sees is found too."""
        with self.lock:
            active, self.active = self.active, set()
        if self.ring is None:  # made again only when subscribers come or go, not each check
            with self.gw.engine_lock:  # where subscribers come and go
                self.ring = list(self.gw.acct.subscribers)
        everyone = self.ring
        step = min(DRIFT_SLICE, max(1, -(-len(everyone) // DRIFT_ROUNDS)))
        start = self.cursor % max(1, len(everyone))
        self.cursor = start + step
        return sorted(active | set(everyone[start:start + step]))

    def settled_marks(self, sids) -> dict[int, int]:
        """Bytes in the marks of ``sids`` as of the flush before the latest:
        drained a whole flush interval ago or more, so long past the kernel."""
        with self.lock:
            return {sid: sum(self.marks.get((sid, d), (0, 0))[0] - self.last_flushed.get((sid, d), 0)
                             for d in (0, 1)) for sid in sids}

    # ---- unrated traffic ----------------------------------------------------

    def charge_unrated(self, kernel: dict, when: str, reset_behind: bool = True, charge: bool = True) -> dict[str, int]:
        """Charge what the kernel counted beyond the marks. Called with a
        kernel listing taken *before* the flush that brought the marks up to
        date (or at start, before any packet was rated): every byte the kernel
        had counted through the engine was rated before the listing, so it is
        in the marks, and what is left is certainly unrated. The charge is in
        the engine now and in the ledger (marks included) with the next flush;
        a crash before that loses nothing, the next start finds the same
        difference. At start (``reset_behind``), a count below its mark means
        the kernel's counter started again (a new table, an element
        recreated): the mark follows it. (Later it is only the engine ahead
        of the listing, see check_drift.) Returns ``{name: bytes charged}``."""
        gw = self.gw
        charged, reset = {}, {}
        now = time.time_ns()
        events = []
        with gw.engine_lock:
            for sid, ways in kernel.items():
                if sid not in gw.acct.subscribers:
                    continue
                for direction, (kbytes, kpackets) in enumerate(ways):
                    mbytes, mpackets = self.marks.get((sid, direction), (0, 0))
                    if kbytes < mbytes:
                        if reset_behind:
                            reset[(sid, direction)] = (kbytes, kpackets)
                    elif kbytes > mbytes and charge:
                        events += gw.acct.engine.rate_volume(sid, gw.acct.engine.default_zone, direction,
                                                             kbytes - mbytes, max(0, kpackets - mpackets), now)
                        name = gw.acct.subscribers[sid].name
                        charged[name] = charged.get(name, 0) + kbytes - mbytes
        if reset:
            gw.thread_ledger().set_kernel_marks(reset)
            log.warning("kernel counters below what the ledger holds, taken as started again (a new table, "
                        "recreated elements): %s", ", ".join(
                            f"{gw.acct.subscribers[sid].name} {('upload', 'download')[d]}: kernel {kb} B, "
                            f"ledger {self.marks.get((sid, d), (0, 0))[0]} B" for (sid, d), (kb, _kp) in sorted(reset.items())))
            self.marks.update({k: list(v) for k, v in reset.items()})
        if charged:
            gw.metrics.unrated.inc(sum(charged.values()))
            log.warning("%s: charged %d bytes the kernel forwarded that the engine never rated (rated but not "
                        "flushed before a crash, or passed fail-open while no reader was bound): %s", when,
                        sum(charged.values()), ", ".join(f"{n} {b} B" for n, b in sorted(charged.items())))
        gw.post(events)
        return charged

    def forget(self, sid: int, networks) -> None:
        """Networks of ``sid`` are about to leave the kernel, their counters
        with them: their counts leave the subscriber's marks too, so that
        kernel - mark keeps meaning unrated traffic."""
        gw = self.gw
        with gw.enforcer_lock:
            counters = gw.enforcer.counters_of(networks)
        deltas = {}
        for d, way in enumerate(("up", "down")):
            rows = [counters[n] for n in networks if n in counters]
            deltas[(sid, d)] = (-sum(r[f"{way}_bytes"] for r in rows), -sum(r[f"{way}_packets"] for r in rows))
        gw.ledger.adjust_kernel_marks(deltas)
        with self.lock:
            for key, (b, p) in deltas.items():
                mark = self.marks.setdefault(key, [0, 0])
                mark[0] += b
                mark[1] += p

    # ---- drift ----------------------------------------------------------------

    def loop(self) -> None:
        """The drift thread: every ``drift_interval``, the kernel's side of a
        check, read *before* the flush that will compare it (the kernel
        counts a packet just after the engine rates it, so the listing comes
        first and the drain second, see check_drift), handed to the flusher.
        The settled marks are taken before the reading starts: every byte in
        them had passed the kernel by then."""
        gw = self.gw
        while not gw.stopping.wait(0.2):
            if not self.due() or self.readings.full():
                continue
            try:
                if self.reader is None:
                    self.reader = gw._enforcer(gw.config)
                sids = self.sample()
                if gw.opts.inline:
                    settled = self.settled_marks(sids)
                    reading = (self.counts(sids, reader=self.reader), settled)
                else:
                    reading = (self.total_bytes(sids, reader=self.reader), None)
            except Exception:  # nft busy, a set renewed by a reload: the next check reads again
                log.exception("drift check: the kernel's counters could not be read; next check in %.0f s",
                              gw.opts.drift_interval)
                reading = None
            self.next_check = time.monotonic() + gw.opts.drift_interval
            if reading is not None:
                self.readings.put(reading)

    def before_flush(self) -> tuple | None:
        """A reading the drift thread took since the last flush, if any (see loop)."""
        try:
            return self.readings.get_nowait()
        except queue.Empty:
            return None

    def check_drift(self, kernel: dict, settled: dict | None) -> None:
        """Compare the kernel's per-subscriber counters with what the engine
        rated, at a consistent point.

        Inline, ``kernel`` was listed between two flushes: every byte it
        counted through the engine is in the marks after the second one
        (``self.marks``), and every byte in the marks one flush earlier
        (``settled``, of the same subscribers) had long passed the kernel. So
        kernel > marks after is traffic that certainly bypassed the engine
        (fail-open at a full queue, a rule the operator added before ours):
        charged by :meth:`charge_unrated`; kernel < marks before, beyond
        noise, is the engine certainly ahead of the kernel (counters reset,
        packets dropped after the queue): an alarm. A passive source reports
        traffic a while after the kernel counted it: the kernel's count of the
        previous check's subscribers must have reached the engine by now; only
        a shortfall is an alarm."""
        gw, opts = self.gw, self.gw.opts
        drift = {}  # name -> kernel minus engine bytes, beyond noise
        if opts.inline:
            self.charge_unrated(kernel, "drift check", reset_behind=False)
            for sid, ways in kernel.items():
                if sid not in gw.acct.subscribers:
                    continue
                counted = sum(b for b, _p in ways)
                rated = settled.get(sid, 0)
                if rated - counted > max(opts.drift_min_bytes, counted // 200):
                    drift[gw.acct.subscribers[sid].name] = counted - rated
        else:
            kernel, self.kernel_before = self.kernel_before, kernel
            if kernel is None:
                return
            for sid, counted in kernel.items():
                if sid not in gw.acct.subscribers:
                    continue
                gap = counted - gw.flusher.engine_bytes.get(sid, 0)
                if gap > max(opts.drift_min_bytes, counted // 200):
                    drift[gw.acct.subscribers[sid].name] = gap
        for name in set(self.drift) - set(drift):
            gw.metrics.drift.remove(name)
        for name, gap in drift.items():
            gw.metrics.drift.labels(name).set(gap)
            if self.drift.get(name) != gap:
                if gap < 0:
                    log.warning("drift: the engine rated %d bytes of subscriber %s more than the kernel counted "
                                "(the kernel is behind: its counters were reset, or packets were dropped after "
                                "the queue)", -gap, name)
                else:
                    log.warning("drift: the kernel counted %d bytes of subscriber %s more than the source reported "
                                "(the kernel is ahead: the source lost records, or traffic bypassed it)", gap, name)
        if drift:
            gw.metrics.drift_alarms.inc()
        self.drift = drift
