"""What the kernel drops after the tc program counted it is not charged (``tollgate run --source ebpf``).

The program meters uploads at tc ingress, before the forward hook, and downloads at tc egress, before the
qdisc: an operator's own forward rule, a full qdisc (and rp_filter, no route, an invalid conntrack state,
bind_mac) dropped what it had counted, and the subscriber paid for bytes never delivered. Now
``tollgate_drop`` (tp_btf/kfree_skb, ext/bpf/tollgate.bpf.c, "Refunds") gives them back, and the source
charges used less refunds. Truth from outside the gateway, as in tests/linux/test_ebpf_blockpage.py (whose
lab helpers this module uses): nft counters in the upstream namespace and in s1's, forwarded packets only.

* uploads: the operator's table in the gateway namespace drops UDP and TCP to port 9999 in the forward hook
  while s1 sends bounded UDP to 9999 and to another port, and TCP (HTTP downloads, their ACKs, SYNs to
  9999), IPv4 and IPv6: the ledger equals what the far ends received, to the byte;
* downloads: a qdisc on s1's interface (HTB at 20 Mbit/s, a pfifo of 5 packets) drops at enqueue what the
  egress program counted, under a UDP download at 100 Mbit/s and a TCP one: the same, to the byte;
* bind_mac: s1's IPv4 address bound to its MAC, then s1's namespace takes another MAC (a spoofer): nft's
  ``bound_mac`` rule drops its pings and UDP in the forward hook, and s1 pays nothing for them;
* the refund program stays attached while no daemon runs (its link pinned with the maps), the heartbeat
  attaches it again when its link goes, ``tollgate policy remove`` takes it away.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gateway.lab import UPSTREAM4, UPSTREAM6
import lablib
from lablib import lab_config, netns
from test_ebpf_blockpage import S1, far_end, far_end_gateway, finish, ledger, wait_for

PIN = f"/sys/fs/bpf/tollgate-test-refunds-{os.getpid()}"
SUBS = (1, 2, 3, 4)
OPERATOR = ("table inet operator {\n  chain opfwd {\n    type filter hook forward priority 0; policy accept;\n"
            "    udp dport 9999 counter drop\n    tcp dport 9999 counter drop\n  }\n}\n")


class EbpfGateway(lablib.EbpfGateway):
    pin, subs = PIN, SUBS


def delivered() -> int:
    """What the program passed for s1 in the external zone, both directions, less what the kernel dropped
    after it (live, no flush)."""
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return sum(maps.counter(S1, 1, d).used - maps.refund(S1, 1, d)[0] for d in (0, 1))


def refunded() -> int:
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return sum(maps.refund(S1, 1, d)[0] for d in (0, 1))


def settled(db) -> int:
    """Waits until the ledger holds everything the program delivered for s1 (external zone); returns it."""
    wait_for("the ledger up to date with the program's counters", lambda: ledger(db)[0] == delivered())
    return ledger(db)[0]


def operator_drops(lab) -> int:
    doc = json.loads(netns(lab.gw, "nft", "-j", "list", "table", "inet", "operator", check=True).stdout)["nftables"]
    return sum(x["counter"]["packets"] for i in doc if "rule" in i for x in i["rule"]["expr"] if "counter" in x)


def udp_sender(lab, host: str, port: int, count: int, size: int) -> subprocess.Popen:
    """``count`` datagrams of ``size`` bytes from s1 to ``host``:``port``, ten every millisecond or so (a
    pace the grants follow: a burst would mostly be refused by the program, for want of a grant, before the
    operator's rule could drop it), bounded in count, and in time by ``timeout``."""
    code = (f"import socket, time\ns = socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET, "
            f"socket.SOCK_DGRAM)\nfor i in range({count}):\n    try: s.sendto(b'x' * {size}, ({host!r}, {port}))\n"
            "    except OSError: pass\n    if i % 10 == 9: time.sleep(0.001)\n")
    return subprocess.Popen(["ip", "netns", "exec", lab.sub(S1), "timeout", "20", sys.executable, "-c", code],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def s1(lab, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", lab.sub(S1), "timeout", "20", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def refunds_lab(lab, tmp_path_factory):
    config = lab_config(lab.n) + "[sessions]\nbind_mac = true\n"  # no binding until the bind_mac test
    try:
        with far_end_gateway(lab, EbpfGateway, tmp_path_factory.mktemp("refunds"), config) as gw:
            yield lab, gw
    finally:  # what a failed test may have left
        netns(lab.gw, "nft", "delete", "table", "inet", "operator")
        netns(lab.gw, "tc", "qdisc", "del", "dev", f"s{S1}", "root")


def test_refunds_are_on_here(refunds_lab):
    """This kernel (6.18) has what refunds need: a run that silently fell back to the programs without them
    would pass the tests below only by luck."""
    from ext.bpfmaps import Maps

    lab, gw = refunds_lab
    with Maps.open(PIN) as maps:
        assert maps.refunds and maps.refunds_attached(), "the maps run without refunds on this kernel"
    health = json.loads(netns(lab.gw, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout)
    assert health["queue"]["ebpf"]["refunds"] is True


def test_uploads_the_operator_drops_are_not_charged(refunds_lab):
    lab, gw = refunds_lab
    subprocess.run(["ip", "netns", "exec", lab.gw, "nft", "-f", "-"], input=OPERATOR, text=True, check=True)
    try:
        charged0, far0, refunded0 = settled(gw.db), far_end(lab), refunded()
        procs = [udp_sender(lab, host, port, 3000, size) for host in (UPSTREAM4, UPSTREAM6)
                 for port, size in ((9999, 1200), (7000, 700))]
        procs += [s1(lab, "curl", "-s", "-g", "-o", "/dev/null", "-m", "5", f"http://{h}/big.bin")
                  for h in (UPSTREAM4, f"[{UPSTREAM6}]")]
        procs += [s1(lab, "curl", "-s", "-g", "-o", "/dev/null", "-m", "3", f"http://{h}:9999/")
                  for h in (UPSTREAM4, f"[{UPSTREAM6}]")]
        finish(procs)
        charged, far, back = settled(gw.db) - charged0, far_end(lab) - far0, refunded() - refunded0
        drops = operator_drops(lab)
    finally:
        netns(lab.gw, "nft", "delete", "table", "inet", "operator")
    print(f"\n  the operator dropped {drops:,} packets: {charged:,} B charged, {far:,} B arrived at the far ends, "
          f"{back:,} B refunded")
    assert charged == far, f"charged {charged - far:+,} B against what arrived"
    assert drops > 3000 and far > 0, "the operator's rule dropped too little for a test"
    assert back > 0, "nothing refunded"


def test_downloads_a_full_qdisc_drops_are_not_charged(refunds_lab):
    lab, gw = refunds_lab
    dev = f"s{S1}"
    for cmd in (["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
                ["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "20mbit"],
                ["qdisc", "add", "dev", dev, "parent", "1:1", "pfifo", "limit", "5"]):
        netns(lab.gw, "tc", *cmd, check=True)
    try:
        charged0, far0, refunded0 = settled(gw.db), far_end(lab), refunded()
        finish([s1(lab, "iperf3", "-c", UPSTREAM4, "-R", "-u", "-b", "100M", "-l", "1000", "-t", "1")])
        finish([s1(lab, "curl", "-s", "-g", "-o", "/dev/null", "-m", "4", f"http://[{UPSTREAM6}]/big.bin")])
        charged, far, back = settled(gw.db) - charged0, far_end(lab) - far0, refunded() - refunded0
        qdisc = netns(lab.gw, "tc", "-s", "qdisc", "show", "dev", dev, check=True).stdout
    finally:
        netns(lab.gw, "tc", "qdisc", "del", "dev", dev, "root")
    print(f"\n  s1's qdisc dropped downloads: {charged:,} B charged, {far:,} B arrived at the far ends, "
          f"{back:,} B refunded\n  {' '.join(qdisc.split())}")
    assert far > 0
    assert charged == far, f"charged {charged - far:+,} B against what arrived"
    assert back > 0, "nothing refunded"


def test_a_spoofers_packets_that_bind_mac_drops_are_not_charged_to_the_owner(refunds_lab):
    from test_binding_lab import SPOOF, bound, mac_of, set_mac

    lab, gw = refunds_lab
    mac = mac_of(lab.sub(S1))
    got = gw.tollgate("binding", "add", "s1", "--mac", mac)
    assert got.returncode == 0, got.stderr
    wait_for("s1's address bound to its MAC", lambda: f"{lab.sub_addr4(S1)} . {mac}" in bound(lab))
    charged0, far0, refunded0 = settled(gw.db), far_end(lab), refunded()
    set_mac(lab, S1, SPOOF)
    try:
        spoofed = [s1(lab, "ping", "-q", "-f", "-c", "2000", "-w", "3", UPSTREAM4),
                   udp_sender(lab, UPSTREAM4, 7000, 2000, 700)]
        finish(spoofed)
        charged, far, back = settled(gw.db) - charged0, far_end(lab) - far0, refunded() - refunded0
    finally:
        set_mac(lab, S1, mac)
        assert gw.tollgate("binding", "remove", "--mac", mac).returncode == 0
    print(f"\n  a spoofer of s1's address: {charged:,} B charged to s1, {far:,} B arrived at the far ends, "
          f"{back:,} B refunded")
    assert charged == far == 0, f"s1 paid {charged:,} B for a spoofer's packets"
    assert back > 0, "nothing refunded"


def test_refund_program_outlives_the_daemon_and_the_heartbeat_reattaches_it(refunds_lab):
    """Its link is pinned with the maps: attached while the daemon is down. A link taken away (its pin
    removed: the kernel detaches it) is attached again by the heartbeat, with an alarm."""
    from ext.bpfmaps import DROP_LINK, Maps

    lab, gw = refunds_lab
    gw.stop()
    try:
        with Maps.open(PIN) as maps:
            assert maps.refunds_attached(), "the refund program went with the daemon"
    finally:
        gw.start()
    os.unlink(os.path.join(PIN, DROP_LINK))
    with Maps.open(PIN) as maps:
        assert not maps.refunds_attached()
        wait_for("the heartbeat attached the refund program again", maps.refunds_attached, timeout=20)
    assert "the refund program (tollgate_drop on skb:kfree_skb) is not attached" in (gw.dir / "gateway.log").read_text()


def kfree_skb_links() -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [k for k in json.loads(out or "[]") if k.get("tp_name") == "kfree_skb"]


def test_policy_remove_takes_the_refund_program_away(refunds_lab):
    """What ``tollgate policy remove`` does to the eBPF data path (``policy.bpf.detach``: the filters, then
    ``Maps.unpin``): the refund program's link goes with its pin, and the kernel detaches it."""
    from ext.bpfmaps import Maps
    from policy import bpf

    lab, gw = refunds_lab
    gw.stop()
    with Maps.open(PIN) as maps:
        ours = maps.refunds_attached()
    before = kfree_skb_links()
    assert ours and before
    bpf.detach(None, PIN, netns=lab.gw)
    assert not os.path.exists(PIN)
    assert len(kfree_skb_links()) == len(before) - 1, "the refund program's link stayed"
