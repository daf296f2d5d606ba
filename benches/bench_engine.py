#!/usr/bin/env python3
"""Engine throughput and memory: the compiled engine against its pure-Python twin.

For each subscriber count it builds one world (about 1,000 zone prefixes in
four zones, every subscriber an IPv4 /32 and most an IPv6 /64 or /56), a
realistic packet mix (70% IPv4, TCP/UDP/ICMP, 40..1500 bytes, both
directions, subscribers picked at random), pre-built into batches of 256,
then times ``Engine.process`` over it: best of ``--repeat`` runs. Memory per
subscriber is the growth of the process's resident set (/proc/self/statm)
while subscribers are added, measured in two steps: the subscribers alone (the
engine's per-subscriber state), then their addresses (tries and the control
plane's prefix index); and, computed, the engine's own C state per subscriber
slot (record, counters, dirty-list entry, allowance).

    .venv/bin/python benches/bench_engine.py                 # 1k, 100k, 1M
    .venv/bin/python benches/bench_engine.py --subscribers 1000 --markdown
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ext import EngineC, EnginePy, PacketBatch, ZoneRule
from ext.constants import PRICE_SCALE

T = 1_800_000_000 * 10 ** 9
BATCH = 256
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def zone_rules(rng: random.Random, n: int) -> list[ZoneRule]:
    rules = [ZoneRule("100.64.0.0/10", 0), ZoneRule("2001:db8:100::/40", 0),
             ZoneRule("198.18.0.0/15", 1), ZoneRule("2001:db8:198::/48", 1)]
    v4 = int(ipaddress.ip_address("198.18.0.0"))
    v6 = int(ipaddress.ip_address("2001:db8:198::"))
    seen = set()
    while len(rules) < n:
        if rng.random() < 0.7:
            plen = rng.choice([16, 18, 20, 22, 23, 24, 24, 24, 26, 28])
            net = (v4 + rng.randrange(1 << 17)) >> (32 - plen) << (32 - plen)
            text = str(ipaddress.ip_network((net, plen)))
        else:
            plen = rng.choice([52, 56, 60, 64])
            net = (v6 + (rng.randrange(1 << 16) << 64)) >> (128 - plen) << (128 - plen)
            text = str(ipaddress.IPv6Network((net, plen)))
        if text in seen:
            continue
        seen.add(text)
        if rng.random() < 0.1:  # some zones narrowed to a service
            rules.append(ZoneRule(text, rng.randrange(1, 4), 6, 443, 443))
        else:
            rules.append(ZoneRule(text, rng.randrange(1, 4)))
    return rules


def subscriber_addresses(i: int) -> tuple[str, str | None]:
    v4 = str(ipaddress.ip_address(int(ipaddress.ip_address("100.64.0.0")) + i))
    if i % 5 == 0:
        return v4, None
    if i % 2 and i < 65536:
        return v4, str(ipaddress.IPv6Network((int(ipaddress.ip_address("2001:db8:100::")) + (i << 72), 56)))
    return v4, str(ipaddress.IPv6Network((int(ipaddress.ip_address("2001:db8:100::")) + (i << 64), 64)))


def build_engine(cls, n_subs: int, rules: list[ZoneRule]):
    e = cls(4, 2)
    e.set_zones(rules)
    prices = [0, 0, 0, 0] + [PRICE_SCALE // 1000, PRICE_SCALE // 2000] * 6
    e.set_tariff(1, prices, [(1 << 2, 3)], [10 ** 6])
    e.set_timeline([0, T + 10 ** 9], [0, 1])
    # Subscribers first, then their addresses, so that the resident set's
    # growth separates the per-subscriber state from the address storage
    # (the tries and the control plane's prefix index).
    before = rss()
    for sid in range(1, n_subs + 1):
        e.add_subscriber(sid, 1, 10 ** 15, 0, [10 ** 9])
    middle = rss()
    for sid in range(1, n_subs + 1):
        v4, v6 = subscriber_addresses(sid)
        e.add_address(sid, v4)
        if v6:
            e.add_address(sid, v6)
        if sid % 100_000 == 0:
            say(f"    {sid:,} subscribers")
    return e, middle - before, rss() - middle


def make_batches(rng: random.Random, n_subs: int, rules: list[ZoneRule], n_packets: int,
                 train: float = 1.0) -> list[PacketBatch]:
    """``train``: mean number of back-to-back packets of one flow (1: every
    packet from a random subscriber, the cache's worst case; a TCP download
    through nfqueue arrives in trains of several packets)."""
    remotes4 = [int(ipaddress.ip_network(r.network).network_address) + 1 for r in rules if ":" not in r.network]
    remotes6 = [int(ipaddress.ip_network(r.network).network_address) + 1 for r in rules if ":" in r.network]
    batches = []
    batch = PacketBatch(BATCH, 128)
    ts = T
    left = 0
    for _ in range(n_packets):
        if left == 0:  # a new flow
            left = 1 if train <= 1 else int(rng.expovariate(1 / train)) + 1
            sid = rng.randrange(1, n_subs + 1)
            v4, v6 = subscriber_addresses(sid)
            proto = rng.choice([6, 6, 6, 17, 17, 1])
            sport, dport = rng.choice([443, 80, 53, 50000]), rng.choice([443, 80, 53, 50000])
            l4 = struct.pack("!HH", sport, dport) + bytes(16) if proto != 1 else bytes(8)
            v6_flow = v6 is not None and rng.random() >= 0.7
            if not v6_flow:
                local = int(ipaddress.ip_address(v4))
                remote = rng.choice(remotes4) if rng.random() < 0.8 else rng.randrange(1 << 32)
            else:
                local = int(ipaddress.ip_network(v6).network_address) + 7
                remote = rng.choice(remotes6) if rng.random() < 0.8 else rng.randrange(1 << 128)
        left -= 1
        size = rng.choice([40, 52, 64, 576, 1280, 1400, 1500])
        a, b = (local, remote) if rng.random() < 0.4 else (remote, local)
        if not v6_flow:
            hdr = struct.pack("!BBHHHBBHII", 0x45, 0, size, 0, 0, 64, proto, 0, a, b) + l4
        else:
            hdr = struct.pack("!IHBB", 6 << 28, size - 40, proto, 64) + a.to_bytes(16, "big") + b.to_bytes(16, "big") + l4
        ts += 1000
        batch.append(hdr, size, ts)
        if batch.full():
            batches.append(batch)
            batch = PacketBatch(BATCH, 128)
    if batch.n:
        batches.append(batch)
    return batches


def run(engine, batches: list[PacketBatch], repeat: int) -> float:
    """Best packets/s over ``repeat`` passes."""
    n = sum(b.n for b in batches)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for b in batches:
            engine.process(b)
        dt = time.perf_counter() - t0
        engine.drain()
        best = max(best, n / dt)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", default="1000,100000,1000000", help="comma-separated counts")
    ap.add_argument("--packets", type=int, default=1_000_000, help="packets per pass, compiled engine")
    ap.add_argument("--py-packets", type=int, default=30_000, help="packets per pass, Python twin")
    ap.add_argument("--zone-prefixes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train", type=float, default=8.0, help="mean packets per flow train in the second mix")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()
    if EngineC is None:
        ap.error("the compiled engine is not built (make build)")
    rng = random.Random(1)
    rules = zone_rules(rng, args.zone_prefixes)
    rows = []
    for n in (int(x) for x in args.subscribers.split(",")):
        say(f"== {n:,} subscribers, {len(rules)} zone prefixes")
        gc.collect()
        say("  building the compiled engine")
        c, c_rss, c_addr_rss = build_engine(EngineC, n, rules)
        say(f"  building {args.packets:,} packets (random, and in flow trains of {args.train})")
        batches = make_batches(rng, n, rules, args.packets)
        trains = make_batches(rng, n, rules, args.packets, args.train)
        say("  timing the compiled engine")
        c_pps = run(c, batches, args.repeat)
        c_train_pps = run(c, trains, args.repeat)
        c_state = c.bytes_per_subscriber()
        py_pps = None
        if n <= 100_000:
            say("  timing the Python twin")
            p, _, _ = build_engine(EnginePy, n, rules)
            py_batches = batches[: max(1, args.py_packets // BATCH)]
            py_pps = run(p, py_batches, 1)
            del p
        rows.append((n, c_pps, c_train_pps, py_pps, c_rss / n, c_addr_rss / n, c_state))
        del c, batches, trains
    base = rows[0][1]
    base_train = rows[0][2]
    head = ["subscribers", "compiled Mpps (random)", "ns/packet", "vs first row", "compiled Mpps (trains)",
            "vs first row", "twin kpps", "compiled/twin", "RSS B/sub (state)", "RSS B/sub (addresses)",
            "engine state B/sub"]
    lines = []
    for n, c_pps, c_train_pps, py_pps, per_rss, per_addr, per_state in rows:
        lines.append([f"{n:,}", f"{c_pps / 1e6:.2f}", f"{1e9 / c_pps:.0f}", f"{base / c_pps:.2f}x",
                      f"{c_train_pps / 1e6:.2f}", f"{base_train / c_train_pps:.2f}x",
                      f"{py_pps / 1e3:.1f}" if py_pps else "-", f"{c_pps / py_pps:.0f}x" if py_pps else "-",
                      f"{per_rss:.0f}", f"{per_addr:.0f}", f"{per_state:.0f}"])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
