"""A manual block and unblock under traffic with ``tollgate run --source ebpf``: nothing is charged that
did not arrive. Truth from outside the gateway, as in tests/linux/test_ebpf_blockpage.py (whose lab
helpers this module uses): nft counters in the upstream namespace and in s1's, forwarded packets only.

The tc program runs at ingress, before nft's forward hook. Its blocked flag used to follow an nft block
at the eBPF source's next look at the subscriber (its next poll: ``interval``), so what s1 sent in
between (flood pings, its answers to the resetter's probes) was metered and charged by the program and
then refused by nft; and an unblock cleared the flag before nft's unblock, the same window the other way
round. Now the policy pusher's block step sets the flag before the nft block and clears it after the nft
unblock (gateway/daemon/pusher.py). The gateway here polls every 2 s (``interval=2``), so that a flag that
waits for a poll is a window of up to 2 s, not of a few milliseconds that a run may miss; the step itself
does not depend on the polls.

An address that leaves a blocked subscriber (``tollgate subscriber set``): the change follower takes it out
of nft's blocked set at once. It used to stay in the program's maps until the source's next
``sync_addresses`` (here: its next loop, up to 2 s), a window in which the program passed its tcp/80 as the
blocked subscriber's (redirected to the block page: uncounted) and nft, no longer blocking it, forwarded it
to the far end, which no nft counter saw and nobody paid for. Now it leaves the maps before nft's unblock
(``before_nft_release``); from there it is unknown and ``unknown = "drop"`` drops it.

Our nft table under this source: no ``account`` chain and no counted sets (the program's maps are the
kernel's count; the chain counted every forwarded packet again for nothing), also when a counting run
(nfqueue) left them; the blocked sets stay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from gateway.lab import UPSTREAM4, UPSTREAM6
from lablib import REPO, lab_config, netns
from test_ebpf_blockpage import (C_BLOCKED, C_REDIRECTED, PIN, S1, SUBS, EbpfGateway, blocked_in_kernel, far_end,
                                 far_end_gateway, far_end_parts, finish, ledger, slot_flags, wait_for)


def external_used() -> int:
    """What the program has passed against s1's external-zone grants, both directions (live, no flush)."""
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return sum(maps.counter(S1, 1, d).used for d in (0, 1))


def flushed(db) -> int:
    """Waits until the ledger holds everything the program passed for s1 (external zone); returns it."""
    wait_for("the ledger up to date with the program's counters", lambda: ledger(db)[0] == external_used())
    return ledger(db)[0]


@pytest.fixture(scope="module")
def slow_poll_lab(lab, tmp_path_factory):
    # the table a counting run (nfqueue) leaves: account chain, counted sets with the subscribers in them
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from policy.nft import Enforcer; "
            f"e = Enforcer(queues=(), local_networks=['100.64.0.0/10', '2001:db8:100::/48']); e.install(); "
            f"e.add_subscriber_addresses({[lab.sub_addr4(i) + '/32' for i in SUBS]!r})")
    netns(lab.gw, sys.executable, "-c", code, check=True)
    config = lab_config(lab.n, {S1: "5.00"}).replace("[gateway]\n", '[gateway]\nunknown = "drop"\n', 1)
    with far_end_gateway(lab, EbpfGateway, tmp_path_factory.mktemp("blockstep"), config,
                         ("--source-option", "interval=2")) as gw:
        yield lab, gw


