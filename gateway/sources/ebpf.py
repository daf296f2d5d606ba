"""The eBPF source: packets metered and refused in the kernel by the tc
program (ext/bpf/tollgate.bpf.c), charged from its monotonic counters.

Money stays in the control plane and bytes in the kernel: the engine rates
what the kernel counted (``rate_volume``, remainder carried as for any
aggregate), the grant keeper (gateway/daemon/grants.py) turns balances into
per-(subscriber, zone, direction) byte grants, and the program passes a
packet only while it fits its grant. No packet waits for this process: when
it is down (a restart, a SIGKILL) the program stays attached and pinned and
the grants keep holding, at the byte. ``tollgate policy remove`` detaches
and unpins.

Start (``begin``, called by the daemon once the engine has its subscribers
and the nft table its blocks): open the maps pinned under ``pin_dir`` (or
load them: ``max_slots`` slots, the config's zones), put every subscriber's
prefixes (slot = subscriber id), the zones and the allow-list in, in bulk,
take the ledger's marks (migrations/0019_bpf_marks.sql) as the counters'
last charged values so that the start charges exactly kernel - refunds -
mark (what was forwarded and never flushed: rated but lost in a crash, or
passed while the daemon was down; read twice, ``interval`` apart, as every
poll's reads are charged at the next), grant, and attach to ``interfaces``
(default: ``gateway.lan_interfaces``). The per-subscriber work is bulk:
the networks bound from the Accountant's texts, the refusal snapshot and
the blocked flags in C, the redirected flags from nft's blocked set, the
idle subscribers' grants in C (``GrantKeeper.refresh_many``). Everyone is
granted before the attach (a fraction of a second at a million: a start
knows no rates, so everyone is idle). With the ``start_grants`` option N
only the first N are, and the rest from the loop (``start_grants_left`` in
/healthz counts them down); meanwhile the others pass on the grants the
kernel kept (a restart) or, on fresh maps, are refused until a poll sees
the refusal and grants them. A time-slot boundary grants everyone again
from the loop.

The loop (``run``), every ``interval`` seconds: one scan of the mmapped
counters (ext/bpfmaps.pyx ``Maps.scan``: only the counters whose bit the
program set in its dirty bitmap are read, so a poll costs what moved; the
start reads them all),
the deltas rated, the grants of the subscribers that moved (and of the
blocked and refused ones every ``WATCH_INTERVAL``, of those the daemon
touched (payments, fees, changes: ``touch``), and of everyone in turn over
``SWEEP_SECONDS``, a safety net) brought up to date; at a time-slot boundary the
keeper's freeze, a charge at the old slot and new grants for everyone;
the touched subscribers' networks bound again every ``SYNC_INTERVAL`` (the change
follower's hooks move them first, below; never a comparison of everyone); the heartbeat
(``policy.bpf.present``) every ``heartbeat`` seconds: a program gone is an
alarm (log, ``tollgate_bpf_heartbeat_alarms``, /healthz) and attached again;
with it, the gateway's own destinations (its local routing table) are looked
at again: packets to them are not forwarded, so not counted (``NOT_FORWARDED``).

The block step (``before_nft_block`` .. ``after_nft_unblock``, called by the
policy pusher around its nft update, gateway/daemon/pusher.py): tc ingress
runs before nft's forward hook, so whatever the program passes of a
subscriber that nft blocks is metered, charged and then refused by nft:
never delivered. The program's blocked flag is therefore set before the nft
block and cleared after the nft unblock, in the same step (it used to follow
at this source's next look at the subscriber: what the subscriber sent in
between, flood pings, its answers to the resetter's probes, was charged;
tests/linux/test_ebpf_block_step.py). Downloads cross nft before the egress
program, so either order is right for them. In between the two, the program
drops what nft would have refused anyway, uncounted. The one block the grant
keeper makes itself (money out, gateway/daemon/grants.py) sets the flag in
the same step as the engine's block, before the pusher's nft block.

The block page (``C_REDIRECTED``): for the same reason, a blocked
subscriber's HTTP, which nft's portal chain redirects to the gateway's
block-page server, would be dropped by the program before nft could redirect
it. The maps' per-slot redirected flag says "nft's blocked set holds this
subscriber's networks"; while it is set, the program passes the blocked
subscriber's tcp/80 uploads uncounted (nft delivers them to the gateway
itself, or rejects them in its forward block chain: never forwarded),
everything else stays dropped ("Redirected" in tollgate.bpf.c). Order: set
after the nft block, cleared before the nft unblock (the block step).

A start is the block step too: before the daemon restores nft's sets from
the ledger (``__init__``, made before the restore) every redirected flag is
cleared and the subscribers the engine has blocked are blocked in the
program; after it (``begin``) every slot's blocked flag is set from the
engine and the redirected flag for the subscribers whose networks the
restored blocked set holds, read back from nft.

Networks that leave a subscriber (``before_nft_release``, called by the
change follower before nft unblocks and forgets them: ``_drop_networks`` in
gateway/daemon/changes.py) leave the maps first, the block step's order: they
used to stay until the next ``sync_addresses`` (``SYNC_INTERVAL``), and while
the subscriber was blocked its tcp/80 from them passed the program uncounted
(redirected) and nft, no longer blocking them, forwarded it. From there they
are unknown: the config's ``unknown`` verdict (``Maps.set_verdicts``) drops
or passes them, uncounted, as the forward hook would; what an unknown address
sends to the gateway itself passes either way. Networks that arrive
(``before_engine_add``) reach the maps before the engine has them, counted
from the moment they are rated, not passed as unknown until the next sync;
``sync_addresses`` rebinds a network handed from one subscriber to another
without unbinding it in between.

Refunds (``tollgate_drop`` in tollgate.bpf.c, "Refunds"): whatever the
kernel drops after the program counted it (an upload an operator's forward
rule, rp_filter, a missing route, an invalid conntrack state or nft's
``bound_mac`` rule of ``[sessions] bind_mac`` drops; a download a full qdisc
drops) is given back in the maps' refund of its counter, as the nfqueue path,
counting in the forward hook, never charged it. The program's link is pinned
with the maps: refunds go on while no daemon runs; the heartbeat attaches it
again if its link went (an alarm, as for the tc program). What a counter
charges: ``used - refunded``, one poll late (``_settle``: a packet in flight at
a poll, counted and not yet dropped, is settled by the next), never less than
it charged already: a refund of bytes charged earlier (a late drop) charges
nothing until the delivered total passes what was charged, never a negative
charge. The grant keeper's base is what is settled, charged or refunded
(``settled``): what the kernel passes beyond it is inside the grant and not
paid yet, so grants never let a byte past what the balance buys, and a refund
returns its bytes to the grant. At a time-slot boundary the grants are frozen
at once and given again at the next poll, after what passed at the old prices
is charged at them. Not refunded, so charged: drops after another packet of
the same CPU and direction was counted (a qdisc that drops at dequeue, such as
fq_codel's codel; segments of a GSO packet split after the program). A
spoofer's packets that ``bound_mac`` drops are refunded, not charged to the
address's owner, but they take its grant until the next poll settles them (a
flood of them can hold its traffic back for that long): refusing them in the
program would need the bindings (address -> MACs) in a map of its own. A
kernel without BTF or ``bpf_cast_to_kern_ctx`` (before 6.3): the loader takes
the programs without refunds, the start says so once in the log, and those
drops are charged as before; maps pinned by an older load keep what they
have (``tollgate policy remove`` and a start load them again).

The flusher writes the engine's rows with ``Ledger.apply_flush_bpf``: the
marks advance in the flush's own transaction.

Needs a kernel with BPF (``CONFIG_BPF_SYSCALL``), tc clsact and BPF
classifiers (``CONFIG_NET_CLS_BPF``, ``CONFIG_NET_SCH_INGRESS``), bpffs, and
the program built (``make build``, clang): otherwise the daemon stops at
start with the reason (exit code 2) and nothing attached.
"""

