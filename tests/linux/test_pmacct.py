"""pmacct's uacctd on an NFLOG group of its own beside `tollgate run --source
nflog` on the same traffic: per subscriber, both against the kernel's
counters of our table."""

from __future__ import annotations

import shutil
import time

import pytest
from lablib import Gateway, kernel_bytes, lab_config, ledger_bytes, netns

from gateway.labmeters import Uacctd

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"

pytestmark = pytest.mark.skipif(shutil.which("uacctd") is None, reason="needs pmacct (make system-deps)")


def test_uacctd_and_our_nflog_source_count_the_same_bytes(lab, tmp_path):
    ref = Uacctd(lab.gw, tmp_path, group=2).start()
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n), ["--source", "nflog", "-o", "group=1"]).start()
    try:
        s = lab.sub
        procs = [
            netns(s(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin"),
            netns(s(2), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/big.bin"),
            netns(s(3), "iperf3", "-c", UP4, "-u", "-b", "8M", "-t", "2", "-l", "200"),
            netns(s(4), "ping", "-c", "20", "-i", "0.05", "-s", "1000", UP6),
        ]
        assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs if p.returncode]
        time.sleep(1.5)
    finally:
        ref.stop()
        gw.stop()
    counters = gw.kernel_counters()
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
    ours = ledger_bytes(gw.db)
    pmacct = ref.per_host()
    print()
    for i in range(1, lab.n + 1):
        kernel = kernel_bytes(counters, lab, i)
        theirs = sum(pmacct.get(a, (0, 0))[1] for a in (lab.sub_addr4(i), lab.sub_addr6(i)))
        print(f"  s{i}: tollgate nflog {ours[f's{i}']:>11,} B, pmacct uacctd {theirs:>11,} B, kernel {kernel:>11,} B")
        assert kernel > 10_000
        assert ours[f"s{i}"] == kernel
        assert theirs == kernel
