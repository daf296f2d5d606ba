"""Internal traffic in the lab, ``--source ebpf`` and ``--source nfqueue`` side
by side: the same traffic, the same expectations, the truth from outside the
gateway.

"Internal" as the engine defines it (ext/engine_py.py, step 2-3, and
accounting/zones.py): a packet between two subscribers is an upload of one and
a download of the other, each rated in the zone of the other side's address,
here the ``local`` zone (``gateway.local_networks``); a server on the
operator's own network behind the gateway (a namespace of this test on a
non-subscriber interface) is in ``local`` too, but its ports 5400-5499 are
the operator's zone ``lansrv`` (a zone carved out of the local networks by
ports). Both zones are priced here, up and down at different prices with
remainders, so that a byte in the wrong zone or direction shows in money.
Traffic to the gateway itself (its addresses on the subscriber links, on the
operator's network and on the uplink; pings and TCP to a server on it) is
not forwarded: the nfqueue path never sees it in the forward hook, and the
tc program must leave it uncharged the same way, however its zone is priced.

What is checked, TCP, UDP and ICMP, IPv4 and IPv6, for every subscriber,
zone and direction:

* the ledger's bytes == the far ends' nft counters (in the receiving
  subscriber's namespace, or the server's), to the byte, zones without
  traffic at 0 (the gateway's traffic, which did flow, is in none);
* the money == the engine's own rating (``rate_volume``) of the far ends'
  bytes, to the nano-unit: the engine is the oracle of what internal traffic
  costs, for both sources;
* packets to a subscriber blocked by hand are charged to nobody (the engine
  drops them before the sender is charged; nothing arrives at the far end).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest

from gateway.lab import GATEWAY_UP4, GATEWAY_UP6, sh, spawn
import lablib
from lablib import Gateway, lab_config, netns

PIN = f"/sys/fs/bpf/tollgate-test-internal-{os.getpid()}"
SUBS = (1, 2, 3, 4)
LOCAL, EXTERNAL, LANSRV = 0, 1, 2
SRV4, SRV6 = "100.64.200.2", "2001:db8:100:c8::2"  # the operator's server, behind the gateway's lan0
LAN4, LAN6 = "100.64.200.1", "2001:db8:100:c8::1"  # the gateway on that network
SRV_ZONE_PORT, SRV_LOCAL_PORT, SUB_PORT, GW_PORT = 5410, 5510, 5610, 5710
PRICES = ('local = { upload = "0.0012345", download = "0.0045678" }\n'
          'lansrv = { upload = "0.0067891", download = "0.0078912" }\n')


def config(n: int) -> str:
    head, _, subs = lab_config(n).partition("[[subscriber]]")
    head = head.replace("[tariff.prices]\n", "[tariff.prices]\n" + PRICES)
    zone = ('[[zone]]\nname = "lansrv"\nnetworks = ["100.64.200.0/24", "2001:db8:100:c8::/64"]\n'
            'ports = "5400-5499"\n\n')
    at = head.index("[[tariff]]")
    return head[:at] + zone + head[at:] + "[[subscriber]]" + subs


class EbpfGateway(lablib.EbpfGateway):
    pin, subs = PIN, SUBS


def server_ns(lab) -> str:
    return f"{lab.prefix}-lan"


def far_end_tables(lab) -> None:
    """Counters where the traffic arrives, forwarded packets only (ttl / hop limit one below the sender's 64),
    each rule named by the (subscriber, zone, direction) keys its bytes belong to. The gateway's own traffic is
    counted apart ("gw"), to show that it flowed."""
    def table(rules):
        return ("table inet tgint {\n  chain in { type filter hook input priority 0; policy accept;\n"
                + "\n".join(f"    {r}" for r in rules) + "\n  }\n}\n")

    def key(*triples):
        return " ".join(f"{s},{z},{d}" for s, z, d in triples)

    for j in SUBS:
        rules = []
        for i in SUBS:
            if i != j:  # i's upload and j's download, both in the local zone
                for match in (f"ip saddr {lab.sub_addr4(i)} ip ttl 63", f"ip6 saddr {lab.sub_addr6(i)} ip6 hoplimit 63"):
                    rules.append(f'{match} counter comment "{key((i, LOCAL, 0), (j, LOCAL, 1))}"')
        for match in (f"ip saddr {SRV4} ip ttl 63", f"ip6 saddr {SRV6} ip6 hoplimit 63"):
            rules.append(f'{match} th sport 5400-5499 counter accept comment "{key((j, LANSRV, 1))}"')
            rules.append(f'{match} counter comment "{key((j, LOCAL, 1))}"')
        rules.append(f'ip saddr {{ {lab.gw_addr4(j)}, {LAN4}, {GATEWAY_UP4} }} counter comment "gw"')
        rules.append(f'ip6 saddr {{ 2001:db8:100:{j:x}::1, {LAN6}, {GATEWAY_UP6} }} meta l4proto {{ tcp, icmpv6 }} '
                     'counter comment "gw"')
        sh("nft", "-f", "-", ns=lab.sub(j), input=table(rules))
    rules = []
    for i in SUBS:
        for match in (f"ip saddr {lab.sub_addr4(i)} ip ttl 63", f"ip6 saddr {lab.sub_addr6(i)} ip6 hoplimit 63"):
            rules.append(f'{match} th dport 5400-5499 counter accept comment "{key((i, LANSRV, 0))}"')
            rules.append(f'{match} counter comment "{key((i, LOCAL, 0))}"')
    sh("nft", "-f", "-", ns=server_ns(lab), input=table(rules))
    sh("nft", "-f", "-", ns=lab.gw, input=table(['ip saddr 100.64.0.0/16 counter comment "gw"',
                                                 'ip6 saddr 2001:db8:100::/48 meta l4proto { tcp, icmpv6 } '
                                                 'counter comment "gw"']))


def far_end(lab) -> dict:
    """{(subscriber, zone, direction): bytes} from every far end, and "gw": the gateway's own traffic."""
    out: dict = {"gw": 0}
    for ns in [server_ns(lab), lab.gw] + [lab.sub(j) for j in SUBS]:
        doc = json.loads(netns(ns, "nft", "-j", "list", "table", "inet", "tgint", check=True).stdout)["nftables"]
        for item in doc:
            rule = item.get("rule")
            if not rule:
                continue
            nbytes = next(x["counter"]["bytes"] for x in rule["expr"] if "counter" in x)
            for k in rule["comment"].split():
                k = "gw" if k == "gw" else tuple(int(x) for x in k.split(","))
                out[k] = out.get(k, 0) + nbytes
    return out


def minus(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@pytest.fixture(scope="module")
def internal_lab(lab):
    srv = server_ns(lab)
    sh("ip", "netns", "add", srv)
    try:
        sh("ip", "link", "set", "lo", "up", ns=srv)
        sh("ip", "link", "add", "lan0", "netns", lab.gw, "type", "veth", "peer", "name", "eth0", "netns", srv)
        for ns, dev, v4, v6 in ((lab.gw, "lan0", f"{LAN4}/24", f"{LAN6}/64"), (srv, "eth0", f"{SRV4}/24", f"{SRV6}/64")):
            sh("ip", "addr", "add", v4, "dev", dev, ns=ns)
            sh("ip", "-6", "addr", "add", v6, "dev", dev, "nodad", ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", LAN4, ns=srv)
        sh("ip", "-6", "route", "add", "default", "via", LAN6, ns=srv)
        for name, ns, port in (("srvzone", srv, SRV_ZONE_PORT), ("srvlocal", srv, SRV_LOCAL_PORT),
                               ("sub2", lab.sub(2), SUB_PORT), ("sub4", lab.sub(4), SUB_PORT),
                               ("gwself", lab.gw, GW_PORT)):
            spawn(lab, f"iperf-{name}", ns, "iperf3", "-s", "-p", str(port))
        far_end_tables(lab)
        time.sleep(0.5)
        for target in (SRV4, SRV6):  # neighbours resolved before anything is measured
            sh("ping", "-c", "1", "-W", "2", target, ns=lab.sub(1), check=False, timeout=10)
        yield lab
    finally:
        for pid in sh("ip", "netns", "pids", srv, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", srv, check=False)


def run(lab, i: int, *args: str, timeout: float = 30) -> None:
    """One bounded client run in subscriber i's namespace (iperf3 or ping); it must succeed."""
    sh("timeout", str(int(timeout)), *args, ns=lab.sub(i), timeout=timeout + 5)


def iperf(lab, i: int, host: str, port: int, *args: str) -> None:
    run(lab, i, "iperf3", "-c", host, "-p", str(port), "--connect-timeout", "3000", *args)


def traffic(lab, gw) -> None:
    """Subscriber to subscriber, subscriber to the operator's server (both zones), and to the gateway itself:
    TCP both ways, UDP both ways, ICMP, IPv4 and IPv6; all bounded in bytes and time."""
    s2_4, s2_6, s4_6 = lab.sub_addr4(2), lab.sub_addr6(2), lab.sub_addr6(4)
    # s1 <-> s2
    iperf(lab, 1, s2_4, SUB_PORT, "-n", "3M")
    iperf(lab, 1, s2_6, SUB_PORT, "-n", "3M", "-R")
    iperf(lab, 1, s2_4, SUB_PORT, "-u", "-b", "20M", "-l", "1200", "-n", "1M", "-R")
    iperf(lab, 1, s2_6, SUB_PORT, "-u", "-b", "20M", "-l", "1200", "-n", "1M")
    run(lab, 1, "ping", "-q", "-c", "10", "-i", "0.02", "-s", "600", s2_4)
    run(lab, 2, "ping", "-q", "-6", "-c", "10", "-i", "0.02", "-s", "900", lab.sub_addr6(1))
    # s3 <-> the server: its lansrv port, its other port (local), ICMP (local: no ports)
    iperf(lab, 3, SRV4, SRV_ZONE_PORT, "-n", "2M")
    iperf(lab, 3, SRV6, SRV_ZONE_PORT, "-n", "2M", "-R")
    iperf(lab, 3, SRV6, SRV_LOCAL_PORT, "-u", "-b", "20M", "-l", "1200", "-n", "1M")
    iperf(lab, 3, SRV4, SRV_LOCAL_PORT, "-n", "1M", "-R")
    run(lab, 3, "ping", "-q", "-c", "10", "-i", "0.02", "-s", "700", SRV4)
    run(lab, 3, "ping", "-q", "-6", "-c", "10", "-i", "0.02", "-s", "800", SRV6)
    # to a subscriber blocked by hand (before it has TCP connections: see to_blocked), then s3 -> s4, s1 <-> the
    # server's lansrv port over UDP
    to_blocked(lab, gw)
    iperf(lab, 3, s4_6, SUB_PORT, "-u", "-b", "20M", "-l", "1000", "-n", "500K", "-R")
    iperf(lab, 1, SRV4, SRV_ZONE_PORT, "-u", "-b", "20M", "-l", "1100", "-n", "500K", "-R")
    # the gateway itself, on every network it has an address in: never charged
    iperf(lab, 1, lab.gw_addr4(1), GW_PORT, "-n", "2M")
    iperf(lab, 1, "2001:db8:100:1::1", GW_PORT, "-n", "2M", "-R")
    for target in (lab.gw_addr4(1), "2001:db8:100:1::1", LAN4, LAN6, GATEWAY_UP4, GATEWAY_UP6):
        run(lab, 1, "ping", "-q", "-c", "5", "-i", "0.02", "-s", "1000", target)
    # the link's broadcast (the gateway does not answer it: icmp_echo_ignore_broadcasts)
    sh("ping", "-q", "-b", "-c", "3", "-i", "0.05", "-W", "1", "100.64.1.255", ns=lab.sub(1), check=False, timeout=10)
    time.sleep(0.5)  # the last FIN/ACKs


def to_blocked(lab, gw) -> None:
    """s4 blocked by hand, then s1 sends to it: the engine drops a packet to a blocked subscriber before
    anyone is charged (nothing arrives, so the far ends' counters say what s1 must pay: nothing).

    Done while s4 has no TCP connection: a block makes the gateway end them (policy/resets.py), and the
    eBPF source learns of a manual block only at its next look at s4 (the change follower does not touch
    it), so s4's answers to those probes could pass its tc ingress before its blocked flag and be charged,
    then be refused by the nft blocked set (see the report of this test's commit)."""
    proc = gw.tollgate("block", "s4", "--reason", "test: traffic to a blocked subscriber")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    while lab.sub_addr4(4) not in netns(lab.gw, "nft", "list", "set", "inet", "tollgate", "blocked4").stdout:
        assert time.monotonic() < deadline, "s4 not in the nft blocked set within 10 s"
        time.sleep(0.1)
    time.sleep(0.5)  # and in the maps (the source's next poll)
    for args in (("-4", lab.sub_addr4(4)), ("-6", lab.sub_addr6(4))):
        proc = sh("ping", "-q", args[0], "-c", "5", "-i", "0.05", "-s", "1000", "-W", "1", args[1], ns=lab.sub(1),
                  check=False, timeout=15)
        assert proc.returncode != 0, f"s1 reached the blocked s4 ({args[1]})"
    proc = gw.tollgate("unblock", "s4", "--reason", "test over")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10  # the nft set, then the maps (the source's next look) let it through again
    while lab.sub_addr4(4) in netns(lab.gw, "nft", "list", "set", "inet", "tollgate", "blocked4").stdout:
        assert time.monotonic() < deadline, "s4 still in the nft blocked set 10 s after the unblock"
        time.sleep(0.1)
    time.sleep(0.5)
    while sh("ping", "-c", "1", "-W", "1", lab.sub_addr4(4), ns=lab.sub(1), check=False, timeout=5).returncode:
        assert time.monotonic() < deadline, "s4 not reachable again within 10 s of the unblock"


def ledger(db) -> tuple[dict, dict]:
    """{(subscriber id, zone, direction): bytes} and {name: (id, balance)}."""
    con = sqlite3.connect(db)
    try:
        usage = {(s, z, d): b for s, z, d, b in con.execute(
            "SELECT subscriber_id, zone, direction, sum(bytes) FROM usage GROUP BY 1, 2, 3") if b}
        subs = {name: (sid, bal) for sid, name, bal in con.execute("SELECT id, name, balance FROM subscribers")}
        return usage, subs
    finally:
        con.close()


def engine_cost(config_path, far: dict) -> dict:
    """The engine's own rating of the far ends' bytes, one volume per (subscriber, zone, direction): nano-units
    per subscriber name (the same engine the daemon runs, built from the same config)."""
    from gateway.config import load_config
    from gateway.runtime import Accountant

    acct = Accountant(load_config(config_path), None)
    rows = acct.config_rows()
    acct.load_subscribers(rows)
    engine, names = acct.engine, {r["id"]: r["name"] for r in rows}
    before = {sid: engine.subscriber(sid).balance for sid in names}
    for (sid, zone, d), nbytes in far.items():
        engine.rate_volume(sid, zone, d, nbytes, 1, time.time_ns())
    return {names[sid]: before[sid] - engine.subscriber(sid).balance for sid in names}


@pytest.mark.parametrize("source", ["ebpf", "nfqueue"])
def test_internal_traffic_charged_as_the_engine_says(internal_lab, tmp_path, source):
    lab = internal_lab
    from ext.bpfmaps import BpfError, Maps

    try:
        Maps.unpin(PIN)
    except BpfError:
        pass
    cls = EbpfGateway if source == "ebpf" else Gateway
    gw = cls(lab.gw, tmp_path, config(lab.n))
    try:
        gw.start()
        far0 = far_end(lab)
        traffic(lab, gw)
        time.sleep(1.0)
        gw.stop(signal.SIGTERM)  # the last flush
        assert gw.proc.returncode == 0, (gw.dir / "gateway.log").read_text()[-3000:]
        far = minus(far_end(lab), far0)
    finally:
        if source == "ebpf":
            gw.remove(lab)
        else:
            gw.stop(signal.SIGKILL)
            netns(lab.gw, "nft", "delete", "table", "inet", "tollgate")
    usage, subs = ledger(gw.db)
    gw_bytes = far.pop("gw", 0)
    print(f"\n  {source}: far ends {sorted(far.items())}\n  ledger {sorted(usage.items())}\n  the gateway's own "
          f"traffic (not charged): {gw_bytes} B")
    assert gw_bytes > 4_000_000, "the traffic to and from the gateway itself did not flow"
    for i in SUBS:  # traffic in every zone that has it, nothing anywhere else (external included)
        for zone in (LOCAL, EXTERNAL, LANSRV):
            for d in (0, 1):
                sid = subs[f"s{i}"][0]
                assert usage.get((sid, zone, d), 0) == far.get((i, zone, d), 0), \
                    f"s{i} zone {zone} {'down' if d else 'up'}load: ledger {usage.get((sid, zone, d), 0)} B, " \
                    f"far end {far.get((i, zone, d), 0)} B"
    # that the traffic flowed in these zones (the exact comparison is above): iperf3 ends its test when the
    # sender has written -n bytes, and what is still in flight then may be cut (seen once under load: 2.84 MB
    # of s1's 3 MB), so half of each transfer is asked for, not all of it
    assert far[(1, LOCAL, 0)] > 1_500_000 and far[(3, LANSRV, 1)] > 1_000_000 and far[(1, LANSRV, 1)] > 250_000
    # the money: what the engine makes of the far ends' bytes, to the nano-unit
    cost = engine_cost(gw.config, far)
    charged = {name: 100_000_000_000 - bal for name, (_sid, bal) in subs.items()}
    print(f"  charged {charged}\n  engine  {cost}")
    assert charged == cost
    assert all(cost[f"s{i}"] > 0 for i in SUBS)
