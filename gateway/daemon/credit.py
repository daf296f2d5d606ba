"""Credit grants: how a gateway that shares its ledger with other gateways spends balances (issue 13).

With ``[cluster] gateway`` set, no gateway spends a subscriber's balance directly. The engine's
balance of each subscriber here is this gateway's *grant*: money it reserved in the ledger
(:meth:`accounting.ledger.Ledger.reserve`, one conditional UPDATE: never more than balance +
credit can pay, whichever gateways ask) and has not charged yet; the engine's credit is 0. The
engine rates and enforces per packet against the grant as it would against a balance, each flush
charges the grant (``apply_flush(grants=True)``), and this keeper asks for more before it runs
out, so a subscriber with money is not blocked by the round trip:

- after each drain, a subscriber that spent is refilled when less than ``LOW_WATER`` of its slice
  is left; its slice grows to cover ``COVER_SECONDS`` of what it spends, at least ``[cluster]
  grant``;
- a payment or a change in the ledger (from any gateway: the change follower reads them) asks
  for a refill at the next poll (0.2 s), which unblocks a subscriber whose grant ran out; so does
  money that comes back without a payment, when none of the subscriber's was free: another
  gateway's grant returned (its stop, its expiry) or a refund (the change feed's ``grant``,
  ``Ledger._freed``), so a subscriber blocked as ``final`` (below) is asked for again;
- a grant spent before its refill came (a burst faster than a poll) stops the subscriber's packets
  in the engine at the byte, but it is not a block: the policy pusher asks this keeper
  (:meth:`GrantKeeper.hold_block`), which refills it at the next poll, and the kernel, the block
  page and the subscriber's connections are left alone;
- when the ledger has nothing left to grant (the last ask got less than it asked: ``final``), the
  engine spends the last grant and blocks at the byte, and the subscriber lands on the block page
  as with a balance: the last grant is the final unit;
- a periodic fee comes off the balance, from what no grant holds first; only what that cannot pay
  comes out of this gateway's grant, and the engine's balance loses that part only
  (``Ledger.add_posting_on_grant``), so the engine and the ledger agree on the grant;
- grants live ``grant_validity`` seconds and are renewed every third of it; a gateway that dies
  stops renewing, and any other gateway gives its grants back to the balance when they expire;
  a clean stop gives them back at once, after the last flush.

When the ledger cannot be reached (``[cluster] on_failure``): ``terminate`` serves what is
granted and asks again only once the ledger answers again (after the backoff a renewal probes
it); ``retry_and_terminate`` retries its asks with backoff (``RETRY_MAX``); both block when the
grant runs out. ``continue`` (postpaid) gives a subscriber that runs low a slice of local credit
instead, counted in ``local_credit``, and its traffic is charged when the ledger is back (flushes
wait in the flusher's outbox and are written in order with their ids, never lost, never charged
twice; charges beyond a grant are charged all the same). A connection PostgreSQL dropped is opened
again by the flusher (``Ledger.reconnect_if_lost``).

Runs in the flusher thread, which owns the ledger connection, except :meth:`hold_block` and
:meth:`want`, which the pusher calls too. Locks: ``lock`` (its own) for ``wanted``, ``final`` and
``held_back``, taken alone; engine reads and balance changes under ``engine_lock``, never held
across a ledger round trip.
"""

from __future__ import annotations

import logging
import threading
import time

from ext import Event
from ext.constants import BLOCK_LIMIT, EV_BLOCK

from ..runtime import NS, chunked

log = logging.getLogger("tollgate.daemon")
LOW_WATER = 0.5  # refill when less than this share of a subscriber's slice is left
COVER_SECONDS = 10  # a slice covers this many seconds of what the subscriber spends (per flush interval: 1 s)
RETRY_MAX = 5.0  # seconds between attempts when the ledger cannot be reached (retry_and_terminate)


