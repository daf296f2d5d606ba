"""The live gateway applies speed and connection limits from its tariffs and
from a subscriber's own terms (policy/limits.py does the kernel side; its own
tests are in test_limits.py): rates measured by iperf3 at the far end."""

from __future__ import annotations

import json
import sys
import time

from lablib import Gateway, lab_config, netns

UP4 = "198.18.0.2"
M = 10 ** 6


def iperf(lab, i: int, server: str, reverse: bool) -> float:
    """Bits per second the receiving end counted over 3 s of TCP."""
    out = netns(lab.sub(i), "iperf3", "-c", server, "-t", "3", "-O", "1", "-J", *(["-R"] if reverse else []),
                timeout=30, check=True).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


CONNECT = """
import json, socket, sys, time
host = sys.argv[1]
def connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, 80))
        return s
    except OSError as exc:
        s.close()
        return exc.__class__.__name__
held = [connect() for _ in range(3)]
fourth = connect()
held[0].close()
time.sleep(1)
again = connect()
print(json.dumps({"held": [isinstance(s, socket.socket) for s in held], "fourth": str(fourth),
                  "after_closing_one": isinstance(again, socket.socket)}))
"""


def test_the_gateway_applies_its_tariffs_limits(lab, tmp_path):
    """`tollgate run` with a tariff of 16 Mbit/s down, 8 up and 3 connections."""
    config = lab_config(2).replace(
        'price_unit = "MB"\n', 'price_unit = "MB"\nspeed = { up = "8M", down = "16M" }\nmax_connections = 3\n', 1)
    config = config.replace("[gateway]\n", '[gateway]\nlan_interfaces = ["s1", "s2"]\nwan_interfaces = ["uplink"]\n', 1)
    gw = Gateway(lab.gw, tmp_path, config).start()
    try:
        down = iperf(lab, 1, UP4, reverse=True)
        print(f"\n  through the gateway: download {down / M:.2f} Mbit/s (limit 16)")
        assert abs(down - 16 * M) <= 0.1 * 16 * M
        got = json.loads(netns(lab.sub(2), sys.executable, "-c", CONNECT, UP4, check=True, timeout=30).stdout)
        assert got["held"] == [True, True, True] and got["fourth"] in ("ConnectionRefusedError", "OSError")
        # the operator gives s1 a speed of its own: the running gateway follows
        assert gw.tollgate("terms", "s1", "--speed-down", "8M").returncode == 0
        time.sleep(2.5)
        own = iperf(lab, 1, UP4, reverse=True)
        print(f"  after `tollgate terms s1 --speed-down 8M`: {own / M:.2f} Mbit/s")
        assert abs(own - 8 * M) <= 0.1 * 8 * M
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; nft delete table inet tollgate_limits; "
                                  "iptables-nft -F FORWARD; ip6tables-nft -F FORWARD; "
                                  "for d in s1 s2 uplink; do tc qdisc del dev $d root; done")
