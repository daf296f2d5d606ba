"""The grant keeper of the eBPF data path: money in the control plane, bytes
in the kernel.

The tc program (ext/bpf/tollgate.bpf.c) passes a packet of a (slot, zone,
direction) only while ``used + length <= grant``; this module decides the
grants, from the engine (the one place that knows prices: ``quote_bytes``,
``affordable_bytes``). The slot of a subscriber is its id.

The rule it keeps: the cost of everything the kernel may still pass for a
subscriber, ``sum over its (zone, direction) of quote(grant - used)``, never
exceeds ``balance + credit`` (``used`` as last settled, charged or refunded by
the kernel (the source's ``settled``): bytes the kernel passed since are
inside the grant, so inside that sum). How:

* **Buckets.** A free-volume or tier bucket that covers several (zone,
  direction) pairs is counted in the grant of one of them only: the pair with
  the lowest price now (``quote`` of a volume without buckets). If another
  pair draws on it first, that pair pays less than its grant assumed and the
  owner pays its own, lower or equal, price for what it lost: the total stays
  within the budget (cost change ``(p_owner - p_other) * drawn <= 0``). A
  bucket dearer than the price after it (a tier: the first megabytes cost
  more) is the other way round: every pair it covers counts on it, since a
  pair drawing it pays more than its price alone, never more than that quote.
* **Budget.** What is not committed to outstanding grants (``spare``) is
  shared out in equal parts among the pairs that need more (below their
  low-water mark: half a second of their recent rate, at least
  ``LOW_MIN``), each raised to at most ``SLICE_SECONDS`` of its rate (at least
  ``SLICE_MIN``), so that one busy direction does not hold the whole balance
  while another starves. When the spare cannot pay what the needy pairs
  want, the outstanding grants of the others are cut to what their own rate
  needs (at least ``RECLAIM_KEEP``): the money goes where the traffic is
  (:meth:`_reclaim`). Otherwise grants are lowered only at a time-slot
  boundary (:meth:`freeze`). A volume limit is shared the same way among the
  pairs of the volume zones (not reclaimed).
* **Free pairs** (nothing they pass would ever cost: ``affordable_bytes`` is
  GRANT_FREE) get GRANT_FREE.
* **Money out.** When the kernel refused a packet of a pair (its
  ``dropped_packets`` moved) and what the subscriber can still be granted
  there is less than the packets it refused, the engine blocks it
  (``BLOCK_LIMIT``, or ``BLOCK_VOLUME`` where the volume limit is what is
  short), as the inline engine does at the breaching packet, and sets the
  maps' blocked flag in the same step; the block event then puts it into the
  nft blocked set (block page, DNS, portal). Every other block and unblock
  reaches the maps' flag through the policy pusher's block step (before the
  nft block, after the nft unblock: gateway/sources/ebpf.py), never through a
  refresh, which would clear it before nft lets the subscriber through. A top-up lifts the block in the engine (the change
  follower), and the keeper, watching blocked and refused subscribers every
  ``WATCH_INTERVAL``, raises the grants.
* **Time slots.** At a slot boundary every finite grant (and every free one
  that is not free in the new slot) is shrunk to what the kernel has used
  (:meth:`freeze`), the counters are charged at the old slot, and everyone is
  granted again at the new prices, in one pass.

Lowering a grant races with a packet that read the old grant on another CPU
and has not yet advanced ``used``: at most one packet per CPU passes past the
shrunk grant (and is charged at the new slot's price). Raising never races.

Locks: called by the eBPF source's thread with the gateway's ``engine_lock``
held (engine reads and the block); the maps' stores are single atomic
64-bit writes.

Many at once (a start, a time-slot boundary: :meth:`refresh_many`): the
subscribers none of whose pairs has a rate are refreshed in C (ext/grants.pyx ``refresh_idle``, this rule written a second
time for that case, tests/unit/test_grants_bulk.py holding the two equal),
the others here.

The grants are read from the maps, not kept here too: the kernel's are the
ones in force (a restart's, the previous process's; a subscriber that left
and came back, its old ones), and a copy of four grants a subscriber cost a
million subscribers some 400 MB and their loading 8 s of the start.
"""

from __future__ import annotations

import logging
import time

