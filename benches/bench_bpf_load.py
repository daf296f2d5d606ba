"""The eBPF data path at scale: loading 1M subscribers into the maps, the
memory they take, and the program's own cost per packet at 1k and 1M.

    sudo .venv/bin/python benches/bench_bpf_load.py [--subscribers 1000000] [--markdown] [--no-refunds]

Subscribers are bench_scale's: subscriber i has the IPv4 /32 ``v4_of(i)`` and
80% of them (i % 5 != 0) an IPv6 prefix ``v6_of(j)`` (65,279 /64s inside
DESIGN.md's 2001:db8:100::/48, then /128s). They go in through
``Maps.set_subscribers`` (CIDR text, parsed and batched in ext/bpfmaps.pyx);
the time is wall time of that call, and separately of making the strings.

Memory: the kernel's memlock figure of each map (``/proc/self/fdinfo``).

Per packet: BPF_PROG_TEST_RUN's own timing (``duration``, ns per run, in
the kernel around the program, no system call; on the 2-vCPU VM a program
that returns at once measures 20-22 ns, the test run's own cost per
repetition): "hot" repeats one frame 100k times (everything in cache), also
while a subscriber is blocked (uploads then look their destination up too);
"spread" runs one frame each for 20k random subscribers (repeat 1: closer to
a real mix of subscribers, but each figure includes the kernel's clock reads,
~20-40 ns). Nothing here is asserted. ``--no-refunds`` loads the programs without
refunds (what a kernel without bpf_cast_to_kern_ctx gets, and the pass path
as it was before them). ``--ab ROUNDS``: only the refunds' cost, both
variants loaded side by side with ``--small`` subscribers and run
interleaved, hot, the minimum of ROUNDS rounds each (single figures on a
shared VM move by tens of ns; interleaving puts both under the same noise).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import v4_of, v6_of  # noqa: E402

from ext.bpfmaps import GRANT_FREE, Maps  # noqa: E402
from ext.engine_py import ZoneRule  # noqa: E402

N_ZONES = 2
UPSTREAM = "198.18.0.2"


def frame4(src: str, dst: str, size: int = 64) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0, 64, 17, 0, ipaddress.ip_address(src).packed,
                     ipaddress.ip_address(dst).packed) + struct.pack("!HHHH", 40000, 5201, size - 20, 0)
    return bytes(12) + b"\x08\x00" + ip + bytes(size - 28)


def frame6(src: str, dst: str, size: int = 64) -> bytes:
    ip = struct.pack("!IHBB16s16s", 0x60000000, size - 40, 17, 64, ipaddress.ip_address(src).packed,
                     ipaddress.ip_address(dst).packed) + struct.pack("!HHHH", 40000, 5201, size - 40, 0)
    return bytes(12) + b"\x86\xdd" + ip + bytes(size - 48)


def host6(net: str) -> str:
    n = ipaddress.ip_network(net)
    return str(n.network_address + (2 if n.prefixlen < 128 else 0))


def layout(n: int):
    slots, prefixes = [], []
    j = 0
    for i in range(n):
        slots.append(i)
        prefixes.append(v4_of(i))
        if i % 5:
            j += 1
            slots.append(i)
            prefixes.append(v6_of(j))
    return slots, prefixes


def load(pin: str, n: int, n6: int, refunds: bool):
    maps = Maps.load(pin, max_slots=n, n_zones=N_ZONES, default_zone=1, max_hosts4=n, max_hosts6=max(n6, 1),
                     max_nets6_64=65536, max_nets4=16, max_nets6=16, refunds=refunds)
    assert maps.refunds == refunds, maps.refunds_error
    return maps


def free_grants(maps) -> None:
    view = maps.counters()
    for i in range(view.shape[0]):  # every grant free, through the mmap (the daemon writes only what changed)
        view[i, 1] = GRANT_FREE
    del view


def ab(n: int, rounds: int) -> None:
    """The refunds' cost per packet: both variants side by side, interleaved (see the module docstring)."""
    slots, prefixes = layout(n)
    loaded = {}
    try:
        for refunds in (False, True):
            pin = f"/sys/fs/bpf/tollgate-bench-{os.getpid()}-ab{int(refunds)}"
            Maps.unpin(pin)
            maps = loaded[refunds] = load(pin, n, len(prefixes) - n, refunds)
            maps.set_zones([ZoneRule("198.18.0.0/15", 0), ZoneRule("2001:db8:198::/48", 0)])
            maps.set_subscribers(slots, prefixes)
            free_grants(maps)
        cases = {"IPv4 /32, upload": (0, frame4(v4_of(7), UPSTREAM)),
                 "IPv6 /64, upload": (0, frame6(host6(v6_of(1)), "2001:db8:198::2")),
                 "IPv4 /32, download": (1, frame4(UPSTREAM, v4_of(7)))}
        best = {(c, r): None for c in cases for r in loaded}
        for _ in range(rounds):
            for c, (direction, f) in cases.items():
                for r, maps in loaded.items():  # ingress_ifindex 2: forwarded, as at egress a download is
                    t = maps.test_run(direction, f, 50_000, ingress_ifindex=2)[1]
                    best[(c, r)] = t if best[(c, r)] is None else min(best[(c, r)], t)
        print(f"| ns per packet, {n:,} subscribers (BPF_PROG_TEST_RUN, min of {rounds} interleaved rounds) | "
              "without refunds | with refunds | refunds' cost |")
        print("| --- | --- | --- | --- |")
        for c in cases:
            print(f"| hot, {c} | {best[(c, False)]} | {best[(c, True)]} | {best[(c, True)] - best[(c, False)]:+d} |")
        for maps in loaded.values():
            stats = maps.stats()
            assert stats["passed"][0] == rounds * len(cases) * 50_000 and stats["refunded"][0] == 0, stats
    finally:
        for r, maps in loaded.items():
            maps.close()
            Maps.unpin(f"/sys/fs/bpf/tollgate-bench-{os.getpid()}-ab{int(r)}")


