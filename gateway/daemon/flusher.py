"""The flusher thread: the engine's counters to the ledger, and the
once-a-second work around it.

Every ``PAYMENT_POLL`` seconds it lets :mod:`.changes` apply what the
ledger says changed (a top-up unblocks well within a second); every
``flush_interval`` it applies due tariff changes, drains the engine into the
ledger (idempotent flush ids: a failed write is retried with the same id,
never lost, never charged twice), compares the kernel with the engine at
each due drift check (:mod:`.kernel`), keeps the time-slot timeline ahead of
the clock, bills fees and period ends, and sends volume notifications.
Also here: the rollup and notification threads, which only need the ledger.

Locks: a drain holds ``engine_lock``, then each spool's lock and each
inline reader's hold (no batch between rating and verdict, see
ext/nfqueue.pyx), so that what is drained is exactly what was answered.
Its own state (pending flush, orphan rows, totals) is the flusher thread's
alone; ``orphan_rows`` is appended to by :mod:`.changes`, which runs in
this same thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time

from accounting.money import format_amount
from accounting.notify import Notifier, enqueue
from ext.errors import TollgateError

from ..runtime import MINUTE_NS, NS

log = logging.getLogger("tollgate.daemon")
PAYMENT_POLL = 0.2  # seconds between looks for new payments in the ledger
ROLLUP_FIRST = 300.0  # seconds after start before the first rollup (a restart loop should not roll up each time)
ROLLUP_INTERVAL = 3600.0  # seconds between rollups


def levels_reached(biller, sid: int, allowance: int, allowance_left: int, levels) -> list[tuple[str, str, int]]:
    """(notification key, event, level) of each level a subscriber's use has reached: "quota", its
    tariff's free volume (``allowance`` bytes a period, ``allowance_left`` of them left: the engine's live
    figure), and "volume", its volume limit. A key names the window it counts over, so each level is
    noted once in it: the period for both, but a guest's voucher volume is one allotment for the voucher's
    life (``Terms.volume_since``, gateway/runtime.py), so its "volume" levels are noted once for the voucher
    and not again at each period start (a new period would have noted 80% again, with a percentage of the
    new period's bytes only)."""
    acct = biller.accounts.peek(sid)  # (read only: a resting account stays a row, accounting/account_book.py)
    used = []  # (event, percent, window start)
    if allowance:
        used.append(("quota", 100 * (allowance - allowance_left) // allowance, acct.start))
    limit = acct.terms.volume_limit
    if limit:
        window = acct.start if acct.terms.volume_since is None else acct.terms.volume_since
        used.append(("volume", 100 * (limit - biller.volume_left(sid)) // limit, window))
    return [(f"{event}:{sid}:{window}:{level}", event, level)
            for event, percent, window in used for level in levels if percent >= level]


class Flusher:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.boot = gw.boot
        self.seq = 0
        # drained flushes not yet in the ledger, oldest first, each with its id: while the ledger is away
        # the engine is still drained every round (the grant keeper sees what is spent and, under on_failure
        # = continue, lends before a subscriber runs out) and this outbox grows, written in order when it is back
        self.pending: list[tuple] = []
        self.orphan_rows: list = []  # counters of subscribers removed live, for the next flush
        self.active: set[int] = set()  # subscribers with traffic since the last look at their volumes
        self.engine_bytes: dict[int, int] = {}  # bytes drained from the engine since start, per subscriber
        self.notices: queue.Queue = queue.Queue()  # notifications other threads ask for, written here
        self.quota_noted: set = set()  # quota notification keys queued by this process
        self.last_flush = time.time()

    def notify_later(self, key: str, event: str, sid: int, payload: dict) -> None:
        """A notification to enqueue in the ledger with the next flush (this thread owns the connection)."""
        self.notices.put((key, event, sid, payload))

    def loop(self) -> None:
        gw = self.gw
        next_flush = time.monotonic() + gw.opts.flush_interval
        away = False  # the last look at the ledger failed (said once, not every 0.2 s)
        while not gw.wait_for_ledger(PAYMENT_POLL):
            # Each step on its own: with the ledger away (PostgreSQL stopped) a failed change poll must not
            # skip the grant keeper (on_failure is its to apply) nor the drain (see self.pending).
            try:
                gw.ledger.reconnect_if_lost()
                gw.changes.poll()
                away = False
            except Exception as exc:
                if not away:
                    log.error("ledger changes cannot be read (%s); trying again every %.1f s",
                              str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                              PAYMENT_POLL)
                away = True
            try:
                if gw.credit is not None:
                    gw.credit.poll()  # grants renewed, refilled where a payment or spending asks
            except Exception:
                log.exception("credit grants: round failed; retrying next round")
            if time.monotonic() < next_flush:
                continue
            next_flush = time.monotonic() + gw.opts.flush_interval
            try:
                gw.changes.apply_tariff_changes(gw.calendar_now())
                drift = gw.kernel.before_flush()
                self.flush()
                if drift is not None:
                    gw.kernel.check_drift(*drift)
                self._bill()
                self._check_quotas()
            except Exception:  # the ledger may be busy, full or away: drained rows wait in self.pending
                log.exception("flush round failed; retrying next round")
                try:
                    self._drain()  # (a round that failed before its drain) the outbox takes this second's rows
                except Exception:
                    log.exception("drain failed")

    def _bill(self) -> None:
        gw = self.gw
        now = time.time_ns()
        with gw.engine_lock:
            gw.acct.ensure_timeline(now, since_ns=now)
            postings, events = gw.acct.bill(gw.calendar_now())
        gw.touch({p.subscriber for p in postings})
        for p in postings:
            log.info("billing: subscriber %s %s %s (%s)", p.subscriber, p.kind,
                     format_amount(p.amount, gw.config.currency), p.detail)
        gw.post(events)

    def flush(self) -> None:
        """Write block records and the engine's counters to the ledger.

        Drained rows get their flush id before the write; if the write fails
        they stay pending and the same id is retried, so they are neither
        lost nor charged twice. A pending flush is written first and then a
        fresh drain, so that when this returns everything the engine had
        rated before it was called is in the ledger (the drift check counts
        on it: kernel minus marks is then unrated traffic only)."""
        gw = self.gw
        if gw.pusher.pending():
            gw.pusher.save()
        while True:
            try:
                key, event, sid, payload = self.notices.get_nowait()
            except queue.Empty:
                break
            enqueue(gw.ledger, key, event, sid, payload)
        try:
            self._write_pending()
        finally:  # drained even when the ledger is away: the outbox keeps each flush under its own id
            self._drain()
        self._write_pending()
        if gw.credit is not None:
            gw.credit.flushed()  # everything drained is written: the grants of those who left can go back
        self.last_flush = time.time()

    def _drain(self) -> None:
        """The engine's counters (and the spool files they hold) into ``self.pending``."""
        gw = self.gw
        spools = [r for r in gw.readers if hasattr(r, "take_files")]  # see gateway/sources/spool.py
        with gw.engine_lock, contextlib.ExitStack() as held:
            for spool in spools:  # the files taken are exactly those whose traffic is drained
                held.enter_context(spool.lock)
            for reader in gw.readers:  # no batch between rating and verdict (see ext/nfqueue.pyx)
                if hasattr(reader, "hold"):
                    reader.hold()
                    held.callback(reader.release)
            rows = gw.acct.engine.drain() + self.orphan_rows
            self.active |= {r.subscriber for r in rows}
            gw.kernel.note_drained(rows)
            files = [f for spool in spools for f in spool.take_files()]
            self.orphan_rows = []
            gw.acct.biller.observe(rows)
            if gw.credit is not None:
                gw.credit.note_spent(rows)
        for r in rows:
            self.engine_bytes[r.subscriber] = self.engine_bytes.get(r.subscriber, 0) + r.bytes
        if gw.quotas is not None:  # traffic moves a kernel quota (the eBPF source sees its own traffic at once)
            gw.quotas.touch({r.subscriber for r in rows})
        if not rows and not files:
            return
        self.seq += 1
        now = time.time_ns()
        minute = (now - now % MINUTE_NS) // NS
        self.pending.append((f"{self.boot}:{self.seq}", now,
                             [(r.subscriber, r.zone, r.direction, minute, r.bytes, r.packets, r.charged)
                              for r in rows], files))

    def _write_pending(self) -> None:
        """The outbox into the ledger, oldest first; a failure leaves it, from the failed flush on, in place."""
        gw = self.gw
        while self.pending:
            flush_id, now, rows, files = self.pending[0]
            if gw.opts.bpf_marked:  # its marks per zone advance in the flush's transaction (gateway/sources/ebpf.py)
                gw.ledger.apply_flush_bpf(flush_id, rows, now, files=files)
            else:
                gw.ledger.apply_flush(flush_id, rows, now, source=gw.opts.source, files=files,
                                      kernel_marks=gw.opts.kernel_marked, grants=gw.credit is not None)
            self.pending.pop(0)
            if gw.opts.kernel_marked:
                gw.kernel.note_flushed(rows)
            for spool in (r for r in gw.readers if hasattr(r, "take_files")):
                spool.committed(files)

    def _check_quotas(self) -> None:
        """A notification when a period's free volume ("quota") or volume limit
        ("volume") is used to each of the configured levels, once a period."""
        gw = self.gw
        levels = gw.config.notify.quota_levels
        active, self.active = self.active, set()  # only traffic moves how much of a volume is used
        for sid in sorted(active):
            if sid not in gw.acct.subscribers or sid not in gw.acct.biller.accounts:
                continue
            total = sum(gw.config.tariffs[gw.acct.biller.accounts.peek(sid).terms.tariff].allowance())
            left = sum(gw.acct.engine.subscriber(sid).allowance) if total else 0
            for key, event, level in levels_reached(gw.acct.biller, sid, total, left, levels):
                if key not in self.quota_noted:
                    self.quota_noted.add(key)
                    enqueue(gw.ledger, key, event, sid, gw.payload(sid, time.time_ns(), percent=level))

    def rollup_loop(self) -> None:
        """Every ROLLUP_INTERVAL: the ledger's old minute rows into hours, old
        hours into days, old flushes pruned (accounting/rollup.py), on a
        connection of its own in short transactions (a flush waits a few ms at
        most): the ledger grows with active subscriber-days, not seconds."""
        from accounting.rollup import roll_up

        gw = self.gw
        wait = ROLLUP_FIRST
        while not gw.stopping.wait(wait):
            wait = ROLLUP_INTERVAL
            try:
                gw.thread_ledger().reconnect_if_lost()
                summary = roll_up(gw.thread_ledger(), time.time_ns(), gw.config.timezone)
                log.info("rollup: %s", summary.text())
            except TollgateError as exc:  # e.g. a ledger rolled up under another time zone: said, not fatal
                log.error("rollup refused: %s", exc)
            except Exception:
                log.exception("rollup round failed; retrying in %d s", ROLLUP_INTERVAL)

    def notify_loop(self) -> None:
        gw = self.gw
        notifier = Notifier(gw.open_ledger(), gw.config.notify)
        while not gw.stopping.wait(1.0):
            try:
                notifier.ledger.reconnect_if_lost()
                notifier.deliver_due()
            except Exception:
                log.exception("notification round failed; retrying")
