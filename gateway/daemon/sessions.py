"""The session work a running gateway hosts (issue 15, phase 3): the expiry of sessions, the RADIUS
accounting server, and address binding (anti-spoofing) in the kernel.

* **expiry**: every ``[sessions] expiry_check`` seconds the ``sessions`` thread closes the live sessions
  whose expiry passed (``Operations.expire_sessions``: portal logins at the end of ``portal_session``,
  RADIUS sessions whose Stop was lost, DHCP leases that ended with no ``del``), so they end with no outside
  call, and asks the change follower to refresh their owners at once.
* **RADIUS** (``[radius] serve_in_gateway = true``): the sockets are bound at the gateway's start (a port in
  use stops it before anything else), :class:`gateway.radius.RadiusServer` answers in the ``radius`` thread,
  its counters are in the gateway's /metrics, and it stops before the gateway's ledger closes. After each
  write that changed an owner it asks for the old owners, then the new ones, to be refreshed
  (``ChangeFollower.request``: removals first), so a hand-over does not wait for the next round of the
  change feed.
* **address binding** (``[sessions] bind_mac``): a /32 or /128 of a live session of the configured sources
  that has a MAC is bound to it; with ``static``, a subscriber's static /32 and /128 addresses are bound to
  its MAC bindings (``tollgate binding add alice --mac ...``). The kernel's ``bound*`` sets (policy/nft.py,
  "bindings") drop a forwarded packet from a bound address with another source MAC and count it per
  subscriber (``tollgate_spoofed_packets_total``). The sets are brought in line with the ledger at start,
  then in proportion to what changed: the subscribers named by the ledger's change feed (sessions and
  addresses, schema 14) and by the audit rows of binding changes since the last look, every
  ``BIND_POLL`` seconds, and at once after a write of the hosted RADIUS server.

Threads: ``sessions`` (expiry and bindings, on its own ledger connection) and ``radius`` (on the server's),
both through ``Gateway._spawn``: a death turns /healthz red. Locks: ``enforcer_lock`` around each kernel
change (never ``engine_lock``: the engine's side goes through the change follower).
"""

from __future__ import annotations

import logging
import threading
import time

from accounting.ledger import Ledger
from accounting.operations import OperationError, Operations
from ext.errors import LedgerError, TollgateError


log = logging.getLogger("tollgate.daemon")
BIND_POLL = 0.2  # seconds between looks at what changed for address binding