from ext.constants import BLOCK_LIMIT, BLOCK_VOLUME

try:
    from ext.grants import refresh_idle  # refresh_many's C half
except ImportError:  # not built: one by one
    refresh_idle = None

log = logging.getLogger("tollgate.daemon.grants")

GRANT_FREE = (1 << 64) - 1
UNIT = 1 << 32  # bytes quoted to rank pairs by price
BIG = 1 << 62  # bytes quoted to price what a free grant can still cost (its tier buckets)
LOW_MIN = 256 * 1024  # a pair below this many outstanding bytes asks for more
SLICE_MIN = 1 << 20  # ... and is raised to at least this many
LOW_SECONDS = 0.5
SLICE_SECONDS = 2.0
RATE_ALPHA = 0.3  # weight of the newest poll in a pair's rate
RECLAIM_KEEP = 16 * 1024  # what an idle pair keeps when a busy one needs the money it holds


class GrantKeeper:
    def __init__(self, gw, maps, used_of, settled_views=None) -> None:
        """``used_of(index)``: the counter's ``used`` as last settled (charged, or refunded: the source's
        ``settled``). ``settled_views``: ``(charged, refunds)``, buffers of two uint64 a counter such that
        ``used_of(i) == charged[2i] + refunds[2i]`` (the source's), for :meth:`refresh_many` in C; None: it
        refreshes one by one."""
        self.gw = gw
        self.maps = maps
        self.used_of = used_of
        self.settled_views = settled_views
        self.nz = maps.n_zones
        self.pairs = [(z, d) for z in range(self.nz) for d in (0, 1)]
        self.rate: dict[int, float] = {}  # counter index -> bytes per second, recent
        self.refused: set[int] = set()  # subscribers refused for want of money or volume: watched
        self.masks: dict[int, list] = {}  # engine tariff id -> [(zone mask, direction mask)] of its buckets
        self.stats = {"raises": 0, "money_out_blocks": 0, "freezes": 0, "reclaims": 0}

    # ---- what the source tells ------------------------------------------------

    def index(self, sid: int, zone: int, direction: int) -> int:
        return (sid * self.nz + zone) * 2 + direction

    def observe(self, index: int, nbytes: int, seconds: float) -> None:
        if seconds > 0:
            old = self.rate.get(index, 0.0)
            self.rate[index] = old + RATE_ALPHA * (nbytes / seconds - old)

    def forget(self, sid: int) -> None:
        for z, d in self.pairs:
            i = self.index(sid, z, d)
            self.rate.pop(i, None)
        self.refused.discard(sid)

    # ---- the buckets of a tariff ------------------------------------------------

    def bucket_masks(self, tid: int) -> list:
        masks = self.masks.get(tid)
        if masks is None:
            acct = self.gw.acct
            name, discount = next(k for k, v in acct.engine_tariffs.items() if v == tid)
            masks = self.masks[tid] = [(b[0], b[1]) for b in acct.config.tariffs[name].engine_buckets(discount)]
        return masks

    # ---- grants ---------------------------------------------------------------------

    def _store(self, index: int, sid: int, zone: int, direction: int, grant: int) -> None:
        if self.maps.grant(sid, zone, direction) != grant:
            self.maps.set_grant(sid, zone, direction, grant)

    def _views(self, sid: int, state, now: int) -> dict:
        """Per pair, the bucket bytes its grant may count on (see the module docstring)."""
        masks = self.bucket_masks(state.tariff)
        if not masks:
            return {p: [] for p in self.pairs}
        engine = self.gw.acct.engine
        zeros = [0] * len(masks)
        unit = {(z, d): engine.quote_bytes(sid, z, d, UNIT, now, zeros) for z, d in self.pairs}
        views = {p: list(zeros) for p in self.pairs}
        for b, (zmask, dmask) in enumerate(masks):
            covered = [(z, d) for z, d in self.pairs if zmask >> z & 1 and dmask >> d & 1]
            left = state.allowance[b]
            if not covered or left <= 0:
                continue
            owner = min(covered, key=lambda p: unit[p])  # the first of the cheapest
            alone = [left if k == b else 0 for k in range(len(masks))]
            for p in covered:
                # the owner counts on the bucket; so does every pair for which drawing it costs more than not
                # (a tier dearer than the price after it: first MB at 3, then 1): whoever draws it, a pair's
                # cost lies between its two quotes (linear in what it draws), so the dearer one bounds it
                if p == owner or engine.quote_bytes(sid, *p, left, now, alone) > engine.quote_bytes(sid, *p, left, now,
                                                                                                     zeros):
                    views[p][b] = left
        return views

    def refresh(self, sid: int, now: int, refused: dict | None = None) -> list:
        """Bring ``sid``'s grants up to date; ``refused``:
        ``{(zone, direction): (packets, bytes)}`` the kernel refused it since
        the last look. Returns engine events (a money-out block)."""
        engine = self.gw.acct.engine
        state = engine.subscriber(sid)
        blocked = bool(state.blocked)  # the maps' flag is the block step's (see the module docstring)
        views = self._views(sid, state, now)
        vol_zones = engine.volume_zones if state.volume_left is not None else 0
        priced, committed, outstanding = [], {}, {}
        vol_out = 0
        for z, d in self.pairs:
            i = self.index(sid, z, d)
            view = views[(z, d)] or None
            used = self.used_of(i)
            if engine.affordable_bytes(sid, z, d, now, 0, view) == GRANT_FREE:
                self._store(i, sid, z, d, GRANT_FREE)
                committed[(z, d)] = engine.quote_bytes(sid, z, d, BIG, now, view)
                continue
            grant = self.maps.grant(sid, z, d)
            if grant == GRANT_FREE:  # free before, priced now (a tariff or slot change): shrink to what is used
                grant = max(used, self.maps.counter(sid, z, d).used)
                self._store(i, sid, z, d, grant)
            out = max(0, grant - used)
            outstanding[(z, d)] = out
            committed[(z, d)] = engine.quote_bytes(sid, z, d, out, now, view)
            if vol_zones >> z & 1:
                vol_out += out
            priced.append((z, d))
        spare = state.balance + state.credit - sum(committed.values())
        vol_spare = None if state.volume_left is None else state.volume_left - vol_out
        needy = []
        for p in priced:
            i = self.index(sid, *p)
            rate = self.rate.get(i, 0.0)
            low = max(LOW_MIN, rate * LOW_SECONDS) if rate > 0 else RECLAIM_KEEP  # an idle pair keeps a little
            if outstanding[p] < low or (refused and p in refused):
                needy.append(p)
        if needy and len(needy) < len(priced):
            spare = self._reclaim(sid, now, views, priced, needy, outstanding, committed, spare)
        events = []
        n_vol = sum(1 for z, _d in needy if vol_zones >> z & 1)
        out_of = None
        for k, (z, d) in enumerate(needy):
            i = self.index(sid, z, d)
            view = views[(z, d)] or None
            share = max(0, spare) // (len(needy) - k)
            total = engine.affordable_bytes(sid, z, d, now, committed[(z, d)] + share, view)
            want = max(outstanding[(z, d)], int(max(SLICE_MIN, self.rate.get(i, 0.0) * SLICE_SECONDS)))
            new_out = min(total, want)
            by_volume = False
            if vol_zones >> z & 1 and vol_spare is not None:
                vshare = max(0, vol_spare) // max(1, n_vol)
                n_vol -= 1
                if outstanding[(z, d)] + vshare < new_out:
                    new_out, by_volume = outstanding[(z, d)] + vshare, True
                vol_spare -= max(0, new_out - outstanding[(z, d)])
            if new_out > outstanding[(z, d)]:
                self._store(i, sid, z, d, self.used_of(i) + new_out)
                self.stats["raises"] += 1
                cost = engine.quote_bytes(sid, z, d, new_out, now, view)
                spare -= cost - committed[(z, d)]
            if refused and (z, d) in refused:
                packets, nbytes = refused[(z, d)]
                if packets and new_out < -(-nbytes // packets):  # what it refused would still not fit
                    out_of = BLOCK_VOLUME if by_volume else BLOCK_LIMIT
        if out_of is not None and not state.blocked:
            events = engine.block(sid, out_of)
            self.stats["money_out_blocks"] += 1
            self.maps.set_blocked(sid, True)  # before the pusher's nft block: nothing more is metered
            log.info("subscriber %s: %s out, blocked (the kernel refused its packets at the grant)", sid,
                     "volume" if out_of == BLOCK_VOLUME else "money")
        if out_of is not None or blocked:
            self.refused.add(sid)
        else:
            self.refused.discard(sid)
        return events

    def refresh_many(self, sids, now: int) -> list:
        """:meth:`refresh` of each of ``sids`` (no refusals: a start's grants, a time-slot boundary's):
        the idle ones (no pair with a rate) in C (ext/grants.pyx ``refresh_idle``: the same grants, some
        200 times faster: a million took 30-50 s here), the others one by one. Returns engine events."""
        left = sids
        if self.settled_views is not None and refresh_idle is not None:
            charged, refunds = self.settled_views
            counters = self.maps.counters()
            try:
                left, raises, reclaims = refresh_idle(self.gw.acct.engine, counters, charged, refunds, sids, now,
                                                      self.nz, SLICE_MIN, RECLAIM_KEEP, self.refused, self.rate)
            finally:
                counters.release()  # before the maps unmap the counters (close)
            self.stats["raises"] += raises
            self.stats["reclaims"] += reclaims
        events = []
        for sid in left:
            events += self.refresh(sid, now)
        return events

    def _reclaim(self, sid, now, views, priced, needy, outstanding, committed, spare) -> int:
        """Pairs that need more and a spare that cannot pay for it: the
        outstanding grants of the others (idle ones hold a slice each) are cut
        to what their recent rate needs (at least ``RECLAIM_KEEP``), so that
        the money goes where the traffic is. Returns the new spare."""
        engine = self.gw.acct.engine
        want = 0
        for z, d in needy:
            i = self.index(sid, z, d)
            size = int(max(SLICE_MIN, self.rate.get(i, 0.0) * SLICE_SECONDS))
            want += engine.quote_bytes(sid, z, d, max(size, outstanding[(z, d)]), now, views[(z, d)] or None) \
                - committed[(z, d)]
        if spare >= want:
            return spare
        for z, d in priced:
            if (z, d) in needy:
                continue
            i = self.index(sid, z, d)
            keep = int(max(RECLAIM_KEEP, self.rate.get(i, 0.0) * LOW_SECONDS))
            if outstanding[(z, d)] <= keep:
                continue
            # lowering races with a packet on another CPU that read the old grant: at most one each passes
            live = self.maps.counter(sid, z, d).used
            used = self.used_of(i)
            grant = max(live, used + keep)
            if grant >= self.maps.grant(sid, z, d):
                continue
            self._store(i, sid, z, d, grant)
            self.stats["reclaims"] += 1
            out = grant - used
            cost = engine.quote_bytes(sid, z, d, out, now, views[(z, d)] or None)
            spare += committed[(z, d)] - cost
            committed[(z, d)], outstanding[(z, d)] = cost, out
        return spare

    def freeze(self, sids, next_now: int) -> None:
        """A time-slot boundary: shrink every finite grant to what the kernel
        has used, and every free one that is not free at ``next_now`` (the new
        slot), so that nothing more passes at the old slot's prices."""
        engine = self.gw.acct.engine
        for sid in sids:
            for z, d in self.pairs:
                i = self.index(sid, z, d)
                grant = self.maps.grant(sid, z, d)
                if grant == GRANT_FREE:
                    try:
                        if engine.affordable_bytes(sid, z, d, next_now, 0) == GRANT_FREE:
                            continue
                    except Exception:  # noqa: BLE001 - gone meanwhile: shrink all the same
                        pass
                used = self.maps.counter(sid, z, d).used
                if grant > used:
                    self._store(i, sid, z, d, used)
        self.stats["freezes"] += 1

    def next_boundary(self, now: int) -> int | None:
        """The next time-slot start after ``now`` (ns), from the config's schedule."""
        cfg = self.gw.config
        if len(cfg.schedule.slots) < 2:
            return None
        day = 86400 * 10 ** 9
        starts, slots = cfg.schedule.timeline(now - day, now + 2 * day)
        for t, s, prev in zip(starts[1:], slots[1:], slots):
            if t > now and s != prev:
                return t
        return None

    def now_ns(self) -> int:
        return time.time_ns()
