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
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.lab import UPSTREAM4, lab_config, lab_down, lab_up  # noqa: E402

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


BLAST = Path(tempfile.gettempdir()) / "tollgate-udpblast"
SINK = ("table inet sink {\n chain c {\n  type filter hook prerouting priority -300; policy accept;\n"
        "  udp dport 9 counter drop\n }\n}\n")


def udp_pps(seconds: float, senders: int = 1) -> tuple[float, float]:
    """64-byte IP packets (36 bytes of payload) from ``senders`` subscribers at
    full speed; returns (packets/s received upstream, % lost on the way)."""
    subprocess.run(["ip", "netns", "exec", f"{PREFIX}-up", "nft", "-f", "-"], input=SINK, text=True, check=True)
    try:
        procs = [subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s{i}", str(BLAST), UPSTREAM4, "9",
                                   str(seconds), "36"], stdout=subprocess.PIPE, text=True)
                 for i in range(1, senders + 1)]
        sent = sum(int(p.communicate(timeout=seconds + 30)[0] or 0) for p in procs)
        out = ns("up", "nft", "-j", "list", "table", "inet", "sink").stdout
        received = next(item["counter"]["packets"] for rule in json.loads(out)["nftables"] if "rule" in rule
                        for item in rule["rule"]["expr"] if "counter" in item)
    finally:
        ns("up", "nft", "delete", "table", "inet", "sink")
    return received / seconds, 100.0 * (sent - received) / max(sent, 1)


def queue_drops() -> tuple[int, int]:
    text = ns("gw", "cat", "/proc/net/netfilter/nfnetlink_queue").stdout.split()
    # queue, portid, waiting, copy mode, copy range, queue dropped, user dropped, id, 1
    return (int(text[5]), int(text[6])) if len(text) >= 7 else (0, 0)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (and its threads) so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(label: str, seconds: float, senders: int = 1, consumer: int | None = None) -> dict:
    say(f"  {label}: TCP bulk")
    gbps = tcp_gbps(seconds)
    say(f"  {label}: small UDP from {senders} subscriber(s)")
    cpu0 = cpu_seconds(consumer)
    pps, lost = udp_pps(seconds, senders)
    cpu = cpu_seconds(consumer) - cpu0
    qd, ud = queue_drops()
    health = ns("gw", "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz")
    if health.returncode == 0:
        q = json.loads(health.stdout).get("queue", {})
        packets = sum(v["packets"] for v in q.values())
        batches = sum(v["batches"] for v in q.values())
        say(f"    reader: {packets} packets in {batches} batches ({packets / max(batches, 1):.1f} per batch)")
    return {"label": label, "tcp_gbps": gbps, "udp_pps": pps, "udp_lost_percent": lost,
            "queue_dropped": qd, "user_dropped": ud,
            "us_per_packet": (cpu / (pps * seconds) * 1e6) if consumer and pps else None}


def start_gateway(work: Path, cfg: str, db: str, queues: str = "0", extra=()) -> subprocess.Popen:
    (work / "t.toml").write_text(cfg)
    proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-m", "gateway.cli", "run",
                             "-c", str(work / "t.toml"), "--db", db, "--queues", queues, *extra], cwd=REPO,
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
    """Run both subscribers out of money ``rounds`` times each; the gateway times each block."""
    db = str(work / "lat.db")
    gw = start_gateway(work, lab_config(2, {1: "0.0001", 2: "0.0001"}), db)  # 0.0001 EUR = 10 kB at 0.01 EUR/MB
    try:
        for _ in range(rounds):
            procs = [subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s{i}", "curl", "-s", "-m", "2", "-o",
                                       "/dev/null", f"http://{UPSTREAM4}/big.bin"]) for i in range(1, 3)]
            for p in procs:
                p.wait()
            for i in range(1, 3):
                # a payment is whole cents (issue 11, item 15): 0.01 EUR is 1 MB here, spent within the next round
                subprocess.run([sys.executable, "-m", "gateway.cli", "topup", f"s{i}", "0.01", "-c",
                                str(work / "t.toml"), "--db", db], cwd=REPO, capture_output=True, check=True)
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
    subprocess.run(["gcc", "-O2", "-o", str(BLAST), str(REPO / "benches" / "udpblast.c")], check=True)
    lab_down(PREFIX)
    lab_up(2, PREFIX)
    rows = []
    try:
        say("bare forwarding")
        rows.append(measure("bare forwarding", args.seconds))

        say("Tollgate inline (nfqueue, 1 queue, batch 64, compiled engine)")
        gw = start_gateway(work, lab_config(2, {1: "1000000", 2: "1000000"}), str(work / "ledger.db"))
        try:
            rows.append(measure("Tollgate", args.seconds, consumer=gw.pid))
        finally:
            stop(gw)
        ns("gw", "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")

        say("Tollgate inline, 1 queue, lingering 50 us on thin batches")
        gw = start_gateway(work, lab_config(2, {1: "1000000", 2: "1000000"}), str(work / "ledger3.db"),
                           extra=["--linger-us", "50"])
        try:
            linger = measure("Tollgate, linger 50 us", args.seconds, consumer=gw.pid)
        finally:
            stop(gw)
        ns("gw", "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")

        say("Tollgate inline, 2 queues (queue-balance, one thread each), 2 senders")
        gw = start_gateway(work, lab_config(2, {1: "1000000", 2: "1000000"}), str(work / "ledger2.db"), queues="0-1")
        try:
            two = measure("Tollgate, 2 queues, 2 senders", args.seconds, senders=2, consumer=gw.pid)
        finally:
            stop(gw)
        ns("gw", "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")

        say("Python NetfilterQueue, one callback per packet")
        ns("gw", "iptables-nft", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
        base = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-c", NFQ_BASELINE])
        time.sleep(1)
        try:
            rows.append(measure("NetfilterQueue (Python)", args.seconds, consumer=base.pid))
        finally:
            base.terminate()
            base.wait(timeout=10)
            ns("gw", "iptables-nft", "-F", "FORWARD")

        say("block latency")
        latency = block_latency(work, args.rounds)
    finally:
        lab_down(PREFIX)

    bare, tg, nfq = rows
    rows.insert(2, linger)
    rows.insert(3, two)
    head = ["path", "TCP bulk Gbit/s", "vs bare", "64-byte UDP kpps received", "vs NetfilterQueue", "UDP lost %",
            "queue dropped", "user dropped", "consumer CPU us/packet", "packets per CPU-s vs NetfilterQueue"]
    lines = [[r["label"], f"{r['tcp_gbps']:.2f}", f"{r['tcp_gbps'] / bare['tcp_gbps']:.0%}",
              f"{r['udp_pps'] / 1e3:.0f}", f"{r['udp_pps'] / nfq['udp_pps']:.1f}x", f"{r['udp_lost_percent']:.1f}",
              str(r["queue_dropped"]), str(r["user_dropped"]),
              f"{r['us_per_packet']:.2f}" if r["us_per_packet"] else "-",
              f"{nfq['us_per_packet'] / r['us_per_packet']:.1f}x" if r["us_per_packet"] else "-"] for r in rows]
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
