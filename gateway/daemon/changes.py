"""Changes made in the ledger by anyone (CLI, API, portal, an import, another
process) brought into the running engine and kernel, in proportion to what
changed: payments and adjustments by id, subscribers, addresses, terms,
manual blocks and money come back to a subscriber without a payment (a
returned grant: ``grant``) from the ledger's change feed (migrations/0014_change_feed.sql),
tariff changes when they fall due. Run by the flusher thread every
``PAYMENT_POLL`` seconds, so a top-up unblocks well within a second.

Locks: none of its own. Each engine change is made under ``engine_lock``
(payment ids move with the balance under it, so a block state never pairs
one without the other); kernel set changes under ``enforcer_lock``, taken
inside ``engine_lock`` where both are needed (the lock order of the daemon).
"""

from __future__ import annotations

import logging
import queue
import time

from ext.constants import BLOCK_MANUAL
from ext.errors import TollgateError

from ..runtime import NS

log = logging.getLogger("tollgate.daemon")


class ChangeFollower:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.last_payment = 0
        self.last_adjustment = 0
        self.last_change = 0  # the ledger's change feed, read up to here
        self.requests: queue.Queue = queue.Queue()  # subscriber ids the API changed

    def start_from_ledger(self) -> None:
        """Before the start's load (``Gateway.load_from_ledger``): the feed and balance ids to follow from.
        Taken before, not after, so that what is committed while the load runs is replayed rather than
        taken as loaded: a change of the feed replayed for a subscriber loaded as it is now changes
        nothing (:meth:`refresh` compares with the ledger). Without grants :meth:`balances_read` takes the
        balance ids again, in the load's snapshot."""
        ledger = self.gw.ledger
        self.last_change = ledger.last_change_id()
        self.balances_read()

    def balances_read(self) -> None:
        """The payment and adjustment ids the balances read now include: called in the snapshot the
        load reads the balances in (a payment adds to a balance: replaying one it holds would count it
        twice; missing one the balance lacks would lose it)."""
        ledger = self.gw.ledger
        self.last_payment = ledger.last_payment_id()
        self.last_adjustment = ledger.last_adjustment_id()

    def applied_ids(self) -> tuple[int, int]:
        """(payment id, adjustment id) the live balances include; read under ``engine_lock``."""
        return self.last_payment, self.last_adjustment

    def poll(self) -> None:
        self.apply_payments()
        self.apply_requests()
        self.apply_feed()

    def apply_payments(self) -> None:
        """Payments and adjustments written to the ledger by others (CLI, API)
        reach the live balance."""
        gw = self.gw
        for change in gw.ledger.balance_changes_since(self.last_payment, self.last_adjustment):
            events = []
            with gw.engine_lock:
                if gw.credit is not None:  # the engine holds a grant, not the balance: there may be more to take
                    gw.credit.freed((change["subscriber_id"],))
                elif change["subscriber_id"] in gw.acct.subscribers:
                    events = gw.acct.engine.adjust_balance(change["subscriber_id"], change["amount"])
                gw.touch((change["subscriber_id"],))
                if change["kind"] == "payment":
                    self.last_payment = max(self.last_payment, change["id"])
                else:
                    self.last_adjustment = max(self.last_adjustment, change["id"])
            gw.post(events)

    def request(self, sid: int) -> None:
        """Ask for one subscriber in the engine and the kernel to be brought in
        line with the ledger (the API changed it): done by the flusher thread,
        which owns the ledger connection, within PAYMENT_POLL seconds."""
        self.requests.put(sid)

    def apply_requests(self) -> None:
        while True:
            try:
                sid = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                self.refresh(sid)
                self.sync_manual_blocks(sid)
            except TollgateError as exc:
                log.error("subscriber %s: the change cannot be applied: %s", sid, exc)

    def apply_feed(self) -> None:
        """Subscribers, addresses, terms and manual blocks changed in the
        ledger, read from its change feed: the work is in proportion to what
        changed, never a scan of every subscriber."""
        ledger = self.gw.ledger
        while True:
            last, changed = ledger.changes_since(self.last_change)
            if last == self.last_change:
                return
            self.last_change = last
            moved = sorted(sid for sid, what in changed.items() if what & {"subscriber", "addresses"})
            for sid in moved:  # first every network that leaves, then every one that arrives (see release)
                try:
                    self.release(sid)
                except TollgateError as exc:
                    log.error("subscriber %s changed in the ledger but cannot be applied: %s", sid, exc)
            for sid, what in sorted(changed.items()):
                try:
                    if what & {"subscriber", "addresses"}:
                        self.refresh(sid)
                    if "manual" in what:
                        self.sync_manual_blocks(sid)
                    if "grant" in what and self.gw.credit is not None:  # money back, none was free: ask again
                        self.gw.credit.freed((sid,))
                except TollgateError as exc:
                    log.error("subscriber %s changed in the ledger but cannot be applied: %s", sid, exc)

    def apply_tariff_changes(self, now: int) -> None:
        """Tariff changes scheduled in the ledger that fell due: billing under
        the new tariff from the change's own time (the next period's start)."""
        gw = self.gw
        for change in gw.ledger.due_tariff_changes(now):
            sid = change["subscriber_id"]
            gw.ledger.apply_tariff_change(change["id"], now)
            info = gw.acct.subscribers.get(sid)
            if info is None or change["tariff"] not in gw.acct.tariff_ids:
                continue
            with gw.engine_lock:
                _postings, events = gw.acct.change_billing(sid, change["tariff"], gw.acct.engine.subscriber(sid).credit,
                                                           change["effective_ns"])
                info.tariff = change["tariff"]
            gw.limits.update(sid)
            gw.touch((sid,))
            log.info("subscriber %s: tariff %s from %s as scheduled", info.name, change["tariff"],
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(change["effective_ns"] // NS)))
            gw.post(events)

    def sync_manual_blocks(self, sid: int) -> None:
        """Manual blocks are records in the ledger (``accounting.operations``:
        API, portal, CLI, from any process); the engine's ``BLOCK_MANUAL`` bit
        follows them, and the policy pusher the kernel's sets."""
        gw = self.gw
        if sid not in gw.acct.subscribers:
            return
        wanted = gw.ledger.manual_block_of(sid)
        with gw.engine_lock:
            has = bool(gw.acct.engine.subscriber(sid).blocked & BLOCK_MANUAL)
            events = [] if wanted == has else (gw.acct.engine.block if wanted else gw.acct.engine.unblock)(sid, BLOCK_MANUAL)
            if events:
                gw.touch((sid,))  # the eBPF source and kernel quotas follow at their next round, not their sweep
        gw.post(events)

    def refresh(self, sid: int) -> None:
        """Added, deactivated, new addresses, tariff or terms: the engine, the
        kernel's sets and the speed/connection limits follow the ledger."""
        try:
            self._refresh_engine_and_sets(sid)
        finally:
            self.gw.limits.update(sid)
            self.gw.touch((sid,))
            if self.gw.credit is not None:  # a credit limit changed: there may be more (or less) to take
                self.gw.credit.want((sid,))

    def release(self, sid: int) -> None:
        """The first pass over a round of changes: the networks a subscriber
        no longer has leave the engine and the kernel before any subscriber
        gets new ones, so that a network handed from one subscriber to
        another in one round (a session's address replaced, a lease taken
        again) is never still its old owner's when the new one takes it."""
        gw = self.gw
        info = gw.acct.subscribers.get(sid)
        if info is None:
            return
        row = gw.ledger.get_subscriber(sid)
        if not gw.serves(row):
            self.refresh(sid)  # a deactivation (or addresses gone from this gateway's networks) is all leaving
            return
        gone = sorted(set(info.addresses) - set(row["addresses"]))
        if gone:
            with gw.engine_lock:
                for net in gone:
                    gw.acct.engine.remove_address(net)
                self._drop_networks(sid, gone)
                info.addresses = tuple(sorted(set(info.addresses) - set(gone)))

    def _drop_networks(self, sid: int, gone) -> None:
        """Networks already out of the engine leave the kernel (under ``engine_lock``)."""
        gw = self.gw
        gw.quiesce()  # every batch rated with those networks is answered: the kernel has counted it
        if gw.opts.kernel_marked:
            gw.kernel.forget(sid, gone)
        with gw.enforcer_lock:
            # the eBPF program meters before nft: it lets them go first (the block step's order), or what it
            # still passes as the subscriber's (a blocked one's tcp/80, uncounted) nft would forward
            for reader in gw.readers:
                if hasattr(reader, "before_nft_release"):
                    reader.before_nft_release(gone)
            gw.enforcer.unblock(gone)
            gw.enforcer.remove_subscriber_addresses(gone)

    def _add_networks(self, sid: int, added) -> None:
        """Networks about to reach the engine reach the eBPF program first (under ``engine_lock``): counted
        by the kernel before the engine rates them, as below. They used to wait for the source's next
        ``sync_addresses``, and in between the program passed them as unknown (``unknown = "accept"``:
        forwarded, charged to nobody) while the engine already had them as the subscriber's."""
        for reader in self.gw.readers:
            if hasattr(reader, "before_engine_add"):
                reader.before_engine_add(sid, added)

    def _refresh_engine_and_sets(self, sid: int) -> None:
        """The live balance stays the engine's (the ledger's lags by a flush).

        Order matters for the kernel's counters, which must never count less
        than the engine rated (kernel minus mark is unrated traffic): a
        network is counted by the kernel before the engine rates it, and
        leaves the engine (with every batch it rated answered) before its
        counter is read and deleted. In between, its traffic is counted and
        not rated, and found as such by the next drift check."""
        gw = self.gw
        acct = gw.acct
        row = gw.ledger.get_subscriber(sid)
        active = gw.serves(row)  # not ours any more (inactive, or gone from [cluster] networks): it leaves
        info = acct.subscribers.get(sid)
        events = []
        with gw.engine_lock:
            if info is None and not active:
                return
            if info is None:
                self._add_networks(sid, row["addresses"])
                with gw.enforcer_lock:
                    gw.enforcer.add_subscriber_addresses(row["addresses"])
                balance = row["balance"] if gw.credit is None else gw.credit.grant_now(sid)
                events = acct.load_subscribers([{**row, "balance": balance, "addresses": list(row["addresses"]),
                                                 "since": row["billing_since_ns"] or row["created_ns"]}])
                events += acct.open_billing(sid, gw.calendar_now())[1]
                gw.post(events)
                gw.kernel.subscribers_changed()
                log.info("subscriber %s added live", row["name"])
                return
            old = set(info.addresses)
            new = set(row["addresses"]) if active else set()
            gone, added = sorted(old - new), sorted(new - old)
            if not active:
                name = info.name  # (a view of the table's row: read before the row goes)
                acct.close_billing(sid, gw.calendar_now())
                gw.flusher.orphan_rows += acct.engine.remove_subscriber(sid)
                del acct.subscribers[sid]
                if gw.credit is not None:
                    gw.credit.left(sid)
                gw.kernel.subscribers_changed()
            else:
                for net in gone:
                    acct.engine.remove_address(net)
            if gone:
                self._drop_networks(sid, gone)
            if not active:
                log.info("subscriber %s deactivated live", name)
                return
            self._add_networks(sid, added)
            with gw.enforcer_lock:
                gw.enforcer.add_subscriber_addresses(added)
            for net in added:
                acct.engine.add_address(sid, net)
            if row["tariff"] not in acct.tariff_ids:
                raise TollgateError(f"subscriber {row['name']!r}: tariff {row['tariff']!r} is not in the config")
            if row["tariff"] != info.tariff:
                events = acct.change_billing(sid, row["tariff"], row["credit_limit"], gw.calendar_now())[1]
            else:
                events = acct.update_terms(sid, row)
            info.addresses, info.tariff, info.name = tuple(sorted(new)), row["tariff"], row["name"]
            if acct.engine.subscriber(sid).blocked:
                with gw.enforcer_lock:
                    gw.enforcer.block(sorted(new))
        gw.post(events)
