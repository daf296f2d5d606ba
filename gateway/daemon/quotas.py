"""Kernel quotas under a passive source (gateway/sources/nflog.py): each
subscriber's quota kept at what its balance buys now, and whoever the kernel
has stopped blocked in the engine (so the block page and the records follow).

A round every ``QUOTA_POLL`` seconds still looks at every subscriber (what
each balance buys, one listing of the kernel's quotas): the one per-second
cost left in proportion to all subscribers, under the passive sources only
(the issue of scale names it; the inline path has none).

Locks: ``enforcer_lock`` around each round's kernel work; the engine is read
through its own locking (``Accountant.bytes_left``).
"""

from __future__ import annotations

import logging

log = logging.getLogger("tollgate.daemon")
QUOTA_POLL = 0.1  # seconds between kernel quota rounds


class QuotaKeeper:
    def __init__(self, gw) -> None:
        from ..sources.nflog import KernelQuotas

        self.gw = gw
        self.quotas = KernelQuotas(gw.enforcer, gw.acct.engine)

    def restore(self) -> None:
        """At start: an earlier run's quotas counted bytes this engine never saw; every quota anew."""
        with self.gw.enforcer_lock:
            self.gw.enforcer.restore_quotas({})
        self.round()

    def round(self) -> None:
        """Quotas at what each subscriber's balance buys now; then block in the
        engine whoever the kernel has stopped."""
        gw = self.gw
        wanted = {}
        for sid, info in list(gw.acct.subscribers.items()):
            if info.addresses:
                left, rated = gw.acct.bytes_left(sid)
                wanted[sid] = (info.addresses, left, rated)
        with gw.enforcer_lock:
            self.quotas.sync(wanted)
            events = self.quotas.check()
        if events:
            gw.events.put(events)

    def loop(self) -> None:
        while not self.gw.stopping.wait(QUOTA_POLL):
            try:
                self.round()
            except Exception:  # nft busy or a subscriber removed mid-round: the next round retries
                log.exception("kernel quota round failed")
