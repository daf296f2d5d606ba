"""`tollgate run --source nflog` in the lab: the kernel logs header copies of
forwarded packets to an NFLOG group and forwards them without waiting; the
reader rates them. Per-subscriber bytes against the kernel counters of our
table; a kernel quota per subscriber stops traffic at the byte; damaged
netlink input is counted, never rated."""

from __future__ import annotations

import json
import re
import sqlite3
import struct
import time

import pytest
from lablib import Gateway, kernel_bytes, lab_config, ledger_bytes, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"



def test_nflog_bytes_equal_the_kernel_counters(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n), ["--source", "nflog", "--drift-interval", "1"]).start()
    try:
        s = lab.sub
        procs = [
            netns(s(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin"),  # TCP, NATed
            netns(s(2), "iperf3", "-c", UP4, "-u", "-b", "8M", "-t", "2", "-l", "1200"),  # UDP upload
            netns(s(3), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/big.bin"),  # IPv6
            netns(s(4), "ping", "-c", "20", "-i", "0.05", "-s", "1000", UP4),  # ICMP
            netns(s(4), "ping", "-c", "10", "-i", "0.05", lab.sub_addr4(1)),  # internal: s4 <-> s1
        ]
        assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs if p.returncode]
        time.sleep(2.5)  # the kernel's flush timeout, a flush and a drift check after the last packet
        health = json.loads(netns(lab.gw, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout)
        assert health["source"] == "nflog" and health["drift_bytes"] == {}
        stats = health["queue"]["nflog1"]
        assert stats["seq_gaps"] == stats["enobufs"] == stats["malformed_messages"] == 0, stats
        assert health["kernel_quotas"]["quota_blocks"] == 0
    finally:
        gw.stop()
    counters = gw.kernel_counters()
    counted = ledger_bytes(gw.db)
    print()
    for i in range(1, lab.n + 1):
        kernel = kernel_bytes(counters, lab, i)
        print(f"  s{i}: nflog source {counted[f's{i}']:>12,} B, kernel {kernel:>12,} B")
        assert kernel > 10_000
        assert counted[f"s{i}"] == kernel, f"s{i}"
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")


@pytest.mark.parametrize("quota", [True, False], ids=["kernel-quota", "no-quota"])
def test_overshoot_with_and_without_the_kernel_quota(lab, tmp_path, quota):
    """0.02 EUR at 0.01 EUR per MB of download buys 2,000,000 bytes. With the
    kernel quota the kernel forwards no byte beyond them, however late the
    reader is; without it, what passes while the block is on its way is
    charged (a debt). Both end blocked with the block page."""
    gw = Gateway(lab.gw, tmp_path, lab_config(1, {1: "0.02"}, upload_free=True),
                 ["--source", "nflog", "--kernel-quota" if quota else "--no-kernel-quota"]).start()
    try:
        netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", f"http://{UP4}/big.bin")
        time.sleep(1)
        page = netns(lab.sub(1), "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://{UP4}/index.html").stdout
        assert page == "511"  # the block page, not the upstream
        over = float(re.search(r"^tollgate_over_limit_bytes_total (\S+)$", gw.metrics(), re.M).group(1))
    finally:
        gw.stop()
    counters = gw.kernel_counters()
    down = counters[f"{lab.sub_addr4(1)}/32"]["down_bytes"] + counters["2001:db8:100:1::/64"]["down_bytes"]
    con = sqlite3.connect(gw.db)
    (balance,) = con.execute("SELECT balance FROM subscribers WHERE name = 's1'").fetchone()
    con.close()
    print(f"\n  {'with' if quota else 'without'} kernel quota: {down:,} B downloaded of 2,000,000 bought,"
          f" overshoot {max(0, down - 2_000_000):,} B, balance {balance / 1e9:+.6f} EUR,"
          f" tollgate_over_limit_bytes {over:,.0f}")
    assert ledger_bytes(gw.db)["s1"] >= down  # every byte forwarded was rated
    if quota:
        assert down <= 2_000_000 and balance >= 0
    else:
        assert down > 2_000_000 and balance < 0 and over > 0
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")


def nlmsg(payload_attrs: bytes, seq=0) -> bytes:
    """One NFULNL_MSG_PACKET message (subsystem 4, type 0) with these attributes."""
    body = struct.pack("=BBH", 2, 0, 0) + payload_attrs  # nfgenmsg: AF_INET, version 0, res_id
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, seq, 0) + body


def nla(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def test_damaged_netlink_messages_are_counted_never_rated():
    """Messages built by hand go through the reader's own parser: a good one
    is rated; truncated, overlong and garbage ones are counted as malformed;
    nothing crashes."""
    import ext
    from ext import ZoneRule
    from ext.constants import PRICE_SCALE
    from ext.nflog import LogReader

    engine = ext.Engine(2, 1, default_zone=1)
    engine.set_zones([ZoneRule("100.64.0.0/10", 0)])
    engine.set_tariff(1, [PRICE_SCALE] * 4)
    engine.add_subscriber(1, 1, 10 ** 9)
    engine.add_address(1, "100.64.1.2/32")
    packet = bytes.fromhex("45000054000040004001000064400102c6120002") + b"\0" * 64  # 84-byte ICMP, v4
    NFULA_PAYLOAD, NFULA_SEQ, NFULA_ORIG_LEN = 9, 11, 16
    good = nlmsg(nla(NFULA_SEQ, struct.pack("!I", 0)) + nla(NFULA_ORIG_LEN, struct.pack("!I", 84))
                 + nla(NFULA_PAYLOAD, packet))
    reader = LogReader(77, engine)
    try:
        reader.feed(good)
        assert engine.subscriber(1).rated_bytes == 84
        damaged = [good[:10], good[:-20], good[:4] + b"\xff\xff" + good[6:], b"\0" * 64,
                   struct.pack("=I", 4096) + good[4:], good + b"\x07" * 7,
                   nlmsg(nla(NFULA_PAYLOAD, packet[:10])), nlmsg(struct.pack("=HH", 200, NFULA_PAYLOAD) + packet)]
        for datagram in damaged:
            reader.feed(datagram)
        stats = reader.stats()
        assert engine.subscriber(1).rated_bytes == 84 + 84  # the whole message before the junk of `good + junk`
        # all but the foreign message type (skipped) and the 10-byte packet (the engine's to judge)
        assert stats["malformed_messages"] == len(damaged) - 2, stats
        assert stats["unknown_length"] == 1 and engine.stats().malformed_packets == 1
    finally:
        reader.close()
