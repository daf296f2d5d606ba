"""Speed and connection limits in the lab: rates measured by iperf3 at the
far end, connections counted by the kernel."""

from __future__ import annotations

import json
import sys
import time

import pytest

from lablib import REPO, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
M = 10 ** 6


def limiter(lab, code: str) -> str:
    """Run ``code`` with ``r = RateLimiter(...)`` (the lab's interfaces) in the gateway namespace."""
    prelude = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from policy.rates import RateLimiter, Limits; "
               f"r = RateLimiter({[f's{i}' for i in range(1, lab.n + 1)]!r}, ['uplink']); ")
    return netns(lab.gw, sys.executable, "-c", prelude + code, check=True).stdout


@pytest.fixture
def limited(lab):
    limiter(lab, f"r.install(); r.set_subscriber(1, ['{lab.sub_addr4(1)}/32', '2001:db8:100:1::/64'], "
                 f"Limits(up_bps=8 * {M}, down_bps=16 * {M}, max_connections=3))")
    yield
    limiter(lab, "r.remove()")


def iperf(lab, i: int, server: str, reverse: bool) -> float:
    """Bits per second the receiving end counted over 3 s of TCP."""
    out = netns(lab.sub(i), "iperf3", "-c", server, "-t", "3", "-O", "1", "-J", *(["-R"] if reverse else []),
                timeout=30, check=True).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


@pytest.mark.parametrize("server", [UP4, UP6], ids=["ipv4", "ipv6"])
def test_speed_limits_both_directions(lab, limited, server):
    up = iperf(lab, 1, server, reverse=False)
    down = iperf(lab, 1, server, reverse=True)
    print(f"\n  {server}: upload {up / M:.2f} Mbit/s (limit 8), download {down / M:.2f} Mbit/s (limit 16)")
    assert abs(up - 8 * M) <= 0.1 * 8 * M
    assert abs(down - 16 * M) <= 0.1 * 16 * M
    free = iperf(lab, 2, server, reverse=True)  # a subscriber without limits is not shaped
    assert free > 2 * 16 * M


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


def test_connection_limit(lab, limited):
    got = json.loads(netns(lab.sub(1), sys.executable, "-c", CONNECT, UP4, check=True, timeout=30).stdout)
    assert got["held"] == [True, True, True]
    assert got["fourth"] in ("ConnectionRefusedError", "OSError")  # rejected at once, not timed out
    assert got["after_closing_one"] is True
    other = json.loads(netns(lab.sub(2), sys.executable, "-c", CONNECT, UP4, check=True, timeout=30).stdout)
    assert other["fourth"] == "<socket.socket" or other["fourth"].startswith("<socket.socket")  # no limit for s2


def test_bad_rates_are_refused():
    from accounting.money import parse_rate

    assert parse_rate("10M") == 10 * M and parse_rate("512k") == 512_000 and parse_rate("1.5G") == 1_500_000_000
    for bad in ("fast", "10X", "-5M", "1k", "0"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_the_gateway_applies_its_tariffs_limits(lab, tmp_path):
    """`tollgate run` with a tariff of 16 Mbit/s down, 8 up and 3 connections."""
    from lablib import Gateway, lab_config

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
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; nft delete table inet tollgate_rates; "
                                  "iptables-nft -F FORWARD; ip6tables-nft -F FORWARD; "
                                  "for d in s1 s2 uplink; do tc qdisc del dev $d root; done")
