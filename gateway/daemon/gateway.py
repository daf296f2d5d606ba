"""The running gateway: what its parts share, the order of start and stop,
reload, and the threads.

Shared here, and only here: the config, the flusher's ledger connection
(``ledger``; other threads use ``thread_ledger()``), the accountant and its
engine, the kernel enforcer, the readers, the event queue the policy pusher
takes from (``post``), and the two locks:

* ``engine_lock``: control operations on the engine and the daemon's maps of
  subscribers (the C engine also locks inside, so packets keep flowing);
* ``enforcer_lock``: the one libnftables context, used by several threads.

Lock order: ``engine_lock``, then a reader's hold or a spool's lock, then
``enforcer_lock``; never the other way round.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
import uuid

from accounting.ledger import Ledger
from accounting.money import format_amount
from accounting.thread_ledgers import ThreadLedgers
from ext.errors import ConfigError, SourceError, TollgateError

from ..config import Config, load_config
from ..runtime import NS, Accountant, iter_ledger_chunks, kept_for_life
from .changes import ChangeFollower
from .credit import GrantKeeper
from .flusher import Flusher
from .http import LiveView, listen_socket, serve
from .kernel import KernelTruth
from .limits import SpeedLimits
from .metrics import Metrics
from .options import RunOptions
from .pusher import PolicyPusher
from .sessions import SessionHost

log = logging.getLogger("tollgate.daemon")
FAILED_GRACE = 2.0  # seconds /healthz answers "failed" before a gateway with a dead thread exits


class Gateway:
    """The running daemon; see the package docstring (gateway/daemon/__init__.py)."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.config: Config = load_config(opts.config_path)
        if self.config.cluster.grants and opts.bpf_marked:
            raise ConfigError("cluster.gateway", "credit grants run on the nfqueue, NFLOG, conntrack and flow "
                                                 "sources; the eBPF source does not take them yet")
        self.ledger = self.open_ledger()
        self.acct = Accountant(self.config, self.ledger, opts.engine)
        self.boot = uuid.uuid4().hex[:12]
        self.events: queue.Queue = queue.Queue()  # lists of (Event, packet ts) for the policy pusher
        self.stopping = threading.Event()
        self.ledger_moved = threading.Event()  # set by the ledger-listen thread, and at stop (wait_for_ledger)
        self.readers: list = []
        self.threads: list[threading.Thread] = []
        self.engine_lock = threading.Lock()
        self.enforcer_lock = threading.Lock()
        self.enforcer = None  # policy.nft.Enforcer, made at start
        self.source_preload = None  # the source's kernel work begun before the ledger is read (_preload_source)
        self.http_local = threading.local()  # the daemon's helper threads' own connections (thread_ledger)
        # the HTTP request threads' ledger: on PostgreSQL one pool for all of them, so that a busy API holds
        # a few of the server's connections (a pool that waits, unlike the helper threads' own connections:
        # the pusher must not wait for a pool while the ledger is away)
        self.request_ledgers = ThreadLedgers(opts.db_path, prepare=self._name_gateway)
        self.failed: dict[str, str] = {}  # thread name -> why it died: /healthz goes red, run() ends
        self.fatal = threading.Event()
        self.metrics = Metrics(self)
        self.kernel = KernelTruth(self)
        self.pusher = PolicyPusher(self)
        self.changes = ChangeFollower(self)
        self.flusher = Flusher(self)
        self.limits = SpeedLimits(self)
        self.quotas = None  # .quotas.QuotaKeeper, under a passive source with kernel quotas
        self.view = LiveView(self)
        self.sessions = SessionHost(self)  # expiry, the hosted RADIUS server, address binding (.sessions)
        self.credit = GrantKeeper(self) if self.config.cluster.grants else None  # a shared ledger (.credit)

    # ---- start and stop --------------------------------------------------

    def start(self) -> None:
        self.http_socket = listen_socket(self.opts.listen, self.opts.port)  # a port in use stops us first
        self.sessions.open()  # the RADIUS sockets too
        self.source_preload = self._preload_source()
        try:
            self._start()
        except BaseException:
            if self.source_preload is not None:  # not taken by the source's begin: joined, what it loaded unpinned
                self.source_preload.discard()
            raise

    def _preload_source(self):
        """What the source does in the kernel before it needs a subscriber, begun in a thread of its own
        before the ledger is read: the eBPF source's maps, opened or loaded (the verifier on the other core
        while this thread reads the subscribers: ``EbpfSource.preload``, gateway/sources/ebpf.py); the
        reader made later takes it over. None: nothing to begin."""
        if self.opts.inline:
            return None
        from ..sources import source_class

        preload = getattr(source_class(self.opts.source), "preload", None)
        if preload is None:
            return None
        return preload(self.acct.engine, self.config, **self.opts.source_options)

    def _start(self) -> None:
        self.acct.seed_ledger()
        with kept_for_life():  # (a million subscribers, their terms, their accounts)
            events = self.load_from_ledger()
            now = time.time_ns()
            self.acct.ensure_timeline(now, since_ns=now)
            events += self.acct.start_billing(self.calendar_now())[1]
            events += self.acct.bill(self.calendar_now())[1]  # fees and period ends that fell due while stopped
            events += self.acct.resume_from_ledger(self.calendar_now())  # a volume limit used up before the restart
        self.pusher.restore()
        self._make_readers()
        for reader in self.readers:
            if hasattr(reader, "recover"):  # a spool: what a crash left half-way, against the ledger
                reader.recover(lambda digest: self.thread_ledger().ingested_file(digest))
        self.enforcer = self._enforcer(self.config)
        self.enforcer.install()  # keeps the elements of our sets, so the blocks that held still hold
        self.limits.restore()
        # the counted sets' networks only where the table counts (nfqueue, NFLOG): on the eBPF source the maps
        # count, and a million subscribers' networks listed for nothing were 1.4 s of its start
        listing = self.enforcer.restore(blocked=self.blocked_networks(),
                                        subscribers=self.all_networks() if self.enforcer.count else ())
        if self.opts.kernel_marked:
            self._recover_from_kernel(listing)
        for reader in self.readers:  # the eBPF source: its maps, marks, grants, attach (gateway/sources/ebpf.py)
            if hasattr(reader, "begin"):
                reader.begin(self)
        if self.opts.quotas:
            from .quotas import QuotaKeeper

            self.quotas = QuotaKeeper(self)
            self.quotas.restore()
        log.info("restored kernel state: %d subscribers, %d blocked", len(self.acct.subscribers),
                 len(self.blocked_networks()))
        self.pusher.record([(ev, None) for ev in events], time.time_ns())
        self._start_readers()
        self._spawn("policy", self.pusher.loop)
        if self.quotas is not None:
            self._spawn("quotas", self.quotas.loop)
        self._spawn("flusher", self.flusher.loop)
        listener = self.ledger.db.listener()
        if listener is not None:
            self._spawn("ledger-listen", lambda: self._listen(listener))
        if not self.opts.bpf_marked:  # the eBPF source has its own heartbeat instead (gateway/sources/ebpf.py)
            self._spawn("drift", self.kernel.loop)
        self._spawn("rollup", self.flusher.rollup_loop)
        self._spawn("http", lambda: serve(self.view, self.http_socket))
        if self.config.notify.webhook or self.config.notify.command:
            self._spawn("notify", self.flusher.notify_loop)
        self.sessions.start()

    def load_from_ledger(self) -> list:
        """The ledger's subscribers into the engine (the start), streamed: a chunk of rows at a time (a
        million: 600 MB of rows otherwise). Returns the engine's events.

        Nothing committed while it loads (seconds at a million) is lost: the change feed's id is read
        before the load, so whatever changed during it is replayed by the first poll (a replayed change of
        a subscriber loaded as it is now changes nothing: ``ChangeFollower.refresh`` brings the engine in
        line with the ledger's row). Payments and adjustments are not replayable that way (each adds to
        the balance): without grants the balances and their ids are read in one snapshot of the ledger,
        so those the balances include are exactly those up to the ids. With grants (which write while
        loading, so no read snapshot) a payment only frees credit to ask for again: replaying it is harmless."""
        self.changes.start_from_ledger()
        chunks = iter_ledger_chunks(self.ledger, cluster=self.config.cluster)
        if self.credit is not None:  # (rows: each balance becomes the gateway's grant)
            return self.acct.load_subscribers(self.credit.load(r for chunk in chunks for r in chunk.rows()))
        with self.ledger.db.snapshot():
            self.changes.balances_read()
            return self.acct.load_chunks(chunks)

    def _recover_from_kernel(self, listing: dict) -> None:
        """What the kernel forwarded while we were down (see .kernel), from
        the counters read by the restore of our sets (a second listing of
        the table would cost as much again: seconds at 100k subscribers).
        What passes fail-open from that listing until the readers are bound
        again below is counted and not rated, and found by the drift checks."""
        self.kernel.load_marks()
        kernel = self.kernel.counts(listing=listing)
        if self.opts.inline:
            self.kernel.charge_unrated(kernel, "start")
            # the queues were bound above only to fail before the kernel was touched; bound again now that
            # its state is final, so that no packet waits in a queue across the table's renewal (one that
            # did could be answered past our counters: rated, never counted); what passes fail-open in
            # between is counted, not rated, and charged by the next drift check
            for reader in self.readers:
                reader.close()
            self.readers = []
            self._make_readers()
        else:  # conntrack: what passed while we were down is in the connections' counters; bound them
            self.kernel.charge_unrated(kernel, "start", charge=False)
            base = {key: mark[0] for key, mark in self.kernel.marks.items()}
            self.readers[0].bound_by(lambda sids: {
                sid: tuple(ways[d][0] - base.get((sid, d), 0) for d in (0, 1))
                for sid, ways in self.kernel.counts(sids).items()})

    def stop(self) -> None:
        """Flush and stop; the kernel table and its blocks stay in place."""
        if self.stopping.is_set():
            return
        log.info("stopping: flushing counters, leaving blocks in place")
        self.stopping.set()
        self.ledger_moved.set()
        self.sessions.stop()  # the hosted RADIUS server, before the ledger closes
        for reader in self.readers:
            reader.stop()
        for t in self.threads:
            if t.name != "tollgate-http":
                t.join(timeout=5)
        self.pusher.drain()
        self.flusher.flush()
        if self.credit is not None:
            self.credit.release()
        for reader in self.readers:
            reader.close()
        self.ledger.close()
        self.request_ledgers.close()

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
        self.limits.restore()  # the tariffs' speeds and connection limits may have changed
        log.info("config reloaded from %s", self.opts.config_path)

    def _enforcer(self, cfg: Config):
        from policy.nft import Enforcer

        if self.opts.inline:
            kw = {"queues": self.opts.queues}
        else:  # the source says what it needs (NFLOG: the log rule)
            kw = {"queues": (), **getattr(self.readers[0], "enforcer_options", dict)(), "quotas": self.opts.quotas}
        return Enforcer.from_config(cfg, fail_open=self.opts.fail_open, portal_port=self.opts.port, **kw)

    # ---- threads and readers -----------------------------------------------

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

        from ..sources import source_class

        if not self.opts.inline:
            options = dict(self.opts.source_options)
            if self.source_preload is not None:
                options["preload"] = self.source_preload  # (not an option anyone can give: not in OPTIONS)
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

    def quiesce(self) -> None:
        """Wait until no reader has a batch between rating and verdict (ext/nfqueue.pyx)."""
        for reader in self.readers:
            if hasattr(reader, "hold"):
                reader.hold()
                reader.release()

    def reader_label(self, reader) -> str:
        """A reader's name in /healthz and /metrics: its queue number (``nflog<group>`` for NFLOG),
        or the passive source's name."""
        return str(getattr(reader, "queue_num", self.opts.source))

    # ---- shared helpers ---------------------------------------------------------

    def touch(self, sids) -> None:
        """These subscribers' balance, traffic, terms or networks moved (for the kernel quotas, if any, and a
        reader that keeps kernel state per subscriber: the eBPF source's grants and maps)."""
        if self.quotas is not None:
            self.quotas.touch(sids)
        for reader in self.readers:
            if hasattr(reader, "touch"):
                reader.touch(sids)

    def post(self, events) -> None:
        """Engine events with no packet behind them, for the policy pusher."""
        if events:
            self.events.put([(ev, None) for ev in events])

    def calendar_now(self) -> int:
        """The clock of the billing calendar and the access hours: the system's,
        shifted by ``--clock-offset`` (drills and tests; packets keep the kernel's time)."""
        return time.time_ns() + int(self.opts.clock_offset * NS)

    def wait_for_ledger(self, timeout: float) -> bool:
        """The flusher's pause between looks at the ledger: ``timeout``, or less when the ledger says its
        feed moved (PostgreSQL's NOTIFY, the ``ledger-listen`` thread); True when stopping."""
        self.ledger_moved.wait(timeout)
        self.ledger_moved.clear()
        return self.stopping.is_set()

    def _listen(self, listener) -> None:
        """The ``ledger-listen`` thread: a payment or change committed by anyone wakes the flusher at once."""
        try:
            while not self.stopping.is_set():
                if listener.wait(1.0):
                    self.ledger_moved.set()
        finally:
            listener.close()

    def open_ledger(self) -> Ledger:
        """A new connection to the ledger, writing kernel state and grants as this gateway ([cluster] gateway)."""
        return self._name_gateway(Ledger.open(self.opts.db_path))

    def _name_gateway(self, ledger: Ledger) -> Ledger:
        ledger.gateway = self.config.cluster.gateway or ""
        return ledger

    def thread_ledger(self) -> Ledger:
        """This thread's own connection to the ledger (the flusher owns ``self.ledger``)."""
        ledger = getattr(self.http_local, "ledger", None)
        if ledger is None:
            ledger = self.http_local.ledger = self.open_ledger()
        ledger.reconnect_if_lost()  # PostgreSQL restarted: a new connection, not a dead one for good
        return ledger

    def serves(self, row: dict | None) -> bool:
        """A ledger row this gateway holds: active, and (``[cluster] networks``) with an address it sees."""
        return row is not None and bool(row.get("active", 1)) and self.config.cluster.serves(row["addresses"])

    def networks(self, sid: int) -> tuple:
        return self.acct.subscribers[sid].addresses

    def all_networks(self) -> list[str]:
        # read from the table's column at once (a view each was 1.8 s of a start at a million subscribers)
        return self.acct.subscribers.all_networks()

    def blocked_networks(self) -> list[str]:
        # the engine's blocked ones, in the subscribers' order (a SubscriberState made for each of a million
        # subscribers, twice a start, was 1.7 s of it)
        blocked = set(self.acct.engine.blocked_subscribers())
        return [n for sid in self.acct.subscribers if sid in blocked for n in self.networks(sid)]

    def payload(self, sid: int, ts: int, balance: int | None = None, **detail) -> dict:
        """A notification's body."""
        info = self.acct.subscribers.get(sid)
        out = {"subscriber": info.name if info else str(sid), "subscriber_id": sid,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts // NS)), **detail}
        if balance is not None:
            out["balance"] = format_amount(balance, self.config.currency)
        return out

    def health(self) -> dict:
        return self.view.health()


def run(opts: RunOptions) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    import signal

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
