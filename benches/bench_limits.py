#!/usr/bin/env python3
"""Speed limits, side by side in one run (root; builds its own lab).

Subscriber 1 of the lab is limited to ``--up`` / ``--down`` bits per second
three ways, each measured by iperf3 (TCP, the rate the receiving end counted)
in both directions, with ping running alongside to show the queueing delay
the limit adds:

* ``policy/limits.py``: HTB on the gateway's interfaces, the class picked by
  the packet's priority; leaf fq_codel if the kernel has it, else a bfifo of
  about 100 ms at the rate (what Tollgate installs);
* the same HTB classes with the kernel's default leaf, a 1000-packet FIFO;
* nft ``limit rate over ... drop``: a policer, with nft's default burst (5
  packets) and with 100 ms of burst.

Then, with ``--scale N[,N...]``, the control plane: how long ``restore``
takes to install N limited subscribers (two LAN interfaces and the WAN one:
three HTB classes and leaves, two address maps and a connection-limit chain
each), to read them back in a new process, to restore the same again (a
restart), to change one, and to remove everything.

    sudo .venv/bin/python benches/bench_limits.py [--seconds 3] [--up 10M] [--down 20M] [--scale 1000,5000] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.lab import UPSTREAM4, UPSTREAM6, lab_down, lab_up
from policy.limits import parse_rate

PREFIX = "tgblim"
SUB1 = ["100.64.1.2/32", "2001:db8:100:1::/64"]


def ns(name: str, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *cmd], capture_output=True, text=True, check=False,
                          timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{name}: {' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def limits(code: str) -> None:
    ns("gw", sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                   f"from policy.limits import Limits; l = Limits(['s1', 's2'], 'uplink'); "
                                   f"l.install(); {code}")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Htb:
    name = "HTB, policy/limits.py"

    def __init__(self, up: int, down: int) -> None:
        self.up, self.down = up, down

    def apply(self) -> None:
        limits(f"l.set_subscriber(1, {SUB1!r}, up_bps={self.up}, down_bps={self.down})")

    def undo(self) -> None:
        limits("l.remove()")


class HtbDefaultFifo(Htb):
    name = "HTB, default 1000-packet FIFO leaf"

    def apply(self) -> None:
        super().apply()
        for dev in ("s1", "uplink"):  # without its own leaf an HTB class gets the default pfifo (txqueuelen)
            ns("gw", "tc", "qdisc", "del", "dev", dev, "parent", "1:1")


class Policer:
    def __init__(self, up: int, down: int, burst_seconds: float | None) -> None:
        self.up, self.down, self.burst = up, down, burst_seconds
        self.name = "nft limit rate (policer), " + (f"burst {burst_seconds * 1000:.0f} ms" if burst_seconds
                                                     else "default burst")

    def _rule(self, match: str, rate: int) -> str:
        burst = f" burst {int(rate / 8 * self.burst)} bytes" if self.burst else ""
        return f"    {match} limit rate over {rate // 8} bytes/second{burst} drop\n"

    def apply(self) -> None:
        table = ("table inet police {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n"
                 + self._rule("ip saddr 100.64.1.2", self.up) + self._rule("ip daddr 100.64.1.2", self.down)
                 + self._rule("ip6 saddr 2001:db8:100:1::/64", self.up)
                 + self._rule("ip6 daddr 2001:db8:100:1::/64", self.down) + "  }\n}\n")
        subprocess.run(["ip", "netns", "exec", f"{PREFIX}-gw", "nft", "-f", "-"], input=table, text=True, check=True)

    def undo(self) -> None:
        ns("gw", "nft", "delete", "table", "inet", "police")


def measure(server: str, reverse: bool, seconds: int) -> dict:
    """iperf3 from subscriber 1 with ping alongside: receiver's rate, retransmits, median RTT."""
    pings = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s1", "ping", "-i", "0.2", "-c", str(5 * seconds),
                              server], stdout=subprocess.PIPE, text=True)
    out = ns("s1", "iperf3", "-c", server, "-t", str(seconds), "-O", "1", "-J", *(["-R"] if reverse else []),
             timeout=seconds + 30)
    rtts = [float(line.split("time=")[1].split()[0]) for line in pings.communicate(timeout=seconds + 30)[0].splitlines()
            if "time=" in line]
    end = json.loads(out.stdout)["end"]
    return {"bps": end["sum_received"]["bits_per_second"], "retransmits": end["sum_sent"].get("retransmits", 0),
            "rtt_ms": statistics.median(rtts) if rtts else float("nan")}