from __future__ import annotations

import logging
import threading
import time

from ext.constants import NF_DROP
from ext.errors import BpfError, ConfigError, EngineError

log = logging.getLogger("tollgate.sources.ebpf")

WATCH_INTERVAL = 0.2  # seconds between looks at blocked and refused subscribers (a top-up flows within 1 s)
# everyone's grants looked at once in this time, a slice per poll: a safety net, since what moves a grant is
# traffic (refreshed at each poll) or a touch (payments, fees, changes); at 5 s, 100k subscribers cost 20k
# refreshes a second, a third of a core idle
SWEEP_SECONDS = 60.0
# ... but never more than SWEEP_RATE refreshes a second (some 40 us each): at a million subscribers a sweep of
# 60 s was 17k refreshes a second, 27% of a core with no traffic at all; capped, a sweep there takes half an hour
SWEEP_RATE = 500
SYNC_INTERVAL = 1.0  # seconds between looks for new and removed addresses
# A start grants the first START_GRANTS subscribers (option start_grants; 0: everyone, the default) before it
# attaches and answers /healthz, and the rest from the loop, up to START_BUDGET seconds of each poll, under the
# engine lock (a flush or a payment waits at most that long for the lock); a time-slot boundary's grants always
# come from the loop. Both through GrantKeeper.refresh_many: an idle subscriber (no pair with a rate: everyone
# at a start) is granted in C (ext/grants.pyx, 0.16 us), any other by the Python refresh (some 30 us: at a
# million, 50 s of polls after /healthz before everyone had a grant, before refresh_many). Until then a
# subscriber passes on the grants the kernel kept (a restart) or is refused (fresh maps: grants 0); a refused
# subscriber is granted at the next poll, as the watch grants anyone refused.
START_GRANTS = 0
START_BUDGET = 0.05
# The program sees what a subscriber sends on its link, not only what the gateway forwards: neighbour
# discovery to solicited-node multicast, MLD, mDNS, broadcasts, and everything to the gateway's own addresses
# (DNS, the portal, pings). None of it is forwarded, so the forward hook, where the nfqueue path meters, never
# sees it: the program passes it uncounted, whatever the local zone costs. These ranges the program tests by
# itself (never_forwarded in tollgate.bpf.c); the gateway's own addresses come from its local routing table
# (policy.bpf.local_destinations), those outside these ranges as Maps.set_zones' not_forwarded.
NOT_FORWARDED = ("224.0.0.0/4", "255.255.255.255/32", "169.254.0.0/16", "127.0.0.0/8", "ff00::/8", "fe80::/10")


def release(maps, loaded: bool, pin_dir: str) -> None:
    """What a failed start leaves of its maps: ``maps`` closed and, if this start ``loaded`` them (not
    reopened: those keep their pins and grants), unpinned; attached nowhere, the kernel frees them."""
    from ext.bpfmaps import Maps

    if maps is not None:
        maps.close()
    if loaded:
        try:
            Maps.unpin(pin_dir)
        except BpfError as exc:
            log.error("a failed start could not unpin %s: %s", pin_dir, exc)


