#!/usr/bin/env python3
"""Inline data plane, side by side in one run (root; builds its own lab).

Through the lab's gateway, three ways: bare forwarding; Tollgate
(``tollgate run``: batched nfqueue reader + compiled engine + nftables); and
a baseline of Python NetfilterQueue with one callback per packet accepting
everything. For each: TCP bulk (iperf3, Gbit/s at the receiver) and small UDP
(iperf3, 64-byte IP packets, packets/s the receiver got), plus the queue's
own drop counters from /proc/net/netfilter/nfnetlink_queue. Then block
latency: subscribers are run out of money again and again and the gateway
reports the time from the breaching packet to the kernel set, p50 and p99.

    .venv/bin/python benches/bench_dataplane.py [--seconds 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.lab import UPSTREAM4, lab_down, lab_up  # noqa: E402

PREFIX = "tgbench"
NFQ_BASELINE = """
import signal, sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(0, lambda pkt: pkt.accept(), max_len=8192)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
q.run()
"""


def ns(name: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *cmd], capture_output=True, text=True,
                          timeout=timeout)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def iperf(args: list[str], seconds: float) -> dict:
    out = ns("s1", "iperf3", "-c", UPSTREAM4, "-t", str(seconds), "--json", *args, timeout=seconds + 30)
    return json.loads(out.stdout)


def tcp_gbps(seconds: float) -> float:
    return iperf([], seconds)["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_pps(seconds: float) -> tuple[float, float]:
    res = iperf(["-u", "-b", "0", "-l", "36"], seconds)["end"]["sum"]  # 36 + 8 + 20 = 64 IP bytes
    received = res["packets"] - res["lost_packets"]
    return received / res["seconds"], res["lost_percent"]


def queue_drops() -> tuple[int, int]:
    text = ns("gw", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
    # queue, portid, waiting, copy mode, copy range, queue dropped, user dropped, id, 1
    return (int(text[5]), int(text[6])) if len(text) >= 7 else (0, 0)


def measure(label: str, seconds: float) -> dict:
    say(f"  {label}: TCP bulk")
    gbps = tcp_gbps(seconds)
    say(f"  {label}: small UDP")
    pps, lost = udp_pps(seconds)
    qd, ud = queue_drops()
    return {"label": label, "tcp_gbps": gbps, "udp_pps": pps, "udp_lost_percent": lost,
            "queue_dropped": qd, "user_dropped": ud}


def config(n: int, balance: str) -> str:
    subs = "".join(f'[[subscriber]]\nname = "s{i}"\ntariff = "t"\nbalance = "{balance}"\n'
                   f'addresses = ["100.64.{i}.2/32", "2001:db8:100:{i:x}::/64"]\n' for i in range(1, n + 1))
    return ('[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10", "2001:db8:100::/48"]\n'
            '[[tariff]]\nname = "t"\nprice_unit = "GB"\n[tariff.prices]\nexternal = "0.01"\n' + subs)


def start_gateway(work: Path, cfg: str, db: str) -> subprocess.Popen:
    (work / "t.toml").write_text(cfg)
    proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-m", "gateway.cli", "run",
                             "-c", str(work / "t.toml"), "--db", db], cwd=REPO,
                            stdout=open(work / "gw.log", "a"), stderr=subprocess.STDOUT)
    for _ in range(100):
        if ns("gw", "curl", "-s", "-m", "1", "http://127.0.0.1:8080/healthz").returncode == 0:
            return proc
        time.sleep(0.2)
    raise RuntimeError((work / "gw.log").read_text()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def block_latency(work: Path, rounds: int) -> dict:
    """Run 4 subscribers out of money ``rounds`` times each; the gateway times each block."""
    db = str(work / "lat.db")
    gw = start_gateway(work, config(4, "0.0001").replace('"0.01"', '"10.00"'), db)  # 0.0001 EUR = 10 kB
    try:
        for r in range(rounds):
            procs = [subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s{i}", "curl", "-s", "-m", "2", "-o",
                                       "/dev/null", f"http://{UPSTREAM4}/big.bin"]) for i in range(1, 5)]
            for p in procs:
                p.wait()
            for i in range(1, 5):
                subprocess.run([sys.executable, "-m", "gateway.cli", "topup", f"s{i}", "0.0001", "-c",
                                str(work / "t.toml"), "--db", db], cwd=REPO, capture_output=True)
            time.sleep(1.2)  # the flusher applies the top-ups
        return json.loads(ns("gw", "curl", "-s", "http://127.0.0.1:8080/healthz").stdout)["block_latency_ms"]
    finally:
        stop(gw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each iperf3 run")
    ap.add_argument("--rounds", type=int, default=10, help="block/top-up rounds for the latency figure")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    lab_down(PREFIX)
    lab_up(2, PREFIX)
    rows = []
    try:
        say("bare forwarding")
        rows.append(measure("bare forwarding", args.seconds))

        say("Tollgate inline (nfqueue, 1 queue, batch 64, compiled engine)")
        gw = start_gateway(work, config(2, "1000000"), str(work / "ledger.db"))
        try:
            rows.append(measure("Tollgate", args.seconds))
        finally:
            stop(gw)
        ns("gw", "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")

        say("Python NetfilterQueue, one callback per packet")
        ns("gw", "iptables-nft", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
        base = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-c", NFQ_BASELINE])
        time.sleep(1)
        try:
            rows.append(measure("NetfilterQueue (Python)", args.seconds))
        finally:
            base.terminate()
            base.wait(timeout=10)
            ns("gw", "iptables-nft", "-F", "FORWARD")

        say("block latency")
        latency = block_latency(work, args.rounds)
    finally:
        lab_down(PREFIX)

    bare, tg, nfq = rows
    head = ["path", "TCP bulk Gbit/s", "vs bare", "64-byte UDP kpps", "vs NetfilterQueue", "UDP lost %",
            "queue dropped", "user dropped"]
    lines = [[r["label"], f"{r['tcp_gbps']:.2f}", f"{r['tcp_gbps'] / bare['tcp_gbps']:.0%}",
              f"{r['udp_pps'] / 1e3:.0f}", f"{r['udp_pps'] / nfq['udp_pps']:.1f}x", f"{r['udp_lost_percent']:.1f}",
              str(r["queue_dropped"]), str(r["user_dropped"])] for r in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in [head] + lines:
            print("  ".join(f"{c:>18}" for c in line))
    print(f"\nblock latency (breaching packet -> kernel set), {latency['n']} blocks: "
          f"p50 {latency['p50']} ms, p99 {latency['p99']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
