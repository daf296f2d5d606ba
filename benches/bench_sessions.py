"""Sessions: RADIUS Starts per second into the ledger, and a Start (or a DHCP lease) to the gateway's kernel.

Part 1 (no root): ``gateway.radius.RadiusServer`` on 127.0.0.1 with a fresh ledger of N subscribers; a pyrad
client sends Accounting-Request Starts (one session and /32 each) with ``--window`` requests outstanding and
counts the Accounting-Responses: starts per second, each one committed in the ledger (synchronous=FULL) before it
is answered. Then as many Stops.

Part 2 (root, ``--lab``): the namespace lab with ``tollgate run`` and ``tollgate radius serve`` in the gateway
namespace; a pyrad client in the upstream namespace sends a Start for subscriber 1's address and the time until
the address is in the kernel's counters (the gateway's change feed, engine and nft set) is measured, then a
Stop and the time until it is gone, ``--rounds`` times; and Starts in a burst of ``--burst`` sessions (the
lab's /10, one /32 each) until the last is in the kernel.

    .venv/bin/python benches/bench_sessions.py [--sessions 2000] [--window 32] [--lab --rounds 10 --burst 200]
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "linux"))

from pyrad import packet as rpacket  # noqa: E402

from gateway.radius import _DICT  # noqa: E402

SECRET = b"bench-secret"
CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10"]

[[tariff]]
name = "lab"
price_unit = "MB"
[tariff.prices]
external = "0.01"

[[subscriber]]
name = "s1"
tariff = "lab"
balance = "100.00"

[radius]
listen = ["{listen}"]

[[radius.client]]
name = "bench"
address = "{client}"
secret = "bench-secret"
"""


def packet(status: int, key: str, user: str, ip: str | None, ident: int) -> bytes:
    pkt = rpacket.AcctPacket(id=ident & 0xFF, secret=SECRET, dict=_DICT)
    pkt[40] = [struct.pack("!I", status)]
    pkt[44] = [key.encode()]
    pkt[1] = [user.encode()]
    if ip:
        pkt[8] = [ipaddress.IPv4Address(ip).packed]
    return pkt.RequestPacket()


def blast(sock, addr, packets: list[bytes], window: int, timeout: float = 30.0) -> tuple[int, float]:
    """Send with ``window`` outstanding (by Identifier); returns (answered, seconds)."""
    sock.settimeout(2.0)
    t0 = time.perf_counter()
    sent = answered = 0
    pending = 0
    deadline = time.monotonic() + timeout
    while answered < len(packets) and time.monotonic() < deadline:
        while pending < window and sent < len(packets):
            sock.sendto(packets[sent], addr)
            sent += 1
            pending += 1
        try:
            sock.recv(4096)
        except socket.timeout:
            break
        answered += 1
        pending -= 1
    return answered, time.perf_counter() - t0


def part1(n: int, window: int) -> None:
    from accounting.ledger import Ledger
    from accounting.operations import Operations
    from gateway.config import load_config
    from gateway.radius import RadiusServer

    with tempfile.TemporaryDirectory() as tmp:
        cfgp = Path(tmp, "t.toml")
        cfgp.write_text(CONFIG.format(listen="127.0.0.1:0", client="127.0.0.1"))
        cfg = load_config(cfgp)
        db = Path(tmp, "l.db")
        with Ledger.open(db) as ledger:
            ops = Operations(ledger, cfg, "bench")
            for i in range(n):
                ops.add(f"u{i}", "lab")
        srv = RadiusServer(cfg, db).start()
        try:
            addr = srv.addresses[0]
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            base = int(ipaddress.IPv4Address("100.64.0.0"))
            starts = [packet(1, f"k{i}", f"u{i}", str(ipaddress.IPv4Address(base + 256 + i)), i) for i in range(n)]
            stops = [packet(2, f"k{i}", f"u{i}", None, i) for i in range(n)]
            ok, secs = blast(s, addr, starts, window)
            print(f"| Start -> ledger (pyrad client, window {window}) | {n} | {ok} answered | {secs:.2f} s | "
                  f"{ok / secs:,.0f} starts/s |")
            ok, secs = blast(s, addr, stops, window)
            print(f"| Stop -> ledger (window {window}) | {n} | {ok} answered | {secs:.2f} s | {ok / secs:,.0f} stops/s |")
            print(f"server counts: {srv.counts}")
        finally:
            srv.stop()


def part2(rounds: int, burst: int) -> None:
    from gateway.lab import lab_down, lab_up
    from lablib import TOLLGATE, Gateway, netns

    prefix = "tbsess"
    lab_down(prefix)
    lab = lab_up(1, prefix)
    srv = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subs = "".join(f'[[subscriber]]\nname = "b{i}"\ntariff = "lab"\nbalance = "10.00"\n\n' for i in range(burst))
            gw = Gateway(lab.gw, Path(tmp), CONFIG.format(listen="198.18.0.1:1813", client="198.18.0.2") + subs)
            gw.start()
            srv = subprocess.Popen(["ip", "netns", "exec", lab.gw, *TOLLGATE, "radius", "serve", "-c",
                                    str(gw.config), "--db", str(gw.db)], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(2)
            client = (f"import socket,sys,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3);"
                      f"[(s.sendto(bytes.fromhex(h),('198.18.0.1',1813)), s.recv(4096)) for h in sys.argv[1:]]")
            addr = f"{lab.sub_addr4(1)}/32"
            up, down = [], []
            for r in range(rounds):
                t0 = time.monotonic()
                netns(lab.up, sys.executable, "-c", client, packet(1, f"r{r}", "s1", lab.sub_addr4(1), r).hex(),
                      check=True)
                while addr not in gw.kernel_counters():
                    time.sleep(0.02)
                up.append(time.monotonic() - t0)
                t0 = time.monotonic()
                netns(lab.up, sys.executable, "-c", client, packet(2, f"r{r}", "s1", None, r + 100).hex(), check=True)
                while addr in gw.kernel_counters():
                    time.sleep(0.02)
                down.append(time.monotonic() - t0)
            print(f"| Start -> address in the kernel (radius serve + tollgate run), {rounds} rounds | median "
                  f"{statistics.median(up):.2f} s, max {max(up):.2f} s (includes ~0.1 s of python startup per send "
                  f"and a 20 ms poll) |")
            print(f"| Stop -> address out of the kernel | median {statistics.median(down):.2f} s, max {max(down):.2f} s |")
            base = int(ipaddress.IPv4Address("100.64.100.0"))
            pkts = [packet(1, f"b{i}", f"b{i}", str(ipaddress.IPv4Address(base + i)), i).hex() for i in range(burst)]
            last = f"{ipaddress.IPv4Address(base + burst - 1)}/32"
            t0 = time.monotonic()
            netns(lab.up, sys.executable, "-c", client, *pkts, check=True, timeout=120)
            t_sent = time.monotonic() - t0
            while last not in gw.kernel_counters():
                time.sleep(0.05)
            total = time.monotonic() - t0
            print(f"| {burst} Starts one after another -> all in the kernel | {total:.2f} s ({burst / total:,.0f} "
                  f"sessions/s end to end; each answered before the next is sent: {t_sent:.2f} s) |")
            gw.stop()
    finally:
        if srv is not None and srv.poll() is None:
            srv.terminate()
            srv.wait(10)
        lab_down(prefix)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--lab", action="store_true", help="part 2: the lab (root)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--burst", type=int, default=200)
    args = ap.parse_args()
    part1(args.sessions, args.window)
    if args.lab:
        part2(args.rounds, args.burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
