"""gateway/dhcp_hook.py's Kea parsing against the environment a real Kea gave.

Recorded from Debian's kea-dhcp4-server 2.2.0 with libdhcp_run_script.so (``"sync": false``) in a lab
namespace, a real dhclient asking and then releasing (the hook script dumped ``env | sort``; PATH, PWD,
SHLVL and _ left out). What reality showed: a DHCPREQUEST is one ``leases4_committed`` (LEASES4_AT0_*, an
empty CLIENT_ID when the client sends none); a DHCPRELEASE is *two* calls, ``lease4_release`` (LEASE4_*)
and ``leases4_committed`` with the released lease in DELETED_LEASES4_AT0_* and LEASES4_SIZE=0, run at
once as two processes (async), so each of them ends the session and the second finds nothing to end.
tests/linux/test_kea_lab.py runs the real thing end to end."""

from __future__ import annotations

import time

import pytest

from accounting.ledger import Ledger
from accounting.operations import Operations
from gateway.config import load_config
from gateway.dhcp_hook import HookError, apply, kea_leases

QUERY_REQUEST = """QUERY4_CIADDR=0.0.0.0
QUERY4_FLAGS=0
QUERY4_GIADDR=0.0.0.0
QUERY4_HOPS=0
QUERY4_HWADDR=be:3f:66:e9:1d:94
QUERY4_HWADDR_TYPE=1
QUERY4_IFACE_INDEX=2
QUERY4_IFACE_NAME=kea0
QUERY4_LOCAL_ADDR=255.255.255.255
QUERY4_LOCAL_HWADDR=ff:ff:ff:ff:ff:ff
QUERY4_LOCAL_HWADDR_TYPE=1
QUERY4_LOCAL_PORT=67
QUERY4_RELAYED=false
QUERY4_REMOTE_ADDR=0.0.0.0
QUERY4_REMOTE_HWADDR=be:3f:66:e9:1d:94
QUERY4_REMOTE_HWADDR_TYPE=1
QUERY4_REMOTE_PORT=68
QUERY4_SECS=0
QUERY4_SIADDR=0.0.0.0
QUERY4_TXID=740287812
QUERY4_TYPE=DHCPREQUEST
QUERY4_YIADDR=0.0.0.0
"""
QUERY_RELEASE = """QUERY4_CIADDR=100.64.201.10
QUERY4_FLAGS=0
QUERY4_GIADDR=0.0.0.0
QUERY4_HOPS=0
QUERY4_HWADDR=be:3f:66:e9:1d:94
QUERY4_HWADDR_TYPE=1
QUERY4_IFACE_INDEX=2
QUERY4_IFACE_NAME=kea0
QUERY4_LOCAL_ADDR=100.64.201.1
QUERY4_LOCAL_HWADDR=5a:00:6d:b6:d6:cb
QUERY4_LOCAL_HWADDR_TYPE=1
QUERY4_LOCAL_PORT=67
QUERY4_RELAYED=false
QUERY4_REMOTE_ADDR=100.64.201.10
QUERY4_REMOTE_HWADDR=be:3f:66:e9:1d:94
QUERY4_REMOTE_HWADDR_TYPE=1
QUERY4_REMOTE_PORT=68
QUERY4_SECS=0
QUERY4_SIADDR=0.0.0.0
QUERY4_TXID=1776722042
QUERY4_TYPE=DHCPRELEASE
QUERY4_YIADDR=0.0.0.0
"""
COMMITTED = """DELETED_LEASES4_SIZE=0
LEASES4_AT0_ADDRESS=100.64.201.10
LEASES4_AT0_CLIENT_ID=
LEASES4_AT0_CLTT=1796136933
LEASES4_AT0_HOSTNAME=vm
LEASES4_AT0_HWADDR=be:3f:66:e9:1d:94
LEASES4_AT0_HWADDR_TYPE=1
LEASES4_AT0_STATE=default
LEASES4_AT0_SUBNET_ID=1
LEASES4_AT0_VALID_LIFETIME=120
LEASES4_SIZE=1
""" + QUERY_REQUEST
RELEASE = """LEASE4_ADDRESS=100.64.201.10
LEASE4_CLIENT_ID=
LEASE4_CLTT=1796136933
LEASE4_HOSTNAME=vm
LEASE4_HWADDR=be:3f:66:e9:1d:94
LEASE4_HWADDR_TYPE=1
LEASE4_STATE=default
LEASE4_SUBNET_ID=1
LEASE4_VALID_LIFETIME=120
""" + QUERY_RELEASE
COMMITTED_RELEASE = """DELETED_LEASES4_AT0_ADDRESS=100.64.201.10
DELETED_LEASES4_AT0_CLIENT_ID=
DELETED_LEASES4_AT0_CLTT=1796136933
DELETED_LEASES4_AT0_HOSTNAME=vm
DELETED_LEASES4_AT0_HWADDR=be:3f:66:e9:1d:94
DELETED_LEASES4_AT0_HWADDR_TYPE=1
DELETED_LEASES4_AT0_STATE=default
DELETED_LEASES4_AT0_SUBNET_ID=1
DELETED_LEASES4_AT0_VALID_LIFETIME=120
DELETED_LEASES4_SIZE=1
LEASES4_SIZE=0
""" + QUERY_RELEASE
MAC = "be:3f:66:e9:1d:94"
EXPIRES = (1796136933 + 120) * 10**9