SCALE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from policy.limits import Limits
n = {n}
subs = [dict(sid=i, networks=[f"100.65.{{i // 250}}.{{i % 250 + 1}}/32", f"2001:db8:101:{{i:x}}::/64"],
             up_bps="5M", down_bps="20M", max_connections=200) for i in range(1, n + 1)]
times = {{}}
def timed(name, fn):
    t = time.perf_counter(); fn(); times[name] = time.perf_counter() - t
first = Limits(["s1", "s2"], "uplink")
timed("install", first.install)
timed("restore", lambda: first.restore(subs))
second = Limits(["s1", "s2"], "uplink")
timed("read back", second.install)
assert second.subscribers == first.subscribers
timed("restore unchanged", lambda: second.restore(subs))
timed("change one", lambda: second.set_subscriber(7, subs[6]["networks"], up_bps="6M", down_bps="20M"))
timed("remove", second.remove)
print(json.dumps(times))
"""


def scale(n: int) -> dict:
    return json.loads(ns("gw", sys.executable, "-c", SCALE.format(repo=str(REPO), n=n), timeout=900).stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--up", default="10M")
    ap.add_argument("--down", default="20M")
    ap.add_argument("--scale", default="", help="subscriber counts for the control-plane timings, e.g. 1000,5000")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    up, down = parse_rate(args.up), parse_rate(args.down)
    lab_down(PREFIX)
    lab_up(2, PREFIX)
    rows = []
    try:
        say(f"unshaped: {measure(UPSTREAM4, True, 2)['bps'] / 1e6:.0f} Mbit/s download")
        for mode in (Htb(up, down), HtbDefaultFifo(up, down), Policer(up, down, None), Policer(up, down, 0.1)):
            mode.apply()
            try:
                families = ((4, UPSTREAM4), (6, UPSTREAM6)) if isinstance(mode, Htb) and type(mode) is Htb \
                    else ((4, UPSTREAM4),)
                for family, server in families:
                    for direction, reverse, limit in (("upload", False, up), ("download", True, down)):
                        m = measure(server, reverse, args.seconds)
                        rows.append((mode.name, f"IPv{family}", direction, limit, m))
                        say(f"{mode.name}, IPv{family} {direction}: {m['bps'] / 1e6:.2f} of {limit / 1e6:g} Mbit/s, "
                            f"{m['retransmits']} retransmits, ping {m['rtt_ms']:.1f} ms")
            finally:
                mode.undo()
            time.sleep(0.5)
        scaled = []
        for n in [int(x) for x in args.scale.split(",") if x]:
            scaled.append((n, scale(n)))
            say(f"{n} subscribers: " + ", ".join(f"{k} {v:.2f} s" for k, v in scaled[-1][1].items()))
    finally:
        lab_down(PREFIX)
    if args.markdown:
        print("| shaping | family | direction | limit | measured | measured / limit | TCP retransmits | ping under load |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, family, direction, limit, m in rows:
            print(f"| {name} | {family} | {direction} | {limit / 1e6:g} Mbit/s | {m['bps'] / 1e6:.2f} Mbit/s | "
                  f"{m['bps'] / limit:.3f} | {m['retransmits']} | {m['rtt_ms']:.1f} ms |")
        if scaled:
            keys = list(scaled[0][1])
            print("\n| subscribers | " + " | ".join(keys) + " |")
            print("| --- |" + " --- |" * len(keys))
            for n, times in scaled:
                print(f"| {n} | " + " | ".join(f"{times[k]:.2f} s" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
