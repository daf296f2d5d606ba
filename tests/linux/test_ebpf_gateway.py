"""``tollgate run --source ebpf`` in the lab, with the real parts: the tc
program attached to the gateway namespace's subscriber veths (never a host
interface), the lab's masquerade on the upstream, the ledger on disk.

Truth from outside the gateway: nft counters in the upstream namespace, per
subscriber by the port of its own iperf3 server (uploads by destination
port, downloads by source port), IPv4 and IPv6, TCP and UDP, and ICMP for
subscriber 1. Two priced zones (``external``, and ``bulk``: the 5300-5399
ports) and two time slots, the boundary crossed under traffic.

* bytes charged per subscriber in the priced zones == the far end's, to the byte;
* a subscriber whose money runs out receives nothing beyond what its balance
  bought (its balance never below 0) and lands in the nft blocked set; a
  top-up flows again within 1 s;
* SIGKILL under traffic, restarts: afterwards 0 bytes lost or charged twice,
  and the one that ran out got nothing while the daemon was down.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from gateway.lab import GATEWAY_UP4, GATEWAY_UP6, UPSTREAM4, UPSTREAM6, spawn
import lablib
from lablib import lab_config, netns

PIN = f"/sys/fs/bpf/tollgate-test-ebpf-{os.getpid()}"
SUBS = (1, 2, 3, 4)
EXT, BULK = 5200, 5300  # subscriber i's servers: EXT + i (zone external), BULK + i (zone bulk)
PRICE_MB = "0.01"  # external and bulk downloads by day; twice that in the "peak" slot
POOR = 3  # 0.05 EUR: 5 MB of downloads at 0.01 EUR/MB
ALWAYS_POOR = 4  # runs out before the kills


class EbpfGateway(lablib.EbpfGateway):
    pin, subs = PIN, SUBS


def config(lab, peak_from: str, peak_to: str) -> str:
    base = lab_config(lab.n, {POOR: "0.05", ALWAYS_POOR: "0.03"}, price_mb=PRICE_MB)
    head, _, subs = base.partition("[[subscriber]]")
    tariff = head.replace(
        f'[tariff.prices]\nexternal = {{ upload = "{PRICE_MB}", download = "{PRICE_MB}" }}\n',
        f'[tariff.prices]\nexternal = {{ upload = "{PRICE_MB}", download = "{PRICE_MB}" }}\n'
        f'"external.peak" = {{ upload = "0.02", download = "0.02" }}\n'
        f'bulk = {{ upload = "0.005", download = "0.005" }}\n'
        f'"bulk.peak" = {{ upload = "0.01", download = "0.01" }}\n')
    assert tariff != head
    zones = ('[[zone]]\nname = "bulk"\nnetworks = ["198.18.0.0/15", "2001:db8:198::/48"]\nports = "5300-5399"\n\n'
             '[schedule]\nslots = ["day", "peak"]\n'
             f'[[schedule.rule]]\nslot = "peak"\nfrom = "{peak_from}"\nto = "{peak_to}"\n\n')
    gw_end = tariff.index("[[tariff]]")
    return tariff[:gw_end] + zones + tariff[gw_end:] + "[[subscriber]]" + subs


def far_end_tables(lab) -> None:
    """Downloads counted where they arrive (the subscriber's namespace, forwarded packets only: the hop
    limit one below the upstream's), uploads where they arrive (the upstream, by the subscriber's ports;
    ICMP is subscriber 1's)."""
    for i in SUBS:
        subprocess.run(["ip", "netns", "exec", lab.sub(i), "nft", "-f", "-"], check=True, text=True, input=(
            "table inet tgebpf {\n  chain in { type filter hook input priority 0; policy accept;\n"
            f"    ip saddr {UPSTREAM4} ip ttl 63 counter comment \"s{i}\"\n"
            f"    ip6 saddr {UPSTREAM6} ip6 hoplimit 63 counter comment \"s{i}\"\n  }}\n}}\n"))
    rules = []
    for i in SUBS:
        for port in (EXT + i, BULK + i):
            for fam, addr in (("ip", GATEWAY_UP4), ("ip6", GATEWAY_UP6)):
                rules.append(f"    {fam} saddr {addr} th dport {port} counter comment \"s{i}\"")
    rules.append(f"    ip saddr {GATEWAY_UP4} meta l4proto icmp counter comment \"s1\"")
    rules.append(f"    ip6 saddr {GATEWAY_UP6} icmpv6 type {{ echo-request, echo-reply }} counter comment \"s1\"")
    subprocess.run(["ip", "netns", "exec", lab.up, "nft", "-f", "-"], check=True, text=True, input=(
        "table inet tgebpf {\n  chain in { type filter hook input priority 0; policy accept;\n"
        + "\n".join(rules) + "\n  }\n}\n"))


def far_end(lab) -> dict[str, int]:
    out = {f"s{i}": 0 for i in SUBS}
    for ns in [lab.up] + [lab.sub(i) for i in SUBS]:
        doc = json.loads(netns(ns, "nft", "-j", "list", "table", "inet", "tgebpf", check=True).stdout)["nftables"]
        for item in doc:
            rule = item.get("rule")
            if rule:
                out[rule["comment"]] += next(x["counter"]["bytes"] for x in rule["expr"] if "counter" in x)
    return out


def charged_bytes(db) -> dict[str, int]:
    """Ledger usage per subscriber in the priced zones (external 1, bulk 2): the local zone (the
    gateway's own addresses, which the tc program sees and the forward hook does not) is free."""
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT s.name, coalesce(sum(u.bytes), 0) FROM subscribers s LEFT JOIN usage u"
                                " ON u.subscriber_id = s.id AND u.zone IN (1, 2) GROUP BY s.id"))
    finally:
        con.close()