class MapsLoad:
    """The maps a start needs, reopened (pinned by an earlier run) or else loaded and pinned (``Maps.load``:
    libbpf parses the object, the kernel allocates the maps and verifies the programs, 2-5 s at a million
    slots, all of it without the GIL), in a thread of its own: begun at the top of the daemon's start, it
    runs while the ledger is read (``EbpfSource.preload``). ``take`` hands the result over once (what the
    load raised is raised there: the start's error, where it always was); a start that fails before that
    discards it (``discard``): joined, closed, and unpinned if it was loaded here, as a failed ``begin`` leaves it."""

    def __init__(self, pin_dir: str, **load) -> None:
        self.pin_dir, self.load = pin_dir, load
        self.maps = None
        self.loaded = False  # loaded and pinned here (not reopened): what a failed start unpins
        self.error: BaseException | None = None
        self.done = False  # taken or discarded
        self.thread = threading.Thread(target=self._run, name="tollgate-ebpf-load", daemon=True)

    def start(self) -> MapsLoad:
        self.thread.start()
        return self

    def _run(self) -> None:
        from ext.bpfmaps import Maps

        try:
            try:
                self.maps = Maps.open(self.pin_dir)
                log.info("reopened the maps pinned at %s (load %08x): counters and grants as the kernel kept them",
                         self.pin_dir, self.maps.load_id)
            except BpfError:
                Maps.unpin(self.pin_dir)  # a half-made directory (no tg_info): nothing of value in it
                self.maps = Maps.load(self.pin_dir, **self.load)
                self.loaded = True
                log.info("loaded the tc program and its maps, pinned at %s (load %08x, %d slots)", self.pin_dir,
                         self.maps.load_id, self.load["max_slots"])
        except BaseException as exc:  # noqa: BLE001 - the taker's to raise, in the start's thread
            self.error = exc

    def wait(self):
        """The maps once the thread is done (None: it failed; ``take`` says why), still this load's."""
        self.thread.join()
        return self.maps

    def take(self) -> tuple:
        """``(maps, loaded)``, now the caller's; or what the load raised (BpfError: no BPF data path here)."""
        self.thread.join()
        if self.done:
            raise RuntimeError("the maps' load was taken or discarded already")
        self.done = True
        if self.error is not None:
            raise self.error
        return self.maps, self.loaded

    def discard(self) -> None:
        """The start failed before ``take``: the thread joined (a start never leaves it behind), the maps
        closed, and what it loaded unpinned (attached nowhere, the kernel frees it); reopened pins stay."""
        self.thread.join()
        if self.done:
            return
        self.done = True
        release(self.maps, self.loaded, self.pin_dir)
        self.maps = None


