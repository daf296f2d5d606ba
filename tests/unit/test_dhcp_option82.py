"""Option 82 (RFC 3046 relay agent information) as the real servers pass it to gateway/dhcp_hook.py.

Recorded in lab namespaces: a "relay" namespace sent DISCOVER and REQUEST (scapy for the packet, a UDP socket on
port 67 with giaddr 100.64.203.1 and hops 1, as a relay agent does) with option 82 to Debian's kea-dhcp4 2.2.0
(libdhcp_run_script.so) and to dnsmasq 2.90 (--dhcp-script), each dumping its script's environment:

- Kea: ``QUERY4_OPTION_82_SUB_OPTION_1`` (circuit-id) and ``_2`` (remote-id) are ``0x`` and *upper-case* hex of
  the sub-option's bytes, whatever they are (text or binary); ``QUERY4_OPTION_82`` the whole option the same
  way; ``QUERY4_RELAYED=true``, ``QUERY4_GIADDR`` the relay.
- dnsmasq: ``DNSMASQ_CIRCUIT_ID`` and ``DNSMASQ_REMOTE_ID`` are the *raw bytes* (no escaping: a tab, 0xff, a
  newline come through as such), cut at the first zero byte: a Cisco-style binary circuit-id 00:04:00:64:01:07
  (VLAN 100, module 1, port 7) arrives as no variable at all; ``DNSMASQ_RELAY_ADDRESS`` the relay.

Before: the Kea value was taken as it stood ("0x657468302f31..." never matched a binding of "eth0/1/7:100"), and
a circuit-id with a space (dnsmasq's "port 7") made the whole call exit 2, even for a lease bound by MAC.
Now both become one form: printable ASCII as its lower-cased text, anything else ``0x`` and lower-case hex.
tests/linux/test_dhcp_relay_lab.py sends the same packets to the real servers with our hook behind them."""

from __future__ import annotations

import os
import time

import pytest

from accounting.ledger import Ledger
from accounting.operations import Operations
from ext.errors import ConfigError
from gateway.config import SessionSettings, load_config
from gateway.dhcp_hook import HookError, agent_id, apply, dnsmasq_lease, kea_agent_id, kea_leases

# Kea 2.2.0, circuit-id "eth0/1/7:100", remote-id "cpe-alice" (text)
KEA_COMMITTED = """DELETED_LEASES4_SIZE=0
LEASES4_AT0_ADDRESS=100.64.203.10
LEASES4_AT0_CLIENT_ID=
LEASES4_AT0_CLTT=1796144946
LEASES4_AT0_HOSTNAME=
LEASES4_AT0_HWADDR=52:54:00:00:cb:01
LEASES4_AT0_HWADDR_TYPE=1
LEASES4_AT0_STATE=default
LEASES4_AT0_SUBNET_ID=1
LEASES4_AT0_VALID_LIFETIME=120
LEASES4_SIZE=1
QUERY4_CIADDR=0.0.0.0
QUERY4_FLAGS=0
QUERY4_GIADDR=100.64.203.1
QUERY4_HOPS=1
QUERY4_HWADDR=52:54:00:00:cb:01
QUERY4_HWADDR_TYPE=1
QUERY4_IFACE_INDEX=2
QUERY4_IFACE_NAME=kr1
QUERY4_LOCAL_ADDR=100.64.202.1
QUERY4_LOCAL_HWADDR=
QUERY4_LOCAL_HWADDR_TYPE=
QUERY4_LOCAL_PORT=67
QUERY4_OPTION_82=0x010C657468302F312F373A31303002096370652D616C696365
QUERY4_OPTION_82_SUB_OPTION_1=0x657468302F312F373A313030
QUERY4_OPTION_82_SUB_OPTION_2=0x6370652D616C696365
QUERY4_RELAYED=true
QUERY4_REMOTE_ADDR=100.64.203.1
QUERY4_REMOTE_HWADDR=
QUERY4_REMOTE_HWADDR_TYPE=
QUERY4_REMOTE_PORT=67
QUERY4_SECS=0
QUERY4_SIADDR=0.0.0.0
QUERY4_TXID=4660
QUERY4_TYPE=DHCPREQUEST
QUERY4_YIADDR=0.0.0.0
"""
# Kea 2.2.0, a binary circuit-id 00:04:00:64:01:07 and the remote-id "cpe alice" (with a space)
KEA_BINARY = {"QUERY4_OPTION_82": "0x0106000400640107020963706520616C696365",
              "QUERY4_OPTION_82_SUB_OPTION_1": "0x000400640107",
              "QUERY4_OPTION_82_SUB_OPTION_2": "0x63706520616C696365"}