def env(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_a_request_commits_one_lease():
    hook, start, stop = kea_leases(["leases4_committed"], env(COMMITTED))
    assert hook == "leases4_committed" and stop == []
    (lease,) = start
    assert (lease.network, lease.mac, lease.client_id, lease.circuit_id, lease.expires_ns, lease.key) == \
        ("100.64.201.10/32", MAC, None, None, EXPIRES, MAC)


def test_a_release_is_two_calls_that_both_end_the_lease():
    for argv, text in ((["lease4_release"], RELEASE), (["leases4_committed"], COMMITTED_RELEASE)):
        _hook, start, stop = kea_leases(argv, env(text))
        assert start == [] and [(x.network, x.key) for x in stop] == [("100.64.201.10/32", MAC)]


def test_the_recorded_calls_against_a_ledger(tmp_path):
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text('[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10"]\n[[tariff]]\nname = "b"\n'
                        'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    cfg = load_config(cfg_path)
    with Ledger.open(tmp_path / "l.db") as ledger:
        ops = Operations(ledger, cfg, "test")
        ops.add("alice", "b")
        ops.bind("alice", "mac", MAC)
        out = []

        cltt = str(int(time.time()))  # the recorded lease ended long ago: the same lease, given now

        def run(argv, text):
            _h, start, stop = kea_leases(argv, env(text.replace("1796136933", cltt)))
            return apply(ops, "kea", "kea1", start, stop, ("mac",), 5 * 10**9, out=_Sink(out))

        assert run(["leases4_committed"], COMMITTED) == 0
        (row,) = ops.sessions(live=True)
        assert (row["network"], row["subscriber"], row["mac"], row["expires_ns"]) == \
            ("100.64.201.10/32", "alice", MAC, (int(cltt) + 120 + 5) * 10**9)
        assert run(["lease4_release"], RELEASE) == 0
        assert run(["leases4_committed"], COMMITTED_RELEASE) == 0  # the second of the pair: nothing left to end
        assert ops.sessions(live=True) == []
        assert [r["end_reason"] for r in ops.sessions(live=False)] == ["released"]
        assert out == []


class _Sink(list):
    def __init__(self, into):
        self.into = into

    def write(self, s):
        if s.strip():
            self.into.append(s)


def test_garbage_in_the_kea_environment_is_refused():
    bad = env(COMMITTED).copy()
    bad["LEASES4_AT0_HWADDR"] = "not-a-mac"
    with pytest.raises(HookError):
        kea_leases(["leases4_committed"], bad)
    bad = env(COMMITTED).copy()
    del bad["LEASES4_AT0_ADDRESS"]
    with pytest.raises(HookError):
        kea_leases(["leases4_committed"], bad)


# A DHCPDECLINE (the client found the address in use), relayed, to the same Kea 2.2.0 (scapy as the relay agent):
# lease4_decline with the lease as it was, and at once a leases4_committed whose lease is the address in
# probation: STATE=declined, no HWADDR, no client id, the probation period as its lifetime. Before, that second
# call was refused as garbage (exit 2: "neither a hardware address nor a client id").
DECLINE = """LEASE4_ADDRESS=100.64.203.10
LEASE4_CLIENT_ID=
LEASE4_CLTT=1796145144
LEASE4_HOSTNAME=
LEASE4_HWADDR=52:54:00:00:cb:06
LEASE4_HWADDR_TYPE=1
LEASE4_STATE=default
LEASE4_SUBNET_ID=1
LEASE4_VALID_LIFETIME=120
QUERY4_CIADDR=0.0.0.0
QUERY4_GIADDR=100.64.203.1
QUERY4_HWADDR=52:54:00:00:cb:06
QUERY4_HWADDR_TYPE=1
QUERY4_OPTION_82=0x0106000400640107020963706520616C696365
QUERY4_OPTION_82_SUB_OPTION_1=0x000400640107
QUERY4_OPTION_82_SUB_OPTION_2=0x63706520616C696365
QUERY4_RELAYED=true
QUERY4_TYPE=DHCPDECLINE
"""
COMMITTED_DECLINED = """DELETED_LEASES4_SIZE=0
LEASES4_AT0_ADDRESS=100.64.203.10
LEASES4_AT0_CLIENT_ID=
LEASES4_AT0_CLTT=1796145144
LEASES4_AT0_HOSTNAME=
LEASES4_AT0_HWADDR=
LEASES4_AT0_HWADDR_TYPE=1
LEASES4_AT0_STATE=declined
LEASES4_AT0_SUBNET_ID=1
LEASES4_AT0_VALID_LIFETIME=86400
LEASES4_SIZE=1
QUERY4_CIADDR=0.0.0.0
QUERY4_GIADDR=100.64.203.1
QUERY4_HWADDR=52:54:00:00:cb:06
QUERY4_HWADDR_TYPE=1
QUERY4_OPTION_82=0x0106000400640107020963706520616C696365
QUERY4_OPTION_82_SUB_OPTION_1=0x000400640107
QUERY4_OPTION_82_SUB_OPTION_2=0x63706520616C696365
QUERY4_RELAYED=true
QUERY4_TYPE=DHCPDECLINE
"""


def test_a_decline_is_two_calls_that_both_end_the_session_and_start_nothing(tmp_path):
    from gateway.dhcp_hook import stop_reason

    _h, start, (lease,) = kea_leases(["leases4_committed"], env(COMMITTED_DECLINED))
    assert start == [] and not lease.held and lease.network == "100.64.203.10/32"
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text('[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10"]\n[[tariff]]\nname = "b"\n'
                        'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    for first in ("lease4_decline", "leases4_committed"):
        with Ledger.open(tmp_path / f"{first}.db") as ledger:
            ops = Operations(ledger, load_config(cfg_path), "test")
            ops.add("carol", "b")
            ops.bind("carol", "circuit_id", "0x000400640107")
            now = str(int(time.time()))
            _h, start, _ = kea_leases(["lease4_renew"], env(DECLINE.replace("1796145144", now)))
            assert apply(ops, "kea", "kea1", start, [], ("circuit_id",), 0) == 0
            assert [r["subscriber"] for r in ops.sessions(live=True)] == ["carol"]
            calls = [("lease4_decline", DECLINE), ("leases4_committed", COMMITTED_DECLINED)]
            for hook, text in sorted(calls, key=lambda c: c[0] != first):
                h, start, stop = kea_leases([hook], env(text.replace("1796145144", now)))
                assert start == [] and apply(ops, "kea", "kea1", start, stop, ("circuit_id",), 0,
                                             reason=stop_reason(h)) == 0
            assert ops.sessions(live=True) == []
            assert [r["end_reason"] for r in ops.sessions(live=False)] == ["declined"]
