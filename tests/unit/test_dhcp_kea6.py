"""gateway/dhcp_hook.py's DHCPv6 path (Kea's lease6 hooks) against the environments a real Kea gave.

Recorded from Debian's kea-dhcp6-server 2.2.0 with libdhcp_run_script.so (``"sync": false``) in lab namespaces,
the hook script dumping ``env | sort`` (PATH, PWD, SHLVL and _ left out; the argument is the file's name):
a real ``dhclient -6`` (IA_NA), ``dhclient -6 -P`` (IA_PD, a /56 of the pd-pool 2001:db8:100:c000::/52) and
``dhclient -6 -N -P -D LL`` (both in one exchange, DUID-LL) asking, renewing (renew-timer 3 s) and releasing;
a dhclient killed with SIGKILL and its leases left to expire (valid-lifetime 8 s, reclaim every 1 s); a REBIND
and a DECLINE sent with scapy for a dhclient's lease. What reality showed:

- a lease is ``<prefix>_ADDRESS`` and ``<prefix>_PREFIX_LEN`` (128 for IA_NA; the delegated length for IA_PD,
  whose ADDRESS is the prefix, ``2001:db8:100:c000::``) with ``<prefix>_TYPE`` IA_NA or IA_PD, the DUID as hex
  with colons, the MAC Kea derived (``HWADDR``, type 1), ``IAID`` as a decimal number, CLTT and lifetimes;
- a REQUEST is one ``leases6_committed`` with every IA of the exchange as LEASES6_AT<i>;
- a RENEW is one ``lease6_renew`` per IA (LEASE6_*, PKT6_IA_*) and a ``leases6_committed`` at once, a REBIND
  the same with ``lease6_rebind``;
- a RELEASE is ``lease6_release`` and ``leases6_committed`` with the lease in DELETED_LEASES6_AT0, at once;
- reclamation is ``lease6_expire`` (LEASE6_*, REMOVE_LEASE=true, no QUERY6_*);
- a DECLINE is ``lease6_decline`` (the lease as it was) and a ``leases6_committed`` whose LEASES6_AT0 is the
  address in probation: STATE=declined, DUID "00", no HWADDR, the probation period (86400 s) as its lifetime.
  That one must not start anything (it did before: a lease of nobody's, refused as garbage with exit 2).

tests/linux/test_kea6_lab.py runs the real thing end to end."""

from __future__ import annotations

import ipaddress
import re
import time

import pytest
from hypothesis import given, settings, strategies as st

from accounting.ledger import Ledger
from accounting.operations import Operations
from gateway.config import load_config
from gateway.dhcp_hook import HookError, apply, kea_leases, main, stop_reason