# dnsmasq 2.90 for the same text sub-options, and for the others sent (os.environ's str of the raw bytes)
DNSMASQ_TEXT = {"DNSMASQ_CIRCUIT_ID": "eth0/1/7:100", "DNSMASQ_REMOTE_ID": "cpe-alice",
                "DNSMASQ_RELAY_ADDRESS": "100.64.203.1", "DNSMASQ_INTERFACE": "kr1",
                "DNSMASQ_LEASE_EXPIRES": "1796145081", "DNSMASQ_TIME_REMAINING": "120", "DNSMASQ_TAGS": "kr1"}
DNSMASQ_SPACE = {"DNSMASQ_CIRCUIT_ID": "port 7", "DNSMASQ_REMOTE_ID": "r-3", "DNSMASQ_LEASE_EXPIRES": "1796145091"}
DNSMASQ_LEADING_ZERO = {"DNSMASQ_REMOTE_ID": "cpe alice", "DNSMASQ_LEASE_EXPIRES": "1796145091"}  # circuit gone
DNSMASQ_BINARY = {"DNSMASQ_CIRCUIT_ID": os.fsdecode(b"\x01\x07\xff\x80"), "DNSMASQ_REMOTE_ID": "\n\x0b",
                  "DNSMASQ_LEASE_EXPIRES": "1796145091"}
DNSMASQ_TAB = {"DNSMASQ_CIRCUIT_ID": "Gi0/1 vlan 7\tx", "DNSMASQ_REMOTE_ID": "a", "DNSMASQ_LEASE_EXPIRES": "1796145091"}


