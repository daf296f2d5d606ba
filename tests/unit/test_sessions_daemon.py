"""The session work a gateway hosts (gateway/daemon/sessions.py), without root: no kernel is touched (the
kernel half of address binding is tests/linux/test_binding_lab.py).

- the expiry timer closes a portal session whose time is up with no outside call, and asks the change
  follower for its owner;
- ``[radius] serve_in_gateway``: the server's sockets are bound at ``open``, it answers in a thread of the
  gateway's, a hand-over asks for the old owner then the new one, its counters are in the gateway's registry,
  and its death turns /healthz red;
- what address binding binds: sessions of the configured sources with a MAC (single addresses only), static
  addresses with the subscriber's MAC bindings, never a deactivated subscriber's; what the change feed and
  the binding audit rows name is followed, in proportion to what changed."""

from __future__ import annotations

import queue
import socket
import struct
import time

from prometheus_client import generate_latest
from pyrad import packet as rpacket

from accounting.operations import Operations
from gateway.daemon import Gateway, RunOptions
from gateway.lab import lab_config
from gateway.radius import _DICT
from gateway.runtime import ledger_rows

SECRET = b"daemon-secret"
RADIUS = f"""
[sessions]
expiry_check = 0.1

[radius]
serve_in_gateway = true
listen = ["127.0.0.1:0"]

[[radius.client]]
name = "bras1"
address = "127.0.0.0/8"
secret = "{SECRET.decode()}"
"""


def gateway(tmp_path, extra: str) -> Gateway:
    config = tmp_path / "tollgate.toml"
    config.write_text(lab_config(2) + extra)
    gw = Gateway(RunOptions(str(config), str(tmp_path / "ledger.db")))
    gw.acct.seed_ledger()
    gw.acct.load_subscribers(ledger_rows(gw.ledger))
    gw.changes.start_from_ledger()
    return gw


def requested(gw, timeout: float = 3.0, n: int = 1) -> list[int]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            got.append(gw.changes.requests.get(timeout=0.05))
        except queue.Empty:
            pass
    return got


def start(user: str, session: str, address: str, ident: int) -> bytes:
    pkt = rpacket.AcctPacket(id=ident, secret=SECRET, dict=_DICT)
    pkt[40] = [struct.pack("!I", 1)]
    pkt[44] = [session.encode()]
    pkt[1] = [user.encode()]
    pkt.AddAttribute("Framed-IP-Address", address)
    return pkt.RequestPacket()


def test_the_timer_ends_a_portal_session_with_no_outside_call(tmp_path):
    gw = gateway(tmp_path, "[sessions]\nexpiry_check = 0.1\n")
    ops = Operations(gw.ledger, gw.config, "test")
    s1 = gw.ledger.get_subscriber("s1")["id"]
    ops.portal_login("s1", "100.64.9.9", ends_ns=time.time_ns() + 300_000_000)  # 0.3 s from now
    assert [r["network"] for r in ops.sessions(live=True)] == ["100.64.9.9/32"]
    try:
        gw.sessions.start()
        assert requested(gw) == [s1]  # the owner is refreshed at once, not at the next feed round
        assert ops.sessions(live=True) == []
        assert [r["end_reason"] for r in ops.sessions(live=False)] == ["expired"]
        assert "tollgate_sessions_expired_total 1.0" in generate_latest(gw.metrics.registry).decode()
    finally:
        gw.stopping.set()
        gw.sessions.stop()
        gw.ledger.close()
    assert not gw.failed


def test_the_hosted_radius_server_asks_for_the_old_owner_then_the_new(tmp_path):
    gw = gateway(tmp_path, RADIUS)
    s1, s2 = (gw.ledger.get_subscriber(n)["id"] for n in ("s1", "s2"))
    gw.sessions.open()
    host, port = gw.sessions.radius.addresses[0]
    gw.sessions.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    try:
        sock.sendto(start("s2", "a-1", "100.64.50.9", 1), (host, port))
        assert sock.recv(4096)[0] == rpacket.AccountingResponse
        assert requested(gw) == [s2]
        # the same NAS gives the address to s1 in a new session: s2's is replaced; s2 first, then s1
        sock.sendto(start("s1", "a-2", "100.64.50.9", 2), (host, port))
        assert sock.recv(4096)[0] == rpacket.AccountingResponse
        assert requested(gw, n=2) == [s2, s1]
        # a retransmission changes no owner: nothing asked
        sock.sendto(start("s1", "a-2", "100.64.50.9", 2), (host, port))
        assert sock.recv(4096)[0] == rpacket.AccountingResponse
        assert requested(gw, timeout=0.5) == []
        text = generate_latest(gw.metrics.registry).decode()
        assert 'tollgate_radius_packets_total{result="accepted"} 2.0' in text
        assert 'tollgate_radius_packets_total{result="duplicate"} 1.0' in text
        assert gw.health()["status"] == "ok"
        # the server's thread dies (its sockets gone under it): /healthz turns red
        for s in gw.sessions.radius._sockets:
            s.close()
        assert gw.fatal.wait(5)
        assert "radius" in gw.health()["failed_threads"] and gw.health()["status"] == "failed"
    finally:
        sock.close()
        gw.stopping.set()
        gw.sessions.stop()
        gw.ledger.close()


