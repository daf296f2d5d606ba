"""Kernel quotas under a passive source (gateway/sources/nflog.py): each
subscriber's quota kept at what its balance buys now, and whoever the kernel
has stopped blocked in the engine (so the block page and the records follow).

A round every ``QUOTA_POLL`` seconds renews the quotas of the subscribers
whose balance or rated bytes may have moved since the last round (told by
:meth:`QuotaKeeper.touch`: traffic drained, payments, fees, changes), of
those at their limit or stopped, and of a rotating slice of everyone else
(all of them every ``QUOTA_ROUNDS`` rounds, a safety net for whatever moved
untold), and reads back the kernel's quotas of just those: a round costs in
proportion to what moved, not to every subscriber.

Why that is enough: a quota only needs renewing when what it is computed from
moved; and only a subscriber with traffic can reach its limit, traffic the
source reports to the engine, so it is touched within a flush. One at its
limit is renewed (synced with fresh balances) before it can be taken as
stopped at the next round, so outrun free traffic gets a higher limit, not a
block.

Locks: ``enforcer_lock`` around each round's kernel work; ``lock`` (its own)
around the touched set, which the flusher thread fills; the engine is read
through its own locking (``Accountant.bytes_left``).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("tollgate.daemon")
QUOTA_POLL = 0.1  # seconds between kernel quota rounds
QUOTA_ROUNDS = 50  # a round also renews 1/50 of the subscribers (everyone every 5 s)


class QuotaKeeper:
    def __init__(self, gw) -> None:
        from ..sources.nflog import KernelQuotas

        self.gw = gw
        self.quotas = KernelQuotas(gw.enforcer, gw.acct.engine)
        self.lock = threading.Lock()
        self.touched: set[int] = set()
        self.cursor = 0

    def touch(self, sids) -> None:
        """These subscribers' balance, traffic, terms or networks moved: renewed in the next round."""
        with self.lock:
            self.touched.update(sids)

    def restore(self) -> None:
        """At start: an earlier run's quotas counted bytes this engine never saw; every quota anew."""
        with self.gw.enforcer_lock:
            self.gw.enforcer.restore_quotas({})
        self.round(everyone=True)

    def _slice(self) -> list[int]:
        keys = list(self.gw.acct.subscribers)
        if not keys:
            return []
        step = -(-len(keys) // QUOTA_ROUNDS)
        start = self.cursor % len(keys)
        self.cursor = start + step
        return keys[start:start + step]

    def round(self, everyone: bool = False) -> None:
        """Quotas at what the balances buy now, for the subscribers that may
        have moved; then block in the engine whoever the kernel has stopped."""
        gw, kq = self.gw, self.quotas
        subs = gw.acct.subscribers
        with self.lock:
            touched, self.touched = self.touched, set()
        sids = set(subs) if everyone else touched | kq.at_limit | kq.stopped | set(self._slice())
        wanted, gone = {}, []
        for sid in sids:
            info = subs.get(sid)
            if info is not None and info.addresses:
                left, rated = gw.acct.bytes_left(sid)
                wanted[sid] = (info.addresses, left, rated)
            elif sid in kq.networks:
                gone.append(sid)
        with gw.enforcer_lock:
            kq.sync(wanted, gone=gone)
            events = kq.check(None if everyone else wanted)
        if events:
            gw.events.put(events)

    def loop(self) -> None:
        while not self.gw.stopping.wait(QUOTA_POLL):
            try:
                self.round()
            except Exception:  # nft busy or a subscriber removed mid-round: the next round retries
                log.exception("kernel quota round failed")