def balance(db, name: str) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT balance FROM subscribers WHERE name = ?", (name,)).fetchone()[0]
    finally:
        con.close()


def iperf(lab, i: int, port: int, *args: str, seconds: int = 3) -> subprocess.Popen:
    host = UPSTREAM6 if "-6" in args else UPSTREAM4
    return subprocess.Popen(["ip", "netns", "exec", lab.sub(i), "timeout", str(seconds + 5), "iperf3", "-c", host,
                             "-p", str(port), "-t", str(seconds), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def blocked_in_kernel(lab, addr: str) -> bool:
    return addr in netns(lab.gw, "nft", "-j", "list", "set", "inet", "tollgate", "blocked4", check=True).stdout


def wait_for(what, cond, timeout: float = 15.0, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def ebpf_lab(lab, tmp_path_factory):
    from ext.bpfmaps import BpfError, Maps

    for i in SUBS:
        for port in (EXT + i, BULK + i):
            spawn(lab, f"iperf{port}", lab.up, "iperf3", "-s", "-p", str(port))
    far_end_tables(lab)
    time.sleep(0.5)
    # the peak slot: the next whole minute at least 12 s away (UTC, the lab config's time zone)
    now = dt.datetime.now(dt.timezone.utc)
    boundary = (now + dt.timedelta(seconds=72 if now.second > 48 else 60)).replace(second=0, microsecond=0)
    peak_from, peak_to = boundary.strftime("%H:%M"), (boundary + dt.timedelta(minutes=10)).strftime("%H:%M")
    try:
        Maps.unpin(PIN)
    except BpfError:
        pass
    gw = EbpfGateway(lab.gw, tmp_path_factory.mktemp("ebpf"), config(lab, peak_from, peak_to))
    try:
        gw.start()
        yield lab, gw, boundary.timestamp()
    finally:
        gw.remove(lab)


def test_exact_across_zones_slots_and_kills(ebpf_lab):
    lab, gw, boundary = ebpf_lab
    # s4 runs out first (3 MB of downloads), with the gateway up
    p = iperf(lab, ALWAYS_POOR, EXT + ALWAYS_POOR, "-R", seconds=4)
    wait_for("s4 blocked", lambda: blocked_in_kernel(lab, lab.sub_addr4(ALWAYS_POOR)))
    p.wait(timeout=15)
    s4_at_block = far_end(lab)["s4"]
    # traffic across the slot boundary: both zones, TCP both ways, UDP, IPv4 and IPv6, ICMP; started 8 s
    # before it, so that the first kill and restart are over when it comes (the running daemon crosses it)
    wait = boundary - 8 - time.time()
    if wait > 0:
        time.sleep(wait)
    procs = [iperf(lab, 1, EXT + 1, "-R", "-b", "40M", seconds=12),
             iperf(lab, 1, BULK + 1, "-6", "-b", "20M", seconds=12),
             iperf(lab, 2, BULK + 2, "-R", "-6", "-b", "30M", seconds=12),
             iperf(lab, 2, EXT + 2, "-u", "-b", "10M", "-l", "1200", seconds=12),
             subprocess.Popen(["ip", "netns", "exec", lab.sub(1), "ping", "-q", "-c", "60", "-i", "0.2", "-s", "700",
                               UPSTREAM4], stdout=subprocess.DEVNULL),
             subprocess.Popen(["ip", "netns", "exec", lab.sub(1), "ping", "-q", "-6", "-c", "60", "-i", "0.2",
                               UPSTREAM6], stdout=subprocess.DEVNULL)]
    # killed twice under traffic: 6 s before the boundary and after it
    for pause in (2.0, 6.0):
        time.sleep(pause)
        gw.stop(signal.SIGKILL)
        time.sleep(0.7)
        assert far_end(lab)["s4"] == s4_at_block, "s4 got bytes past its grant while the daemon was down"
        gw.start()
    for proc in procs:
        proc.wait(timeout=30)
    time.sleep(1.0)
    gw.stop(signal.SIGKILL)  # what was counted after the last flush: charged at the next start, not lost
    gw.start()
    time.sleep(2.5)
    gw.stop(signal.SIGTERM)
    far, charged = far_end(lab), charged_bytes(gw.db)
    log = (gw.dir / "gateway.log").read_text()
    print(f"\n  far end {far}\n  ledger  {charged}")
    con = sqlite3.connect(gw.db)
    print("  ledger by (subscriber, zone, direction):", con.execute(
        "SELECT subscriber_id, zone, direction, sum(bytes) FROM usage GROUP BY 1, 2, 3").fetchall())
    con.close()
    for name in ("s1", "s2", "s4"):
        assert charged[name] == far[name], f"{name}: ledger {charged[name]} B, far end {far[name]} B"
    assert far["s1"] > 10_000_000 and far["s2"] > 10_000_000
    assert far["s4"] == s4_at_block
    assert balance(gw.db, "s4") >= 0, "s4 got more than its balance bought"
    assert "time-slot boundary" in log
    con = sqlite3.connect(gw.db)
    try:
        twice = con.execute("SELECT flush_id, subscriber_id FROM charges GROUP BY 1, 2 HAVING count(*) > 1").fetchall()
        # s1's external downloads were charged at both slots' prices: some minutes at 0.01, some at 0.02 EUR/MB
        per_mb = {round(a * 1_000_000 / b / 1e9, 3) for b, a in con.execute(
            "SELECT bytes, amount FROM usage WHERE subscriber_id = 1 AND zone = 1 AND direction = 1 AND bytes > 1e6")}
    finally:
        con.close()
    assert twice == []
    print(f"  s1 external download, EUR per MB by minute: {sorted(per_mb)}")
    assert max(per_mb) > 0.011, "nothing charged at the peak slot's price"
    from accounting.ledger import Ledger

    with Ledger.open(gw.db) as ledger:
        assert ledger.check_invariants() == []
    gw.start()  # for the next test


def test_money_out_then_top_up(ebpf_lab):
    lab, gw, _ = ebpf_lab
    if gw.proc is None or gw.proc.poll() is not None:
        gw.start()
    before = far_end(lab)["s3"]
    p = iperf(lab, POOR, EXT + POOR, "-R", seconds=5)
    wait_for("s3 blocked", lambda: blocked_in_kernel(lab, lab.sub_addr4(POOR)))
    p.wait(timeout=20)
    time.sleep(1.5)  # flushed
    got = far_end(lab)["s3"] - before
    assert balance(gw.db, "s3") >= 0, "s3 got more than its balance bought"
    # what it received cost at most its 0.05 EUR (peak: 0.02 EUR/MB, day 0.01): 2.5 to 5 MB, nothing beyond;
    # and the money went where the traffic was: left is only what the other pairs kept (16 KiB each, the
    # upload of its ACKs half a second of their rate): under 0.005 EUR, 250 KB at the peak price
    left = balance(gw.db, "s3")
    assert 0 < got <= 5_000_000 + 1
    assert left <= 5_000_000, f"s3 was refused with {left / 1e9:.4f} EUR left"
    assert charged_bytes(gw.db)["s3"] == far_end(lab)["s3"]
    # a top-up: traffic flows again within a second of the payment reaching the ledger
    ping = ["ip", "netns", "exec", lab.sub(POOR), "ping", "-c", "1", "-W", "0.2", UPSTREAM4]
    assert subprocess.run(ping, capture_output=True).returncode != 0
    proc = gw.tollgate("topup", "s3", "1.00")
    assert proc.returncode == 0, proc.stderr
    took = wait_for("s3 flows again", lambda: subprocess.run(ping, capture_output=True).returncode == 0, timeout=5,
                    step=0.0)
    print(f"\n  s3: {got:,} B for 0.05 EUR ({left / 1e9:.4f} EUR left); a top-up flowed again after {took:.2f} s")
    assert took < 1.0


def test_addresses_follow_the_ledger_live(ebpf_lab):
    """A subscriber's networks changed in the ledger reach the maps (the change follower touches it, the
    source syncs what was touched): its IPv6 /64 taken away is no longer charged to it, given back it is."""
    lab, gw, _ = ebpf_lab
    v4, v6 = f"{lab.sub_addr4(2)}/32", "2001:db8:100:2::/64"

    def ping6() -> None:
        subprocess.run(["ip", "netns", "exec", lab.sub(2), "ping", "-6", "-q", "-c", "5", "-i", "0.2", "-s", "500",
                        UPSTREAM6], capture_output=True, timeout=15)

    proc = gw.tollgate("subscriber", "set", "s2", "--address", v4)
    assert proc.returncode == 0, proc.stderr
    time.sleep(2.5)  # the change follower's poll (0.2 s), the source's address sync (1 s), a flush
    before = charged_bytes(gw.db)["s2"]
    ping6()
    time.sleep(2.5)
    assert charged_bytes(gw.db)["s2"] == before, "s2 was charged for a network it no longer has"
    proc = gw.tollgate("subscriber", "set", "s2", "--address", v4, v6)
    assert proc.returncode == 0, proc.stderr
    time.sleep(2.5)
    ping6()
    time.sleep(2.5)
    assert charged_bytes(gw.db)["s2"] >= before + 5 * 548, "s2's /64, given back, is not charged to it"
