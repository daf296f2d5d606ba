"""A live network handed from a higher subscriber id to a lower one in one ledger transaction, while a gateway
runs: Debian's radclient sends a Start for bob's session on subscriber 1's address, bob downloads; then a Start
from the same access server (another Acct-Session-Id) names alice, which replaces bob's session in one
transaction (``Operations.session_start``: "replaced"). The change follower takes the leaving network out of
the engine and kernel before adding the arriving one (commit "Changes: a round of the change feed takes every
leaving network out..."): alice (id 1) must own the address right after, and her traffic is counted for her to
the byte, bob's total unchanged. Far-end truth: the kernel's per-network counters of our table.

Everything runs in the lab's namespaces; every process started here is killed in a finally block."""

from __future__ import annotations

import subprocess
import time

from lablib import REPO, TOLLGATE, Gateway, ledger_bytes, netns
from test_sessions_lab import BIG, UP4, cleanup_gateway, config, kill, live_sessions, radclient, wait_for


def owner_seen_by_gateway(lab, i: int) -> str:
    """The subscriber the running gateway's engine names for subscriber i's address: its block page (served
    from the engine's live state) as that address sees it."""
    page = netns(lab.sub(i), "curl", "-s", "-m", "2", f"http://{lab.gw_addr4(i)}:8080/").stdout
    if "belongs to no subscriber" in page:
        return ""
    return page.split("Subscriber <b>", 1)[1].split("</b>", 1)[0] if "Subscriber <b>" in page else "?"


def download(lab, i: int) -> int:
    got = netns(lab.sub(i), "curl", "-s", "-m", "20", "-o", "/dev/null", "-w", "%{size_download}",
                f"http://{UP4}/big.bin")
    assert got.returncode == 0, got.stderr
    return int(got.stdout)


def test_a_radius_start_hands_a_live_address_from_a_higher_to_a_lower_subscriber_id(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config()).start()
    log = open(tmp_path / "radius.log", "w")
    srv = subprocess.Popen(["ip", "netns", "exec", lab.gw, *TOLLGATE, "-v", "radius", "serve", "-c", str(gw.config),
                            "--db", str(gw.db)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    net = f"{lab.sub_addr4(1)}/32"
    try:
        from accounting.ledger import Ledger

        with Ledger.open(gw.db) as ledger:
            ids = dict(ledger.db.execute("SELECT name, id FROM subscribers"))
        assert ids["bob"] > ids["alice"], ids  # the hand-over goes from the higher id to the lower
        wait_for(lambda: ":1813 " in netns(lab.gw, "ss", "-Hlun").stdout, 15, "radius serve listening")

        start = "Acct-Status-Type = Start\nUser-Name = {user}\nAcct-Session-Id = \"{key}\"\n" \
                f"Framed-IP-Address = {lab.sub_addr4(1)}\n"
        got = radclient(lab, start.format(user="bob", key="hb-1"))
        assert got.returncode == 0 and "Accounting-Response" in got.stdout, got.stdout + got.stderr
        wait_for(lambda: owner_seen_by_gateway(lab, 1) == "bob", 3, "the gateway gives the address to bob")
        assert download(lab, 1) == BIG
        time.sleep(2.5)  # a flush
        bob = ledger_bytes(gw.db)["bob"]
        assert bob == gw.kernel_counters()[net]["up_bytes"] + gw.kernel_counters()[net]["down_bytes"] > BIG

        # one transaction: bob's session closed "replaced", alice's opened, on the same network
        got = radclient(lab, start.format(user="alice", key="ha-1"))
        assert got.returncode == 0 and "Accounting-Response" in got.stdout, got.stdout + got.stderr
        assert live_sessions(gw.db) == {net: "alice"}
        took = wait_for(lambda: owner_seen_by_gateway(lab, 1) == "alice", 3, "the gateway gives the address to alice")
        print(f"\n  hand-over bob -> alice reached the engine {took:.2f} s after the Access-Response")
        # the kernel's element was renewed with the new owner: its counter starts again from alice's first byte
        before = gw.kernel_counters()[net]
        assert before["up_bytes"] + before["down_bytes"] < 64 * 1024, before
        assert download(lab, 1) == BIG
        assert download(lab, 1) == BIG
        time.sleep(2.5)
        counted = ledger_bytes(gw.db)
        counters = gw.kernel_counters()[net]
        assert counted["bob"] == bob  # not a byte of alice's went to bob
        assert counted["alice"] == counters["up_bytes"] + counters["down_bytes"] > 2 * BIG
        with Ledger.open(gw.db) as ledger:
            ends = ledger.db.execute("SELECT u.name, s.end_reason FROM sessions s JOIN subscribers u ON "
                                     "u.id = s.subscriber_id ORDER BY s.id").fetchall()
            assert ends == [("bob", "replaced"), ("alice", None)]
            assert ledger.check_invariants() == []
        assert "cannot be applied" not in (tmp_path / "gateway.log").read_text()
    finally:
        kill(srv)
        gw.stop()
        cleanup_gateway(lab)
