"""Address binding (anti-spoofing) with real packets: `tollgate run` with `[sessions] bind_mac = true` binds
alice's static 100.64.1.2 and 2001:db8:100:1::2 to her MAC binding, and carol's DHCP-style session on
100.64.3.2 to the session's MAC. A subscriber namespace whose MAC is changed (`ip link set dev eth0 address
...`) is dropped in the forward hook, IPv4 and IPv6, and counted for its subscriber to the packet and byte
(the kernel's named counter and /metrics); the right MAC passes again; an unbound address passes whatever
its MAC; the session's end unbinds its address.

DESIGN.md ranges only; every ping is bounded (-c, -W)."""

from __future__ import annotations

import re
import time

from lablib import Gateway, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
SPOOF = "52:54:00:99:99:99"

CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "lab"
price_unit = "MB"
[tariff.prices]
external = "0.01"

[[subscriber]]
name = "alice"
tariff = "lab"
balance = "100.00"
addresses = ["100.64.1.2/32", "2001:db8:100:1::2/128"]

[[subscriber]]
name = "bob"
tariff = "lab"
balance = "100.00"
addresses = ["100.64.2.2/32", "2001:db8:100:2::/64"]

[[subscriber]]
name = "carol"
tariff = "lab"
balance = "100.00"

[sessions]
bind_mac = true
"""


def mac_of(ns: str) -> str:
    return re.search(r"link/ether ([0-9a-f:]{17})", netns(ns, "ip", "link", "show", "eth0").stdout).group(1)


def set_mac(lab, i: int, mac: str) -> None:
    netns(lab.sub(i), "ip", "link", "set", "dev", "eth0", "address", mac, check=True)
    # the gateway would answer the old MAC until its neighbour entry is confirmed again
    netns(lab.gw, "ip", "neigh", "flush", "dev", f"s{i}")


def pings(ns: str, target: str, n: int = 3) -> int:
    """Echo replies of n pings (56 bytes of data: 84 IP bytes in IPv4, 104 in IPv6)."""
    got = netns(ns, "ping", "-n", "-q", "-c", str(n), "-i", "0.2", "-W", "1", target, timeout=20)
    m = re.search(r"(\d+) received", got.stdout)
    return int(m.group(1)) if m else 0


def spoofed(gw) -> dict[str, tuple[int, int]]:
    text = gw.metrics()
    out = {}
    for name, value in re.findall(r'tollgate_spoofed_packets_total\{subscriber="([^"]+)"\} ([0-9.e+]+)', text):
        out[name] = [int(float(value)), 0]
    for name, value in re.findall(r'tollgate_spoofed_bytes_total\{subscriber="([^"]+)"\} ([0-9.e+]+)', text):
        out[name][1] = int(float(value))
    return {k: tuple(v) for k, v in out.items()}


def bound(lab) -> str:
    return netns(lab.gw, "nft", "list", "set", "inet", "tollgate", "bound_mac4").stdout + \
        netns(lab.gw, "nft", "list", "set", "inet", "tollgate", "bound_mac6").stdout


def wait_for(check, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_bound_address_with_another_mac_is_dropped_and_counted(lab, tmp_path):
    macs = {i: mac_of(lab.sub(i)) for i in (1, 2, 3)}
    gw = Gateway(lab.gw, tmp_path, CONFIG).start()
    try:
        assert pings(lab.sub(1), UP4) == 3  # no MAC binding yet
        got = gw.tollgate("binding", "add", "alice", "--mac", macs[1])
        assert got.returncode == 0, got.stderr
        # the binding's audit row brings alice's static /32 and /128 in, bound to her MAC; bob has no MAC binding
        wait_for(lambda: f"100.64.1.2 . {macs[1]}" in bound(lab) and f"2001:db8:100:1::2 . {macs[1]}" in bound(lab),
                 2, "alice's addresses bound")
        assert "100.64.2.2" not in bound(lab)
        assert pings(lab.sub(1), UP4) == 3 and pings(lab.sub(1), UP6) == 3

        set_mac(lab, 1, SPOOF)
        assert pings(lab.sub(1), UP4) == 0 and pings(lab.sub(1), UP6) == 0
        assert spoofed(gw).get("alice") == (6, 3 * 84 + 3 * 104)  # every echo request, to the byte
        set_mac(lab, 2, SPOOF)  # bob's addresses are bound to nothing: any MAC passes
        assert pings(lab.sub(2), UP4) == 3 and pings(lab.sub(2), UP6) == 3
        set_mac(lab, 1, macs[1])
        assert pings(lab.sub(1), UP4) == 3 and pings(lab.sub(1), UP6) == 3
        assert spoofed(gw).get("alice") == (6, 564)  # the right MAC passes and is not counted

        # a session's address is bound to the session's MAC, live, and unbound when it ends
        from accounting.ledger import Ledger
        from accounting.operations import Operations
        from gateway.config import load_config

        with Ledger.open(gw.db) as ledger:
            Operations(ledger, load_config(gw.config), "test").session_start(
                "kea", "lab-kea", macs[3], "carol", ["100.64.3.2/32"], mac=macs[3])
        wait_for(lambda: f"100.64.3.2 . {macs[3]}" in bound(lab), 2, "the session's address bound")
        assert pings(lab.sub(3), UP4) == 3
        set_mac(lab, 3, SPOOF)
        assert pings(lab.sub(3), UP4, 2) == 0
        assert spoofed(gw).get("carol") == (2, 2 * 84)
        with Ledger.open(gw.db) as ledger:
            Operations(ledger, load_config(gw.config), "test").session_stop("kea", "lab-kea", macs[3])
        wait_for(lambda: "100.64.3.2" not in bound(lab), 2, "the session's end unbinds its address")
        assert pings(lab.sub(3), UP4) == 3  # no longer bound: passes with any MAC (counted for no one)
        assert 'tollgate_bound_addresses 2.0' in gw.metrics()
        assert gw.tollgate("ledger", "check").returncode == 0
        # a restart restores the bindings from the ledger (the kernel's are replaced, not added to)
        gw.stop()
        netns(lab.gw, "nft", "flush", "set", "inet", "tollgate", "bound_mac4", check=True)
        gw.start()
        assert f"100.64.1.2 . {macs[1]}" in bound(lab) and "100.64.3.2" not in bound(lab)
        set_mac(lab, 1, SPOOF)
        assert pings(lab.sub(1), UP4, 1) == 0
        assert spoofed(gw).get("alice") == (7, 564 + 84)  # the counter outlives the restart
    finally:
        for i in (1, 2, 3):
            set_mac(lab, i, macs[i])
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
