"""The eBPF start's binding of every subscriber's networks at scale (``EbpfSource._begin``): the
subscriber table's networks handed to the maps, and the table's ``all_networks`` (the nft restore's list).

    sudo .venv/bin/python benches/bench_bind_networks.py [--subscribers 1000000] [--rounds 3]

Subscribers are bench_scale's (``bulk_rows``: the IPv4 /32 ``v4_of(i)``, for 80% an IPv6 prefix in
2001:db8:100::/48), in a ``SubscriberTable`` filled as a start fills it (chunks of 10k). The maps are
loaded (not attached) with ``max_slots`` = subscribers + 64 and one zone in a throwaway pin directory,
unpinned after. Each round binds into the same maps (a rebind: the same work as a first bind, the
entries replaced); wall time per round, the best of ``--rounds``. Nothing is asserted.

- ``strs``: ``networks_by_id()`` (a str per subscriber decoded from the arena) then
  ``Maps.set_subscriber_networks(sids, texts)``, as the start did before it bound from the arena;
- ``arena``: ``SubscriberTable.networks_arena()`` handed to ``Maps.set_subscriber_networks_arena`` and the
  ascending ids taken from the presence bytes (what ``_begin`` keeps), when this tree has it;
- ``all_networks``: ``SubscriberTable.all_networks()``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import compress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PIN = "/sys/fs/bpf/tollgate-arena-test"
CHUNK = 10_000


def table_of(n: int):
    from bench_scale import bulk_rows
    from gateway.subscriber_table import SubscriberTable

    table = SubscriberTable()
    rows = list(bulk_rows(n))
    for lo in range(0, n, CHUNK):
        chunk = rows[lo:lo + CHUNK]
        table.fill([r[0] for r in chunk], [r[1] for r in chunk], ["bulk"] * len(chunk),
                   [f"{r[2]}/32 {r[3]}" if r[3] else f"{r[2]}/32" for r in chunk], [None] * len(chunk))
    return table


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid():
        raise SystemExit("root is needed (the maps are loaded)")
    from ext.bpfmaps import Maps

    table = table_of(args.subscribers)
    Maps.unpin(PIN)
    maps = Maps.load(PIN, max_slots=args.subscribers + 64, n_zones=1, default_zone=0)
    try:
        def strs():
            sids, texts = table.networks_by_id()
            maps.set_subscriber_networks(sids, texts)

        print(f"{args.subscribers} subscribers, best of {args.rounds}")
        print(f"strs: {best(strs, args.rounds):.3f} s")
        if hasattr(maps, "set_subscriber_networks_arena"):
            def arena():
                with table.networks_arena() as (data, words, present):
                    maps.set_subscriber_networks_arena(data, words, present)
                    list(compress(range(len(present)), present))

            print(f"arena: {best(arena, args.rounds):.3f} s")
        print("bound:", maps.subscriber_count())
        print(f"all_networks: {best(table.all_networks, args.rounds):.3f} s")
    finally:
        maps.close()
        Maps.unpin(PIN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