def env(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_kea_passes_hex_and_it_becomes_the_text():
    _, (lease,), _ = kea_leases(["leases4_committed"], env(KEA_COMMITTED))
    assert (lease.circuit_id, lease.remote_id, lease.mac) == ("eth0/1/7:100", "cpe-alice", "52:54:00:00:cb:01")
    assert kea_agent_id(KEA_BINARY, "QUERY4_OPTION_82_SUB_OPTION_1") == "0x000400640107"
    assert kea_agent_id(KEA_BINARY, "QUERY4_OPTION_82_SUB_OPTION_2") == "cpe alice"


def test_dnsmasq_passes_raw_bytes_and_they_become_the_same_forms():
    def one(extra, mac="52:54:00:00:cb:01", ip="100.64.203.10"):
        return dnsmasq_lease(["add", mac, ip], extra)[1]

    lease = one(DNSMASQ_TEXT)
    assert (lease.circuit_id, lease.remote_id, lease.expires_ns) == ("eth0/1/7:100", "cpe-alice", 1796145081 * 10**9)
    assert (one(DNSMASQ_SPACE).circuit_id, one(DNSMASQ_SPACE).remote_id) == ("port 7", "r-3")
    assert (one(DNSMASQ_LEADING_ZERO).circuit_id, one(DNSMASQ_LEADING_ZERO).remote_id) == (None, "cpe alice")
    assert (one(DNSMASQ_BINARY).circuit_id, one(DNSMASQ_BINARY).remote_id) == ("0x0107ff80", "0x0a0b")
    assert one(DNSMASQ_TAB).circuit_id == "0x4769302f3120766c616e20370978"


def test_one_form_whichever_server():
    # the text sub-options the relay sent, through each server's form
    for text in ("eth0/1/7:100", "cpe-alice", "port 7", "Gi0/1"):
        kea = kea_agent_id({"X": "0x" + text.encode().hex().upper()}, "X")
        assert kea == agent_id(os.fsencode(text)) == text.lower()
    assert agent_id(b"") is None and agent_id(None) is None
    assert agent_id(b" padded ") == "0x2070616464656420"  # a binding value is stripped: kept apart as hex
    assert agent_id(b"x" * 253) == "x" * 253 and agent_id(b"x" * 254) is None  # too long to be bound
    assert agent_id(b"\x00" * 125) == "0x" + "00" * 125 and agent_id(b"\x00" * 126) is None


@pytest.mark.parametrize("value", ["657468", "0x", "0x6", "0xZZ", "0x65 74", "eth0/1", "0x" + "00" * 256])
def test_what_is_not_keas_form_is_refused(value):
    e = env(KEA_COMMITTED)
    e["QUERY4_OPTION_82_SUB_OPTION_1"] = value
    with pytest.raises(HookError, match="QUERY4_OPTION_82_SUB_OPTION_1"):
        kea_leases(["leases4_committed"], e)


@pytest.mark.parametrize("how,kea,dnsmasq", [
    ("circuit-id", "eth0/1/7:100", "eth0/1/7:100"),
    ("remote-id", "cpe-alice", "cpe-alice"),
    ("remote-id|circuit-id", "cpe-alice|eth0/1/7:100", "cpe-alice|eth0/1/7:100")])
def test_dhcp_circuit_id_says_which_sub_options_name_the_lease(how, kea, dnsmasq):
    s = SessionSettings(dhcp_circuit_id=how)
    assert kea_leases(["leases4_committed"], env(KEA_COMMITTED), s)[1][0].circuit_id == kea
    assert dnsmasq_lease(["add", "52:54:00:00:cb:01", "100.64.203.10"], DNSMASQ_TEXT, s)[1].circuit_id == dnsmasq
    # both, and only one is there: nothing names the lease by circuit
    s = SessionSettings(dhcp_circuit_id="remote-id|circuit-id")
    assert dnsmasq_lease(["add", "52:54:00:00:cb:01", "100.64.203.10"], DNSMASQ_LEADING_ZERO, s)[1].circuit_id is None


def test_the_config_option(tmp_path):
    base = ('[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10"]\n[[tariff]]\nname = "b"\n'
            'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    p = tmp_path / "t.toml"
    p.write_text(base + '[sessions]\ndhcp_circuit_id = "remote-id"\n')
    assert load_config(p).sessions.dhcp_circuit_id == "remote-id"
    p.write_text(base + '[sessions]\ndhcp_circuit_id = "port"\n')
    with pytest.raises(ConfigError, match="dhcp_circuit_id"):
        load_config(p)


def test_the_recorded_kea_call_binds_by_circuit_id_in_a_ledger(tmp_path):
    cfg_path = tmp_path / "t.toml"
    cfg_path.write_text('[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10"]\n[[tariff]]\nname = "b"\n'
                        'price_unit = "MB"\n[tariff.prices]\nexternal = "1"\n')
    with Ledger.open(tmp_path / "l.db") as ledger:
        ops = Operations(ledger, load_config(cfg_path), "test")
        ops.add("alice", "b")
        ops.add("bob", "b")
        ops.bind("alice", "circuit_id", "ETH0/1/7:100")  # as an operator types it: bindings ignore case
        ops.bind("bob", "mac", "52:54:00:00:cb:01")
        text = KEA_COMMITTED.replace("1796144946", str(int(time.time())))
        _, start, stop = kea_leases(["leases4_committed"], env(text))
        assert apply(ops, "kea", "kea4", start, stop, ("circuit_id", "mac"), 0) == 0
        assert [(r["network"], r["subscriber"]) for r in ops.sessions(live=True)] == [("100.64.203.10/32", "alice")]
