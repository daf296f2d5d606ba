"""`tollgate run` hosting the RADIUS accounting server (`[radius] serve_in_gateway = true`), with Debian's
radclient as the access server: a Start from the upstream namespace is answered by the gateway itself and its
address counted; a Start of another user from the same NAS hands the live address over (the old owner
refreshed, then the new, at once), and each is charged exactly its own bytes (kernel counters); the server's
counters are on the gateway's /metrics; a Stop takes the address out; SIGTERM stops the server before the
ledger closes and the gateway exits 0.

Everything runs in the lab's namespaces; every process started here is stopped in a finally block."""

from __future__ import annotations

import time

from lablib import Gateway, ledger_bytes, netns
from test_sessions_handover import download, owner_seen_by_gateway
from test_sessions_lab import BIG, cleanup_gateway, config, live_sessions, radclient, wait_for


def test_the_gateway_hosts_the_radius_server(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config().replace("[radius]\n", "[radius]\nserve_in_gateway = true\n")).start()
    net = f"{lab.sub_addr4(1)}/32"
    start = "Acct-Status-Type = Start\nUser-Name = {user}\nAcct-Session-Id = \"{key}\"\n" \
            f"Framed-IP-Address = {lab.sub_addr4(1)}\n"
    try:
        assert ":1813 " in netns(lab.gw, "ss", "-Hlun").stdout  # bound by the time /healthz answers
        got = radclient(lab, start.format(user="bob", key="h-1"))
        assert got.returncode == 0 and "Accounting-Response" in got.stdout, got.stdout + got.stderr
        wait_for(lambda: owner_seen_by_gateway(lab, 1) == "bob", 3, "the gateway gives the address to bob")
        assert download(lab, 1) == BIG
        time.sleep(2.5)  # a flush
        counters = gw.kernel_counters()
        bob = ledger_bytes(gw.db)["bob"]
        assert bob == counters[net]["up_bytes"] + counters[net]["down_bytes"] > BIG

        t0 = time.monotonic()
        got = radclient(lab, start.format(user="alice", key="h-2"))
        assert got.returncode == 0 and "Accounting-Response" in got.stdout
        wait_for(lambda: owner_seen_by_gateway(lab, 1) == "alice", 3, "the hand-over reaches the engine")
        print(f"hand-over seen by the engine {time.monotonic() - t0:.2f} s after radclient sent it")
        assert live_sessions(gw.db) == {net: "alice"}
        assert download(lab, 1) == BIG
        time.sleep(2.5)
        counters = gw.kernel_counters()
        counted = ledger_bytes(gw.db)
        assert counted["bob"] == bob
        assert counted["alice"] == counters[net]["up_bytes"] + counters[net]["down_bytes"] > BIG

        assert radclient(lab, "Acct-Status-Type = Stop\nUser-Name = alice\nAcct-Session-Id = \"h-2\"\n").returncode == 0
        wait_for(lambda: net not in gw.kernel_counters(), 3, "the Stop takes the address out")
        metrics = gw.metrics()
        assert 'tollgate_radius_packets_total{result="accepted"} 3.0' in metrics, metrics[-3000:]
        assert gw.tollgate("ledger", "check").returncode == 0
        assert '"status":"ok"' in netns(lab.gw, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout
        gw.stop()
        assert gw.proc.returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]
        assert ":1813 " not in netns(lab.gw, "ss", "-Hlun").stdout
    finally:
        gw.stop()
        cleanup_gateway(lab)
