"""gateway/radius.py on 127.0.0.1 and ::1 with packets built by pyrad: Start / Interim-Update / Stop and
Accounting-On bind and unbind addresses in a real ledger; a bad secret, an unknown client, truncated
attributes and malformed packets are dropped, counted and write nothing; retransmissions get the same answer;
a lost Stop ends by the TTL. Hypothesis throws random, truncated and re-signed mutated packets at the parser:
no exception ever leaves it, and a packet that is not answered writes nothing."""

from __future__ import annotations

import hashlib
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad import packet as rpacket

from accounting.ledger import Ledger
from accounting.operations import Operations
from gateway.config import load_config
from gateway.radius import _DICT, RESULTS, RadiusServer

SECRET = b"testing123"
S = 10 ** 9
CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "1"

[sessions]
interim_interval = 10
interim_missed = 2
grace = 5

[radius]
listen = ["127.0.0.1:0", "[::1]:0"]

[[radius.client]]
name = "bras1"
address = "127.0.0.0/8"
secret = "testing123"

[[radius.client]]
name = "bras6"
address = "::1"
secret = "other-secret"
"""


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    cfg = load_config(path)
    with Ledger.open(tmp_path / "l.db") as ledger:
        ops = Operations(ledger, cfg, "cli:test")
        ops.add("alice", "basic")
        ops.add("bob", "basic", ["100.64.1.2/32"])
    srv = RadiusServer(cfg, tmp_path / "l.db")
    srv.open()
    yield srv
    srv.close()


def request(status: str, session: str = "S1", user: str | None = "alice", secret: bytes = SECRET, ident: int = 1,
            **attrs) -> bytes:
    pkt = rpacket.AcctPacket(id=ident, secret=secret, dict=_DICT)
    pkt[40] = [struct.pack("!I", {"Start": 1, "Stop": 2, "Interim-Update": 3, "Accounting-On": 7,
                                   "Accounting-Off": 8}[status])]
    if session is not None:
        pkt[44] = [session.encode()]
    if user is not None:
        pkt[1] = [user.encode()]
    for name, value in attrs.items():
        pkt.AddAttribute(name.replace("_", "-"), value)
    return pkt.RequestPacket()


def live(srv) -> dict[str, str]:
    return {r["network"]: r["subscriber"] for r in srv.ops.sessions(live=True)}


def dump(srv) -> list[str]:
    return list(srv._ledger.db.dump())


def test_start_interim_stop_over_udp_v4_and_v6(server):
    server._thread = None
    import threading

    server._stopping.clear()
    t = threading.Thread(target=server._loop, daemon=True)
    t.start()
    try:
        (h4, p4), (h6, p6) = server.addresses
        for family, host, port, secret in ((socket.AF_INET, h4, p4, SECRET), (socket.AF_INET6, h6, p6, b"other-secret")):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(3)
            key = f"S-{family}"
            s.sendto(request("Start", key, secret=secret, Framed_IP_Address="100.64.7.9",
                             Delegated_IPv6_Prefix="2001:db8:100:7700::/56"), (host, port))
            reply = s.recv(4096)
            assert reply[0] == rpacket.AccountingResponse
            assert live(server) == {"100.64.7.9/32": "alice", "2001:db8:100:7700::/56": "alice"}
            s.sendto(request("Interim-Update", key, secret=secret, ident=2, Acct_Input_Octets=1000,
                             Acct_Output_Octets=5, Acct_Output_Gigawords=1), (host, port))
            assert s.recv(4096)[0] == rpacket.AccountingResponse
            assert {(r["up_bytes"], r["down_bytes"]) for r in server.ops.sessions(live=True)} == {(1000, 2 ** 32 + 5)}
            s.sendto(request("Stop", key, secret=secret, ident=3, Acct_Input_Octets=2000), (host, port))
            assert s.recv(4096)[0] == rpacket.AccountingResponse
            assert live(server) == {}
            s.close()
        assert server.counts["accepted"] == 6
        assert [r["client"] for r in server.ops.sessions(live=False)][::2] == ["bras1", "bras6"]
    finally:
        server._stopping.set()
        t.join(5)


def test_a_bad_secret_an_unknown_client_and_malformed_packets_are_dropped_and_counted(server):
    before = dump(server)
    good = request("Start", Framed_IP_Address="100.64.7.9")
    assert server.handle(request("Start", secret=b"wrong", Framed_IP_Address="100.64.7.9"), "127.0.0.1") is None
    assert server.handle(good, "192.0.2.1") is None  # not a client
    assert server.handle(good, "::1") is None  # a client, with another secret
    # a truncated attribute: the last one's length runs past the packet (pyrad alone would take it shorter)
    cut = bytearray(good[:-2])
    cut[2:4] = struct.pack("!H", len(cut))
    assert server.handle(bytes(cut), "127.0.0.1") is None
    assert server.handle(good[:10], "127.0.0.1") is None
    assert server.handle(b"\x01" + good[1:], "127.0.0.1") is None  # an Access-Request on the accounting port
    no_session = request("Start", session=None, Framed_IP_Address="100.64.7.9")
    assert server.handle(no_session, "127.0.0.1") is None
    assert dump(server) == before
    assert server.counts == {**dict.fromkeys(RESULTS, 0), "bad_authenticator": 2, "unknown_client": 1,
                             "malformed": 4}
    assert server.handle(good, "127.0.0.1") is not None and live(server) == {"100.64.7.9/32": "alice"}
    metrics = {s.labels["result"]: s.value for m in server.registry.collect() for s in m.samples
               if s.name == "tollgate_radius_packets_total"}
    assert metrics["bad_authenticator"] == 2 and metrics["accepted"] == 1


def test_duplicates_and_refused_claims(server):
    start = request("Start", Framed_IP_Address="100.64.7.9")
    first = server.handle(start, "127.0.0.1")
    audits = server._ledger.db.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    assert server.handle(start, "127.0.0.1") == first  # a retransmission: the same answer, nothing written
    assert server.handle(request("Start", ident=9, Framed_IP_Address="100.64.7.9"), "127.0.0.1") is not None
    assert server._ledger.db.execute("SELECT count(*) FROM audit_log").fetchone()[0] == audits
    assert server.counts["duplicate"] == 2 and len(server.ops.sessions()) == 1
    # bob's static address, an unknown user: refused, counted and answered (a retransmission would not help)
    before = dump(server)
    assert server.handle(request("Start", "S2", "alice", Framed_IP_Address="100.64.1.2"), "127.0.0.1") is not None
    assert server.handle(request("Start", "S3", "mallory", Framed_IP_Address="100.64.7.20"), "127.0.0.1") is not None
    assert server.counts["refused"] == 2 and dump(server) == before


def test_accounting_on_closes_that_clients_sessions_and_a_lost_stop_expires(server):
    t = 1000 * S
    server.handle(request("Start", "A", Framed_IP_Address="100.64.7.9"), "127.0.0.1", now=t)
    server.handle(request("Start", "B", "bob", Framed_IPv6_Prefix="2001:db8:100:9::/64"), "::1", now=t)
    assert set(live(server)) == {"100.64.7.9/32"}  # ::1 is bras6, whose secret is another: dropped
    server.handle(request("Start", "B", "bob", secret=b"other-secret", Framed_IPv6_Prefix="2001:db8:100:9::/64"),
                  "::1", now=t)
    assert set(live(server)) == {"100.64.7.9/32", "2001:db8:100:9::/64"}
    server.handle(request("Accounting-On", session=None, user=None), "127.0.0.1", now=t + S)
    assert set(live(server)) == {"2001:db8:100:9::/64"}  # bras1's ended, bras6's stayed
    # the TTL is 10 s * 2 + 5 s after the last packet: an Interim at +10 s moves it, then silence
    server.handle(request("Interim-Update", "B", "bob", secret=b"other-secret"), "::1", now=t + 10 * S)
    assert server.ops.expire_sessions(now=t + 30 * S)["closed"] == []
    closed = server.ops.expire_sessions(now=t + 36 * S)["closed"]
    assert [(c["network"], c["end_reason"]) for c in closed] == [("2001:db8:100:9::/64", "expired")]
    assert server._ledger.check_invariants() == []


# ---- fuzzing: nothing raises, nothing unanswered is written ------------------------------------------------------

def _resign(data: bytes, secret: bytes = SECRET) -> bytes:
    """The packet with a Request Authenticator that verifies (RFC 2866 section 3), so that mutations reach the
    attribute decoding past the authenticator check."""
    body = data[:4] + b"\x00" * 16 + data[20:]
    return data[:4] + hashlib.md5(body + secret).digest() + data[20:]


SEEDS = [request("Start", Framed_IP_Address="100.64.7.9", Framed_IPv6_Prefix="2001:db8:100:9::/64"),
         request("Interim-Update", Acct_Input_Octets=5, Acct_Input_Gigawords=2),
         request("Stop", Acct_Output_Octets=7), request("Accounting-On", session=None, user=None)]


def _check(server, data: bytes) -> None:
    before = dump(server)
    total = sum(server.counts.values())
    reply = server.handle(data, "127.0.0.1")
    assert sum(server.counts.values()) >= total + 1  # every packet is counted as something
    if reply is None:
        assert dump(server) == before
    else:
        assert reply[0] == rpacket.AccountingResponse and reply[1] == data[1]


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(server, data):
    _check(server, data)


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 200), st.booleans())
def test_fuzz_truncated(server, seed, cut, fix_length):
    data = bytearray(seed[:max(0, len(seed) - 1 - cut % len(seed))])
    if fix_length and len(data) >= 4:
        data[2:4] = struct.pack("!H", len(data))
    _check(server, bytes(data))


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(20, 400), st.integers(0, 255)), min_size=1,
                                        max_size=6), st.binary(max_size=20))
def test_fuzz_mutated_and_resigned(server, seed, flips, tail):
    data = bytearray(seed + tail)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    _check(server, _resign(bytes(data)))