def measure(n: int, refunds: bool = True) -> dict:
    pin = f"/sys/fs/bpf/tollgate-bench-{os.getpid()}-{n}"
    Maps.unpin(pin)
    t0 = time.perf_counter()
    slots, prefixes = layout(n)
    t_strings = time.perf_counter() - t0
    n6 = len(prefixes) - n
    t0 = time.perf_counter()
    maps = load(pin, n, n6, refunds)
    t_create = time.perf_counter() - t0
    try:
        maps.set_zones([ZoneRule("198.18.0.0/15", 0), ZoneRule("2001:db8:198::/48", 0)])
        t0 = time.perf_counter()
        maps.set_subscribers(slots, prefixes)
        t_load = time.perf_counter() - t0
        counts = maps.subscriber_count()
        t0 = time.perf_counter()
        free_grants(maps)
        t_grants = time.perf_counter() - t0
        memory = maps.map_memory()
        rng = random.Random(1)
        v6_subs = [(i, host6(p)) for i, p in zip(slots, prefixes) if ":" in p]
        cases = {
            "IPv4 /32 hash": frame4(v4_of(rng.randrange(n)), UPSTREAM),
            "IPv6 /64 hash": frame6(host6(v6_of(1)), "2001:db8:198::2"),
            "IPv6 /128 hash": frame6(v6_subs[-1][1], "2001:db8:198::2") if n6 > 65279 else None,
            "unknown (all lookups miss)": frame4("100.127.255.254", UPSTREAM),
        }
        hot = {}
        for name, f in cases.items():
            if f is not None:
                maps.test_run(0, f, 1000)
                hot[name] = min(maps.test_run(0, f, 100_000)[1] for _ in range(3))
        # while anyone is blocked, an upload's destination is looked up too (a packet to a blocked subscriber
        # is refused before its sender is charged)
        maps.set_blocked(n - 1, True)
        for name in ("IPv4 /32 hash", "IPv6 /64 hash"):
            maps.test_run(0, cases[name], 1000)
            hot[f"{name}, a subscriber blocked"] = min(maps.test_run(0, cases[name], 100_000)[1] for _ in range(3))
        maps.set_blocked(n - 1, False)
        spread = []
        for _ in range(20_000):
            i = rng.randrange(n)
            spread.append(maps.test_run(0, frame4(v4_of(i), UPSTREAM), 1)[1])
        spread.sort()
        stats = maps.stats()
        assert stats["dropped"][0] == 0 and stats["noslot"][0] == 0, stats
        return {"n": n, "prefixes": len(prefixes), "counts": counts, "t_strings": t_strings, "t_create": t_create,
                "t_load": t_load, "t_grants": t_grants, "memory": memory, "hot": hot,
                "spread_median": spread[len(spread) // 2], "spread_p99": spread[int(len(spread) * 0.99)]}
    finally:
        maps.close()
        Maps.unpin(pin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--refunds", action=argparse.BooleanOptionalAction, default=True,
                    help="the programs with refunds (default) or without (--no-refunds)")
    ap.add_argument("--ab", type=int, metavar="ROUNDS", help="only the refunds' cost: both variants, interleaved")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (bpf)")
    if args.ab:
        ab(args.small, args.ab)
        return
    results = [measure(args.small, args.refunds), measure(args.subscribers, args.refunds)]
    mib = 1 << 20
    print("| subscribers | prefixes (/32, /64, /128) | strings | load (set_subscribers) | "
          "maps created | grants via mmap | map memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        c = r["counts"]
        mem = r["memory"]
        print(f"| {r['n']:,} | {r['prefixes']:,} ({c['tg_sub4']:,}, {c['tg_sub6_64']:,}, {c['tg_sub6']:,}) | "
              f"{r['t_strings']:.2f} s | {r['t_load']:.2f} s | {r['t_create']:.2f} s | {r['t_grants']:.2f} s | "
              f"{sum(mem.values()) / mib:.0f} MiB (counters {mem['tg_counters'] / mib:.0f}, "
              f"sub4 {mem['tg_sub4'] / mib:.0f}, sub6 {mem['tg_sub6'] / mib:.0f}, "
              f"sub6_64 {mem['tg_sub6_64'] / mib:.0f}) |")
    print()
    print(f"| program cost per packet (ns, BPF_PROG_TEST_RUN, {'with' if args.refunds else 'without'} refunds) | " + " | ".join(f"{r['n']:,} subscribers"
                                                                              for r in results) + " |")
    print("| --- | " + " | ".join("---" for _ in results) + " |")
    for name in results[-1]["hot"]:
        print(f"| hot, {name} | " + " | ".join(str(r["hot"].get(name, "-")) for r in results) + " |")
    print("| spread over 20k random subscribers, IPv4, median / p99 | "
          + " | ".join(f"{r['spread_median']} / {r['spread_p99']}" for r in results) + " |")


if __name__ == "__main__":
    main()
