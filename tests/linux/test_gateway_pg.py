"""The live gateway on a PostgreSQL ledger: the same nfqueue path, real packets and nftables as
test_gateway.py, with ``gateway.database`` a conninfo of the session's throwaway cluster instead of
a file. Every byte figure is checked against the kernel's per-subscriber counters; money against
amounts worked out here."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from lablib import Gateway, kernel_bytes, lab_config, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
BIG = 8 * 1024 * 1024
EUR = 10 ** 9


@pytest.fixture
def pg_gateway(lab, tmp_path, pg_cluster):
    gws = []

    def start(balances=None, extra=(), **kw) -> Gateway:
        gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, balances or {}, **kw), extra)
        gw.db = pg_cluster.create_database(f"gw_{uuid.uuid4().hex[:12]}")
        gws.append(gw)
        return gw.start()

    yield start
    for gw in gws:
        gw.stop()
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def charged_bytes(conninfo: str) -> dict[str, int]:
    from accounting.ledger import Ledger

    with Ledger.open(conninfo) as led:
        names = {s["id"]: s["name"] for s in led.subscribers()}
        return {names[u["subscriber_id"]]: u["bytes"] for u in led.usage(group_by="subscriber_id")}


def test_bytes_charged_equal_the_kernel_counters_and_survive_a_sigkill(lab, pg_gateway):
    gw = pg_gateway()
    s = lab.sub
    procs = [
        netns(s(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin"),
        netns(s(2), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/big.bin"),
        netns(s(3), "ping", "-c", "5", "-i", "0.05", "-s", "3000", UP4),  # fragments
        netns(s(3), "ping", "-c", "5", "-i", "0.05", lab.sub_addr4(4)),  # internal: s3 -> s4 through the gateway
        netns(s(4), "iperf3", "-c", UP6, "-u", "-b", "10M", "-t", "1", "-l", "400"),
    ]
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs if p.returncode]
    time.sleep(2.5)  # the flusher writes every second
    counters = gw.kernel_counters()
    counted = charged_bytes(gw.db)
    for i in range(1, 5):
        assert kernel_bytes(counters, lab, i) > 10_000, i
        assert counted[f"s{i}"] == kernel_bytes(counters, lab, i), f"s{i}"

    # SIGKILL under traffic, then a restart: nothing lost, nothing counted twice
    load = [netns_bg(lab, 1, f"http://{UP4}/big.bin"), netns_bg(lab, 2, f"http://[{UP6}]/big.bin")]
    time.sleep(0.3)
    gw.stop(signal.SIGKILL)
    for p in load:
        p.wait(timeout=30)
    gw.start()
    time.sleep(2.5)
    gw.stop()
    counters = gw.kernel_counters()
    counted = charged_bytes(gw.db)
    for i in range(1, 5):
        assert counted[f"s{i}"] == kernel_bytes(counters, lab, i), f"s{i} after the SIGKILL"
    from accounting.ledger import Ledger

    with Ledger.open(gw.db) as led:
        assert led.check_invariants() == []


def netns_bg(lab, i: int, url: str):
    import subprocess

    return subprocess.Popen(["ip", "netns", "exec", lab.sub(i), "curl", "-s", "-m", "20", "-o", "/dev/null", url])


def test_blocked_at_the_balance_and_a_cli_top_up_flows_within_a_second(lab, pg_gateway):
    limit = 2_000_000  # 0.02 EUR at 0.01 EUR/MB downloaded; uploads free
    gw = pg_gateway({1: "0.02"}, upload_free=True)
    got = netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}",
                f"http://{UP4}/big.bin")
    assert 0 < int(got.stdout or 0) <= limit
    time.sleep(0.5)
    assert gw.kernel_counters()["100.64.1.2/32"]["down_bytes"] <= limit
    assert netns(lab.sub(1), "curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{UP4}:5201/").returncode != 0

    assert gw.tollgate("topup", "s1", "1.00").returncode == 0  # the CLI writes to PostgreSQL too
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        if netns(lab.sub(1), "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{UP4}/index.html").stdout == "200":
            break
        time.sleep(0.05)
    assert time.monotonic() - t0 < 1.0
    time.sleep(2.5)
    gw.stop()
    from accounting.ledger import Ledger

    with Ledger.open(gw.db) as led:
        assert led.balance("s1") >= 0 and led.check_invariants() == []
        assert led.balance("s1") == 102 * EUR // 100 - sum(c["amount"] for c in led.charges("s1"))