def test_manual_block_under_traffic_charges_only_what_arrived(slow_poll_lab):
    """Two manual blocks and unblocks under traffic, IPv4 and IPv6 at once: the ledger equals what the far
    ends received, to the byte, and the program refuses s1 as soon as nft does."""
    lab, gw = slow_poll_lab
    charged0, far0 = flushed(gw.db), far_end(lab)
    sub = ["ip", "netns", "exec", lab.sub(S1)]
    # bounded in count and time: flood pings (paced by their replies) and rate-limited downloads whose TCP
    # connections the block resets (the resetter's probes make s1 answer)
    traffic = [subprocess.Popen(sub + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for cmd in (
        ["ping", "-q", "-f", "-c", "40000", "-w", "9", UPSTREAM4],
        ["ping", "-6", "-q", "-f", "-c", "40000", "-w", "9", UPSTREAM6],
        ["curl", "-s", "-o", "/dev/null", "-m", "9", "--limit-rate", "300k", f"http://{UPSTREAM4}/big.bin"],
        ["curl", "-s", "-g", "-o", "/dev/null", "-m", "9", "--limit-rate", "300k", f"http://[{UPSTREAM6}]/big.bin"])]
    try:
        time.sleep(0.5)  # traffic flowing
        for _ in range(2):
            assert gw.tollgate("block", "s1", "--reason", "test: under traffic").returncode == 0
            wait_for("s1 blocked", lambda: blocked_in_kernel(lab))
            assert slot_flags() & C_BLOCKED, "nft blocks s1 and the program does not"
            time.sleep(0.5)  # the flood runs into the block
            assert gw.tollgate("unblock", "s1", "--reason", "test: under traffic").returncode == 0
            wait_for("s1 unblocked", lambda: not blocked_in_kernel(lab))
            time.sleep(0.5)  # and flows again
    finally:
        finish(traffic, 20)
    charged, far = flushed(gw.db) - charged0, far_end(lab) - far0
    print(f"\n  across two manual blocks under traffic: {charged:,} B charged, {far:,} B arrived at the far ends")
    assert far > 0, "no traffic crossed the gateway"
    assert charged == far, f"charged {charged - far:+,} B against what arrived"
    assert ledger(gw.db)[1] >= 0


def test_nft_table_counts_nothing_under_ebpf(slow_poll_lab):
    """No chain of ours in the forward hook but ``block``, no counted set (the counting run's are gone), the
    blocked sets there; what the table holds is read from the kernel."""
    lab, _gw = slow_poll_lab
    doc = json.loads(netns(lab.gw, "nft", "-j", "list", "table", "inet", "tollgate", check=True).stdout)["nftables"]
    forward = sorted(i["chain"]["name"] for i in doc if "chain" in i and i["chain"].get("hook") == "forward")
    sets = {i["set"]["name"]: i["set"] for i in doc if "set" in i}
    assert forward == ["block"], f"chains in the forward hook: {forward}"
    assert not [n for n in sets if n.startswith(("up", "down"))], f"counted sets left: {sorted(sets)}"
    assert not [n for n, st in sets.items() if "counter" in json.dumps(st.get("stmt", []))]
    assert {"blocked4", "blocked6", "blocked6_64", "blocked4_net", "blocked6_net"} <= set(sets)


# TCP with no flags: conntrack calls it INVALID and tracks nothing, so neither nat chain sees it (no portal
# redirect, no masquerade); only a forward rule stops it. To port 80 from a blocked s1, the program passes it
# uncounted (the slot is redirected), as it does a block-page request.
INVALID_HTTP = """
import sys
from scapy.all import IP, IPv6, TCP, Raw, send
src4, src6, dst4, dst6 = sys.argv[1:5]
for i in range(20):
    send(IP(src=src4, dst=dst4) / TCP(sport=40000 + i, dport=80, flags="") / Raw(b"x" * 100), verbose=False)
    send(IPv6(src=src6, dst=dst6) / TCP(sport=40000 + i, dport=80, flags="") / Raw(b"x" * 100), verbose=False)
"""
HTTP_ARRIVALS = ("table inet tghttp {\n  chain c { type filter hook prerouting priority -300; policy accept;\n"
                 "    tcp dport 80 counter\n  }\n}\n")


def test_blocked_http_that_no_nat_redirects_is_rejected(slow_poll_lab):
    """Under this source our forward hook holds one rule for blocked subscribers, ``tcp dport 80 jump
    blocked_http`` (policy/nft.py, ``refused_at_tc``): the program refuses everything else of theirs first.
    That rule is what keeps the tcp/80 the program passes, and the portal does not redirect, from being
    forwarded: here TCP packets conntrack finds invalid, from blocked s1 to the upstream's port 80, v4 and v6.
    None arrives upstream (counted there at prerouting, before anything of the upstream's), and the program
    charges none. It fails with the rule taken out of the table."""
    lab, gw = slow_poll_lab
    subprocess.run(["ip", "netns", "exec", lab.up, "nft", "-f", "-"], input=HTTP_ARRIVALS, text=True, check=True)
    try:
        assert gw.tollgate("block", "s1", "--reason", "test: http").returncode == 0
        wait_for("s1 blocked", lambda: blocked_in_kernel(lab))
        wait_for("s1 redirected", lambda: slot_flags() & 2)
        used0 = external_used()
        netns(lab.sub(S1), sys.executable, "-c", INVALID_HTTP, lab.sub_addr4(S1), lab.sub_addr6(S1),
              UPSTREAM4, UPSTREAM6, check=True, timeout=60)
        time.sleep(0.5)
        doc = json.loads(netns(lab.up, "nft", "-j", "list", "table", "inet", "tghttp", check=True).stdout)
        arrived = sum(x["counter"]["packets"] for i in doc["nftables"] if "rule" in i
                      for x in i["rule"]["expr"] if "counter" in x)
        assert arrived == 0, f"{arrived} of 40 tcp/80 packets of a blocked subscriber were forwarded"
        assert external_used() == used0
    finally:
        netns(lab.up, "nft", "delete", "table", "inet", "tghttp")
        assert gw.tollgate("unblock", "s1").returncode == 0
        wait_for("s1 unblocked", lambda: not blocked_in_kernel(lab))


def connect_attempts(lab, host: str, count: int, seconds: float) -> subprocess.Popen:
    """From s1: ``count`` TCP connects to ``host``:80, one new connection (a new SYN) about every 20-40 ms,
    each given up after 20 ms, for at most ``seconds``: HTTP starting again and again, so that every moment of a change
    has a packet in it. Bounded in count and time."""
    code = (f"import socket, time\nend = time.monotonic() + {seconds}\n"
            f"for _ in range({count}):\n    if time.monotonic() > end: break\n"
            "    s = socket.socket()\n    s.settimeout(0.02)\n"
            f"    try: s.connect(({host!r}, 80)); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
            "    except OSError: pass\n    s.close()\n    time.sleep(0.02)\n")
    return subprocess.Popen(["ip", "netns", "exec", lab.sub(S1), sys.executable, "-c", code],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def program_unknown() -> int:
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return maps.stats()["unknown"][0]


def test_address_leaving_a_blocked_subscriber_is_never_forwarded(slow_poll_lab):
    """s1 blocked (its tcp/80 to the block page), its IPv4 address taken away under HTTP from it: not one
    byte of it reaches the far end (the upstream's count of what the gateway forwards), during the change or
    after it, and nothing is charged; after it the address is unknown: the program drops it (``unknown =
    "drop"``). Run last in this module: s1 keeps only its IPv6 network."""
    from ext.bpfmaps import Maps

    lab, gw = slow_poll_lab
    assert gw.tollgate("block", "s1", "--reason", "test: address leaves").returncode == 0
    wait_for("s1 blocked and redirected", lambda: blocked_in_kernel(lab) and slot_flags() & C_REDIRECTED)
    with Maps.open(PIN) as maps:
        hosts4 = maps.subscriber_count()["tg_sub4"]
    charged0, up0 = flushed(gw.db), far_end_parts(lab)[0]
    attempts = connect_attempts(lab, UPSTREAM4, count=600, seconds=12)
    try:
        time.sleep(0.5)  # HTTP running into the block page
        proc = gw.tollgate("subscriber", "set", "s1", "--address", f"2001:db8:100:{S1:x}::/64")
        assert proc.returncode == 0, proc.stderr
        wait_for("s1's IPv4 address out of nft's blocked set", lambda: not blocked_in_kernel(lab))
        unknown0 = program_unknown()

        def gone_from_maps():
            with Maps.open(PIN) as maps:
                return maps.subscriber_count()["tg_sub4"] == hosts4 - 1

        wait_for("s1's IPv4 address out of the maps", gone_from_maps)
        time.sleep(1.0)  # and HTTP from it goes on: unknown now
        assert attempts.poll() is None, "the connects ended before the change was over"
    finally:
        attempts.kill()
        attempts.wait()
    up = far_end_parts(lab)[0] - up0
    unknown = program_unknown() - unknown0
    print(f"\n  s1's IPv4 address taken away under HTTP: {up:,} B reached the far end, {unknown} packets of it "
          "dropped as unknown after the change")
    assert up == 0, f"{up:,} B of the address that left reached the far end, uncounted"
    assert unknown > 0, "the address is not refused as unknown after the change"
    assert flushed(gw.db) == charged0, "charged for an address that left"