def test_a_radius_port_in_use_stops_the_gateway_before_anything(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        gw = gateway(tmp_path, RADIUS.replace("127.0.0.1:0", f"127.0.0.1:{busy.getsockname()[1]}"))
        try:
            gw.sessions.open()
        except Exception as exc:  # noqa: BLE001 - the message is what counts
            assert "cannot listen" in str(exc)
        else:
            raise AssertionError("a port in use was taken")
        gw.ledger.close()
    finally:
        busy.close()


def test_what_address_binding_binds(tmp_path):
    gw = gateway(tmp_path, "[sessions]\nbind_mac = true\n")
    ops = Operations(gw.ledger, gw.config, "test")
    host = gw.sessions
    assert host.bind_sources == ("dnsmasq", "kea", "portal", "static")
    s1, s2 = (gw.ledger.get_subscriber(n)["id"] for n in ("s1", "s2"))
    assert host.wanted(gw.ledger) == {}  # static addresses, but no MAC bindings yet
    ops.bind("s1", "mac", "52:54:00:00:00:01")
    ops.bind("s1", "mac", "52:54:00:00:00:0A")
    ops.session_start("kea", "k1", "52:54:00:00:00:02", "s2", ["100.64.60.2/32"], mac="52:54:00:00:00:02")
    ops.session_start("radius", "bras1", "r1", "s2", ["100.64.60.3/32"], mac="52:54:00:00:00:03")  # not bound
    ops.session_start("portal", "portal", "100.64.60.4", "s2", ["100.64.60.4/32", "2001:db8:100:60::4/128"],
                      mac="52:54:00:00:00:04")
    ops.session_start("kea", "k1", "52:54:00:00:00:05", "s2", ["2001:db8:100:61::/64"], mac="52:54:00:00:00:05")
    macs1 = frozenset({"52:54:00:00:00:01", "52:54:00:00:00:0a"})
    want = host.wanted(gw.ledger)
    assert want == {"100.64.1.2/32": (s1, macs1),  # s1's static /32; its /64 is a prefix: not bound
                    "100.64.60.2/32": (s2, frozenset({"52:54:00:00:00:02"})),
                    "100.64.60.4/32": (s2, frozenset({"52:54:00:00:00:04"})),
                    "2001:db8:100:60::4/128": (s2, frozenset({"52:54:00:00:00:04"}))}
    assert host.wanted(gw.ledger, {s1}) == {"100.64.1.2/32": (s1, macs1)}

    class Kernel:  # stands in for policy.nft.AddressBindings: records what apply was asked
        calls = []

        def apply(self, old, new):
            self.calls.append((dict(old), dict(new)))
            return sum(old.get(n) != new.get(n) for n in old.keys() | new.keys())

    host._bindings = Kernel
    host.bound = dict(want)
    host.last_change = gw.ledger.last_change_id()
    host.last_audit = gw.ledger.db.execute("SELECT max(id) FROM audit_log").fetchone()[0]
    host.follow(gw.ledger)
    assert Kernel.calls == []  # nothing changed: no kernel call
    ops.session_stop("kea", "k1", "52:54:00:00:00:02")
    ops.unbind("mac", "52:54:00:00:00:0a")
    host.follow(gw.ledger)
    (old, new), = Kernel.calls
    assert set(old) == set(want) and new == {"100.64.1.2/32": (s1, frozenset({"52:54:00:00:00:01"})),
                                             "100.64.60.4/32": want["100.64.60.4/32"],
                                             "2001:db8:100:60::4/128": want["2001:db8:100:60::4/128"]}
    assert host.bound == new
    ops.deactivate("s1")
    host.follow(gw.ledger)
    assert "100.64.1.2/32" not in host.bound
    gw.ledger.close()


def test_the_ruleset_has_the_binding_rules_only_when_asked(tmp_path):
    from policy.nft import Enforcer

    gw = gateway(tmp_path, "[sessions]\nbind_mac = [\"kea\"]\n")
    on = Enforcer.from_config(gw.config, queues=(0,)).ruleset()
    block = on.split("chain block {")[1].split("}")[0].splitlines()
    assert block[2].strip() == "ip saddr . ether saddr != @bound_mac4 counter name ip saddr map @bound4 drop"
    assert block[3].strip() == "ip6 saddr . ether saddr != @bound_mac6 counter name ip6 saddr map @bound6 drop"
    assert "map bound4 { type ipv4_addr : counter; }" in on
    gw.ledger.close()
    off = Enforcer(queues=(0,)).ruleset()
    assert "bound" not in off