class GrantKeeper:
    def __init__(self, gw) -> None:
        self.gw = gw
        cluster = gw.config.cluster
        self.slice = cluster.grant
        self.validity_ns = int(cluster.grant_validity * NS)
        self.mode = cluster.on_failure
        self.size: dict[int, int] = {}  # a subscriber's slice, when it spends more than [cluster] grant
        self.lock = threading.Lock()
        self.wanted: set[int] = set()  # refill at the next poll
        self.final: set[int] = set()  # the ledger gave less than asked at the last ask: their blocks are real
        self.held_back: set[int] = set()  # spent grants whose block the pusher held back for a refill
        self.spending: set[int] = set()  # spent in the last drain: their grants are looked at every poll
        self.unasked: set[int] = set()  # terminate: refills the ledger could not be asked for, asked once it answers
        self.leaving: set[int] = set()  # left the engine: their grants go back after their last flush
        self.next_renew = 0
        self.retry_at = 0.0  # monotonic: no ledger round trip before (a failure's backoff)
        self.backoff = 0.2
        self.local_credit: dict[int, int] = {}  # on_failure = continue: given without the ledger
        self.reserved = 0  # taken from the ledger since start
        self.round_trips = 0  # reserve calls that reached the ledger
        self.failures = 0
        self.last_error: str | None = None

    # ---- start and stop ------------------------------------------------------------------------

    def load(self, rows):
        """The rows to fill the engine with (an iterable: a start streams them), each balance this
        gateway's grant: what it held before (a restart within the grants' validity: still its own)
        topped up to a slice. One reserve per ``ROW_CHUNK`` rows: a few statements each, on a
        connection of their own (:meth:`_start_writer`)."""
        ledger = self.gw.ledger
        now = time.time_ns()
        held = {sid: amount for sid, (amount, _until) in ledger.grants().items()}
        loaded = granted = 0
        writer = self._start_writer(ledger)
        try:
            for part in chunked(rows):
                asks = {r["id"]: self.slice - held.get(r["id"], 0) for r in part
                        if held.get(r["id"], 0) < self.slice}
                taken = self._reserve(asks, now, writer) or {}
                self._note_final(asks, taken)
                loaded += len(part)
                granted += len(taken)
                for r in part:
                    yield {**r, "balance": held.get(r["id"], 0) + taken.get(r["id"], 0)}
        finally:
            if writer is not ledger:
                writer.close()
        self.next_renew = now + self.validity_ns // 3
        log.info("credit grants: %d subscribers, %d held from before, %d granted now (gateway %r)", loaded,
                 len(held), granted, ledger.gateway)

    @staticmethod
    def _start_writer(ledger):
        """The connection a start reserves on: not the one whose scan of the subscribers is still open
        (``rows`` is read from ``ledger`` while the reserves are made). On SQLite a write on the connection
        of an open read is refused at once, not waited for (SQLITE_BUSY_SNAPSHOT, "database is locked"),
        whenever another writer committed since the read began: a top-up from the CLI during a start cost
        the next chunk of ROW_CHUNK subscribers their grants (tests/unit/test_grants_ledger.py). The same
        connection only where a second one would be another database (SQLite in memory) or cannot be
        opened (its reserve then fails as it would have, and on_failure says what follows)."""
        from accounting.ledger import Ledger

        target = getattr(getattr(ledger, "db", None), "target", None)
        if not isinstance(target, str) or not target or ":memory:" in target or "mode=memory" in target:
            return ledger
        try:
            writer = Ledger.open(target)
        except Exception as exc:  # noqa: BLE001 - the ledger away: the start's reserves say so as before
            log.warning("credit grants: no second connection to the ledger for the start's grants (%s)", exc)
            return ledger
        writer.gateway = ledger.gateway
        return writer

    def grant_now(self, sid: int) -> int:
        """A first grant for a subscriber added while running (its engine balance)."""
        return (self._reserve({sid: self.slice}, time.time_ns()) or {}).get(sid, 0)

    def release(self) -> None:
        """At a clean stop, after the last flush: every grant back to the balance."""
        try:
            returned = self.gw.ledger.release_grants()
            log.info("credit grants: %d returned to the ledger", len(returned))
        except Exception as exc:  # the grants come back when they expire: said, not fatal
            log.error("credit grants: cannot return them now (%s); they return when they expire", exc)

    # ---- while running ---------------------------------------------------------------------------

    def left(self, sid: int) -> None:
        """``sid`` left the engine (deactivated, or gone from ``[cluster] networks``); under ``engine_lock``."""
        self.leaving.add(sid)
        self.size.pop(sid, None)

    def flushed(self) -> None:
        """After a flush is written: the grants of subscribers that left go back (their last traffic is in)."""
        leaving, self.leaving = self.leaving, set()
        if leaving and not self._ledger(lambda: self.gw.ledger.release_grants(leaving))[0]:
            self.leaving |= leaving

    def want(self, sids) -> None:
        """Refill these at the next poll (running low, a changed credit limit: there may be more to take)."""
        with self.lock:
            self.wanted.update(sids)

    def freed(self, sids) -> None:
        """Money came to these in the ledger (a payment; a grant returned by another gateway or a refund,
        the change feed's ``grant``): asked again at the next poll, and their last ask's shortfall is
        not theirs any more (``final`` is what the ledger said then: a block while it stood would be
        taken as real, with money in the ledger, and a refill left to the next payment)."""
        with self.lock:
            self.final.difference_update(sids)
            self.wanted.update(sids)

    def hold_block(self, sid: int) -> bool:
        """The pusher's question for an engine block for the balance: True if it is only a spent grant
        with money left in the ledger (refilled at the next poll: not a block), False if it is real."""
        with self.lock:
            if sid in self.final:
                return False
            self.wanted.add(sid)
            self.held_back.add(sid)
            return True

    def _note_final(self, asks: dict[int, int], taken: dict[int, int]) -> None:
        with self.lock:
            for sid, asked in asks.items():
                if taken.get(sid, 0) < asked:
                    self.final.add(sid)
                else:
                    self.final.discard(sid)

    def note_spent(self, rows) -> None:
        """After a drain (under ``engine_lock``): the slices follow what each subscriber spends, and those
        running low are refilled at the next poll."""
        spent: dict[int, int] = {}
        for r in rows:
            spent[r.subscriber] = spent.get(r.subscriber, 0) + r.charged
        engine = self.gw.acct.engine
        self.spending = {sid for sid, amount in spent.items() if amount}
        for sid, amount in spent.items():
            if sid not in self.gw.acct.subscribers:
                continue
            size = max(self.slice, amount * COVER_SECONDS)
            if size != self.slice:
                self.size[sid] = size
            else:
                self.size.pop(sid, None)
            if engine.subscriber(sid).balance < size * LOW_WATER:
                self.want((sid,))

    def poll(self) -> None:
        """Renew this gateway's grants, return dead gateways' expired ones, refill what is wanted."""
        gw = self.gw
        reachable = time.monotonic() >= self.retry_at  # not while backing off after a failure
        if not reachable and self.mode != "continue":  # (continue lends meanwhile)
            return
        now = time.time_ns()
        if reachable and now >= self.next_renew:
            reachable = self._ledger(lambda: (gw.ledger.renew_grants(now + self.validity_ns),
                                              gw.ledger.expire_grants(now)))[0]
            if reachable:
                self.next_renew = now + self.validity_ns // 3
        with self.lock:
            wanted, self.wanted = self.wanted, set()
        wanted |= self.spending  # between drains too: a fast spender's low water is seen within a poll
        if not wanted:
            return
        with gw.engine_lock:
            asks = {}
            for sid in wanted:
                if sid not in gw.acct.subscribers:
                    continue
                size = self.size.get(sid, self.slice)
                left = gw.acct.engine.subscriber(sid).balance
                if left < size * LOW_WATER:
                    asks[sid] = size - max(left, 0)
        taken = self._reserve(asks, now) if reachable else None
        if taken is not None:
            self._note_final(asks, taken)
        if taken is None:
            if self.mode == "retry_and_terminate":
                self.want(asks)  # asked again after the backoff
            elif self.mode == "terminate":
                # not asked again while the ledger is away, but once it answers: a subscriber blocked on a spent
                # grant sends nothing the engine sees (the kernel drops it), so no "next need" would ever come
                # and it stayed blocked with money in the ledger (tests/linux/test_cluster_faults.py)
                self.unasked |= set(asks)
            elif self.mode == "continue":
                taken = self._lend(asks)
            if not taken:
                return
        events = []
        with gw.engine_lock:
            for sid, took in taken.items():
                if sid in gw.acct.subscribers:
                    events += gw.acct.engine.adjust_balance(sid, took)
            with self.lock:
                # held back for a refill that did not come: the ledger is out, the block is real now
                real = [sid for sid in self.held_back - set(taken) if sid in self.final and sid in gw.acct.subscribers]
                self.held_back -= set(taken) | set(real)
            for sid in real:
                state = gw.acct.engine.subscriber(sid)
                if state.blocked & BLOCK_LIMIT:
                    events.append(Event(EV_BLOCK, sid, -1, BLOCK_LIMIT, state.balance))
        gw.touch(taken)
        gw.post(events)

    def stats(self) -> dict:
        return {"gateway": self.gw.ledger.gateway, "on_failure": self.mode, "reserved": self.reserved,
                "round_trips": self.round_trips, "held_back": len(self.held_back),
                "failures": self.failures, "last_error": self.last_error,
                "local_credit": sum(self.local_credit.values())}

    # ---- the ledger's round trips ------------------------------------------------------------------

    def _reserve(self, asks: dict[int, int], now: int, ledger=None) -> dict[int, int] | None:
        """``Ledger.reserve`` (on ``ledger``, default the gateway's); None when the ledger cannot be reached
        (after noting the failure)."""
        if not asks:
            return {}
        ledger = ledger or self.gw.ledger
        ok, taken = self._ledger(lambda: ledger.reserve(asks, now + self.validity_ns))
        if not ok:
            return None
        self.round_trips += 1
        self.reserved += sum(taken.values())
        return taken

    def _ledger(self, call) -> tuple[bool, object]:
        """Run one ledger call: ``(True, its result)``; on failure note it, back off, ``(False, None)``."""
        try:
            result = call()
        except Exception as exc:  # psycopg's OperationalError, SQLite busy: the ledger is away, not us broken
            self.failures += 1
            self.last_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.error("credit grants: the ledger cannot be reached (%s); on_failure = %s", self.last_error, self.mode)
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(RETRY_MAX, self.backoff * 2)
            self.next_renew = 0  # after the backoff the renewal is the probe: is the ledger back?
            return False, None
        self.backoff = 0.2
        self.last_error = None
        if self.unasked:  # terminate: the ledger answers again, ask for what could not be asked
            self.want(self.unasked)
            self.unasked = set()
        return True, result

    def _lend(self, asks: dict[int, int]) -> dict[int, int]:
        """``continue``: a slice on local credit to each subscriber running low; charged when the ledger is back."""
        for sid, amount in asks.items():
            self.local_credit[sid] = self.local_credit.get(sid, 0) + amount
        log.warning("credit grants: %d subscribers served on local credit while the ledger is away", len(asks))
        return dict(asks)
