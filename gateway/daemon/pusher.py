"""The policy pusher: engine events become kernel set changes, then records.

Block and unblock events (from the readers, payments, billing, the API) are
queued on ``Gateway.events`` as ``(Event, packet ts)`` pairs; this thread
takes everything queued at once and makes one batched nftables update of it
(the kernel drops the subscriber from then on, even if this process dies),
times each block from the breaching packet to the set holding it, ends the
blocked networks' TCP connections, and writes the block state to the ledger
at once, so that a crash right after a block cannot make the next start
forget it (``restore`` reads it back).

Locks: it takes ``enforcer_lock`` for each kernel update and ``engine_lock``
to read block bits together with the payment ids applied so far (never
both at once). Its unsaved state is written by this thread, and retried by
the flusher's ``flush_unsaved`` (both under ``save_lock``, which it owns).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ext.constants import BLOCK_LIMIT, BLOCK_MANUAL, BLOCK_REASONS, EV_BLOCK, EV_UNBLOCK, EV_WARN
from ext.errors import TollgateError

from ..runtime import NS

log = logging.getLogger("tollgate.daemon")


class PolicyPusher:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.saved: dict[int, int] = {}  # block bits the ledger holds per subscriber (block_state)
        self.unsaved: set[int] = set()  # subscribers whose block state is still to be written
        self.unsaved_records: list[tuple] = []  # block history rows still to be written
        self.save_lock = threading.Lock()  # the policy thread and the flusher's retry
        self.resetter = None  # policy.resets.Resetter, made at the first block
        self.latencies: list[float] = []  # block latencies, kept for /healthz and the lab's report

    def restore(self) -> None:
        """Put back in the engine the blocks the ledger remembers, before the
        kernel's sets are restored from it: a manual block until it is lifted,
        a limit block until a payment or adjustment came after it. (Volume and
        access-hour blocks follow from billing, already brought up to date.)
        A limit block needs its record: it may leave a small positive balance
        (the breaching packet is dropped, not charged), so the balance alone
        does not say it was blocked."""
        acct, ledger = self.gw.acct, self.gw.ledger
        for sid in ledger.manually_blocked():
            if sid in acct.subscribers:
                acct.engine.block(sid, BLOCK_MANUAL)
        states = ledger.block_states()
        for sid, state in states.items():
            if sid in acct.subscribers and state["blocked"] & BLOCK_LIMIT and not state["paid_since"]:
                acct.engine.block(sid, BLOCK_LIMIT)
        self.saved = {sid: state["blocked"] for sid, state in states.items()}

    def loop(self) -> None:
        gw = self.gw
        while not gw.stopping.is_set():
            try:
                first = gw.events.get(timeout=0.2)
            except queue.Empty:
                continue
            self.push(self._take(first))

    def drain(self) -> None:
        """Whatever is queued, pushed now (at stop)."""
        try:
            first = self.gw.events.get_nowait()
        except queue.Empty:
            return
        self.push(self._take(first))

    def _take(self, first: list) -> list:
        """Everything queued now: one kernel update for a burst of events."""
        batch = list(first)
        while True:
            try:
                batch += self.gw.events.get_nowait()
            except queue.Empty:
                return batch

    def push(self, events: list) -> None:
        """One batched kernel update for ``(Event, packet ts)`` pairs."""
        gw = self.gw
        if gw.credit is not None:  # a spent grant with money left in the ledger is refilled, not blocked
            events = [(ev, ts) for ev, ts in events
                      if not (ev.kind == EV_BLOCK and ev.reason == BLOCK_LIMIT and gw.credit.hold_block(ev.subscriber))]
        block, unblock, blocked, unblocked = [], [], [], []
        for ev, _ts in events:
            if ev.kind == EV_BLOCK:
                block += gw.networks(ev.subscriber)
                blocked.append(ev.subscriber)
            elif ev.kind == EV_UNBLOCK and not gw.acct.engine.subscriber(ev.subscriber).blocked:
                unblock += gw.networks(ev.subscriber)
                unblocked.append(ev.subscriber)
        # The eBPF source's program meters at tc ingress, before nft's forward hook: what it passes of a
        # subscriber that nft blocks is charged and never delivered. So it stops passing (and counting) before
        # the nft block, counts again only after the nft unblock, and passes a blocked subscriber's tcp/80
        # (nft sends it to the block page) only while nft blocks its networks: one step, here, under the
        # enforcer lock (gateway/sources/ebpf.py, "The block step").
        steps = [r for r in gw.readers if hasattr(r, "before_nft_block")]
        started = time.perf_counter()
        with gw.enforcer_lock:
            if block:
                for r in steps:
                    r.before_nft_block(blocked)
                gw.enforcer.block(block)
                for r in steps:
                    r.after_nft_block(blocked)
            if unblock:
                for r in steps:
                    r.before_nft_unblock(unblocked)
                gw.enforcer.unblock(unblock)
                for r in steps:
                    r.after_nft_unblock(unblocked)
        done = time.time_ns()
        if block or unblock:
            gw.metrics.nft_latency.observe(time.perf_counter() - started)
        self.record(events, done)
        if block:
            self._reset_connections(block)

    def _reset_connections(self, networks) -> None:
        """A download in flight would hang until the client gives up: end the
        blocked networks' TCP connections at once (policy/resets.py)."""
        try:
            if self.resetter is None:
                from policy.resets import Resetter

                self.resetter = Resetter()
            self.gw.metrics.resets.inc(self.resetter.reset(networks))
        except OSError as exc:  # no conntrack in this namespace, no raw sockets: the block holds all the same
            log.warning("could not reset the connections of %d blocked networks: %s", len(networks), exc)

    def record(self, events: list, done_ns: int) -> None:
        """Metrics, logs, notifications and the ledger's block records for
        ``(Event, packet ts)`` pairs whose kernel update is done; the block
        state is written at once (not with the next flush)."""
        records = []
        for ev, ts in events:
            record = self._record_event(ev, ts, done_ns)
            if record is not None:
                records.append(record)
        self.save({ev.subscriber for ev, _ts in events if ev.kind in (EV_BLOCK, EV_UNBLOCK)}, records, done_ns)

    def save(self, sids=(), records=(), ts: int | None = None) -> None:
        """The engine's block bits of ``sids`` (where they differ from what
        the ledger holds), with the payment and adjustment ids applied so far,
        read in one step under the engine lock; a failed write is retried by
        the flusher (an empty call)."""
        gw = self.gw
        with self.save_lock:
            self.unsaved_records += list(records)
            with gw.engine_lock:
                self.unsaved |= {sid for sid in sids if sid in gw.acct.subscribers}
                paid = gw.changes.applied_ids()
                states = [(sid, gw.acct.engine.subscriber(sid).blocked, *paid) for sid in sorted(self.unsaved)]
            states = [st for st in states if self.saved.get(st[0], 0) != st[1]]
            if not states and not self.unsaved_records:
                self.unsaved.clear()
                return
            records = self.unsaved_records
            try:
                gw.thread_ledger().save_block_state(states, ts, records)
            # (and PostgreSQL away: psycopg's errors are no TollgateError, and this thread died of them with
            # the gateway, tests/linux/test_cluster_faults.py; thread_ledger connects again when it is back)
            except (TollgateError, *gw.ledger.db.errors):
                log.exception("block state not written; retrying with the next flush")
                return
            self.unsaved_records = self.unsaved_records[len(records):]
            self.unsaved.clear()
            self.saved.update({sid: bits for sid, bits, _p, _a in states})

    def pending(self) -> bool:
        return bool(self.unsaved or self.unsaved_records)

    def _record_event(self, ev, packet_ts: int | None, done_ns: int) -> tuple | None:
        """Metrics, log and notification of one event; returns its block record, if it has one."""
        gw = self.gw
        reason = BLOCK_REASONS.get(ev.reason, str(ev.reason))
        if ev.kind == EV_BLOCK:
            gw.metrics.blocks.labels(reason).inc()
            if packet_ts:  # from the breaching packet to the set holding the subscriber
                latency = (done_ns - packet_ts) / NS
                gw.metrics.block_latency.observe(latency)
                self.latencies.append(latency)
            log.info("blocked subscriber %s (%s), balance %s", ev.subscriber, reason, ev.balance)
        elif ev.kind == EV_UNBLOCK:
            gw.metrics.unblocks.labels(reason).inc()
            log.info("unblocked subscriber %s (%s)", ev.subscriber, reason)
        elif ev.kind == EV_WARN:
            log.info("subscriber %s: balance %s fell below warning level %d", ev.subscriber, ev.balance, ev.reason + 1)
        else:
            return None
        event = {EV_BLOCK: "block", EV_UNBLOCK: "unblock", EV_WARN: "warn"}[ev.kind]
        detail = {"level": ev.reason + 1} if ev.kind == EV_WARN else {"reason": reason}
        gw.flusher.notify_later(f"{event}:{ev.subscriber}:{done_ns}", event, ev.subscriber,
                                gw.payload(ev.subscriber, done_ns, balance=ev.balance, **detail))
        if ev.kind == EV_WARN or ev.reason == BLOCK_MANUAL:  # manual ones are recorded when asked for
            return None
        return (ev.subscriber, event, reason, packet_ts or None, ev.balance if ev.kind == EV_BLOCK else None)
