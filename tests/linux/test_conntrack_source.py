"""`tollgate run --source conntrack` in the lab: nothing queued, the kernel's
connection counters rated; per-subscriber bytes against the kernel's own
per-subscriber counters of our nft table (forwarded IP bytes)."""

from __future__ import annotations

import json
import sqlite3
import time

from lablib import Gateway, kernel_bytes, lab_config, ledger_bytes, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"


def test_conntrack_bytes_equal_the_kernel_counters(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n), ["--source", "conntrack", "-o", "interval=0.5",
                                                       "--drift-interval", "1"]).start()
    try:
        s = lab.sub
        procs = [
            netns(s(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin"),  # one long TCP flow, NATed
            netns(s(2), "iperf3", "-c", UP4, "-u", "-b", "8M", "-t", "2", "-l", "1200"),  # UDP upload
            netns(s(3), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/big.bin"),  # IPv6
            netns(s(4), "ping", "-c", "20", "-i", "0.05", "-s", "1000", UP4),
        ]
        assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs if p.returncode]
        time.sleep(2.5)  # dumps after the last packet, and drift checks: the source's lag is no drift
        health = json.loads(netns(lab.gw, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout)
        assert health["drift_bytes"] == {} and health["source"] == "conntrack"
    finally:
        gw.stop()  # the last dump and flush happen on the way out
    counters = gw.kernel_counters()
    counted = ledger_bytes(gw.db)
    print()
    for i in range(1, lab.n + 1):
        kernel = kernel_bytes(counters, lab, i)
        ours = counted[f"s{i}"]
        print(f"  s{i}: conntrack source {ours:>12,} B, kernel {kernel:>12,} B, {100 * (ours - kernel) / kernel:+.4f}%")
        assert kernel > 10_000
        assert abs(ours - kernel) <= kernel / 1000, f"s{i}: {ours} vs {kernel}"
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")


def test_a_passive_source_charges_the_overshoot_and_blocks(lab, tmp_path):
    """Without the kernel quota (on by default; see test_nflog_source.py for
    both): 0.02 EUR at 0.01 EUR/MB, the 8 MB download has passed by the time
    conntrack reports it, so it is charged in full (a debt) and s1 is blocked
    in the kernel from then on."""
    gw = Gateway(lab.gw, tmp_path, lab_config(1, {1: "0.02"}, upload_free=True),
                 ["--source", "conntrack", "-o", "interval=0.2", "--no-kernel-quota"]).start()
    try:
        assert netns(lab.sub(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
        time.sleep(1.5)
        blocked = netns(lab.sub(1), "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                        f"http://{UP4}/index.html").stdout
        assert blocked == "511"  # the block page, not the upstream
    finally:
        gw.stop()
    con = sqlite3.connect(gw.db)
    (balance,) = con.execute("SELECT balance FROM subscribers WHERE name = 's1'").fetchone()
    con.close()
    assert balance < -6 * 10 ** 7  # 0.02 EUR less about 0.084 EUR of download: a debt of ~0.06 EUR
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")


FAR_END_S1 = f"""table inet farend {{
  chain input {{ type filter hook input priority 0; policy accept;
    ip saddr {UP4} ip ttl 63 counter
  }}
}}"""
FAR_END_UP = """table inet farend {
  chain input { type filter hook input priority 0; policy accept;
    ip ttl 63 counter
  }
}"""


def far_end_bytes(lab) -> int:
    total = 0
    for ns in (lab.sub(1), lab.up):
        doc = json.loads(netns(ns, "nft", "-j", "list", "table", "inet", "farend", check=True).stdout)["nftables"]
        total += sum(x["counter"]["bytes"] for item in doc if "rule" in item for x in item["rule"]["expr"]
                     if "counter" in x)
    return total


def test_conntrack_charges_only_what_was_forwarded(lab, tmp_path):
    """s1 has 0.02 EUR at 0.01 EUR per MB downloaded and pulls a 40 Mbit/s UDP stream for 3 s (15 MB):
    the kernel quota and then the block drop the stream at the gateway, while conntrack, which counts at
    prerouting, has the whole stream in the connection's counters. The ledger must hold what arrived:
    the far ends' own counters (s1's namespace for the stream, the upstream's for what s1 sent)."""
    import subprocess

    for ns, table in ((lab.sub(1), FAR_END_S1), (lab.up, FAR_END_UP)):
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=table, text=True, check=True)
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, {1: "0.02"}, upload_free=True),
                 ["--source", "conntrack", "-o", "interval=0.2"]).start()
    try:
        netns(lab.sub(1), "iperf3", "-c", UP4, "-u", "-R", "-b", "40M", "-t", "3", "-l", "1200", timeout=30)
        time.sleep(1.5)
        far = far_end_bytes(lab)  # read after the stream, before the gateway's last dump on the way out
    finally:
        gw.stop()
        for ns in (lab.sub(1), lab.up):
            netns(ns, "nft", "delete", "table", "inet", "farend")
    charged = ledger_bytes(gw.db)["s1"]
    print(f"\n  s1: far ends {far:,} B, ledger {charged:,} B")
    assert 1_000_000 < far < 4_000_000  # about what 0.02 EUR buys: the stream was cut at the gateway
    assert charged == far
    con = sqlite3.connect(gw.db)
    balance = con.execute("SELECT balance FROM subscribers WHERE name = 's1'").fetchone()[0]
    con.close()
    assert balance >= 0, "charged for bytes that never arrived"
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
