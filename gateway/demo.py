"""``make demo``: the gateway at work in a lab of network namespaces.

Builds a lab (4 subscribers, a gateway, an upstream), starts ``tollgate run``
in the gateway with a sample tariff and small balances, drives traffic while
showing live per-subscriber usage, lets one subscriber run out and get
blocked, fetches the block page from it, tops it up from the command line
and shows its traffic flowing again; then cleans everything up. Needs root.
Every step says what it does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "tgdemo"
UP4, UP6 = "198.18.0.2", "2001:db8:198::2"

def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def ns(name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *cmd], capture_output=True, text=True,
                          timeout=timeout)


def usage_table(db: Path) -> str:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT s.name, coalesce(sum(u.bytes), 0), coalesce(sum(u.packets), 0), s.balance "
                       "FROM subscribers s LEFT JOIN usage u ON u.subscriber_id = s.id GROUP BY s.id").fetchall()
    con.close()
    lines = [f"    {'subscriber':<10} {'bytes':>12} {'packets':>8} {'balance':>12}"]
    lines += [f"    {n:<10} {b:>12,} {p:>8,} {bal / 1e9:>10.4f} EUR" for n, b, p, bal in rows]
    return "\n".join(lines)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root: it builds network namespaces", file=sys.stderr)
        return 2
    from .lab import lab_config, lab_down, lab_up

    work = Path(tempfile.mkdtemp(prefix="tollgate-demo-"))
    config, db = work / "tollgate.toml", work / "ledger.db"
    config.write_text(lab_config(4, {3: "0.30"}, price_mb="0.02", names=["alice", "bob", "carol", "dave"],
                                 warn="0.05"))
    gateway = None
    try:
        say("building the lab: 4 subscribers, a gateway and an upstream, in network namespaces")
        lab_down(PREFIX)
        lab_up(4, PREFIX)
        say(f"starting `tollgate run` in the gateway (config {config}); tariff: 0.02 EUR per MB either way; "
            "carol has 0.30 EUR")
        log = open(work / "gateway.log", "w")
        gateway = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-m", "gateway.cli",
                                    "-v", "run", "-c", str(config), "--db", str(db)], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
        for _ in range(100):
            if ns("gw", "curl", "-s", "-m", "1", "http://127.0.0.1:8080/healthz").returncode == 0:
                break
            time.sleep(0.2)
        print(ns("gw", "nft", "list", "table", "inet", "tollgate").stdout.split("chain account")[0][-400:])

        say("driving traffic: downloads over IPv4 and IPv6, iperf3, pings; usage from the ledger as it goes")
        jobs = [
            ("s1", ["curl", "-s", "-o", "/dev/null", "--limit-rate", "2M", f"http://{UP4}/big.bin"]),
            ("s2", ["iperf3", "-c", UP6, "-t", "4", "-R", "-b", "16M"]),
            ("s4", ["ping", "-c", "20", "-i", "0.1", UP4]),
            ("s3", ["curl", "-s", "-o", "/dev/null", "-m", "8", "-w", "carol received %{size_download} bytes\n",
                    f"http://[{UP6}]/big.bin"]),
        ]
        procs = [subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-{n}", *cmd], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for n, cmd in jobs]
        for _ in range(4):
            time.sleep(1.2)
            print(usage_table(db), flush=True)
        outputs = [p.communicate(timeout=30)[0] for p in procs]
        print("    " + outputs[3].strip())

        say("carol downloads the 8 MB file again: her 0.30 EUR covers 15 MB in all, so she runs out on the way")
        out = ns("s3", "curl", "-s", "-o", "/dev/null", "-m", "5", "-w", "%{size_download}", f"http://{UP4}/big.bin")
        print(f"    carol received {out.stdout} bytes, then the gateway blocked her")
        time.sleep(1.2)
        print(usage_table(db))
        health = json.loads(ns("gw", "curl", "-s", "http://127.0.0.1:8080/healthz").stdout)
        print(f"    time from the breaching packet to the kernel set: {health['block_latency_ms']}")

        say(f"carol's browser asks for http://{UP4}/ and gets the block page")
        page = ns("s3", "curl", "-s", "-m", "3", f"http://{UP4}/").stdout
        text = " ".join(re.sub(r"<[^>]+>", " ", page.split("<body>")[-1]).split())
        print("    " + text[:400])
        fast = ns("s3", "curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{time_total}", f"http://{UP4}:5201/")
        print(f"    other traffic fails fast: a TCP connection to port 5201 is reset after {float(fast.stdout):.4f} s")

        say("the operator tops carol up from the command line")
        topup = subprocess.run([sys.executable, "-m", "gateway.cli", "topup", "carol", "1.00", "-c", str(config),
                                "--db", str(db)], cwd=REPO, capture_output=True, text=True)
        print("    " + topup.stdout.strip())
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            if ns("s3", "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://{UP4}/index.html").stdout == "200":
                break
            time.sleep(0.05)
        print(f"    carol's traffic flows again after {time.monotonic() - t0:.2f} s")
        time.sleep(1.2)
        print(usage_table(db))

        say("carol's invoice for this month so far, as PDF and HTML (tollgate invoice)")
        month = time.strftime("%Y-%m-%d")
        invoice = subprocess.run([sys.executable, "-m", "gateway.cli", "invoice", "carol", "-c", str(config),
                                  "--db", str(db), "--at", month, "--pdf", str(work / "carol.pdf"),
                                  "--html", str(work / "carol.html")], cwd=REPO, capture_output=True, text=True)
        print("    " + (invoice.stdout or invoice.stderr).strip())
        return 0
    finally:
        say("cleaning up: stopping the gateway, removing the lab")
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(timeout=10)
            except subprocess.TimeoutExpired:
                gateway.kill()
        from .lab import lab_down

        lab_down(PREFIX)
        print(f"    the ledger and the gateway's log stay in {work}")


if __name__ == "__main__":
    sys.exit(main())
