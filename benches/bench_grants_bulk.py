#!/usr/bin/env python3
"""The start's grants without a kernel: ``GrantKeeper.refresh`` one by one
against ``GrantKeeper.refresh_many`` (ext/grants.pyx, in C) for N fresh
subscribers (grants 0, nothing used) of the lab's tariff (local free,
external priced; no buckets), on maps laid out as the real ones in a
bytearray. CPU seconds of this process (``time.process_time``), per
subscriber; both give the same grants (checked here on the sample the
Python refresh does, and in tests/unit/test_grants_bulk.py).

    .venv/bin/python benches/bench_grants_bulk.py --subscribers 1000000 --sample 20000
"""

from __future__ import annotations

import argparse
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ext  # noqa: E402
from gateway.daemon.grants import GRANT_FREE, GrantKeeper  # noqa: E402

N_ZONES = 2  # local (free), external (priced): the lab's


class BufMaps:
    def __init__(self, slots: int) -> None:
        self.n_zones = N_ZONES
        self.n_counters = slots * N_ZONES * 2
        self.buf = bytearray(self.n_counters * 64)
        self.q = memoryview(self.buf).cast("Q")

    def counters(self):
        return memoryview(self.buf).cast("Q", (self.n_counters, 8))

    def _i(self, sid, z, d):
        return (sid * N_ZONES + z) * 2 + d

    def grant(self, sid, z, d):
        return self.q[8 * self._i(sid, z, d) + 1]

    def set_grant(self, sid, z, d, n):
        if not 0 <= n <= GRANT_FREE:
            raise ValueError(n)
        self.q[8 * self._i(sid, z, d) + 1] = n

    def counter(self, sid, z, d):
        return SimpleNamespace(used=self.q[8 * self._i(sid, z, d)])


def world(n: int):
    e = ext.EngineC(N_ZONES, 1, default_zone=1)
    e.set_tariff(0, [0, 0, 10_000, 10_000])  # 0.01 per MB either way outside, local free
    ids = array("q", range(1, n + 1))
    e.add_subscribers(ids, array("q", [0] * n), array("q", [10_000] * n), array("q", [0] * n), [()] * n, [None] * n)
    maps = BufMaps(n + 1)
    charged = memoryview(bytearray(maps.n_counters * 16)).cast("Q")
    refunds = memoryview(bytearray(maps.n_counters * 16)).cast("Q")
    gw = SimpleNamespace(acct=SimpleNamespace(engine=e))
    keeper = GrantKeeper(gw, maps, lambda i: charged[2 * i] + refunds[2 * i], settled_views=(charged, refunds))
    keeper.masks[0] = []
    return e, maps, keeper


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=20_000, help="subscribers the Python refresh does")
    args = ap.parse_args()
    n, k = args.subscribers, min(args.sample, args.subscribers)
    _e, maps, keeper = world(n)
    now = time.time_ns()
    t = time.process_time()
    for sid in range(1, k + 1):
        keeper.refresh(sid, now)
    one = (time.process_time() - t) / k
    python_grants = bytes(maps.buf[:(k + 1) * N_ZONES * 2 * 64])
    _e, maps, keeper = world(n)
    t = time.process_time()
    events = keeper.refresh_many(list(range(1, n + 1)), now)
    bulk = (time.process_time() - t) / n
    assert events == []
    assert bytes(maps.buf[:(k + 1) * N_ZONES * 2 * 64]) == python_grants, "refresh_many differs from refresh"
    print("| subscribers | refresh one by one (Python) | refresh_many (C) | everyone, one by one -> in bulk |")
    print("| --- | --- | --- | --- |")
    print(f"| {n:,} | {one * 1e6:.1f} us CPU each | {bulk * 1e6:.2f} us CPU each | {one * n:.1f} s -> {bulk * n:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
