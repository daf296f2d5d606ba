"""The tc/eBPF program live in the lab: attached to the gateway namespace's
subscriber-facing veth (never a host interface), its counters against the far
end's nft counters, to the byte, both directions, IPv4 and IPv6 (with the
lab's masquerade on the upstream side), and a grant that stops traffic at the
byte."""

from __future__ import annotations

import json
import os
import time

import pytest

from gateway.lab import GATEWAY_UP4, GATEWAY_UP6, UPSTREAM4, UPSTREAM6, sh

PIN = f"/sys/fs/bpf/tollgate-test-lab-{os.getpid()}"
UPSTREAM_ZONE, OTHER_ZONE = 0, 1
FREE = (1 << 64) - 1

# Everything the upstream gets from / sends to the gateway's upstream address,
# which after masquerade is subscriber 1's traffic, less the neighbour
# discovery that the gateway itself does on the uplink.
FAR_END = f"""table inet tgbpf {{
  counter up4 {{}}
  counter down4 {{}}
  counter up6 {{}}
  counter down6 {{}}
  chain in {{ type filter hook input priority 0; policy accept;
    ip saddr {GATEWAY_UP4} counter name up4
    ip6 saddr {GATEWAY_UP6} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    ip6 saddr {GATEWAY_UP6} counter name up6
  }}
  chain out {{ type filter hook output priority 0; policy accept;
    ip daddr {GATEWAY_UP4} counter name down4
    ip6 daddr {GATEWAY_UP6} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    ip6 daddr {GATEWAY_UP6} counter name down6
  }}
}}
"""


@pytest.fixture(scope="module")
def bpf_lab(lab):
    from ext.bpfmaps import BpfError, Maps
    from ext.engine_py import ZoneRule
    from policy import bpf

    try:
        Maps.unpin(PIN)
        maps = Maps.load(PIN, max_slots=8, n_zones=2, default_zone=OTHER_ZONE)
    except (BpfError, ImportError) as exc:
        pytest.fail(f"the eBPF program does not load here: {exc}")
    try:
        maps.set_subscribers([1, 1], [f"{lab.sub_addr4(1)}/32", "2001:db8:100:1::/64"])
        maps.set_zones([ZoneRule("198.18.0.0/15", UPSTREAM_ZONE), ZoneRule("2001:db8:198::/48", UPSTREAM_ZONE)])
        for zone in (0, 1):
            for direction in (0, 1):
                maps.set_grant(1, zone, direction, FREE)
        sh("nft", "-f", "-", ns=lab.up, input=FAR_END)
        bpf.attach(["s1"], PIN, netns=lab.gw)
        assert bpf.present(["s1"], PIN, netns=lab.gw)
        yield lab, maps
    finally:
        try:
            bpf.detach(["s1"], PIN, netns=lab.gw, unpin=False)
        finally:
            maps.close()
            Maps.unpin(PIN)


def far_end(lab) -> dict[str, int]:
    out = json.loads(sh("nft", "-j", "list", "counters", "table", "inet", "tgbpf", ns=lab.up).stdout)
    return {c["counter"]["name"]: c["counter"]["bytes"] for c in out["nftables"] if "counter" in c}


def used(maps, direction: int) -> int:
    return maps.counter(1, UPSTREAM_ZONE, direction).used


def run(lab, *args: str, timeout: float = 30) -> None:
    sh(*args, ns=lab.sub(1), timeout=timeout)


def test_counters_equal_the_far_end_to_the_byte(bpf_lab):
    lab, maps = bpf_lab
    # IPv4 and IPv6 share the slot's counters: measure one family at a time
    for family, up_addr, key in ((4, UPSTREAM4, "4"), (6, UPSTREAM6, "6")):
        far0, up0, down0 = far_end(lab), used(maps, 0), used(maps, 1)
        run(lab, "ping", f"-{family}", "-c", "5", "-i", "0.05", "-s", "1000", "-W", "2", up_addr)
        run(lab, "iperf3", "-c", up_addr, "-u", "-b", "40M", "-l", "1200", "-n", "1M", "--connect-timeout", "3000")
        run(lab, "iperf3", "-c", up_addr, "-u", "-b", "40M", "-l", "1200", "-n", "1M", "-R",
            "--connect-timeout", "3000")
        run(lab, "iperf3", "-c", up_addr, "-n", "2M", "-R", "--connect-timeout", "3000")
        time.sleep(0.5)  # the last FIN/ACKs
        far1 = far_end(lab)
        up, down = used(maps, 0) - up0, used(maps, 1) - down0
        assert up == far1["up" + key] - far0["up" + key], f"IPv{family} upload"
        assert down == far1["down" + key] - far0["down" + key], f"IPv{family} download"
        assert up > 1_000_000 and down > 3_000_000  # the traffic did flow, through our program
    assert maps.stats()["dropped"] == (0, 0)


def test_a_grant_stops_traffic_at_the_byte(bpf_lab):
    lab, maps = bpf_lab
    far0, c0 = far_end(lab), maps.counter(1, UPSTREAM_ZONE, 0)
    # 1000-byte IP packets (20 IP + 8 ICMP + 972); the grant buys 5.5 of them
    maps.set_grant(1, UPSTREAM_ZONE, 0, c0.used + 5500)
    sh("ping", "-4", "-c", "10", "-i", "0.05", "-s", "972", "-W", "1", UPSTREAM4, ns=lab.sub(1), check=False,
       timeout=30)
    time.sleep(0.2)
    c1 = maps.counter(1, UPSTREAM_ZONE, 0)
    delivered = far_end(lab)["up4"] - far0["up4"]
    assert c1.used - c0.used == delivered == 5000
    assert c1.packets - c0.packets == 5
    assert c1.dropped_packets - c0.dropped_packets == 5 and c1.dropped_bytes - c0.dropped_bytes == 5000
    maps.set_grant(1, UPSTREAM_ZONE, 0, FREE)
    run(lab, "ping", "-4", "-c", "1", "-W", "2", UPSTREAM4)  # a raised grant flows again at once


def test_detach_leaves_nothing(bpf_lab):
    from policy import bpf

    lab, _maps = bpf_lab
    assert bpf.attached(lab.gw) == {"s1": {"ingress": bpf.attached(lab.gw)["s1"]["ingress"],
                                           "egress": bpf.attached(lab.gw)["s1"]["egress"]}}
    bpf.detach(None, PIN, netns=lab.gw, unpin=False)
    assert bpf.attached(lab.gw) == {} and not bpf.present(["s1"], PIN, netns=lab.gw)
    assert "clsact" not in sh("tc", "qdisc", "show", "dev", "s1", ns=lab.gw).stdout
    bpf.attach(["s1"], PIN, netns=lab.gw)  # for the fixture's own detach
    assert bpf.present(["s1"], PIN, netns=lab.gw)
