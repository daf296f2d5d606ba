"""Real flow exporters and collectors beside ours, on the same lab traffic.

softflowd (a NetFlow v9 exporter, from Debian) watches the gateway's
subscriber side and sends every datagram both to our collector (``tollgate
run --source netflow``) and to nfdump's nfcapd. Per subscriber, our ledger
must equal what nfdump reads from nfcapd's file, byte for byte; then a second
gateway charges nfcapd's file through the spool source, and its ledger must
equal it too. Against the kernel's counters the exporter is only as exact as
its packet capture, and it also sees the subscribers' own traffic to the
gateway (DNS, neighbour discovery), which is not forwarded; that is reported."""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import shutil
import subprocess
import time

import pytest
from lablib import Gateway, kernel_bytes, lab_config, ledger_bytes, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("softflowd", "softflowctl", "nfcapd", "nfdump")),
                                reason="needs softflowd and nfdump (make system-deps)")



def nfdump_per_subscriber(folder, lab) -> dict[str, int]:
    """Bytes per subscriber as nfdump itself reads nfcapd's files (its CSV, read here with the csv module)."""
    out = subprocess.run(["nfdump", "-N", "-R", str(folder), "-o", "csv"], capture_output=True, text=True,
                         check=True).stdout
    lines = out.split("\nSummary")[0]
    nets = {f"s{i}": [ipaddress.ip_network(f"{lab.sub_addr4(i)}/32"),
                      ipaddress.ip_network(f"2001:db8:100:{i:x}::/64")] for i in range(1, lab.n + 1)}
    total = dict.fromkeys(nets, 0)
    for row in csv.DictReader(io.StringIO(lines)):
        for side in ("sa", "da"):
            addr = ipaddress.ip_address(row[side])
            for name, owned in nets.items():
                if any(addr in n for n in owned):
                    total[name] += int(row["ibyt"])
    return total


def test_softflowd_feeds_our_collector_and_nfcapd_alike_and_the_spool_charges_nfcapds_files(lab, tmp_path):
    flows = tmp_path / "nfcapd"
    flows.mkdir()
    ctl = f"/tmp/tg-sf{os.getpid()}.ctl"  # a unix socket path must stay short
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n), ["--source", "netflow", "-o", "listen=127.0.0.1:2055"]).start()
    nfcapd = subprocess.Popen(["ip", "netns", "exec", lab.gw, "nfcapd", "-b", "127.0.0.1", "-p", "9995",
                               "-w", str(flows), "-t", "3600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    softflowd = subprocess.Popen(["ip", "netns", "exec", lab.gw, "softflowd", "-d", "-i", "any", "-v", "9", "-6",
                                  "-n", "127.0.0.1:2055,127.0.0.1:9995", "-c", ctl, "-p", f"/tmp/tg-sf{os.getpid()}.pid",
                                  "-B", str(32 << 20), "net 100.64.0.0/10 or net 2001:db8:100::/48"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        s = lab.sub
        procs = [
            netns(s(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin"),
            netns(s(2), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/big.bin"),
            netns(s(3), "iperf3", "-c", UP4, "-u", "-b", "4M", "-t", "2", "-l", "1000"),
            netns(s(4), "ping", "-c", "20", "-i", "0.05", "-s", "800", UP4),
        ]
        assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs if p.returncode]
        # softflowd reads a TPACKET_V3 ring that hands over a block only when it is full: push the last
        # packets through with the gateway's own traffic to its own address (on lo, no subscriber's)
        netns(lab.gw, "ping", "-q", "-f", "-c", "3000", "-s", "1400", lab.gw_addr4(1))
        time.sleep(0.5)
        netns(lab.gw, "softflowctl", "-c", ctl, "expire-all", check=True)
        time.sleep(2.5)  # the datagrams reach both collectors; our flush
    finally:
        softflowd.terminate()
        softflowd.wait(10)
        nfcapd.terminate()  # nfcapd closes its file under its final name on the way out
        nfcapd.wait(10)
        gw.stop()
    ours, theirs = ledger_bytes(gw.db), nfdump_per_subscriber(flows, lab)
    counters = gw.kernel_counters()
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
    print()
    for i in range(1, lab.n + 1):
        kernel = kernel_bytes(counters, lab, i)
        print(f"  s{i}: our collector {ours[f's{i}']:>11,} B, nfcapd/nfdump {theirs[f's{i}']:>11,} B,"
              f" kernel {kernel:>11,} B (softflowd {100 * (ours[f's{i}'] - kernel) / kernel:+.2f}%)")
    assert ours == theirs and min(theirs.values()) > 10_000

    # the same traffic once more, from nfcapd's files through the spool source into a new ledger
    spool = tmp_path / "spool"
    spool.mkdir()
    for f in flows.glob("nfcapd.2*"):
        shutil.copy(f, spool / f.name)
        os.utime(spool / f.name, (time.time() - 60, time.time() - 60))
    second = tmp_path / "second"
    second.mkdir()
    gw2 = Gateway(lab.gw, second, lab_config(lab.n), ["--source", "spool", "-o", f"dir={spool}"]).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list((spool / "done").glob("nfcapd.*")):
            time.sleep(0.2)
    finally:
        gw2.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
    assert sorted(p.name for p in (spool / "done").iterdir()) == sorted(p.name for p in flows.glob("nfcapd.2*"))
    assert ledger_bytes(gw2.db) == theirs
