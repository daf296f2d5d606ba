"""Speed and connection limits of the subscribers whose terms set them
(``policy/limits.py``: an nft table of its own and HTB classes), kept in
line with the subscribers in the engine: all of them at start and reload,
one at a time when one changes.

Locks: ``enforcer_lock`` around every kernel change (one libnftables
context is shared by the daemon's threads).
"""

from __future__ import annotations

import logging

log = logging.getLogger("tollgate.daemon")


class SpeedLimits:
    def __init__(self, gw) -> None:
        self.gw = gw
        self.rates = None  # policy.limits.Limits, once some subscriber's speed or connections are limited

    def _of(self, sid: int) -> tuple:
        """(up bit/s, down bit/s, connections) of the subscriber's terms; None: no limit."""
        terms = self.gw.acct.terms[sid]
        return terms.speed_up, terms.speed_down, terms.max_connections

    def _limited(self, sid: int) -> bool:
        return any(v is not None for v in self._of(sid))

    def restore(self) -> None:
        """Our limits table and HTB classes made to hold exactly the subscribers
        whose terms limit speed or connections (none ever: nothing installed)."""
        from policy.limits import Limits

        gw = self.gw
        # those holding one of the distinct terms that limit (a few objects), found in C, not a million looked at
        subs, terms = gw.acct.subscribers, gw.acct.terms
        limiting = [t for t in terms.distinct() if any(v is not None for v in (t.speed_up, t.speed_down,
                                                                                t.max_connections))]
        limited = [(sid, subs[sid].addresses, *self._of(sid)) for sid in terms.holding(limiting) if sid in subs]
        lan, wan = gw.config.lan_interfaces, gw.config.wan_interfaces
        if self.rates is None and (not limited or not (lan and wan)):
            leftover = Limits()
            if leftover.installed():  # limits of an earlier run that no longer apply
                with gw.enforcer_lock:
                    leftover.remove()
                log.info("removed the limits table of an earlier run")
            if limited:
                log.error("speed and connection limits need gateway.lan_interfaces and gateway.wan_interfaces: "
                          "%d subscribers left unlimited", len(limited))
            return
        with gw.enforcer_lock:
            if self.rates is None or (self.rates.lan, self.rates.wan) != (lan, wan):
                self.rates = Limits(lan, wan)
                self.rates.install()
            self.rates.restore(limited)
        log.info("speed and connection limits for %d subscribers", len(limited))

    def update(self, sid: int) -> None:
        gw = self.gw
        if self.rates is None:
            if sid in gw.acct.subscribers and self._limited(sid):
                self.restore()
            return
        with gw.enforcer_lock:
            if sid in gw.acct.subscribers:
                self.rates.set_subscriber(sid, gw.acct.subscribers[sid].addresses, *self._of(sid))
            else:
                self.rates.remove_subscriber(sid)