NA_COMMITTED = """DELETED_LEASES6_SIZE=0
LEASES6_AT0_ADDRESS=2001:db8:100:c9::100
LEASES6_AT0_CLTT=1796144870
LEASES6_AT0_DUID=00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01
LEASES6_AT0_HOSTNAME=
LEASES6_AT0_HWADDR=52:54:00:00:ca:01
LEASES6_AT0_HWADDR_TYPE=1
LEASES6_AT0_IAID=51713
LEASES6_AT0_PREFERRED_LIFETIME=90
LEASES6_AT0_PREFIX_LEN=128
LEASES6_AT0_STATE=default
LEASES6_AT0_SUBNET_ID=1
LEASES6_AT0_TYPE=IA_NA
LEASES6_AT0_VALID_LIFETIME=120
LEASES6_SIZE=1
QUERY6_CLIENT_ID=00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=8708685
QUERY6_TYPE=REQUEST
"""
NA_RELEASE = """LEASE6_ADDRESS=2001:db8:100:c9::100
LEASE6_CLTT=1796144870
LEASE6_DUID=00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=90
LEASE6_PREFIX_LEN=128
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_NA
LEASE6_VALID_LIFETIME=120
QUERY6_CLIENT_ID=00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=15192392
QUERY6_TYPE=RELEASE
"""
NA_COMMITTED_RELEASE = """DELETED_LEASES6_AT0_ADDRESS=2001:db8:100:c9::100
DELETED_LEASES6_AT0_CLTT=1796144870
DELETED_LEASES6_AT0_DUID=00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01
DELETED_LEASES6_AT0_HOSTNAME=
DELETED_LEASES6_AT0_HWADDR=52:54:00:00:ca:01
DELETED_LEASES6_AT0_HWADDR_TYPE=1
DELETED_LEASES6_AT0_IAID=51713
DELETED_LEASES6_AT0_PREFERRED_LIFETIME=90
DELETED_LEASES6_AT0_PREFIX_LEN=128
DELETED_LEASES6_AT0_STATE=default
DELETED_LEASES6_AT0_SUBNET_ID=1
DELETED_LEASES6_AT0_TYPE=IA_NA
DELETED_LEASES6_AT0_VALID_LIFETIME=120
DELETED_LEASES6_SIZE=1
LEASES6_SIZE=0
QUERY6_CLIENT_ID=00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=15192392
QUERY6_TYPE=RELEASE
"""
PD_COMMITTED = """DELETED_LEASES6_SIZE=0
LEASES6_AT0_ADDRESS=2001:db8:100:c000::
LEASES6_AT0_CLTT=1796144881
LEASES6_AT0_DUID=00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01
LEASES6_AT0_HOSTNAME=
LEASES6_AT0_HWADDR=52:54:00:00:ca:01
LEASES6_AT0_HWADDR_TYPE=1
LEASES6_AT0_IAID=51713
LEASES6_AT0_PREFERRED_LIFETIME=90
LEASES6_AT0_PREFIX_LEN=56
LEASES6_AT0_STATE=default
LEASES6_AT0_SUBNET_ID=1
LEASES6_AT0_TYPE=IA_PD
LEASES6_AT0_VALID_LIFETIME=120
LEASES6_SIZE=1
QUERY6_CLIENT_ID=00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=1188658
QUERY6_TYPE=REQUEST
"""
PD_RELEASE = """LEASE6_ADDRESS=2001:db8:100:c000::
LEASE6_CLTT=1796144881
LEASE6_DUID=00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=90
LEASE6_PREFIX_LEN=56
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_PD
LEASE6_VALID_LIFETIME=120
QUERY6_CLIENT_ID=00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=15647830
QUERY6_TYPE=RELEASE
"""
PD_COMMITTED_RELEASE = """DELETED_LEASES6_AT0_ADDRESS=2001:db8:100:c000::
DELETED_LEASES6_AT0_CLTT=1796144881
DELETED_LEASES6_AT0_DUID=00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01
DELETED_LEASES6_AT0_HOSTNAME=
DELETED_LEASES6_AT0_HWADDR=52:54:00:00:ca:01
DELETED_LEASES6_AT0_HWADDR_TYPE=1
DELETED_LEASES6_AT0_IAID=51713
DELETED_LEASES6_AT0_PREFERRED_LIFETIME=90
DELETED_LEASES6_AT0_PREFIX_LEN=56
DELETED_LEASES6_AT0_STATE=default
DELETED_LEASES6_AT0_SUBNET_ID=1
DELETED_LEASES6_AT0_TYPE=IA_PD
DELETED_LEASES6_AT0_VALID_LIFETIME=120
DELETED_LEASES6_SIZE=1
LEASES6_SIZE=0
QUERY6_CLIENT_ID=00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=15647830
QUERY6_TYPE=RELEASE
"""
BOTH_COMMITTED = """DELETED_LEASES6_SIZE=0
LEASES6_AT0_ADDRESS=2001:db8:100:c9::100
LEASES6_AT0_CLTT=1796144912
LEASES6_AT0_DUID=00:03:00:01:52:54:00:00:ca:01
LEASES6_AT0_HOSTNAME=
LEASES6_AT0_HWADDR=52:54:00:00:ca:01
LEASES6_AT0_HWADDR_TYPE=1
LEASES6_AT0_IAID=51713
LEASES6_AT0_PREFERRED_LIFETIME=20
LEASES6_AT0_PREFIX_LEN=128
LEASES6_AT0_STATE=default
LEASES6_AT0_SUBNET_ID=1
LEASES6_AT0_TYPE=IA_NA
LEASES6_AT0_VALID_LIFETIME=30
LEASES6_AT1_ADDRESS=2001:db8:100:c000::
LEASES6_AT1_CLTT=1796144912
LEASES6_AT1_DUID=00:03:00:01:52:54:00:00:ca:01
LEASES6_AT1_HOSTNAME=
LEASES6_AT1_HWADDR=52:54:00:00:ca:01
LEASES6_AT1_HWADDR_TYPE=1
LEASES6_AT1_IAID=51713
LEASES6_AT1_PREFERRED_LIFETIME=20
LEASES6_AT1_PREFIX_LEN=56
LEASES6_AT1_STATE=default
LEASES6_AT1_SUBNET_ID=1
LEASES6_AT1_TYPE=IA_PD
LEASES6_AT1_VALID_LIFETIME=30
LEASES6_SIZE=2
QUERY6_CLIENT_ID=00:03:00:01:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=9280830
QUERY6_TYPE=REQUEST
"""
RENEW_NA = """LEASE6_ADDRESS=2001:db8:100:c9::100
LEASE6_CLTT=1796144915
LEASE6_DUID=00:03:00:01:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=20
LEASE6_PREFIX_LEN=128
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_NA
LEASE6_VALID_LIFETIME=30
PKT6_IA_IAID=51713
PKT6_IA_IA_T1=0
PKT6_IA_IA_T2=0
PKT6_IA_IA_TYPE=3
QUERY6_CLIENT_ID=00:03:00:01:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=7734012
QUERY6_TYPE=RENEW
"""
RENEW_PD = """LEASE6_ADDRESS=2001:db8:100:c000::
LEASE6_CLTT=1796144915
LEASE6_DUID=00:03:00:01:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=20
LEASE6_PREFIX_LEN=56
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_PD
LEASE6_VALID_LIFETIME=30
PKT6_IA_IAID=51713
PKT6_IA_IA_T1=0
PKT6_IA_IA_T2=0
PKT6_IA_IA_TYPE=25
QUERY6_CLIENT_ID=00:03:00:01:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=7734012
QUERY6_TYPE=RENEW
"""
EXPIRE_NA = """LEASE6_ADDRESS=2001:db8:100:c9::100
LEASE6_CLTT=1796145103
LEASE6_DUID=00:03:00:01:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=6
LEASE6_PREFIX_LEN=128
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_NA
LEASE6_VALID_LIFETIME=8
REMOVE_LEASE=true
"""
EXPIRE_PD = """LEASE6_ADDRESS=2001:db8:100:c000::
LEASE6_CLTT=1796145103
LEASE6_DUID=00:03:00:01:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=6
LEASE6_PREFIX_LEN=56
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_PD
LEASE6_VALID_LIFETIME=8
REMOVE_LEASE=true
"""
REBIND = """LEASE6_ADDRESS=2001:db8:100:c9::101
LEASE6_CLTT=1796145130
LEASE6_DUID=00:03:00:01:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=6
LEASE6_PREFIX_LEN=128
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_NA
LEASE6_VALID_LIFETIME=8
PKT6_IA_IAID=51713
PKT6_IA_IA_T1=0
PKT6_IA_IA_T2=0
PKT6_IA_IA_TYPE=3
QUERY6_CLIENT_ID=00:03:00:01:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=273
QUERY6_TYPE=REBIND
"""
DECLINE = """LEASE6_ADDRESS=2001:db8:100:c9::101
LEASE6_CLTT=1796145130
LEASE6_DUID=00:03:00:01:52:54:00:00:ca:01
LEASE6_HOSTNAME=
LEASE6_HWADDR=52:54:00:00:ca:01
LEASE6_HWADDR_TYPE=1
LEASE6_IAID=51713
LEASE6_PREFERRED_LIFETIME=6
LEASE6_PREFIX_LEN=128
LEASE6_STATE=default
LEASE6_SUBNET_ID=1
LEASE6_TYPE=IA_NA
LEASE6_VALID_LIFETIME=8
QUERY6_CLIENT_ID=00:03:00:01:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=546
QUERY6_TYPE=DECLINE
"""
COMMITTED_DECLINED = """DELETED_LEASES6_SIZE=0
LEASES6_AT0_ADDRESS=2001:db8:100:c9::101
LEASES6_AT0_CLTT=1796145130
LEASES6_AT0_DUID=00
LEASES6_AT0_HOSTNAME=
LEASES6_AT0_HWADDR=
LEASES6_AT0_HWADDR_TYPE=
LEASES6_AT0_IAID=51713
LEASES6_AT0_PREFERRED_LIFETIME=0
LEASES6_AT0_PREFIX_LEN=128
LEASES6_AT0_STATE=declined
LEASES6_AT0_SUBNET_ID=1
LEASES6_AT0_TYPE=IA_NA
LEASES6_AT0_VALID_LIFETIME=86400
LEASES6_SIZE=1
QUERY6_CLIENT_ID=00:03:00:01:52:54:00:00:ca:01
QUERY6_IFACE_INDEX=2
QUERY6_IFACE_NAME=k6g
QUERY6_LOCAL_ADDR=ff02::1:2
QUERY6_LOCAL_PORT=0
QUERY6_PROTO=UDP
QUERY6_REMOTE_ADDR=fe80::5054:ff:fe00:ca01
QUERY6_REMOTE_HWADDR=
QUERY6_REMOTE_HWADDR_TYPE=
QUERY6_REMOTE_PORT=546
QUERY6_TXID=546
QUERY6_TYPE=DECLINE
"""
NS = 10**9
NA, PD = "2001:db8:100:c9::100/128", "2001:db8:100:c000::/56"
MAC = "52:54:00:00:ca:01"
DUID_LL = "00:03:00:01:52:54:00:00:ca:01"  # dhclient -D LL: type 3, hardware type 1, the MAC


