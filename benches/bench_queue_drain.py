#!/usr/bin/env python3
"""How fast can a consumer empty a full queue? Tollgate's reader vs Python NetfilterQueue.

On a 2-vCPU machine the sender competes with the consumer for the CPU, so a
live small-packet test measures the sender as much as the consumer. Here the
two are apart in time: the consumer binds the queue but does not read; the
sender (benches/udpblast.c, 64-byte IP packets) fills the queue and stops;
then the consumer is let go and timed until it has given a verdict to every
waiting packet (count read from /proc/net/netfilter/nfnetlink_queue). Both
consumers get the same queue length, socket buffer and copy range. The
verdict re-injects each packet, so the kernel's forwarding work is inside
both timings.

    sudo .venv/bin/python benches/bench_queue_drain.py [--seconds 0.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.lab import UPSTREAM4, lab_down, lab_up  # noqa: E402

PREFIX = "tgdrain"
BLAST = Path(tempfile.gettempdir()) / "tollgate-udpblast"
QUEUE_LEN = 1 << 20
SOCK_BUF = 256 << 20

TOLLGATE = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from ext import EngineC, ZoneRule
from ext.nfqueue import QueueReader
e = EngineC(2, 1)
e.set_zones([ZoneRule("100.64.0.0/10", 0)])
e.set_tariff(0, [0, 0, 1, 1])
e.add_subscriber(1, 0, 0 if {{drop}} else 10 ** 15)  # no balance: blocked, every verdict a drop
e.add_address(1, "100.64.1.2/32")
r = QueueReader(0, e, batch_size=64, queue_maxlen={QUEUE_LEN}, rcvbuf={SOCK_BUF}, fail_open=False)
print("bound", flush=True)
n = int(sys.stdin.readline())
t0 = time.perf_counter()
r.run(stop_after_packets=n)
print(n / (time.perf_counter() - t0), flush=True)
"""

NETFILTERQUEUE = f"""
import sys, time
from netfilterqueue import NetfilterQueue
count = 0
def accept(pkt):
    global count
    pkt.drop() if {{drop}} else pkt.accept()
    count += 1
q = NetfilterQueue()
q.bind(0, accept, max_len={QUEUE_LEN}, range=128, sock_len={SOCK_BUF})
print("bound", flush=True)
n = int(sys.stdin.readline())
t0 = time.perf_counter()
while count < n:
    q.run(block=False)
print(n / (time.perf_counter() - t0), flush=True)
"""


def ns(name: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *cmd], capture_output=True, text=True, **kw)


def waiting() -> int:
    fields = ns("gw", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
    return int(fields[2]) if len(fields) > 2 else 0


def drain_rate(script: str, seconds: float, drop: bool) -> tuple[float, int]:
    code = script.replace("{drop}", str(drop))
    consumer = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-c", code],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert consumer.stdout.readline().strip() == "bound"
        ns("s1", str(BLAST), UPSTREAM4, "9", str(seconds), "36", timeout=seconds + 30)
        n = waiting()
        consumer.stdin.write(f"{n}\n")
        consumer.stdin.flush()
        rate = float(consumer.stdout.readline())
        consumer.wait(timeout=60)
        return rate, n
    finally:
        if consumer.poll() is None:
            consumer.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="how long the sender fills the queue")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--verdict", choices=("accept", "drop"), default="accept",
                    help="accept re-injects every packet (the kernel forwards it inside the verdict call); "
                         "drop leaves only the queue and the consumer")
    args = ap.parse_args()
    drop = args.verdict == "drop"
    subprocess.run(["gcc", "-O2", "-o", str(BLAST), str(REPO / "benches" / "udpblast.c")], check=True)
    lab_down(PREFIX)
    lab_up(1, PREFIX)
    results = {}
    try:
        ns("gw", "iptables-nft", "-A", "FORWARD", "-s", "100.64.0.0/10", "-j", "NFQUEUE", "--queue-num", "0")
        for name, script in (("Tollgate reader (C, batched)", TOLLGATE),
                             ("Python NetfilterQueue (one callback per packet)", NETFILTERQUEUE)):
            runs = [drain_rate(script, args.seconds, drop) for _ in range(args.repeat)]
            results[name] = max(r for r, _n in runs), [n for _r, n in runs]
            print(f"{name}: best {results[name][0] / 1e3:.0f} kpps over {args.repeat} drains of "
                  f"{', '.join(str(n) for n in results[name][1])} queued packets", file=sys.stderr)
    finally:
        lab_down(PREFIX)
    (tg, _), (nfq, _) = results.values()
    print("| consumer | verdict | packets drained per second (best) | packets queued per drain |\n|---|---|---|---|")
    for name, (rate, ns_) in results.items():
        print(f"| {name} | {args.verdict} | {rate / 1e3:.0f} k | {min(ns_):,}-{max(ns_):,} |")
    print(f"\nverdict {args.verdict}: Tollgate drains a full queue {tg / nfq:.1f}x as fast as Python NetfilterQueue.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