class SessionHost:
    """The gateway's session work; see the module docstring."""

    def __init__(self, gw) -> None:
        from ..config import RadiusSettings, SessionSettings

        self.gw = gw
        self.timing = gw.config.sessions or SessionSettings()
        self.radius_settings = gw.config.radius or RadiusSettings()
        self.radius = None  # gateway.radius.RadiusServer, when hosted
        self.bind_sources = tuple(self.timing.bind_mac)
        self.bound: dict[str, tuple[int, frozenset]] = {}  # what the kernel binds (this thread's copy)
        self.last_change = 0
        self.last_audit = 0
        self.wake = threading.Event()
        self.expired = 0  # session rows this gateway closed as expired
        self.requested = 0  # owner refreshes asked for after RADIUS writes

    # ---- start and stop ----------------------------------------------------------------------------------------

    def open(self) -> None:
        """At the very start of ``Gateway.start``: bind the RADIUS sockets (a port in use stops us first)."""
        if self.radius_settings.serve_in_gateway:
            from ..radius import RadiusServer

            self.radius = RadiusServer(self.gw.config, self.gw.opts.db_path, actor="radius",
                                       on_change=self.owners_changed, expire=False)
            self.radius.open()
            self.gw.metrics.add_collectors(self.radius.registry)

    def start(self) -> None:
        """At the end of ``Gateway.start`` (the kernel's table installed): the bindings restored, the threads."""
        gw = self.gw
        if self.bind_sources:
            self.last_change = gw.ledger.last_change_id()  # read before the full look: nothing after it is missed
            self.last_audit = _last_audit(gw.ledger)
            self.restore(gw.ledger)
        if self.radius is not None:
            gw._spawn("radius", self.radius.serve)
        gw._spawn("sessions", self.loop)

    def stop(self) -> None:
        """Before the gateway's ledger closes (``Gateway.stop``, with ``stopping`` set)."""
        self.wake.set()
        if self.radius is not None:
            self.radius.stop()

    # ---- the sessions thread ---------------------------------------------------------------------------------

    def loop(self) -> None:
        gw = self.gw
        ledger = gw.open_ledger()
        try:
            ops = Operations(ledger, gw.config, "gateway")
            interval = min(BIND_POLL, self.timing.expiry_check) if self.bind_sources else self.timing.expiry_check
            next_expiry = 0.0
            while not gw.stopping.is_set():
                self.wake.wait(interval)
                self.wake.clear()
                if gw.stopping.is_set():
                    return
                try:
                    ledger.reconnect_if_lost()  # a connection PostgreSQL dropped is opened again
                    if time.monotonic() >= next_expiry:
                        next_expiry = time.monotonic() + self.timing.expiry_check
                        self.expire(ops)
                    if self.bind_sources:
                        self.follow(ledger)
                # busy or full, or PostgreSQL away (psycopg's errors are no LedgerError: this thread died of a
                # stopped server and the gateway with it, tests/linux/test_cluster_faults.py): the next round tries again
                except (LedgerError, OperationError, *ledger.db.errors) as exc:
                    log.warning("sessions: round failed, trying again: %s", exc)
        finally:
            ledger.close()

    def expire(self, ops: Operations) -> None:
        done = ops.expire_sessions()
        if done["closed"]:
            self.expired += len(done["closed"])
            log.info("sessions: %d session rows expired (%s)", len(done["closed"]),
                     ", ".join(sorted({r["network"] for r in done["closed"]})[:5]))
            self.request([r["subscriber_id"] for r in done["closed"]])

    def owners_changed(self, done: dict) -> None:
        """The hosted RADIUS server wrote ``done`` (an operation's result): old owners, then new ones."""
        self.request([r["subscriber_id"] for r in done.get("closed", ())]
                     + [r["subscriber_id"] for r in done.get("sessions", ())])
        self.wake.set()  # the bindings follow at once too

    def request(self, sids) -> None:
        for sid in dict.fromkeys(sids):  # in order, each once: removals first
            self.requested += 1
            self.gw.changes.request(sid)

    # ---- address binding -----------------------------------------------------------------------------------

    def wanted(self, ledger: Ledger, sids=None) -> dict[str, tuple[int, frozenset]]:
        """What the ledger binds, for ``sids`` (None: everyone): ``{network: (subscriber, MACs)}``."""
        db = ledger.db
        where, args = "", []
        if sids is not None:
            sids = sorted(sids)
            if not sids:
                return {}
            where, args = f" AND {{col}} IN ({', '.join('?' * len(sids))})", sids
        out: dict[str, tuple[int, set]] = {}

        def put(net, sid, mac) -> None:
            if not (net.endswith("/32") and "." in net or net.endswith("/128")) or not mac:
                return
            got = out.setdefault(net, (sid, set()))
            if got[0] == sid:  # one owner per address (the ledger's rule); a stale row of another is no claim
                got[1].add(mac)

        sources = [s for s in self.bind_sources if s != "static"]
        if sources:
            for net, sid, mac in db.execute(
                    "SELECT s.network, s.subscriber_id, s.mac FROM sessions s JOIN subscribers u ON u.id = "
                    f"s.subscriber_id WHERE s.ended_ns IS NULL AND s.mac IS NOT NULL AND u.active = 1 AND s.source "
                    f"IN ({', '.join('?' * len(sources))})" + where.format(col="s.subscriber_id"),
                    [*sources, *args]):
                put(net, sid, mac)
        if "static" in self.bind_sources:
            for net, sid, mac in db.execute(
                    "SELECT a.network, a.subscriber_id, b.value FROM addresses a JOIN bindings b ON "
                    "b.subscriber_id = a.subscriber_id AND b.kind = 'mac' JOIN subscribers u ON u.id = "
                    "a.subscriber_id WHERE a.session_id IS NULL AND u.active = 1" + where.format(col="a.subscriber_id"),
                    args):
                put(net, sid, mac)
        return {net: (sid, frozenset(macs)) for net, (sid, macs) in out.items()}

    def _bindings(self):
        from policy.nft import AddressBindings

        return AddressBindings(self.gw.enforcer)

    def restore(self, ledger: Ledger) -> None:
        """The kernel's bindings made equal to the ledger's, whatever a previous run left."""
        gw = self.gw
        want = self.wanted(ledger)
        with gw.enforcer_lock:
            kb = self._bindings()
            have = kb.read()
            kb.apply(have, want)
        self.bound = want
        log.info("address binding (%s): %d addresses bound", ", ".join(self.bind_sources), len(want))

    def follow(self, ledger: Ledger) -> None:
        """The subscribers whose sessions, addresses or MAC bindings changed since the last look: their
        bindings again."""
        sids: set[int] = set()
        while True:
            last, changed = ledger.changes_since(self.last_change)
            if last == self.last_change:
                break
            self.last_change = last
            sids.update(sid for sid, what in changed.items() if what & {"subscriber", "addresses"})
        rows = ledger.db.execute("SELECT id, target FROM audit_log WHERE id > ? AND action IN ('binding.add', "
                                 "'binding.remove') ORDER BY id", (self.last_audit,)).fetchall()
        for _id, target in rows:
            try:
                sids.add(int(str(target).removeprefix("subscriber:")))
            except ValueError:
                pass
        if rows:
            self.last_audit = max(self.last_audit, rows[-1][0])
        if not sids:
            return
        want = self.wanted(ledger, sids)
        old = {net: b for net, b in self.bound.items() if b[0] in sids}
        # an address another subscriber takes over is in want with its new owner and in old under the old one
        old.update({net: self.bound[net] for net in want if net in self.bound})
        new = {net: want.get(net) for net in old.keys() | want.keys()}
        new = {net: b for net, b in new.items() if b is not None}
        try:
            with self.gw.enforcer_lock:
                n = self._bindings().apply(old, new)
        except TollgateError as exc:  # out of line with the kernel: read it and start again
            log.error("address binding: %s; bringing the kernel in line again", exc)
            self.restore(ledger)
            return
        for net in old:
            self.bound.pop(net, None)
        self.bound.update(new)
        if n:
            log.info("address binding: %d addresses changed for %d subscribers", n, len(sids))

    def spoofed(self) -> dict[int, tuple[int, int]]:
        """``{subscriber: (packets, bytes)}`` dropped from its bound addresses (for /metrics)."""
        if not self.bind_sources or self.gw.enforcer is None:
            return {}
        with self.gw.enforcer_lock:
            return self._bindings().counters()


def _last_audit(ledger: Ledger) -> int:
    return ledger.db.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]


class SessionCollector:
    """/metrics: sessions this gateway expired, bound addresses, and what the binding dropped per subscriber."""

    def __init__(self, gw) -> None:
        self.gw = gw

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        host = self.gw.sessions
        yield CounterMetricFamily("tollgate_sessions_expired", "session rows the gateway closed as expired",
                                  value=host.expired)
        yield GaugeMetricFamily("tollgate_bound_addresses", "addresses bound to a MAC in the kernel",
                                value=len(host.bound))
        packets = CounterMetricFamily("tollgate_spoofed_packets", "forwarded packets from a bound address with "
                                      "another source MAC, dropped", labels=["subscriber"])
        nbytes = CounterMetricFamily("tollgate_spoofed_bytes", "IP bytes of those packets", labels=["subscriber"])
        try:
            counts = host.spoofed()
        except TollgateError:
            counts = {}
        for sid, (p, b) in sorted(counts.items()):
            info = self.gw.acct.subscribers.get(sid)
            name = info.name if info else str(sid)
            packets.add_metric([name], p)
            nbytes.add_metric([name], b)
        yield packets
        yield nbytes