def env(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def parse(hook: str, text: str):
    return kea_leases([hook], env(text))


def test_a_request_commits_the_address_and_the_prefix_as_leases_of_their_own():
    _, (na,), stop = parse("leases6_committed", NA_COMMITTED)
    assert stop == []
    duid = "00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01"  # dhclient's default DUID-LLT
    assert (na.network, na.mac, na.client_id, na.circuit_id, na.expires_ns, na.key) == \
        (NA, MAC, duid, None, (1796144870 + 120) * NS, f"{NA} ia_na duid {duid}")
    _, (pd,), _ = parse("leases6_committed", PD_COMMITTED)
    assert (pd.network, pd.mac, pd.key) == (PD, MAC, f"{PD} ia_pd duid 00:01:00:01:32:a1:bb:70:52:54:00:00:ca:01")
    _, both, _ = parse("leases6_committed", BOTH_COMMITTED)
    assert [(x.network, x.client_id) for x in both] == [(NA, DUID_LL), (PD, DUID_LL)]
    assert len({x.key for x in both}) == 2  # the address and the prefix come and go separately


@pytest.mark.parametrize("hook,text,network", [
    ("lease6_renew", RENEW_NA, NA), ("lease6_renew", RENEW_PD, PD),
    ("lease6_rebind", REBIND, "2001:db8:100:c9::101/128")])
def test_renew_and_rebind_start_or_confirm(hook, text, network):
    _, (lease,), stop = parse(hook, text)
    assert stop == [] and lease.network == network and lease.client_id == DUID_LL and lease.mac == MAC


@pytest.mark.parametrize("hook,text,network,reason", [
    ("lease6_release", NA_RELEASE, NA, "released"), ("leases6_committed", NA_COMMITTED_RELEASE, NA, "released"),
    ("lease6_release", PD_RELEASE, PD, "released"), ("leases6_committed", PD_COMMITTED_RELEASE, PD, "released"),
    ("lease6_expire", EXPIRE_NA, NA, "expired"), ("lease6_expire", EXPIRE_PD, PD, "expired"),
    ("lease6_decline", DECLINE, "2001:db8:100:c9::101/128", "declined")])
def test_release_expire_and_decline_end_the_lease(hook, text, network, reason):
    _, start, (lease,) = parse(hook, text)
    assert start == [] and lease.network == network and lease.held and stop_reason(hook) == reason


def test_the_committed_call_of_a_decline_starts_nothing_and_ends_whatever_held_the_address():
    _, start, (lease,) = parse("leases6_committed", COMMITTED_DECLINED)
    assert start == [] and not lease.held and lease.end_reason == "declined"
    assert lease.network == "2001:db8:100:c9::101/128"


def _ops(tmp_path, ledger):
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text('[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10", "2001:db8:100::/48"]\n'
                        '[[tariff]]\nname = "b"\nprice_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    ops = Operations(ledger, load_config(cfg_path), "test")
    ops.add("alice", "b")
    ops.add("bob", "b")
    ops.bind("alice", "client_id", DUID_LL)
    ops.bind("bob", "mac", MAC)
    return ops


class _Sink(list):
    def write(self, s):
        if s.strip():
            self.append(s)


def test_the_recorded_calls_against_a_ledger_by_duid_or_by_mac(tmp_path):
    now = str(int(time.time()))  # the recorded leases ended long ago: the same leases, given now

    def run(ops, hook, text, by):
        h, start, stop = kea_leases([hook], env(text.replace("1796144912", now).replace("1796144915", now)
                                                .replace("1796145103", now)))
        out = _Sink()
        code = apply(ops, "kea", "kea6", start, stop, by, 5 * NS, out=out, reason=stop_reason(h))
        return code, out

    with Ledger.open(tmp_path / "l.db") as ledger:
        ops = _ops(tmp_path, ledger)
        # by DUID first: alice's (her DUID binding), though bob's MAC binding names the lease too
        assert run(ops, "leases6_committed", BOTH_COMMITTED, ("client_id", "mac")) == (0, [])
        live = {r["network"]: r for r in ops.sessions(live=True)}
        assert {n: r["subscriber"] for n, r in live.items()} == {NA: "alice", PD: "alice"}
        assert live[PD]["expires_ns"] == (int(now) + 30 + 5) * NS and live[NA]["mac"] == MAC
        # renewals confirm (the same two sessions, nothing new)
        assert run(ops, "lease6_renew", RENEW_NA, ("client_id", "mac"))[0] == 0
        assert run(ops, "leases6_committed", BOTH_COMMITTED, ("client_id", "mac"))[0] == 0
        assert [r["id"] for r in ops.sessions(live=True)] == [r["id"] for r in live.values()]
        # the address released (both calls of the pair); the prefix stays until it expires
        # (recorded with dhclient's DUID-LLT: the same release as DUID-LL's, which this session has)
        na_release = NA_RELEASE.replace("00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01", DUID_LL)
        assert run(ops, "lease6_release", na_release, ())[0] == 0
        assert run(ops, "leases6_committed", NA_COMMITTED_RELEASE.replace(
            "00:01:00:01:32:a1:bb:65:52:54:00:00:ca:01", DUID_LL), ())[0] == 0
        assert [r["network"] for r in ops.sessions(live=True)] == [PD]
        assert run(ops, "lease6_expire", EXPIRE_PD, ())[0] == 0
        assert ops.sessions(live=True) == []
        assert sorted((r["network"], r["end_reason"]) for r in ops.sessions(live=False)) == \
            [(PD, "expired"), (NA, "released")]
        # by MAC only: bob's
        assert run(ops, "leases6_committed", BOTH_COMMITTED, ("mac",))[0] == 0
        assert {r["subscriber"] for r in ops.sessions(live=True)} == {"bob"}
        assert ledger.check_invariants() == []


def test_a_dual_stack_client_keeps_its_v4_lease_and_its_v6_leases_apart(tmp_path):
    from tests.unit.test_dhcp_kea import COMMITTED as V4_COMMITTED

    now = str(int(time.time()))
    with Ledger.open(tmp_path / "l.db") as ledger:
        ops = _ops(tmp_path, ledger)
        ops.bind("bob", "mac", "be:3f:66:e9:1d:94")
        for hook, text in (("leases6_committed", BOTH_COMMITTED), ("leases4_committed", V4_COMMITTED),
                           ("leases6_committed", BOTH_COMMITTED)):
            _, start, stop = kea_leases([hook], env(text.replace("1796144912", now).replace("1796136933", now)))
            # one --server for both: a v4 lease (keyed by MAC) must not replace the v6 ones, nor they it
            assert apply(ops, "kea", "kea", start, stop, ("mac",), 0, out=_Sink()) == 0
        assert sorted(r["network"] for r in ops.sessions(live=True)) == ["100.64.201.10/32", PD, NA]
        assert [r for r in ops.sessions(live=False)] == []


def test_a_decline_ends_the_session_whichever_of_its_two_calls_comes_first(tmp_path):
    now = str(int(time.time()))
    for order in ((("lease6_decline", DECLINE), ("leases6_committed", COMMITTED_DECLINED)),
                  (("leases6_committed", COMMITTED_DECLINED), ("lease6_decline", DECLINE))):
        with Ledger.open(tmp_path / f"l{order[0][0]}.db") as ledger:
            ops = _ops(tmp_path, ledger)
            _, start, _ = kea_leases(["lease6_rebind"], env(REBIND.replace("1796145130", now)))
            assert apply(ops, "kea", "kea6", start, [], ("client_id",), 0, out=_Sink()) == 0
            assert [r["network"] for r in ops.sessions(live=True)] == ["2001:db8:100:c9::101/128"]
            for hook, text in order:
                h, start, stop = kea_leases([hook], env(text.replace("1796145130", now)))
                assert start == []
                assert apply(ops, "kea", "kea6", start, stop, ("client_id",), 0, out=_Sink(),
                             reason=stop_reason(h)) == 0
            assert ops.sessions(live=True) == []
            assert [r["end_reason"] for r in ops.sessions(live=False)] == ["declined"]


# ---- garbage in: a clear error, exit 2, nothing written, no traceback ----------------------------------------

def _without(text, key):
    return "\n".join(line for line in text.splitlines() if not line.startswith(key + "="))


# (argv, environment, what the error names)
GARBAGE = [
    (["lease6_renew"], "", "LEASE6_ADDRESS"),  # nothing in the environment
    (["lease6_renew"], _without(RENEW_NA, "LEASE6_ADDRESS"), "LEASE6_ADDRESS"),
    (["lease6_renew"], RENEW_NA.replace("2001:db8:100:c9::100", "100.64.1.2"), "IPv6"),  # an IPv4 address in a v6 lease
    (["lease6_renew"], RENEW_NA.replace("2001:db8:100:c9::100", "2001:db8:100:c9::zz"), "not an IP address"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_TYPE=IA_NA", "LEASE6_TYPE=IA_XX"), "LEASE6_TYPE"),
    (["lease6_renew"], _without(RENEW_NA, "LEASE6_TYPE"), "LEASE6_TYPE"),
    (["lease6_renew"], RENEW_NA.replace("PREFIX_LEN=128", "PREFIX_LEN=64"), "is a /128"),  # an IA_NA is a /128
    (["lease6_renew"], RENEW_PD.replace("PREFIX_LEN=56", "PREFIX_LEN=0"), "delegated prefix"),
    (["lease6_renew"], RENEW_PD.replace("PREFIX_LEN=56", "PREFIX_LEN=129"), "LEASE6_PREFIX_LEN"),
    (["lease6_renew"], RENEW_PD.replace("PREFIX_LEN=56", "PREFIX_LEN=-56"), "LEASE6_PREFIX_LEN"),
    # 2001:db8:100:c000:: has bits set past a /40
    (["lease6_renew"], RENEW_PD.replace("PREFIX_LEN=56", "PREFIX_LEN=40"), "bits set past"),
    (["lease6_renew"], _without(RENEW_PD, "LEASE6_PREFIX_LEN"), "delegated prefix"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_DUID=00:03", "LEASE6_DUID=zz:03"), "not a DUID"),
    (["lease6_renew"], RENEW_NA.replace(f"LEASE6_DUID={DUID_LL}", "LEASE6_DUID=00:03"), "not a DUID"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_HWADDR=52:54:00:00:ca:01", "LEASE6_HWADDR=52:54"), "not a MAC"),
    # nothing names the client
    (["lease6_renew"], RENEW_NA.replace(f"LEASE6_DUID={DUID_LL}", "LEASE6_DUID=")
     .replace("LEASE6_HWADDR=52:54:00:00:ca:01", "LEASE6_HWADDR="), "neither a DUID"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_VALID_LIFETIME=30", "LEASE6_VALID_LIFETIME=4294967296"),
     "LEASE6_VALID_LIFETIME"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_CLTT=1796144915", "LEASE6_CLTT=1e9"), "LEASE6_CLTT"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_IAID=51713", "LEASE6_IAID=x"), "LEASE6_IAID"),
    (["lease6_renew"], RENEW_NA.replace("LEASE6_STATE=default", "LEASE6_STATE=DROP TABLE"), "LEASE6_STATE"),
    (["leases6_committed"], BOTH_COMMITTED.replace("LEASES6_SIZE=2", "LEASES6_SIZE=3"), "LEASES6_AT2_ADDRESS"),
    (["leases6_committed"], BOTH_COMMITTED.replace("LEASES6_SIZE=2", "LEASES6_SIZE=100000"), "LEASES6_SIZE"),
    (["leases6_committed"], BOTH_COMMITTED.replace("LEASES6_SIZE=2", "LEASES6_SIZE=two"), "LEASES6_SIZE"),
    (["leases6_committed"], NA_COMMITTED_RELEASE.replace("DELETED_LEASES6_AT0_ADDRESS=2001:db8:100:c9::100",
                                                         "DELETED_LEASES6_AT0_ADDRESS="),
     "DELETED_LEASES6_AT0_ADDRESS"),
    (["lease6_explode"], RENEW_NA, "unknown Kea hook point"),
    (["lease6_renew", "extra"], RENEW_NA, "one argument"),
    ([], RENEW_NA, "one argument"),
]


@pytest.mark.parametrize("argv,text,names", GARBAGE)
def test_garbage_is_refused_with_a_reason(argv, text, names):
    with pytest.raises(HookError, match=re.escape(names)):
        kea_leases(argv, env(text))


@pytest.mark.parametrize("argv,text,names", GARBAGE)
def test_garbage_exits_2_with_one_line_on_stderr_and_never_opens_the_ledger(argv, text, names, capsys):
    def never():
        raise AssertionError("the ledger was opened for garbage")

    code = main("kea", argv, _cfg(), never, "kea6", ("mac",), env=env(text))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err and names in err and "nothing written" in err, err
    assert "Traceback" not in err


def _cfg():
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "t.toml"
    p.write_text('[gateway]\ncurrency = "EUR"\nlocal_networks = ["2001:db8:100::/48"]\n[[tariff]]\nname = "b"\n'
                 'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    return load_config(p)


_LEASE_KEYS = sorted(k for k in env(RENEW_PD) if k.startswith("LEASE6_"))
_text = st.one_of(st.sampled_from(["", "0", "128", "56", "IA_PD", "IA_NA", "default", "declined", "2001:db8::",
                                   "::", "ff:ff", "00", "4294967295", "-1", " ", "1" * 30]),
                  st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_LEASE_KEYS), _text, max_size=len(_LEASE_KEYS)),
       st.sampled_from(["lease6_renew", "lease6_release", "lease6_expire", "lease6_decline", "lease6_rebind"]))
def test_fuzzed_lease6_environments_parse_or_are_refused_never_anything_else(changes, hook):
    e = {**env(RENEW_PD), **changes}
    try:
        _, start, stop = kea_leases([hook], e)
    except HookError:
        return
    for lease in start + stop:  # what gets through is a canonical IPv6 network and a key the ledger takes
        net = ipaddress.ip_network(lease.network)
        assert net.version == 6 and str(net) == lease.network
        assert 1 <= len(lease.key) <= 253 and (lease.mac or lease.client_id or not lease.held)


@pytest.mark.parametrize("argv,text,names", [g for g in GARBAGE if g[0]][:6] + [
    (["lease6_renew"], RENEW_PD.replace("PREFIX_LEN=56", "PREFIX_LEN=40"), "bits set past"),
    (["leases6_committed"], BOTH_COMMITTED.replace("LEASES6_SIZE=2", "LEASES6_SIZE=100000"), "LEASES6_SIZE"),
    (["lease6_renew", "extra"], RENEW_NA, "one argument")])
def test_the_real_command_exits_2_with_one_line_and_creates_no_ledger(argv, text, names, tmp_path):
    """What Kea runs: the `tollgate dhcp-hook` process, its environment as Kea sets it (and nothing of ours)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "t.toml"
    cfg.write_text('[gateway]\ncurrency = "EUR"\nlocal_networks = ["2001:db8:100::/48"]\n[[tariff]]\nname = "b"\n'
                   'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    db = tmp_path / "ledger.db"
    got = subprocess.run([sys.executable, "-m", "gateway.cli", "dhcp-hook", "-c", str(cfg), "--db", str(db),
                          "--server", "kea6", "kea", *argv], cwd=repo, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", **env(text)})
    assert got.returncode == 2 and got.stdout == "", (got.stdout, got.stderr)
    assert got.stderr.count("\n") == 1 and names in got.stderr and "Traceback" not in got.stderr, got.stderr
    assert not db.exists()
