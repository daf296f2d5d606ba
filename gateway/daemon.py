"""``tollgate run``: the live gateway.

Threads, each with one job:

* one **reader** per nfqueue queue: receives packet batches, runs them through
  the engine (GIL released) and sends verdicts; engine events go to the
  policy queue;
* the **policy pusher**: turns block/unblock events into batched nftables set
  changes at once (the kernel drops the subscriber from then on, even if this
  process dies) and times each from the breaching packet to the set holding it;
* the **flusher**: once a second drains the engine's counters into the ledger
  (idempotent flush ids), records blocks, compares the engine with the
  kernel's counters (drift) and keeps the time-slot timeline ahead of the
  clock; five times a second it applies payments that appeared in the ledger
  (a top-up from the CLI or the API unblocks well within a second);
* the **HTTP service**: health, ``/metrics`` and the block page.

SIGTERM/SIGINT: stop the readers, flush, leave the kernel table and its blocks
in place (the queue rule bypasses to the fail-open/closed choice). SIGHUP:
reload the config (zones, tariffs, time slots, allow-list).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from accounting.ledger import Ledger
from accounting.notify import Notifier, enqueue
from accounting.money import format_amount
from ext.constants import BLOCK_LIMIT, BLOCK_MANUAL, BLOCK_REASONS, EV_BLOCK, EV_UNBLOCK, EV_WARN
from ext.errors import ConfigError, SourceError, TollgateError

from .config import Config, load_config
from .runtime import MINUTE_NS, NS, Accountant, ledger_rows

log = logging.getLogger("tollgate.daemon")
PAYMENT_POLL = 0.2  # seconds between looks for new payments in the ledger
QUOTA_POLL = 0.1  # seconds between kernel quota rounds (passive sources)
DRIFT_ROUNDS = 30  # a drift check reads the active subscribers and 1/30 of the others (see _drift_sample)
ROLLUP_FIRST = 300.0  # seconds after start before the first rollup (a restart loop should not roll up each time)
ROLLUP_INTERVAL = 3600.0  # seconds between rollups
FAILED_GRACE = 2.0  # seconds /healthz answers "failed" before a gateway with a dead thread exits


@dataclass
class RunOptions:
    config_path: str
    db_path: str
    queues: tuple = (0,)
    fail_open: bool = True
    listen: str = "::"  # both families (see Gateway._listen_socket)
    port: int = 8080
    engine: str | None = None
    flush_interval: float = 1.0
    batch_size: int = 64
    linger_us: int = 0
    drift_interval: float = 10.0  # seconds between engine-vs-kernel comparisons
    drift_min_bytes: int = 64 * 1024  # a drift below this (or 0.5% of the kernel's count) is noise
    metrics_subscribers: int = 1000  # cap on per-subscriber series in /metrics
    clock_offset: float = 0.0  # seconds added to the calendar's clock (see Gateway.calendar_now)
    source: str = "nfqueue"  # see gateway/sources
    source_options: dict = field(default_factory=dict)
    kernel_quota: bool | None = None  # per-subscriber kernel quotas; None: on for nflog and conntrack

    @property
    def inline(self) -> bool:
        return self.source == "nfqueue"

    @property
    def kernel_marked(self) -> bool:
        """Whether what the engine rates is what our table's counters count,
        so that the ledger keeps kernel marks (inline; conntrack, bounded by
        them, see gateway/sources/conntrack.py)."""
        return self.source in ("nfqueue", "conntrack")

    @property
    def quotas(self) -> bool:
        """Whether kernel quotas back a passive source (see gateway/sources/nflog.py):
        meaningful only where the gateway forwards the traffic it counts."""
        if self.inline:
            return False
        return self.source in ("nflog", "conntrack") if self.kernel_quota is None else self.kernel_quota


class EngineCollector:
    """Exports the engine's own counters at scrape time (no per-packet metric calls)."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway

    def collect(self):
        s = self.gw.acct.engine.stats()
        for name, value, doc in (
            ("tollgate_packets", s.packets, "packets seen by the engine"),
            ("tollgate_bytes", s.bytes, "IP bytes seen by the engine"),
            ("tollgate_malformed_packets", s.malformed_packets, "packets that could not be parsed"),
            ("tollgate_unknown_packets", s.unknown_packets, "packets of no subscriber"),
            ("tollgate_dropped_packets", s.dropped_packets, "packets dropped for blocked subscribers"),
            ("tollgate_dropped_bytes", s.dropped_bytes, "bytes dropped for blocked subscribers"),
            ("tollgate_over_limit_bytes", s.over_limit_bytes, "bytes rated past a subscriber's limit: flow records "
             "a passive source reported after the traffic passed (0 inline: the breaching packet is dropped)"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        q = GaugeMetricFamily("tollgate_queue_stat", "nfqueue reader counters", labels=["queue", "stat"])
        for reader in self.gw.readers:
            for key, value in reader.stats().items():
                q.add_metric([self.gw.reader_label(reader), key], value)
        yield q
        drops = CounterMetricFamily("tollgate_queue_kernel_drops", "packets the kernel dropped for a queue "
                                    "(/proc/net/netfilter/nfnetlink_queue)", labels=["queue", "where"])
        for queue_num, queue_dropped, user_dropped in kernel_queue_drops():
            drops.add_metric([str(queue_num), "queue_full"], queue_dropped)
            drops.add_metric([str(queue_num), "socket"], user_dropped)
        yield drops
        yield from self.subscribers()

    def subscribers(self):
        """Bytes and balance of the busiest subscribers. The series are capped
        (``--metrics-subscribers``, default 1000) so a large network cannot
        swamp Prometheus; totals for everyone are in the ledger."""
        gw = self.gw
        top = sorted(gw.engine_bytes.items(), key=lambda kv: -kv[1])[:gw.opts.metrics_subscribers]
        nbytes = CounterMetricFamily("tollgate_subscriber_bytes", "IP bytes rated for the subscriber since the "
                                     "gateway started", labels=["subscriber"])
        balance = GaugeMetricFamily("tollgate_subscriber_balance", "live balance in internal units (nano-units "
                                    "of the currency, or bytes)", labels=["subscriber"])
        for sid, total in top:
            info = gw.acct.subscribers.get(sid)
            if info is None:
                continue
            nbytes.add_metric([info.name], total)
            balance.add_metric([info.name], gw.acct.engine.subscriber(sid).balance)
        yield nbytes
        yield balance


def kernel_queue_drops() -> list[tuple[int, int, int]]:
    """(queue, dropped because full, dropped because our socket was full) per bound queue."""
    out = []
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 7:
                    out.append((int(fields[0]), int(fields[5]), int(fields[6])))
    except OSError:
        pass
    return out


class Gateway:
    """The running daemon; see the module docstring."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.config: Config = load_config(opts.config_path)
        self.ledger = Ledger.open(opts.db_path)
        self.acct = Accountant(self.config, self.ledger, opts.engine)
        self.boot = uuid.uuid4().hex[:12]
        self.flush_seq = 0
        self.pending: tuple | None = None  # a drained flush not yet in the ledger
        self.events: queue.Queue = queue.Queue()
        self.ledger_jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.readers: list = []
        self.threads: list[threading.Thread] = []
        self.engine_lock = threading.Lock()  # control operations; the C engine also locks inside
        self.last_payment = 0
        self.last_adjustment = 0
        self.orphan_rows: list = []  # counters of subscribers removed live, for the next flush
        self.active: set[int] = set()  # subscribers with traffic since the last look at their volumes
        self.drift_active: set[int] = set()  # subscribers with traffic since the last drift check
        self.drift_cursor = 0  # where the next drift check's slice of everyone begins
        self.drift_ring: list[int] | None = None  # everyone, in the order the slices take them
        self.last_flushed: dict[tuple[int, int], int] = {}  # bytes of the latest flush, per (subscriber, direction)
        self.last_change = 0  # the ledger's change feed, read up to here
        self.quota_noted: set = set()  # quota notification keys queued by this process
        self.refresh_requests: queue.Queue = queue.Queue()  # subscriber ids the API changed
        self.kernel_before: dict | None = None  # the previous drift check's kernel counters (passive sources)
        self.rates = None  # policy.limits.Limits, once some subscriber's speed or connections are limited
        self.kernel_quotas = None  # gateway.sources.nflog.KernelQuotas, under a passive source with quotas
        self.last_flush = time.time()
        self.registry = CollectorRegistry()
        self.m_blocks = Counter("tollgate_blocks", "subscribers blocked", ["reason"], registry=self.registry)
        self.m_unblocks = Counter("tollgate_unblocks", "subscribers unblocked", ["reason"], registry=self.registry)
        self.m_block_latency = Histogram(
            "tollgate_block_latency_seconds", "from the breaching packet to the kernel set holding the subscriber",
            buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1), registry=self.registry)
        self.m_nft_latency = Histogram("tollgate_nft_update_seconds", "time of one batched nftables update",
                                       registry=self.registry)
        self.m_flush_lag = Gauge("tollgate_flush_lag_seconds", "seconds since the last successful flush",
                                 registry=self.registry)
        self.m_flush_lag.set_function(lambda: time.time() - self.last_flush)
        self.registry.register(EngineCollector(self))
        self.block_latencies: list[float] = []  # kept for the lab's report
        self.http_local = threading.local()  # per-thread read connections to the ledger
        self.enforcer_lock = threading.Lock()  # one libnftables context, used by two threads
        self.engine_bytes: dict[int, int] = {}  # bytes drained from the engine since start, per subscriber
        self.drift: dict[str, int] = {}  # subscriber -> kernel minus engine bytes, where beyond noise
        self.next_drift_check = time.monotonic() + opts.drift_interval
        self.m_drift = Gauge("tollgate_drift_bytes", "kernel minus engine bytes, for subscribers beyond the "
                             "noise threshold at the last check (negative: the engine is ahead of the kernel)",
                             ["subscriber"], registry=self.registry)
        self.m_unrated = Counter("tollgate_unrated_bytes", "bytes the kernel forwarded that the engine never rated "
                                 "(fail-open while no reader was bound, rated but unflushed at a crash), charged "
                                 "when found", registry=self.registry)
        self.marks: dict[tuple[int, int], list[int]] = {}  # the ledger's kernel marks, followed in memory (inline)
        self.saved_blocks: dict[int, int] = {}  # block bits the ledger holds per subscriber (block_state)
        self.unsaved_blocks: set[int] = set()  # subscribers whose block state is still to be written
        self.unsaved_records: list[tuple] = []  # block history rows still to be written
        self.resetter = None  # policy.resets.Resetter, made at the first block
        self.m_resets = Counter("tollgate_connection_resets", "TCP connections of blocked subscribers ended at "
                                "once (policy/resets.py)", registry=self.registry)
        self.failed: dict[str, str] = {}  # thread name -> why it died: /healthz goes red, run() ends
        self.fatal = threading.Event()
        self.m_drift_alarms = Counter("tollgate_drift_alarms", "drift checks that found a subscriber beyond "
                                      "the threshold", registry=self.registry)

    # ---- start and stop --------------------------------------------------

    def start(self) -> None:
        self.http_socket = self._listen_socket()  # first: a port in use stops us before the kernel is touched
        self.acct.seed_ledger()
        events = self.acct.load_subscribers(ledger_rows(self.ledger))
        self.last_payment = self.ledger.last_payment_id()
        self.last_adjustment = self.ledger.last_adjustment_id()
        self.last_change = self.ledger.last_change_id()  # what was loaded above includes everything before it
        now = time.time_ns()
        self.acct.ensure_timeline(now, since_ns=now)
        events += self.acct.start_billing(self.calendar_now())[1]
        events += self.acct.bill(self.calendar_now())[1]  # fees and period ends that fell due while stopped
        events += self.acct.resume_from_ledger(self.calendar_now())  # a volume limit used up before the restart
        self._restore_blocks()
        self._make_readers()
        for reader in self.readers:
            if hasattr(reader, "recover"):  # a spool: what a crash left half-way, against the ledger
                reader.recover(lambda digest: self.thread_ledger().ingested_file(digest))
        self.enforcer = self._enforcer(self.config)
        self.enforcer.install()  # keeps the elements of our sets, so the blocks that held still hold
        self._restore_limits()
        self.enforcer.restore(blocked=self._blocked_networks(), subscribers=self._all_networks())
        if self.opts.kernel_marked:
            self.marks = {key: list(v) for key, v in self.ledger.kernel_marks().items()}
            kernel = self._kernel_counts()
            if self.opts.inline:
                self._charge_unrated(kernel, "start")
                # the queues were bound above only to fail before the kernel was touched; bound again now that
                # its state is final, so that no packet waits in a queue across the table's renewal (one that
                # did could be answered past our counters: rated, never counted); what passes fail-open in
                # between is counted, not rated, and charged by the next drift check
                for reader in self.readers:
                    reader.close()
                self.readers = []
                self._make_readers()
            else:  # conntrack: what passed while we were down is in the connections' counters; bound them
                self._charge_unrated(kernel, "start", charge=False)
                base = {key: mark[0] for key, mark in self.marks.items()}
                self.readers[0].bound_by(lambda sids: {
                    sid: tuple(ways[d][0] - base.get((sid, d), 0) for d in (0, 1))
                    for sid, ways in self._kernel_counts(sids).items()})
        if self.opts.quotas:
            from .sources.nflog import KernelQuotas

            self.enforcer.restore_quotas({})  # an earlier run's quotas counted bytes this engine never saw
            self.kernel_quotas = KernelQuotas(self.enforcer, self.acct.engine)
            self._quota_round()
        log.info("restored kernel state: %d subscribers, %d blocked", len(self.acct.subscribers),
                 len(self._blocked_networks()))
        self._record_events([(ev, None) for ev in events], time.time_ns())
        self._start_readers()
        self._spawn("policy", self._policy_loop)
        if self.kernel_quotas is not None:
            self._spawn("quotas", self._quota_loop)
        self._spawn("flusher", self._flush_loop)
        self._spawn("rollup", self._rollup_loop)
        self._spawn("http", self._serve_http)
        if self.config.notify.webhook or self.config.notify.command:
            self._spawn("notify", self._notify_loop)

    def _restore_blocks(self) -> None:
        """Put back in the engine the blocks the ledger remembers, before the
        kernel's sets are restored from it: a manual block until it is lifted,
        a limit block until a payment or adjustment came after it. (Volume and
        access-hour blocks follow from billing, already brought up to date.)
        A limit block needs its record: it may leave a small positive balance
        (the breaching packet is dropped, not charged), so the balance alone
        does not say it was blocked."""
        for sid in self.ledger.manually_blocked():
            if sid in self.acct.subscribers:
                self.acct.engine.block(sid, BLOCK_MANUAL)
        for sid, state in self.ledger.block_states().items():
            if sid in self.acct.subscribers and state["blocked"] & BLOCK_LIMIT and not state["paid_since"]:
                self.acct.engine.block(sid, BLOCK_LIMIT)
        self.saved_blocks = {sid: state["blocked"] for sid, state in self.ledger.block_states().items()}

    # ---- the kernel's counters: crash recovery and drift (inline) ---------------------
    #
    # Our table's per-subscriber counters are monotonic: install() and
    # restore() keep them, so they survive a restart and a SIGKILL. The
    # ledger's kernel marks say how much of each count it already holds as
    # usage (every inline flush adds its bytes in the same transaction). So
    # kernel - mark is traffic the gateway forwarded and never charged: rated
    # but not flushed when the process died, or let through fail-open while no
    # reader was bound (start-up, downtime, a full queue). It is charged, at
    # the default zone's price at the current time slot (the kernel does not
    # know zones), and so lands in the ledger with the next flush.

    def _kernel_counts(self, sids=None) -> dict[int, tuple]:
        """``{subscriber: ((up bytes, up packets), (down bytes, down packets))}``
        of every subscriber (one listing of our table), or of just ``sids``
        (their elements asked for by value)."""
        if sids is None:
            with self.enforcer_lock:
                counters = self.enforcer.counters()
            subs = self.acct.subscribers
        else:
            subs = {sid: self.acct.subscribers[sid] for sid in sids if sid in self.acct.subscribers}
            with self.enforcer_lock:
                counters = self.enforcer.counters_of([n for info in subs.values() for n in info.addresses])
        out = {}
        for sid, info in subs.items():
            rows = [counters[n] for n in info.addresses if n in counters]
            out[sid] = tuple((sum(r[f"{way}_bytes"] for r in rows), sum(r[f"{way}_packets"] for r in rows))
                             for way in ("up", "down"))
        return out

    def _drift_sample(self) -> list[int]:
        """Whom a drift check reads: every subscriber with traffic since the
        last check, and the next slice of the others in turn (all of them
        every DRIFT_ROUNDS checks): traffic that bypasses the engine for a
        subscriber it never sees is found too, while a check costs in
        proportion to the active subscribers."""
        active, self.drift_active = self.drift_active, set()
        if self.drift_ring is None:  # made again only when subscribers come or go, not each check
            self.drift_ring = list(self.acct.subscribers)
        everyone = self.drift_ring
        step = max(1, -(-len(everyone) // DRIFT_ROUNDS))
        start = self.drift_cursor % max(1, len(everyone))
        self.drift_cursor = start + step
        return sorted(active | set(everyone[start:start + step]))

    def _charge_unrated(self, kernel: dict, when: str, reset_behind: bool = True, charge: bool = True) -> dict[str, int]:
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
        of the listing, see _check_drift.) Returns ``{name: bytes charged}``."""
        charged, reset = {}, {}
        now = time.time_ns()
        events = []
        with self.engine_lock:
            for sid, ways in kernel.items():
                if sid not in self.acct.subscribers:
                    continue
                for direction, (kbytes, kpackets) in enumerate(ways):
                    mbytes, mpackets = self.marks.get((sid, direction), (0, 0))
                    if kbytes < mbytes:
                        if reset_behind:
                            reset[(sid, direction)] = (kbytes, kpackets)
                    elif kbytes > mbytes and charge:
                        events += self.acct.engine.rate_volume(sid, self.acct.engine.default_zone, direction,
                                                               kbytes - mbytes, max(0, kpackets - mpackets), now)
                        name = self.acct.subscribers[sid].name
                        charged[name] = charged.get(name, 0) + kbytes - mbytes
        if reset:
            self.thread_ledger().set_kernel_marks(reset)
            log.warning("kernel counters below what the ledger holds, taken as started again (a new table, "
                        "recreated elements): %s", ", ".join(
                            f"{self.acct.subscribers[sid].name} {('upload', 'download')[d]}: kernel {kb} B, "
                            f"ledger {self.marks.get((sid, d), (0, 0))[0]} B" for (sid, d), (kb, _kp) in sorted(reset.items())))
            self.marks.update({k: list(v) for k, v in reset.items()})
        if charged:
            self.m_unrated.inc(sum(charged.values()))
            log.warning("%s: charged %d bytes the kernel forwarded that the engine never rated (rated but not "
                        "flushed before a crash, or passed fail-open while no reader was bound): %s", when,
                        sum(charged.values()), ", ".join(f"{n} {b} B" for n, b in sorted(charged.items())))
        if events:
            self.events.put([(ev, None) for ev in events])
        return charged

    def _forget_counters(self, sid: int, networks) -> None:
        """Networks of ``sid`` are about to leave the kernel, their counters
        with them: their counts leave the subscriber's marks too, so that
        kernel - mark keeps meaning unrated traffic."""
        with self.enforcer_lock:
            counters = self.enforcer.counters_of(networks)
        deltas = {}
        for d, way in enumerate(("up", "down")):
            rows = [counters[n] for n in networks if n in counters]
            deltas[(sid, d)] = (-sum(r[f"{way}_bytes"] for r in rows), -sum(r[f"{way}_packets"] for r in rows))
        self.ledger.adjust_kernel_marks(deltas)
        for key, (b, p) in deltas.items():
            mark = self.marks.setdefault(key, [0, 0])
            mark[0] += b
            mark[1] += p

    def _enforcer(self, cfg: Config):
        from policy.nft import Enforcer

        if self.opts.inline:
            kw = {"queues": self.opts.queues}
        else:  # the source says what it needs (NFLOG: the log rule)
            kw = {"queues": (), **getattr(self.readers[0], "enforcer_options", dict)(), "quotas": self.opts.quotas}
        return Enforcer.from_config(cfg, fail_open=self.opts.fail_open, portal_port=self.opts.port, **kw)

    # ---- kernel quotas under a passive source (gateway/sources/nflog.py) -------------

    def _quota_round(self) -> None:
        """Quotas at what each subscriber's balance buys now; then block in the
        engine whoever the kernel has stopped."""
        wanted = {}
        for sid, info in list(self.acct.subscribers.items()):
            if info.addresses:
                left, rated = self.acct.bytes_left(sid)
                wanted[sid] = (info.addresses, left, rated)
        with self.enforcer_lock:
            self.kernel_quotas.sync(wanted)
            events = self.kernel_quotas.check()
        if events:
            self.events.put(events)

    def _quota_loop(self) -> None:
        while not self.stopping.wait(QUOTA_POLL):
            try:
                self._quota_round()
            except Exception:  # nft busy or a subscriber removed mid-round: the next round retries
                log.exception("kernel quota round failed")

    # ---- speed and connection limits (policy/limits.py) ------------------------------

    def _limits(self, sid: int) -> tuple:
        """(up bit/s, down bit/s, connections) of the subscriber's terms; None: no limit."""
        terms = self.acct.terms[sid]
        return terms.speed_up, terms.speed_down, terms.max_connections

    def _restore_limits(self) -> None:
        """Our limits table and HTB classes made to hold exactly the subscribers
        whose terms limit speed or connections (none ever: nothing installed)."""
        from policy.limits import Limits

        limited = [(sid, info.addresses, *self._limits(sid)) for sid, info in self.acct.subscribers.items()
                   if any(v is not None for v in self._limits(sid))]
        interfaces = self.config.lan_interfaces and self.config.wan_interfaces
        if self.rates is None and (not limited or not interfaces):
            leftover = Limits()
            if leftover.installed():  # limits of an earlier run that no longer apply
                with self.enforcer_lock:
                    leftover.remove()
                log.info("removed the limits table of an earlier run")
            if limited:
                log.error("speed and connection limits need gateway.lan_interfaces and gateway.wan_interfaces: "
                          "%d subscribers left unlimited", len(limited))
            return
        with self.enforcer_lock:
            if self.rates is None or (self.rates.lan, self.rates.wan) != (self.config.lan_interfaces,
                                                                          self.config.wan_interfaces):
                self.rates = Limits(self.config.lan_interfaces, self.config.wan_interfaces)
                self.rates.install()
            self.rates.restore(limited)
        log.info("speed and connection limits for %d subscribers", len(limited))

    def _update_limits(self, sid: int) -> None:
        if self.rates is None:
            if sid in self.acct.subscribers and any(v is not None for v in self._limits(sid)):
                self._restore_limits()
            return
        with self.enforcer_lock:
            if sid in self.acct.subscribers:
                self.rates.set_subscriber(sid, self.acct.subscribers[sid].addresses, *self._limits(sid))
            else:
                self.rates.remove_subscriber(sid)

    def calendar_now(self) -> int:
        """The clock of the billing calendar and the access hours: the system's,
        shifted by ``--clock-offset`` (drills and tests; packets keep the kernel's time)."""
        return time.time_ns() + int(self.opts.clock_offset * NS)

    def _spawn(self, name: str, target) -> None:
        """Run ``target`` in a thread of its own. Every thread is needed: one
        that dies (an exception, or returning while the gateway is not
        stopping) turns /healthz red at once and ends ``run()`` with exit
        code 1, so that systemd restarts the gateway and a monitor sees it,
        instead of a gateway that looks healthy and has stopped charging."""
        def guarded() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - whatever it was, the thread is gone
                why = f"{type(exc).__name__}: {exc}"
                log.critical("thread %s died: %s", name, why, exc_info=True)
            else:
                if self.stopping.is_set():
                    return
                why = "returned while the gateway was running"
                log.critical("thread %s %s", name, why)
            self.failed[name] = why
            self.fatal.set()

        t = threading.Thread(target=guarded, name=f"tollgate-{name}", daemon=True)
        t.start()
        self.threads.append(t)

    def _make_readers(self) -> None:
        from ext.nfqueue import QueueReader

        from .sources import source_class

        if not self.opts.inline:
            options = dict(self.opts.source_options)
            if self.opts.source == "netflow" and self.config.netflow_exporters and "exporters" not in options:
                options["exporters"] = ",".join(self.config.netflow_exporters)  # the command line wins
            try:
                self.readers.append(source_class(self.opts.source)(self.acct.engine, self.events.put, **options))
            except (ValueError, OSError) as exc:  # a bad option, a port taken, a group bound elsewhere (SourceError)
                raise ConfigError(f"--source {self.opts.source}", str(exc)) from None
            return
        for q in self.opts.queues:
            try:
                self.readers.append(QueueReader(q, self.acct.engine, batch_size=self.opts.batch_size,
                                                fail_open=self.opts.fail_open, on_events=self.events.put,
                                                linger_us=self.opts.linger_us))
            except SourceError as exc:
                # the kernel answers EPERM when another socket holds the queue (nfnetlink_queue.c, NFQNL_CFG_CMD_BIND)
                hint = " (is another tollgate, or another nfqueue program, reading it?)" \
                    if exc.errno in (errno.EBUSY, errno.EPERM) else ""
                raise ConfigError("--queues", f"{exc.strerror or exc}{hint}") from None

    def _start_readers(self) -> None:
        for reader in self.readers:
            self._spawn(f"queue{reader.queue_num}" if self.opts.inline else self.opts.source, reader.run)

    def stop(self) -> None:
        """Flush and stop; the kernel table and its blocks stay in place."""
        if self.stopping.is_set():
            return
        log.info("stopping: flushing counters, leaving blocks in place")
        self.stopping.set()
        for reader in self.readers:
            reader.stop()
        for t in self.threads:
            if t.name != "tollgate-http":
                t.join(timeout=5)
        self._drain_events()
        self._flush()
        for reader in self.readers:
            reader.close()
        self.ledger.close()

    def reload(self) -> None:
        """SIGHUP: a new config for zones, tariffs, slots and the allow-list."""
        try:
            cfg = load_config(self.opts.config_path)
        except TollgateError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        if len(cfg.zones) != len(self.config.zones) or len(cfg.schedule.slots) != len(self.config.schedule.slots):
            log.error("reload refused: the number of zones or time slots changed; restart to apply")
            return
        try:
            enforcer = self._enforcer(cfg)
            with self.enforcer_lock:
                enforcer.install()  # the new allow-list in the kernel; blocks and counters stay
                self.enforcer = enforcer
        except TollgateError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        with self.engine_lock:
            self.acct.load_tables(cfg)
            self.config = cfg
            now = time.time_ns()
            self.acct.ensure_timeline(now, since_ns=now)
        self._restore_limits()  # the tariffs' speeds and connection limits may have changed
        log.info("config reloaded from %s", self.opts.config_path)

    # ---- changes made by the admin API -----------------------------------------

    def refresh_subscriber(self, sid: int) -> None:
        """Ask for one subscriber in the engine and the kernel to be brought in
        line with the ledger (the API changed it): done by the flusher thread,
        which owns the ledger connection, within PAYMENT_POLL seconds."""
        self.refresh_requests.put(sid)

    def _refresh_subscriber(self, sid: int) -> None:
        """Added, deactivated, new addresses, tariff or terms: the engine, the
        kernel's sets and the speed/connection limits follow the ledger."""
        try:
            self._refresh_engine_and_sets(sid)
        finally:
            self._update_limits(sid)

    def _refresh_engine_and_sets(self, sid: int) -> None:
        """The live balance stays the engine's (the ledger's lags by a flush).

        Order matters for the kernel's counters, which must never count less
        than the engine rated (kernel minus mark is unrated traffic): a
        network is counted by the kernel before the engine rates it, and
        leaves the engine (with every batch it rated answered) before its
        counter is read and deleted. In between, its traffic is counted and
        not rated, and found as such by the next drift check."""
        row = self.ledger.get_subscriber(sid)
        active = row is not None and row.get("active", 1)
        info = self.acct.subscribers.get(sid)
        events = []
        with self.engine_lock:
            if info is None and not active:
                return
            if info is None:
                with self.enforcer_lock:
                    self.enforcer.add_subscriber_addresses(row["addresses"])
                events = self.acct.load_subscribers([{**row, "addresses": list(row["addresses"]),
                                                      "since": row["billing_since_ns"] or row["created_ns"]}])
                events += self.acct.open_billing(sid, self.calendar_now())[1]
                if events:
                    self.events.put([(ev, None) for ev in events])
                self.drift_ring = None
                log.info("subscriber %s added live", row["name"])
                return
            old = set(info.addresses)
            new = set(row["addresses"]) if active else set()
            gone, added = sorted(old - new), sorted(new - old)
            if not active:
                self.acct.close_billing(sid, self.calendar_now())
                self.orphan_rows += self.acct.engine.remove_subscriber(sid)
                del self.acct.subscribers[sid]
                self.drift_ring = None
            else:
                for net in gone:
                    self.acct.engine.remove_address(net)
            if gone:
                self._quiesce()  # every batch rated with those networks is answered: the kernel has counted it
                if self.opts.kernel_marked:
                    self._forget_counters(sid, gone)
                with self.enforcer_lock:
                    self.enforcer.unblock(gone)
                    self.enforcer.remove_subscriber_addresses(gone)
            if not active:
                log.info("subscriber %s deactivated live", info.name)
                return
            with self.enforcer_lock:
                self.enforcer.add_subscriber_addresses(added)
            for net in added:
                self.acct.engine.add_address(sid, net)
            if row["tariff"] not in self.acct.tariff_ids:
                raise TollgateError(f"subscriber {row['name']!r}: tariff {row['tariff']!r} is not in the config")
            if row["tariff"] != info.tariff:
                events = self.acct.change_billing(sid, row["tariff"], row["credit_limit"], self.calendar_now())[1]
            else:
                events = self.acct.update_terms(sid, row)
            info.addresses, info.tariff, info.name = tuple(sorted(new)), row["tariff"], row["name"]
            if self.acct.engine.subscriber(sid).blocked:
                with self.enforcer_lock:
                    self.enforcer.block(sorted(new))
        if events:
            self.events.put([(ev, None) for ev in events])

    def _quiesce(self) -> None:
        """Wait until no reader has a batch between rating and verdict (ext/nfqueue.pyx)."""
        for reader in self.readers:
            if hasattr(reader, "hold"):
                reader.hold()
                reader.release()

    def _apply_refresh_requests(self) -> None:
        while True:
            try:
                sid = self.refresh_requests.get_nowait()
            except queue.Empty:
                return
            try:
                self._refresh_subscriber(sid)
                self._sync_manual_blocks(sid)
            except TollgateError as exc:
                log.error("subscriber %s: the change cannot be applied: %s", sid, exc)

    def _apply_tariff_changes(self, now: int) -> None:
        """Tariff changes scheduled in the ledger that fell due: billing under
        the new tariff from the change's own time (the next period's start)."""
        for change in self.ledger.due_tariff_changes(now):
            sid = change["subscriber_id"]
            self.ledger.apply_tariff_change(change["id"], now)
            info = self.acct.subscribers.get(sid)
            if info is None or change["tariff"] not in self.acct.tariff_ids:
                continue
            with self.engine_lock:
                postings, events = self.acct.change_billing(sid, change["tariff"],
                                                            self.acct.engine.subscriber(sid).credit,
                                                            change["effective_ns"])
                info.tariff = change["tariff"]
            self._update_limits(sid)
            log.info("subscriber %s: tariff %s from %s as scheduled", info.name, change["tariff"],
                     time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(change["effective_ns"] // NS)))
            if events:
                self.events.put([(ev, None) for ev in events])

    def _apply_changes(self) -> None:
        """Subscribers, addresses, terms and manual blocks changed in the
        ledger by any process (CLI, API, an import), read from the ledger's
        change feed (migrations/0014_change_feed.sql): the work is in
        proportion to what changed, never a scan of every subscriber."""
        while True:
            last, changed = self.ledger.changes_since(self.last_change)
            if last == self.last_change:
                return
            self.last_change = last
            for sid, what in sorted(changed.items()):
                try:
                    if what & {"subscriber", "addresses"}:
                        self._refresh_subscriber(sid)
                    if "manual" in what:
                        self._sync_manual_blocks(sid)
                except TollgateError as exc:
                    log.error("subscriber %s changed in the ledger but cannot be applied: %s", sid, exc)

    def _sync_manual_blocks(self, sid: int) -> None:
        """Manual blocks are records in the ledger (``accounting.operations``:
        API, portal, CLI, from any process); the engine's ``BLOCK_MANUAL`` bit
        follows them, and the policy pusher the kernel's sets."""
        if sid not in self.acct.subscribers:
            return
        wanted = self.ledger.manual_block_of(sid)
        with self.engine_lock:
            has = bool(self.acct.engine.subscriber(sid).blocked & BLOCK_MANUAL)
            events = [] if wanted == has else \
                (self.acct.engine.block if wanted else self.acct.engine.unblock)(sid, BLOCK_MANUAL)
        if events:
            self.events.put([(ev, None) for ev in events])

    # ---- kernel state ------------------------------------------------------

    def _networks(self, sid: int) -> tuple:
        return self.acct.subscribers[sid].addresses

    def _all_networks(self) -> list[str]:
        return [n for sid in self.acct.subscribers for n in self._networks(sid)]

    def _blocked_networks(self) -> list[str]:
        return [n for sid in self.acct.subscribers if self.acct.engine.subscriber(sid).blocked
                for n in self._networks(sid)]

    def _policy_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                first = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            self._push(self._take_events(first))

    def _take_events(self, first: list) -> list:
        """Everything queued now: one kernel update for a burst of events."""
        batch = list(first)
        while True:
            try:
                batch += self.events.get_nowait()
            except queue.Empty:
                return batch

    def _drain_events(self) -> None:
        try:
            first = self.events.get_nowait()
        except queue.Empty:
            return
        self._push(self._take_events(first))

    def _push(self, events: list) -> None:
        """One batched kernel update for ``(Event, packet ts)`` pairs."""
        block, unblock = [], []
        for ev, _ts in events:
            if ev.kind == EV_BLOCK:
                block += self._networks(ev.subscriber)
            elif ev.kind == EV_UNBLOCK and not self.acct.engine.subscriber(ev.subscriber).blocked:
                unblock += self._networks(ev.subscriber)
        started = time.perf_counter()
        with self.enforcer_lock:
            if block:
                self.enforcer.block(block)
            if unblock:
                self.enforcer.unblock(unblock)
        done = time.time_ns()
        if block or unblock:
            self.m_nft_latency.observe(time.perf_counter() - started)
        self._record_events(events, done)
        if block:
            self._reset_connections(block)

    def _reset_connections(self, networks) -> None:
        """A download in flight would hang until the client gives up: end the
        blocked networks' TCP connections at once (policy/resets.py)."""
        try:
            if self.resetter is None:
                from policy.resets import Resetter

                self.resetter = Resetter()
            self.m_resets.inc(self.resetter.reset(networks))
        except OSError as exc:  # no conntrack in this namespace, no raw sockets: the block holds all the same
            log.warning("could not reset the connections of %d blocked networks: %s", len(networks), exc)

    def _record_events(self, events: list, done_ns: int) -> None:
        """Metrics, logs, notifications and the ledger's block records for
        ``(Event, packet ts)`` pairs whose kernel update is done; the block
        state is written at once (not with the next flush), so that a crash
        right after a block cannot make the next start forget it."""
        records = []
        for ev, ts in events:
            record = self._record_event(ev, ts, done_ns)
            if record is not None:
                records.append(record)
        self._save_block_state({ev.subscriber for ev, _ts in events if ev.kind in (EV_BLOCK, EV_UNBLOCK)},
                               records, done_ns)

    def _save_block_state(self, sids, records=(), ts: int | None = None) -> None:
        """The engine's block bits of ``sids`` (where they differ from what
        the ledger holds), with the payment and adjustment ids applied so far,
        read in one step under the engine lock; a failed write is retried by
        the flusher (an empty call)."""
        self.unsaved_records += list(records)
        with self.engine_lock:
            self.unsaved_blocks |= {sid for sid in sids if sid in self.acct.subscribers}
            states = [(sid, self.acct.engine.subscriber(sid).blocked, self.last_payment, self.last_adjustment)
                      for sid in sorted(self.unsaved_blocks)]
        states = [st for st in states if self.saved_blocks.get(st[0], 0) != st[1]]
        if not states and not self.unsaved_records:
            self.unsaved_blocks.clear()
            return
        records = self.unsaved_records
        try:
            self.thread_ledger().save_block_state(states, ts, records)
        except TollgateError:
            log.exception("block state not written; retrying with the next flush")
            return
        self.unsaved_records = self.unsaved_records[len(records):]
        self.unsaved_blocks.clear()
        self.saved_blocks.update({sid: bits for sid, bits, _p, _a in states})

    def _record_event(self, ev, packet_ts: int | None, done_ns: int) -> tuple | None:
        """Metrics, log and notification of one event; returns its block record, if it has one."""
        reason = BLOCK_REASONS.get(ev.reason, str(ev.reason))
        if ev.kind == EV_BLOCK:
            self.m_blocks.labels(reason).inc()
            if packet_ts:  # from the breaching packet to the set holding the subscriber
                latency = (done_ns - packet_ts) / NS
                self.m_block_latency.observe(latency)
                self.block_latencies.append(latency)
            log.info("blocked subscriber %s (%s), balance %s", ev.subscriber, reason, ev.balance)
        elif ev.kind == EV_UNBLOCK:
            self.m_unblocks.labels(reason).inc()
            log.info("unblocked subscriber %s (%s)", ev.subscriber, reason)
        elif ev.kind == EV_WARN:
            log.info("subscriber %s: balance %s fell below warning level %d", ev.subscriber, ev.balance, ev.reason + 1)
        else:
            return None
        event = {EV_BLOCK: "block", EV_UNBLOCK: "unblock", EV_WARN: "warn"}[ev.kind]
        detail = {"level": ev.reason + 1} if ev.kind == EV_WARN else {"reason": reason}
        self.ledger_jobs.put(("notify", f"{event}:{ev.subscriber}:{done_ns}", event, ev.subscriber,
                              self._payload(ev.subscriber, done_ns, balance=ev.balance, **detail)))
        if ev.kind == EV_WARN or ev.reason == BLOCK_MANUAL:  # manual ones are recorded when asked for
            return None
        return (ev.subscriber, event, reason, packet_ts or None, ev.balance if ev.kind == EV_BLOCK else None)

    def _payload(self, sid: int, ts: int, balance: int | None = None, **detail) -> dict:
        info = self.acct.subscribers.get(sid)
        out = {"subscriber": info.name if info else str(sid), "subscriber_id": sid,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts // NS)), **detail}
        if balance is not None:
            out["balance"] = format_amount(balance, self.config.currency)
        return out

    def _check_quotas(self) -> None:
        """A notification when a period's free volume ("quota") or volume limit
        ("volume") is used to each of the configured levels, once a period."""
        levels = self.config.notify.quota_levels
        active, self.active = self.active, set()  # only traffic moves how much of a volume is used
        for sid in sorted(active):
            acct = self.acct.biller.accounts.get(sid)
            if acct is None or sid not in self.acct.subscribers:
                continue
            used = {}  # event -> percent used this period
            total = sum(self.config.tariffs[acct.terms.tariff].allowance())
            if total:
                used["quota"] = 100 * (total - sum(self.acct.engine.subscriber(sid).allowance)) // total
            if acct.terms.volume_limit:
                volume = sum(v for (zone, _d), v in acct.volumes.items() if zone != 0)
                used["volume"] = 100 * volume // acct.terms.volume_limit
            for event, percent in used.items():
                for level in (lvl for lvl in levels if percent >= lvl):
                    key = f"{event}:{sid}:{acct.start}:{level}"
                    if key not in self.quota_noted:
                        self.quota_noted.add(key)
                        enqueue(self.ledger, key, event, sid, self._payload(sid, time.time_ns(), percent=level))

    def _rollup_loop(self) -> None:
        """Every ROLLUP_INTERVAL: the ledger's old minute rows into hours, old
        hours into days, old flushes pruned (accounting/rollup.py), on a
        connection of its own in short transactions (a flush waits a few ms at
        most): the ledger grows with active subscriber-days, not seconds."""
        from accounting.rollup import roll_up

        wait = ROLLUP_FIRST
        while not self.stopping.wait(wait):
            wait = ROLLUP_INTERVAL
            try:
                summary = roll_up(self.thread_ledger(), time.time_ns(), self.config.timezone)
                log.info("rollup: %s", summary.text())
            except TollgateError as exc:  # e.g. a ledger rolled up under another time zone: said, not fatal
                log.error("rollup refused: %s", exc)
            except Exception:
                log.exception("rollup round failed; retrying in %d s", ROLLUP_INTERVAL)

    def _notify_loop(self) -> None:
        notifier = Notifier(Ledger.open(self.opts.db_path), self.config.notify)
        while not self.stopping.wait(1.0):
            try:
                notifier.deliver_due()
            except Exception:
                log.exception("notification round failed; retrying")

    # ---- ledger -------------------------------------------------------------

    def _flush_loop(self) -> None:
        """Every PAYMENT_POLL seconds: payments from the ledger reach the live
        balances (a top-up unblocks well within a second); every
        ``flush_interval``: counters to the ledger, drift check, timeline."""
        next_flush = time.monotonic() + self.opts.flush_interval
        while not self.stopping.wait(PAYMENT_POLL):
            try:
                self._apply_payments()
                self._apply_refresh_requests()
                self._apply_changes()
                if time.monotonic() < next_flush:
                    continue
                next_flush = time.monotonic() + self.opts.flush_interval
                self._apply_tariff_changes(self.calendar_now())
                # the kernel counts a packet just after the engine rates it: list the kernel first, drain
                # second, and compare with the marks from before and after the drain (see _check_drift)
                kernel = settled = None
                if time.monotonic() >= self.next_drift_check:
                    if self.opts.inline:
                        kernel = self._kernel_counts(self._drift_sample())
                        settled = self._settled_marks(kernel)
                    else:
                        kernel = self._kernel_bytes()
                self._flush()
                if kernel is not None:
                    self._check_drift(kernel, settled)
                now = time.time_ns()
                with self.engine_lock:
                    self.acct.ensure_timeline(now, since_ns=now)
                    postings, events = self.acct.bill(self.calendar_now())
                for p in postings:
                    log.info("billing: subscriber %s %s %s (%s)", p.subscriber, p.kind,
                             format_amount(p.amount, self.config.currency), p.detail)
                if events:
                    self.events.put([(ev, None) for ev in events])
                self._check_quotas()
            except Exception:  # the ledger may be busy or full: drained rows wait in self.pending
                log.exception("flush round failed; retrying next round")

    def _flush(self) -> None:
        """Write block records and the engine's counters to the ledger.

        Drained rows get their flush id before the write; if the write fails
        they stay pending and the same id is retried, so they are neither
        lost nor charged twice. A pending flush is written first and then a
        fresh drain, so that when this returns everything the engine had
        rated before it was called is in the ledger (the drift check counts
        on it: kernel minus marks is then unrated traffic only)."""
        if self.unsaved_blocks or self.unsaved_records:
            self._save_block_state(())
        while True:
            try:
                _kind, key, event, sid, payload = self.ledger_jobs.get_nowait()
            except queue.Empty:
                break
            enqueue(self.ledger, key, event, sid, payload)
        if self.pending is not None:
            self._write_pending()
        self._drain()
        if self.pending is not None:
            self._write_pending()
        self.last_flush = time.time()

    def _drain(self) -> None:
        """The engine's counters (and the spool files they hold) into ``self.pending``."""
        spools = [r for r in self.readers if hasattr(r, "take_files")]  # see gateway/sources/spool.py
        with self.engine_lock, contextlib.ExitStack() as held:
            for spool in spools:  # the files taken are exactly those whose traffic is drained
                held.enter_context(spool.lock)
            for reader in self.readers:  # no batch between rating and verdict (see ext/nfqueue.pyx)
                if hasattr(reader, "hold"):
                    reader.hold()
                    held.callback(reader.release)
            rows = self.acct.engine.drain() + self.orphan_rows
            self.active |= {r.subscriber for r in rows}
            self.drift_active |= {r.subscriber for r in rows}
            files = [f for spool in spools for f in spool.take_files()]
            self.orphan_rows = []
            self.acct.biller.observe(rows)
        for r in rows:
            self.engine_bytes[r.subscriber] = self.engine_bytes.get(r.subscriber, 0) + r.bytes
        if not rows and not files:
            return
        self.flush_seq += 1
        now = time.time_ns()
        minute = (now - now % MINUTE_NS) // NS
        self.pending = (f"{self.boot}:{self.flush_seq}", now,
                        [(r.subscriber, r.zone, r.direction, minute, r.bytes, r.packets, r.charged) for r in rows],
                        files)

    def _write_pending(self) -> None:
        flush_id, now, rows, files = self.pending
        self.ledger.apply_flush(flush_id, rows, now, source=self.opts.source, files=files,
                                kernel_marks=self.opts.kernel_marked)
        self.pending = None
        if self.opts.kernel_marked:  # the ledger's marks moved in the same transaction: follow them
            self.last_flushed = {}
            for sid, _zone, direction, _minute, nbytes, packets, _charged in rows:
                self.last_flushed[(sid, direction)] = self.last_flushed.get((sid, direction), 0) + nbytes
                mark = self.marks.setdefault((sid, direction), [0, 0])
                mark[0] += nbytes
                mark[1] += packets
        for spool in (r for r in self.readers if hasattr(r, "take_files")):
            spool.committed(files)

    def _kernel_bytes(self) -> dict[int, int]:
        with self.enforcer_lock:
            counters = self.enforcer.counters()
        out = {}
        for sid, info in self.acct.subscribers.items():
            rows = [counters[n] for n in info.addresses if n in counters]
            out[sid] = sum(r["up_bytes"] + r["down_bytes"] for r in rows)
        return out

    def _settled_marks(self, sids) -> dict[int, int]:
        """Bytes in the marks of ``sids`` as of the flush before the latest:
        drained a whole flush interval ago or more, so long past the kernel."""
        return {sid: sum(self.marks.get((sid, d), (0, 0))[0] - self.last_flushed.get((sid, d), 0) for d in (0, 1))
                for sid in sids}

    def _check_drift(self, kernel: dict, settled: dict | None) -> None:
        """Compare the kernel's per-subscriber counters with what the engine
        rated, at a consistent point.

        Inline, ``kernel`` was listed between two flushes: every byte it
        counted through the engine is in the marks after the second one
        (``self.marks``), and every byte in the marks one flush earlier
        (``settled``, of the same subscribers) had long passed the kernel. So kernel > marks
        after is traffic that certainly bypassed the engine (fail-open at a
        full queue, a rule the operator added before ours): charged by
        :meth:`_charge_unrated`; kernel < marks before, beyond noise, is the
        engine certainly ahead of the kernel (counters reset, packets dropped
        after the queue): an alarm. A passive source reports traffic a while
        after the kernel counted it: the kernel's count of the previous check
        must have reached the engine by now; only a shortfall is an alarm."""
        self.next_drift_check = time.monotonic() + self.opts.drift_interval
        drift = {}  # name -> kernel minus engine bytes, beyond noise
        if self.opts.inline:
            self._charge_unrated(kernel, "drift check", reset_behind=False)
            for sid, ways in kernel.items():
                if sid not in self.acct.subscribers:
                    continue
                counted = sum(b for b, _p in ways)
                rated = settled.get(sid, 0)
                if rated - counted > max(self.opts.drift_min_bytes, counted // 200):
                    drift[self.acct.subscribers[sid].name] = counted - rated
        else:
            kernel, self.kernel_before = self.kernel_before, kernel
            if kernel is None:
                return
            for sid, counted in kernel.items():
                if sid not in self.acct.subscribers:
                    continue
                gap = counted - self.engine_bytes.get(sid, 0)
                if gap > max(self.opts.drift_min_bytes, counted // 200):
                    drift[self.acct.subscribers[sid].name] = gap
        for name in set(self.drift) - set(drift):
            self.m_drift.remove(name)
        for name, gap in drift.items():
            self.m_drift.labels(name).set(gap)
            if self.drift.get(name) != gap:
                if gap < 0:
                    log.warning("drift: the engine rated %d bytes of subscriber %s more than the kernel counted "
                                "(the kernel is behind: its counters were reset, or packets were dropped after "
                                "the queue)", -gap, name)
                else:
                    log.warning("drift: the kernel counted %d bytes of subscriber %s more than the source reported "
                                "(the kernel is ahead: the source lost records, or traffic bypassed it)", gap, name)
        if drift:
            self.m_drift_alarms.inc()
        self.drift = drift

    def _apply_payments(self) -> None:
        """Payments and adjustments written to the ledger by others (CLI, API)
        reach the live balance."""
        changes = self.ledger.balance_changes_since(self.last_payment, self.last_adjustment)
        for change in changes:
            events = []
            with self.engine_lock:  # the ids move with the balance: a block state never pairs one without the other
                if change["subscriber_id"] in self.acct.subscribers:
                    events = self.acct.engine.adjust_balance(change["subscriber_id"], change["amount"])
                if change["kind"] == "payment":
                    self.last_payment = max(self.last_payment, change["id"])
                else:
                    self.last_adjustment = max(self.last_adjustment, change["id"])
            if events:
                self.events.put([(ev, None) for ev in events])

    # ---- HTTP ----------------------------------------------------------------

    def health(self) -> dict:
        lat = sorted(self.block_latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3)) if lat else (lambda q: None)
        status = "failed" if self.failed else "stopping" if self.stopping.is_set() else "ok"
        return {"status": status, "boot": self.boot,
                "engine": self.acct.engine.implementation, "subscribers": len(self.acct.subscribers),
                "queues": list(self.opts.queues), "flush_lag_seconds": round(time.time() - self.last_flush, 3),
                "block_latency_ms": {"n": len(lat), "p50": pct(0.5), "p99": pct(0.99)},
                "drift_bytes": self.drift,
                "source": self.opts.source,
                "kernel_quotas": self.kernel_quotas.counts if self.kernel_quotas is not None else None,
                "failed_threads": self.failed,
                "queue": {self.reader_label(r): r.stats() for r in self.readers}}

    def reader_label(self, reader) -> str:
        """A reader's name in /healthz and /metrics: its queue number (``nflog<group>`` for NFLOG),
        or the passive source's name."""
        return str(getattr(reader, "queue_num", self.opts.source))

    def subscriber_page(self, address: str) -> dict | None:
        try:
            sid = self.acct.engine.lookup_subscriber(address)
        except ValueError:
            return None
        if not sid or sid not in self.acct.subscribers:
            return None
        from api.app import subscriber_summary

        state = self.acct.engine.subscriber(sid)  # the live balance: the ledger's lags by a flush
        row = self.thread_ledger().get_subscriber(sid)
        if row is None:
            return None
        reasons = [name for bit, name in BLOCK_REASONS.items() if state.blocked & bit]
        return subscriber_summary(self.thread_ledger(), self.config, row, reasons, balance=state.balance)

    def live_balance(self, sid: int) -> int | None:
        """The engine's balance (the ledger's lags by up to a flush); None if not loaded."""
        return self.acct.engine.subscriber(sid).balance if sid in self.acct.subscribers else None

    def thread_ledger(self) -> Ledger:
        """This HTTP thread's own connection to the ledger (the flusher owns its own)."""
        ledger = getattr(self.http_local, "ledger", None)
        if ledger is None:
            ledger = self.http_local.ledger = Ledger.open(self.opts.db_path)
        return ledger

    def _listen_socket(self) -> socket.socket:
        """The HTTP service's socket, bound in the main thread at start (a
        port in use is a clear error, not a dead thread). ``::`` (the
        default) is one socket for both families: the kernel redirects a
        blocked subscriber's port 80 to us over IPv4 and IPv6 alike, and
        asyncio would make an IPv6 socket IPv6-only."""
        host = self.opts.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
            sock.bind((host, self.opts.port))
            sock.listen(512)
        except OSError as exc:
            sock.close()
            raise ConfigError("--listen/--port", f"cannot listen on [{host}]:{self.opts.port}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock

    def _serve_http(self) -> None:
        import uvicorn

        from api.app import create_app

        app = create_app(self)

        async def unmapped(scope, receive, send):
            # an IPv4 client of the dual-stack socket shows as ::ffff:a.b.c.d; the block page, the admin
            # networks and the rate limits know it by its IPv4 address
            client = scope.get("client")
            if client and client[0].startswith("::ffff:") and "." in client[0]:
                scope = {**scope, "client": (client[0][7:], client[1])}
            return await app(scope, receive, send)

        server = uvicorn.Server(uvicorn.Config(unmapped, log_level="warning", access_log=False, lifespan="off"))
        server.install_signal_handlers = lambda: None  # signals belong to the main thread's handler
        self.http_server = server
        server.run(sockets=[self.http_socket])


def run(opts: RunOptions) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    gw = Gateway(opts)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: gw.reload())
    gw.start()
    log.info("tollgate running: queues %s, %s, portal and metrics on %s:%d", list(opts.queues),
             "fail-open" if opts.fail_open else "fail-closed", opts.listen, opts.port)
    while not stop.wait(0.5):
        if gw.fatal.is_set():
            log.critical("stopping: a thread of the gateway died (%s); exit code 1 for the supervisor to restart it",
                         ", ".join(f"{n}: {why}" for n, why in gw.failed.items()))
            time.sleep(FAILED_GRACE)  # a monitor polling /healthz sees it red before the port closes
            break
    gw.stop()
    return 1 if gw.failed else 0