class EbpfSource:
    """See the module docstring; the daemon runs it for ``--source ebpf``."""

    OPTIONS = {"interfaces": "subscriber-facing interfaces, comma-separated (default gateway.lan_interfaces)",
               "pin_dir": "bpffs directory of the pinned maps and programs (default /sys/fs/bpf/tollgate)",
               "interval": "seconds between polls of the kernel's counters (default 0.05)",
               "max_slots": "slots (subscriber ids 0..max_slots-1) when the maps are loaded (default 65536)",
               "heartbeat": "seconds between checks that the program is still attached (default 2)",
               "object": "the compiled program, a .bpf.o (default ext/bpf/tollgate.bpf.o, built by make build)",
               "start_grants": "subscribers granted before the program is attached at start; the rest are granted "
                               "by the loop (default 0: everyone first)"}

    def __init__(self, engine, on_events, interfaces: str = "", pin_dir: str = "", interval: str = "0.05",
                 max_slots: str = "65536", heartbeat: str = "2", object: str = "",
                 start_grants: str = str(START_GRANTS), preload: MapsLoad | None = None) -> None:
        """``preload``: the maps' load the daemon began before it read the ledger (:meth:`preload`); None:
        ``begin`` opens or loads them itself."""
        self.engine = engine
        self.on_events = on_events
        self._parse(interfaces, pin_dir, interval, max_slots, heartbeat, object, start_grants)
        self.preloaded = preload
        self.stopping = threading.Event()
        self.maps = None
        self.keeper = None
        self.gw = None
        self.touch_lock = threading.Lock()
        self.touched: set[int] = set()  # for the next poll's refreshes
        self.touched_addresses: set[int] = set()  # for the next sync_addresses
        self.counts = {"polls": 0, "charged_bytes": 0, "charged_packets": 0, "start_charged_bytes": 0,
                       "heartbeat_alarms": 0, "reattached": 0, "unowned_bytes": 0, "attached": False,
                       "last_alarm_time": 0, "start_grants_left": 0}
        self.ungranted: list[int] = []  # subscribers the start has not granted yet (begin, START_GRANTS)
        self.queue_num = "ebpf"
        self._before_nft_restore()

    def _parse(self, interfaces: str = "", pin_dir: str = "", interval: str = "0.05", max_slots: str = "65536",
               heartbeat: str = "2", object: str = "", start_grants: str = str(START_GRANTS)) -> None:
        """The options (``OPTIONS``, strings) checked and set; ValueError names a bad one."""
        from ext.bpfmaps import DEFAULT_PIN_DIR

        self.interfaces = [i for i in interfaces.split(",") if i]
        self.pin_dir = pin_dir or DEFAULT_PIN_DIR
        self.interval = float(interval)
        self.start_grants = int(start_grants)
        self.max_slots = int(max_slots)
        self.heartbeat = float(heartbeat)
        self.obj_path = object or None
        if not 0.005 <= self.interval <= 5:
            raise ValueError("interval is 0.005..5 seconds")
        if not 1 <= self.max_slots <= 1 << 24:
            raise ValueError("max_slots is 1..16777216")

    @classmethod
    def preload(cls, engine, config, **options) -> MapsLoad | None:
        """The maps opened or loaded in a thread of their own, begun by the daemon at the top of its start,
        before it reads the ledger (``Gateway.start``): they need no subscriber, and a fresh load (the kernel's
        verifier, the maps' allocation: seconds at a million slots) then runs on the other core while this
        process reads the subscribers; ``begin`` takes the result. None where the start fails before the load
        anyway, with the reason said where it always was: an option the constructor refuses, an interface that
        is not in this network namespace (``begin``: nothing loaded)."""
        import socket

        opts = cls.__new__(cls)
        try:
            opts._parse(**options)
        except (TypeError, ValueError):
            return None
        ifaces = opts.interfaces or list(config.lan_interfaces)
        try:
            for iface in ifaces:
                socket.if_nametoindex(iface)
        except OSError:
            return None
        if not ifaces:
            return None
        return opts._maps_load(engine, config).start()

    def _maps_load(self, engine, config) -> MapsLoad:
        return MapsLoad(self.pin_dir, max_slots=self.max_slots, n_zones=len(config.zones),
                        default_zone=engine.default_zone, malformed_drop=config.malformed_verdict == NF_DROP,
                        unknown_drop=config.unknown_verdict == NF_DROP, obj_path=self.obj_path)

    def _before_nft_restore(self) -> None:
        """The block step of a start, its first half (the daemon restores nft's sets from the ledger next; the
        second half is in ``begin``). A previous process's redirected flags are cleared (the restore may unblock
        someone: a payment while it was down): until ``begin`` sets them again from what nft holds, a blocked
        subscriber's tcp/80 is dropped (no block page for a moment), never passed for a network nft no longer
        blocks. And whoever the engine has blocked (billing at this start, a block from before it) is blocked
        in the program before nft's restore blocks them: nothing the restore refuses was metered."""
        from ext.bpfmaps import Maps

        if self.preloaded is not None:  # the daemon's: its maps, once opened or loaded (no second mapping)
            maps = self.preloaded.wait()
            if maps is not None:
                self._flags_before_restore(maps)
            return  # (its error, if it failed, is begin's to say)
        try:
            with Maps.open(self.pin_dir) as maps:
                self._flags_before_restore(maps)
        except BpfError:  # nothing pinned, or another ABI (replaced in begin): no flag of ours to change
            pass

    def _flags_before_restore(self, maps) -> None:
        if maps.n_counters:
            maps.clear_redirected()
            # the engine's blocked ones (few), not a SubscriberState made for each subscriber to ask (2 s of a
            # restart at a million)
            for sid in sorted(self.engine.blocked_subscribers()):
                if sid < maps.max_slots:
                    maps.set_blocked(sid, True)

    def enforcer_options(self) -> dict:
        """Our nft table without the ``account`` chain and its counted sets (policy/nft.py, ``count``): the
        program's maps are the kernel's count here (charges, marks, crash recovery: ``begin``), the daemon reads
        no nft counter under this source (gateway/daemon/kernel.py: its recovery and drift checks are for the
        nft-marked sources), and the chain cost every forwarded packet ten set lookups and a count for nothing."""
        # the block chain tests only tcp/80: the program refuses the rest of a blocked subscriber's traffic
        # first (the block step, this module's docstring)
        return {"count": False, "refused_at_tc": True}

    # ---- start ------------------------------------------------------------------

    def begin(self, gw) -> None:
        """Maps, subscribers, marks, grants, attach (see the module docstring)."""
        import socket

        self.gw = gw
        self.interfaces = self.interfaces or list(gw.config.lan_interfaces)
        if not self.interfaces:
            raise ConfigError("--source ebpf", "no subscriber-facing interface: set gateway.lan_interfaces or "
                                               "--source-option interfaces=IFACE[,IFACE]")
        missing = []
        for iface in self.interfaces:  # before anything is loaded: in this process's network namespace
            try:
                socket.if_nametoindex(iface)
            except OSError:
                missing.append(iface)
        if missing:
            raise ConfigError("--source ebpf", f"no interface {', '.join(missing)} in this network namespace: "
                                               "nothing loaded or attached")
        n_zones = len(gw.config.zones)
        self.loaded = False  # True: this start loaded and pinned the program (a failed start unpins it again)
        try:
            self._begin(gw, n_zones)
        except BaseException:
            # a start that fails leaves the kernel as it found it: what this start loaded is unpinned (and,
            # attached nowhere, freed); maps reopened from an earlier run keep their pins and grants
            if self.preloaded is not None:  # failed before it took the daemon's load: joined, undone
                self.preloaded.discard()
                self.preloaded = None
            release(self.maps, self.loaded, self.pin_dir)
            self.maps = None
            raise

    def _begin(self, gw, n_zones: int) -> None:
        from policy import bpf

        from ..daemon.grants import GrantKeeper

        # the daemon's load, begun before it read the ledger (preload), or one made here (a begin without it)
        load, self.preloaded = self.preloaded or self._maps_load(gw.acct.engine, gw.config).start(), None
        try:
            self.maps, self.loaded = load.take()
        except BpfError as exc:
            raise ConfigError("--source ebpf", f"the kernel's BPF data path is not available here ({exc}); "
                                               "run with --source nfqueue (the inline path) instead") from None
        if self.maps.n_zones != n_zones:  # (reopened: a load is sized by this config)
            raise ConfigError("--source ebpf", f"the maps pinned at {self.pin_dir} have {self.maps.n_zones} "
                                               f"zones, the config {n_zones}: `tollgate policy remove` first "
                                               "(their counters go; the ledger has what was flushed)")
        maps = self.maps
        # the config's verdicts, also over maps a run with another config left
        maps.set_verdicts(gw.config.malformed_verdict == NF_DROP, gw.config.unknown_verdict == NF_DROP)
        too_big = [sid for sid in gw.acct.subscribers if sid >= maps.max_slots]
        if too_big:
            raise ConfigError("--source ebpf", f"subscriber ids up to {max(too_big)} do not fit the maps' "
                                               f"{maps.max_slots} slots: `tollgate policy remove`, then "
                                               "--source-option max_slots=N")
        self.dropped_bytes: dict[int, int] = {}  # counter index -> dropped_bytes at the last refusal seen
        self.snapshot = bytearray(maps.n_counters * 24)  # the scan's: used, packets, dropped_packets as last read
        self.snap = memoryview(self.snapshot).cast("Q")
        # per counter, the bytes and packets charged (what the ledger's marks hold): used less refunds as a
        # poll read them, one poll late (see "Refunds" in the module docstring); a refund that came after its
        # bytes were charged leaves it above that, carried until the delivered total passes it
        self.charged = memoryview(bytearray(maps.n_counters * 16)).cast("Q")
        self.refunds = maps.refunds_view()
        self.unsettled: dict[int, tuple[int, int, int]] = {}  # counter index -> (used, packets, ts) read, not charged
        self.regrant = False  # a time-slot boundary's grants wait for the next poll's charge at the old prices
        if not maps.refunds:
            log.warning("the kernel's drops after the tc program (an operator's forward rule, rp_filter, no route, "
                        "a full qdisc, bind_mac) are charged: no refunds (%s)",
                        maps.refunds_error or "the pinned program has none: `tollgate policy remove` and a "
                        "start on a kernel with BTF and bpf_cast_to_kern_ctx, 6.3 or later, load them")
        self.counts["refunds"] = bool(maps.refunds)
        self.counts["refunds_attached"] = maps.refunds_attached()
        self.keeper = GrantKeeper(gw, maps, self.settled, settled_views=(self.charged, self.refunds))
        with gw.engine_lock:
            # the Accountant's own table is read, not a dict of a view each (some 100 MB at a million):
            # nothing changes it until the start is over (the change follower's thread is spawned after begin)
            subs = gw.acct.subscribers
            self.not_forwarded = self.local_destinations()
            maps.set_zones(gw.config.zones.rules(), self.not_forwarded)
            maps.set_allowlist(gw.config.allowlist)
            # each subscriber's networks as the one text the Accountant holds, parsed in C straight from its
            # table's arena (a list of a slot and a string for each of 1.8M prefixes was 1.5 s of a start at a
            # million subscribers, a str of each one's text 0.4 s)
            with subs.networks_arena() as (arena, words, present):
                maps.set_subscriber_networks_arena(arena, words, present)
            sids = list(subs)  # (ascending: the table's own order)
            # the marks are what the ledger holds: the first scan charges kernel - mark, exactly
            marks = gw.ledger.bpf_marks(self.pin_dir, maps.load_id)
            nz = maps.n_zones
            for (sid, zone, d), (nbytes, packets) in marks.items():
                if sid < maps.max_slots and zone < nz:
                    i = (sid * nz + zone) * 2 + d
                    self.snap[3 * i], self.snap[3 * i + 1] = nbytes, packets
                    self.charged[2 * i], self.charged[2 * i + 1] = nbytes, packets
            # refusals from before this start are not news (one C pass over the counters: a Python loop over
            # their view was 1.7 s of the start at a million subscribers)
            self.dropped_bytes = maps.refusals_into(self.snapshot, sids)
        self.last_poll = time.monotonic()
        self.poll(start=True)  # everything read (see Maps.scan) ...
        time.sleep(self.interval)  # ... and charged once the kernel had the time to drop what was in flight
        charged = self.poll(start=True)
        self.counts["start_charged_bytes"] = charged
        if charged:
            log.warning("start: charged %d bytes the kernel forwarded that the ledger did not hold (rated but not "
                        "flushed before a crash, or passed within its grants while the daemon was down)", charged)
        with gw.engine_lock:
            events = []
            now = time.time_ns()
            # nft's sets were restored before this start: the program's flags follow them, as the block step
            # keeps them from here on (a flag the previous process left for someone paid since goes); written
            # where they change only (a set_blocked each was a second of the start at a million subscribers)
            maps.mirror_blocked([sid for sid in gw.acct.engine.blocked_subscribers() if sid in subs], subs)
            self.ungranted = list(sids)  # (ascending) the start's grants: the first here, the rest in run (START_GRANTS)
            first = self.start_grants or len(self.ungranted)
            events += self.keeper.refresh_many(self.ungranted[:first], now)
            del self.ungranted[:first]
            self.counts["start_grants_left"] = len(self.ungranted)
        gw.post(events)
        try:
            bpf.attach(self.interfaces, self.pin_dir)
        except bpf.AttachError as exc:
            raise ConfigError("--source ebpf", f"cannot attach to {', '.join(self.interfaces)}: {exc}") from None
        self.counts["attached"] = True
        from prometheus_client import Counter

        self.alarms = Counter("tollgate_bpf_heartbeat_alarms", "heartbeat checks that found the tc program "
                              "detached (attached again)", registry=gw.metrics.registry)
        self.next_boundary = self.keeper.next_boundary(time.time_ns())
        self.sweep = sids
        self.cursor = 0
        self._redirect_restored(subs)

    def _redirect_restored(self, subs) -> None:
        """The redirected flag for every subscriber whose networks nft's blocked set holds now (restored from
        the ledger before ``begin``; read back, not assumed), so that a blocked subscriber gets the block page
        after a restart. Later blocks and unblocks: the pusher calls ``redirected``."""
        from ext import netaddr

        gw = self.gw
        with gw.enforcer_lock:
            held = gw.enforcer.blocked()
        # from what nft holds (the blocked subscribers' networks: few), not from everyone: whoever qualifies
        # owns each of its networks, so the owners of the held ones are all there is to look at (a look at
        # every subscriber and its networks was 2.3 s of the start at a million)
        owners = set()
        with gw.engine_lock:
            for n in held:
                try:
                    owners.add(gw.acct.engine.owner(n))
                except EngineError:  # not a network the engine takes: no subscriber's (nor was it before)
                    pass
        sids = sorted(sid for sid in owners if sid in subs and subs[sid].addresses
                      and all(netaddr.canonical(n) in held for n in subs[sid].addresses))
        self.redirected(sids, True)

    def redirected(self, sids, on: bool) -> None:
        """The redirected flag of these subscribers (see the module docstring): set only while nft's blocked
        set holds their networks."""
        for sid in self._slots(sids):
            self.maps.set_redirected(sid, on)

    def _slots(self, sids) -> list[int]:
        maps = self.maps
        if maps is None:  # not begun, or closed: nothing of ours in the kernel to change
            return []
        return [sid for sid in set(sids) if 0 <= sid < maps.max_slots]

    # ---- the block step (the policy pusher, around its nft update; see the module docstring) ----------------

    def before_nft_block(self, sids) -> None:
        """The program stops passing (and counting) these subscribers: before nft refuses them."""
        for sid in self._slots(sids):
            self.maps.set_blocked(sid, True)

    def after_nft_block(self, sids) -> None:
        """nft's blocked set holds their networks now: their tcp/80 may pass to the block page."""
        self.redirected(sids, True)

    def before_nft_unblock(self, sids) -> None:
        """nft is about to let them through: no tcp/80 passes uncounted from here."""
        self.redirected(sids, False)

    def after_nft_unblock(self, sids) -> None:
        """nft lets them through: the program passes (and counts) them again, against their grants. Not a
        subscriber the engine blocked again meanwhile (the grant keeper's money-out block between the pusher's
        look at the engine and now: its own block event follows)."""
        engine = self.gw.acct.engine
        for sid in self._slots(sids):
            try:
                if engine.subscriber(sid).blocked:
                    continue
            except EngineError:  # gone meanwhile: its prefixes leave the maps, the flag stays (fail closed)
                continue
            self.maps.set_blocked(sid, False)

    def before_nft_release(self, networks) -> None:
        """Networks that leave their subscriber (the change follower, before nft's unblock and removal of
        them: gateway/daemon/changes.py) leave the maps first, in the block step's order. Until then the
        program still held them as the subscriber's: a blocked one's tcp/80 passed uncounted (redirected),
        and nft, no longer blocking them, would forward it; an unblocked one's would be charged to a
        subscriber who no longer owns them. From here they are unknown (the config's unknown verdict).
        This is where they leave the maps: ``sync_addresses`` binds the touched subscribers' networks as the
        Accountant holds them, and keeps no copy of its own to find the gone ones by."""
        if self.maps is not None and networks:
            self.maps.remove_subscribers(list(networks))

    def before_engine_add(self, sid: int, networks) -> None:
        """Networks that reach a subscriber (the change follower, before the engine has them) reach the maps
        first: counted against the subscriber's grants from the moment the engine would rate them, not passed
        as unknown until the next ``sync_addresses`` (which finds them bound and binds them again: a no-op).
        A new subscriber has no grant yet: its packets are refused until the next poll grants it (the change
        follower touches it)."""
        maps = self.maps
        if maps is not None and networks and 0 <= sid < maps.max_slots:
            maps.set_subscribers([sid] * len(networks), list(networks))

    # ---- the loop -----------------------------------------------------------------

    def touch(self, sids) -> None:
        """The daemon changed these subscribers (balance, terms, networks; Gateway.touch, from its threads)."""
        with self.touch_lock:
            self.touched.update(sids)
            self.touched_addresses.update(sids)

    def run(self) -> None:
        next_watch = next_sync = time.monotonic()
        next_beat = time.monotonic() + self.heartbeat
        while not self.stopping.wait(self.interval):
            mono = time.monotonic()
            watch = mono >= next_watch
            if watch:
                next_watch = mono + WATCH_INTERVAL
            self.poll(watch=watch)
            if mono >= next_sync:
                next_sync = mono + SYNC_INTERVAL
                self.sync_addresses()
            if mono >= next_beat:
                next_beat = mono + self.heartbeat
                self.check_heartbeat()

    def poll(self, start: bool = False, watch: bool = False) -> int:
        """One scan: what earlier polls read charged (``_settle``), what moved since kept for the next poll,
        grants refreshed. Returns the bytes charged."""
        gw, maps, keeper = self.gw, self.maps, self.keeper
        now = time.time_ns()
        boundary = self.next_boundary if not start else None
        at_boundary = boundary is not None and now >= boundary
        if at_boundary:  # nothing more at the old prices, then charge what passed at them
            with gw.engine_lock:
                keeper.freeze(list(gw.acct.subscribers), now)
        hits = maps.scan(self.snapshot, full=start)  # a start reads everything: see Maps.scan
        mono = time.monotonic()
        seconds, self.last_poll = mono - self.last_poll, mono
        nz = maps.n_zones
        ts = boundary - 1 if at_boundary else now
        events = []
        moved: dict[int, dict] = {}
        with gw.engine_lock:
            subs = gw.acct.subscribers
            charged = self._settle(subs, events, seconds)
            for i, used, packets, dropped, old_used, old_packets, old_dropped in hits:
                sid, rest = divmod(i, 2 * nz)
                zone, d = divmod(rest, 2)
                du, dp = used - old_used, packets - old_packets
                if sid not in subs:
                    self.counts["unowned_bytes"] += max(0, du)
                    continue
                refused = moved.setdefault(sid, {})
                if dropped > old_dropped:
                    dbytes = maps.counter(sid, zone, d).dropped_bytes
                    refused[(zone, d)] = (dropped - old_dropped, max(1, dbytes - self.dropped_bytes.get(i, 0)))
                    self.dropped_bytes[i] = dbytes
                if du < 0:
                    log.error("eBPF counter of subscriber %s zone %d direction %d went back (%d < %d): taken as is",
                              sid, zone, d, used, old_used)
                    continue
                if du or dp:  # charged at the next poll, less what the kernel drops meanwhile
                    self.unsettled[i] = (used, packets, ts)
            if start:
                gw.post(events)
                return charged
            now = time.time_ns()
            if at_boundary:  # grants again once what passed at the old prices is charged: the next poll
                self.next_boundary = keeper.next_boundary(now)
                self.regrant = True
                todo = set()
            elif self.regrant:
                # everyone is granted again at the new prices: those the freeze refused at once, the rest by
                # the loop (START_BUDGET of each poll), as at a start: at a million subscribers, granting them
                # all in this poll held the engine for most of a minute
                self.regrant = False
                todo = set(moved)
                self.ungranted = sorted(subs)
                log.info("time-slot boundary: %d subscribers to be granted again at the new prices", len(subs))
            else:
                with self.touch_lock:
                    touched, self.touched = self.touched, set()
                todo = set(moved) | touched
                if watch:
                    todo |= keeper.refused
                step = max(1, int(min(len(self.sweep) / SWEEP_SECONDS, SWEEP_RATE) * self.interval) + 1)
                if self.cursor >= len(self.sweep):  # a sweep done: the next one over who is here now (came and
                    self.sweep, self.cursor = list(subs), 0  # went meanwhile: touched, refreshed by the poll)
                todo |= set(self.sweep[self.cursor:self.cursor + step])
                self.cursor += step
            for sid in todo:
                if sid in subs:
                    events += keeper.refresh(sid, now, moved.get(sid))
            if self.ungranted and not at_boundary:  # (new grants wait for the charge at the old prices)
                events += self._grant_the_rest(subs, now)
        self.counts["polls"] += 1
        gw.post(events)
        return charged

    def _grant_the_rest(self, subs, now: int) -> list:
        """The start's grants that ``begin`` left (START_GRANTS), for up to START_BUDGET seconds of this poll."""
        events = []
        deadline = time.monotonic() + START_BUDGET
        done = 0
        while done < len(self.ungranted) and time.monotonic() < deadline:
            # in chunks, so the deadline is looked at often: an idle subscriber costs well under a microsecond
            # (in C), a busy one the Python refresh's some 30 us
            events += self.keeper.refresh_many([sid for sid in self.ungranted[done:done + 1024] if sid in subs], now)
            done += 1024
        del self.ungranted[:done]
        self.counts["start_grants_left"] = len(self.ungranted)
        if not self.ungranted:
            log.info("every subscriber granted (a start or a time-slot boundary)")
        return events

    def settled(self, i: int) -> int:
        """Counter ``i``'s ``used`` that is settled: charged, or refunded (the grant keeper's base: whatever
        the kernel passes beyond it is inside the grant and not yet paid)."""
        return self.charged[2 * i] + self.refunds[i, 0]

    def _settle(self, subs, events: list, seconds: float) -> int:
        """What earlier polls read of the counters, charged: used less refunds, less what is charged already
        (see "Refunds" in the module docstring). Under ``engine_lock``; returns the bytes charged."""
        todo, self.unsettled = self.unsettled, {}
        nz, charged = self.maps.n_zones, 0
        engine, keeper, counts, done, refunds = self.gw.acct.engine, self.keeper, self.counts, self.charged, self.refunds
        for i, (used, packets, ts) in todo.items():
            sid, rest = divmod(i, 2 * nz)
            if sid not in subs:  # gone meanwhile: counted as unowned when read
                continue
            # a refund of bytes charged at an earlier poll makes this negative: nothing is charged until the
            # delivered total passes what was charged (never a negative charge)
            du = max(0, used - refunds[i, 0] - done[2 * i])
            dp = max(0, packets - refunds[i, 1] - done[2 * i + 1])
            if du or dp:
                zone, d = divmod(rest, 2)
                events += engine.rate_volume(sid, zone, d, du, dp, ts)
                done[2 * i] += du
                done[2 * i + 1] += dp
                keeper.observe(i, du, seconds)
                charged += du
                counts["charged_bytes"] += du
                counts["charged_packets"] += dp
        return charged

    def sync_addresses(self) -> None:
        """The touched subscribers' networks as the Accountant holds them now, bound again in the maps (each
        bound already by the change follower's ``before_engine_add``, which binds before the engine has them:
        a rebind is a no-op), and the subscribers that left forgotten by the keeper (their networks left the
        maps at ``before_nft_release``, before nft let them go). Their grants are the poll's (a touch refreshes
        them). Read and written in one hold of ``engine_lock``: a network the change follower moves meanwhile
        is never bound again to the owner it left.

        No copy of what the maps hold is kept to compare with: every change of a subscriber's networks passes
        the change follower's two hooks, and a dict of every subscriber's networks was 40 MB at a million."""
        gw, maps = self.gw, self.maps
        with self.touch_lock:
            touched, self.touched_addresses = self.touched_addresses, set()
        if not touched:
            return
        slots, nets, gone = [], [], []
        with gw.engine_lock:
            subs = gw.acct.subscribers
            for sid in sorted(touched):
                info = subs.get(sid)
                if info is None:
                    gone.append(sid)
                    self.keeper.forget(sid)
                elif sid >= maps.max_slots:
                    log.error("subscriber %s does not fit the maps' %d slots: its traffic is not metered by the "
                              "eBPF path (restart after `tollgate policy remove` with a larger max_slots)", sid,
                              maps.max_slots)
                elif info.networks_text:
                    slots.append(sid)
                    nets.append(info.networks_text)
            if nets:
                maps.set_subscriber_networks(slots, nets)
        if gone:
            log.info("eBPF source: %d subscribers left (their networks left the maps with them)", len(gone))

    def local_destinations(self) -> list[str]:
        from policy import bpf

        import ipaddress

        builtin = [ipaddress.ip_network(n) for n in NOT_FORWARDED]
        return sorted(d for d in set(bpf.local_destinations())
                      if not any(n.version == b.version and n.subnet_of(b) for b in builtin
                                 for n in [ipaddress.ip_network(d)]))

    def follow_local_destinations(self) -> None:
        """An address added to or removed from the gateway: the not-forwarded zone rules follow."""
        try:
            now = self.local_destinations()
        except Exception as exc:  # noqa: BLE001 - said, tried again at the next beat
            log.error("cannot read the local routing table: %s", exc)
            return
        if now != self.not_forwarded:
            with self.gw.engine_lock:
                self.maps.set_zones(self.gw.config.zones.rules(), now)
            log.info("the gateway's own destinations changed (%d now): not counted", len(now))
            self.not_forwarded = now

    def check_heartbeat(self) -> bool:
        """The program still attached, both hooks, every interface? If not: alarm and attach again."""
        from policy import bpf

        self.follow_local_destinations()
        self.check_refunds()
        ok = bpf.present(self.interfaces, self.pin_dir)
        self.counts["attached"] = ok
        if ok:
            return True
        self.counts["heartbeat_alarms"] += 1
        self.counts["last_alarm_time"] = round(time.time(), 3)
        self.alarms.inc()
        log.error("heartbeat: the tc program is not attached to all of %s (someone removed a filter or the "
                  "clsact qdisc): attaching it again", ", ".join(self.interfaces))
        try:
            bpf.attach(self.interfaces, self.pin_dir)
            self.counts["reattached"] += 1
            self.counts["attached"] = bpf.present(self.interfaces, self.pin_dir)
        except Exception as exc:  # noqa: BLE001 - said, retried at the next beat
            log.error("heartbeat: attaching again failed: %s", exc)
        return False

    def check_refunds(self) -> bool:
        """The refund program still attached (its pinned link)? If not: alarm and attach it again. Maps
        without refunds: nothing to check (said at start)."""
        maps = self.maps
        if not maps.refunds or maps.refunds_attached():
            self.counts["refunds_attached"] = bool(maps.refunds)
            return True
        self.counts["refunds_attached"] = False
        self.counts["heartbeat_alarms"] += 1
        self.counts["last_alarm_time"] = round(time.time(), 3)
        self.alarms.inc()
        log.error("heartbeat: the refund program (tollgate_drop on skb:kfree_skb) is not attached (its link's pin "
                  "at %s is gone or holds another program): attaching it again; the kernel's drops in between "
                  "were charged", self.pin_dir)
        try:
            maps.attach_refunds()
            self.counts["reattached"] += 1
            self.counts["refunds_attached"] = maps.refunds_attached()
        except BpfError as exc:
            log.error("heartbeat: attaching the refund program again failed: %s", exc)
        return False

    # ---- the passive source's interface -------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        """Close our fds; the program stays attached and pinned, its grants in force. What the
        kernel counted after the last flush is charged at the next start (kernel - mark)."""
        if self.maps is not None:
            self.refunds.release()  # our view of the mmapped refunds, before the maps unmap them
            self.maps.close()
            self.maps = None

    def stats(self) -> dict:
        """Flat numbers (/healthz shows them under queue.ebpf, /metrics as tollgate_queue_stat): the
        heartbeat's (attached, heartbeat_alarms, reattached, last_alarm_time: unix seconds, 0 never), the
        charging's, the keeper's and the program's own (program_*: packets, tg_stats)."""
        out = dict(self.counts)
        if self.keeper is not None:
            out.update(self.keeper.stats)
            out["refused_subscribers"] = len(self.keeper.refused)
        if self.maps is not None:
            try:
                out.update({f"program_{k}": v[0] for k, v in self.maps.stats().items()})
            except BpfError:
                pass
        return out
