"""The NFLOG source: header copies of forwarded packets, rated as they come,
with per-subscriber kernel quotas that stop traffic at the byte.

The kernel side is ``policy.nft.Enforcer(queues=(), log_group=G, quotas=True)``:
a ``log group G snaplen 128 queue-threshold 64`` rule for the local networks
(nothing waits for us: forwarding goes on whatever this reader does) and, in
front of it, a named quota per subscriber. The reader is ``ext.nflog.LogReader``
(Cython, recvmmsg batches, the engine called with the GIL released); lost
datagrams are counted by sequence number, never silent.

Why quotas: a passive source sees a packet after it has passed, and the block
reaches the kernel sets some milliseconds (or, with a backlog, much) later; a
subscriber on a fast link would overspend by what passes in between. The
kernel quota holds the subscriber's remaining allowance in bytes and drops at
the byte however far behind userspace is. :class:`KernelQuotas` keeps it
current:

* a quota object counts ``used`` bytes since it was created or reset; its
  limit is set to ``seen + left``, where ``seen`` is what the engine has rated
  for the subscriber since then and ``left`` the bytes its balance still buys.
  Bytes the kernel passed that the engine has not rated yet are in ``used``
  but not in ``seen``: the kernel lets through exactly ``left`` minus them, so
  its cut and the engine's agree however stale the last refresh is;
* a subscriber the quota stopped (``used`` reached the limit: the kernel
  reports use capped at it) is blocked in the engine
  (``BLOCK_LIMIT``, the usual block event: kernel set, block page), since the
  engine would otherwise never see the packet that breaches;
* when a blocked subscriber is unblocked (a payment), its quota is reset:
  the bytes it counted while dropping never passed.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar

from ext.constants import BLOCK_LIMIT, EV_BLOCK

log = logging.getLogger("tollgate.sources.nflog")


def _int(name: str, value, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"nflog option {name}: {value!r} is not a whole number") from None
    if not lo <= number <= hi:
        raise ValueError(f"nflog option {name}: {number} is outside {lo}..{hi}")
    return number


class NflogSource:
    """``tollgate run --source nflog``: one NFLOG group read by ``ext.nflog.LogReader``."""

    OPTIONS: ClassVar[dict] = {"group": "NFLOG group of the log rule (default 1)",
                               "batch": "datagrams per recvmmsg (default 16)",
                               "copy_range": "bytes of each packet copied (default 128)",
                               "threshold": "packets per netlink datagram, the rule's queue-threshold (default 64)",
                               "flush_ms": "how long the kernel holds a datagram that is not full (default 10)",
                               "rcvbuf": "socket receive buffer in bytes (default 64 MiB)"}

    def __init__(self, engine, on_events, group="1", batch="16", copy_range="128", threshold="64", flush_ms="10",
                 rcvbuf=str(64 << 20)) -> None:
        from ext.nflog import LogReader

        self.group = _int("group", group, 0, 65535)
        self.threshold = _int("threshold", threshold, 1, 65535)
        self.copy_range = _int("copy_range", copy_range, 40, 65535)
        self.reader = LogReader(self.group, engine, batch_size=_int("batch", batch, 1, 256),
                                copy_range=self.copy_range, qthresh=self.threshold,
                                flush_ms=_int("flush_ms", flush_ms, 0, 100000),
                                rcvbuf=_int("rcvbuf", rcvbuf, 4096, 1 << 30), on_events=on_events)
        self.queue_num = f"nflog{self.group}"  # the daemon labels reader stats by it

    def enforcer_options(self) -> dict:
        """What ``policy.nft.Enforcer`` needs to log to this reader."""
        return {"queues": (), "log_group": self.group, "log_snaplen": self.copy_range,
                "log_threshold": self.threshold}

    def run(self) -> None:
        self.reader.run()

    def stop(self) -> None:
        self.reader.stop()

    def close(self) -> None:
        self.reader.close()

    def stats(self) -> dict:
        return self.reader.stats()


class KernelQuotas:
    """Keeps one kernel quota per subscriber equal to what its balance still
    buys (see the module docstring). ``enforcer`` is a ``policy.nft.Enforcer``
    made with ``quotas=True``; ``engine`` the engine the source feeds.

    The caller (the daemon, or a test harness) calls :meth:`sync` with fresh
    balances and then :meth:`check` often (every 0.1 s); ``check`` returns
    engine events to push to the kernel sets. One caller at a time (an
    internal lock makes that so)."""

    def __init__(self, enforcer, engine) -> None:
        self.enforcer = enforcer
        self.engine = engine
        self.lock = threading.Lock()
        self.base: dict[int, int] = {}      # engine-rated bytes of the subscriber when its quota was (re)set
        self.limit: dict[int, int] = {}     # the limit last written
        self.networks: dict[int, tuple] = {}
        self.stopped: set[int] = set()      # subscribers the quota stopped and the engine blocked
        self.at_limit: set[int] = set()     # subscribers at their limit in the last check
        self.counts = {"refreshes": 0, "resets": 0, "quota_blocks": 0}

    def sync(self, subscribers: dict, gone=None) -> None:
        """``{sid: (networks, bytes_left, rated_bytes)}`` for every subscriber
        under a quota: ``bytes_left`` what its balance still buys (0 if
        none), ``rated_bytes`` all bytes the engine has rated for it
        (``SubscriberState.rated_bytes``, a running total). New subscribers get a quota,
        vanished ones lose theirs, changed networks are re-pointed; limits
        change in one transaction. With ``gone`` given (the subscribers that
        vanished), ``subscribers`` may be just those whose state moved: the
        others keep their quotas as they are."""
        with self.lock:
            if gone is None:
                gone = {sid: self.networks[sid] for sid in self.networks if sid not in subscribers}
            else:
                gone = {sid: self.networks[sid] for sid in gone if sid in self.networks}
            if gone:
                self.enforcer.remove_quotas(gone)
                for sid in gone:
                    self.base.pop(sid, None), self.limit.pop(sid, None), self.networks.pop(sid, None)
                    self.stopped.discard(sid)
            create, limits, resets = {}, {}, []
            for sid, (networks, left, rated) in subscribers.items():
                networks = tuple(sorted(networks))
                left = max(0, int(left))
                if sid not in self.base or networks != self.networks.get(sid):
                    if sid in self.networks:
                        self.enforcer.remove_quotas({sid: self.networks[sid]})
                    self.base[sid], self.networks[sid] = rated, networks
                    create[sid] = (networks, left)
                    continue
                if sid in self.stopped:
                    if self._blocked(sid):
                        continue  # the kernel set holds it; nothing passes
                    resets.append(sid)  # unblocked (paid): what the quota dropped never passed
                    self.stopped.discard(sid)
                    self.base[sid] = rated
                limits[sid] = rated - self.base[sid] + left
            if create:
                self.enforcer.set_quotas(create)
                self.limit.update({sid: left for sid, (_n, left) in create.items()})
            if resets:
                self.enforcer.reset_quotas(resets)
                self.counts["resets"] += len(resets)
            changed = {sid: v for sid, v in limits.items() if self.limit.get(sid) != v or sid in resets}
            if changed:
                self.enforcer.set_quota_limits(changed)
                self.limit.update(changed)
                self.counts["refreshes"] += 1

    def check(self, sids=None) -> list:
        """Block in the engine every subscriber its quota has stopped at two
        checks in a row (with a :meth:`sync` between them, so the engine has
        rated what was in flight: a subscriber whose free traffic outran the
        last refresh gets a higher limit, not a block); the ``(Event, ts_ns)``
        pairs to hand to the kernel sets. ``sids``: look at just these (the
        caller then syncs every subscriber of :attr:`at_limit` before the
        next check)."""
        with self.lock:
            events = []
            now = time.time_ns()
            at_limit = set()
            for sid, q in self.enforcer.quotas(sids).items():
                # the kernel reports use capped at the limit: reaching it means nothing more passes
                if q["used"] >= q["allowed"] and sid in self.base and sid not in self.stopped:
                    at_limit.add(sid)
                    if sid in self.at_limit:
                        self.stopped.add(sid)
                        self.counts["quota_blocks"] += 1
                        log.info("subscriber %s used its kernel quota of %d bytes", sid, q["allowed"])
                        events += [(ev, now) for ev in self.engine.block(sid, BLOCK_LIMIT)]
            self.at_limit = at_limit - self.stopped
            return events

    def _blocked(self, sid: int) -> bool:
        return bool(self.engine.subscriber(sid).blocked)


# ---- a standalone harness: one passive source, volume accounting, no ledger ---------------------------------


def main(argv=None) -> int:
    """``python -m gateway.sources.nflog``: run a passive source in this
    network namespace with an engine that charges 1 unit per IP byte, so a
    balance is a byte allowance, and (``--quota``) kernel quotas kept by
    :class:`KernelQuotas`; blocks go to the kernel sets. Prints ``ready``,
    runs until SIGTERM/SIGINT or ``--seconds``, then prints one JSON line:
    bytes rated per subscriber, the kernel's counters, the quotas, the
    source's stats. Used by ``tests/linux/test_nflog.py`` and
    ``benches/bench_passive.py`` to look at a source without the daemon."""
    import argparse
    import json
    import signal

    import ext
    from ext import ZoneRule
    from ext.constants import PRICE_SCALE
    from policy.nft import Enforcer

    from . import source_class

    ap = argparse.ArgumentParser(prog="python -m gateway.sources.nflog", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="nflog", choices=("nflog", "conntrack"))
    ap.add_argument("--subscriber", action="append", default=[], metavar="ID=NET[,NET...]:BYTES",
                    help="a subscriber, its networks and its allowance in bytes")
    ap.add_argument("--local", action="append", default=[], help="local network (default the lab's)")
    ap.add_argument("--quota", action="store_true", help="per-subscriber kernel quotas")
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after this long at the latest")
    ap.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE", help="source option")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    local = args.local or ["100.64.0.0/10", "2001:db8:100::/48"]
    engine = ext.Engine(2, 1, default_zone=1)
    engine.set_zones([ZoneRule(n, 0) for n in local])
    engine.set_tariff(1, [PRICE_SCALE] * 4)  # one unit per byte, every zone and direction
    subs: dict[int, tuple[tuple[str, ...], int]] = {}
    for spec in args.subscriber:
        head, _, allowance = spec.rpartition(":")
        sid, _, nets = head.partition("=")
        subs[int(sid)] = (tuple(nets.split(",")), int(allowance))
        engine.add_subscriber(int(sid), 1, int(allowance))
        for net in nets.split(","):
            engine.add_address(int(sid), net)
    import queue

    pending: queue.SimpleQueue = queue.SimpleQueue()  # (Event, ts) lists from the reader thread
    on_events = pending.put
    options = dict(o.split("=", 1) for o in args.option)
    source = source_class(args.source)(engine, on_events, **options)
    kw = source.enforcer_options() if hasattr(source, "enforcer_options") else {"queues": ()}
    enforcer = Enforcer(local_networks=local, quotas=args.quota, **kw)
    enforcer.install()
    enforcer.restore(blocked=[], subscribers=[n for nets, _a in subs.values() for n in nets])
    quotas = KernelQuotas(enforcer, engine) if args.quota else None

    def snapshot() -> dict:
        # every byte costs one unit: the balance is the bytes left
        states = {sid: engine.subscriber(sid) for sid in subs}
        return {sid: (nets, max(0, states[sid].balance), states[sid].rated_bytes) for sid, (nets, _a) in subs.items()}

    if quotas:
        quotas.sync(snapshot())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    worker = threading.Thread(target=source.run, daemon=True)
    worker.start()
    print("ready", flush=True)
    deadline = time.monotonic() + args.seconds
    blocked: set[int] = set()
    while not stopping.is_set() and time.monotonic() < deadline:
        stopping.wait(0.05)
        events = []
        if quotas:
            quotas.sync(snapshot())
            events = quotas.check()
        while not pending.empty():
            events += pending.get()
        fresh = [ev.subscriber for ev, _ts in events if ev.kind == EV_BLOCK and ev.subscriber not in blocked]
        if fresh:
            enforcer.block([n for sid in set(fresh) for n in subs[sid][0]])
            blocked.update(fresh)
    time.sleep(0.2)  # what the kernel still holds in a datagram (flush timeout)
    source.stop()
    worker.join(5)
    source.close()
    print(json.dumps({"rated": {sid: allowance - engine.subscriber(sid).balance for sid, (_n, allowance) in subs.items()},
                      "kernel": enforcer.counters(), "blocked": sorted(blocked),
                      "quotas": enforcer.quotas() if args.quota else {}, "stats": source.stats(),
                      "quota_stats": quotas.counts if quotas else {}}), flush=True)
    enforcer.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
