"""Sessions in the ledger (schema 17, accounting/sessions.py through accounting/operations.py): one live owner
per address, enforced by the database too, concurrent claims included; history answering "who had it at T";
the rule when two sources claim one address; TTL expiry, a client's restart; audit rows; the change feed a
running gateway reads; `tollgate ledger check` with sessions."""

from __future__ import annotations

import threading

import pytest

from accounting.audit import AuditLog
from accounting.ledger import Ledger
from accounting.operations import OperationError, Operations
from ext.errors import LedgerError
from gateway.config import load_config

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
"""


@pytest.fixture
def ops(tmp_path, ledger_target):
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    cfg = load_config(path)
    ledger = Ledger.open(ledger_target())
    o = Operations(ledger, cfg, "radius:test")
    for name, addrs in (("alice", ["100.64.1.2/32"]), ("bob", []), ("carol", ["100.64.3.0/24"])):
        o.add(name, "basic", addrs)
    yield o
    ledger.close()


def addresses(ops, name) -> list[str]:
    return ops.ledger.get_subscriber(name)["addresses"]


def audit_actions(ops) -> list[str]:
    return [r["action"] for r in AuditLog(ops.ledger).rows(limit=1000)]


def test_start_stop_binds_the_address_and_keeps_history(ops):
    r = ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.9/32", "2001:db8:100:7::/64"], now=100 * S)
    assert r["status"] == "started" and len(r["sessions"]) == 2
    assert addresses(ops, "bob") == ["100.64.7.9/32", "2001:db8:100:7::/64"]
    ops.session_update("radius", "nas1", "A1", up_bytes=10, down_bytes=20, now=150 * S)
    r = ops.session_stop("radius", "nas1", "A1", up_bytes=15, down_bytes=30, now=200 * S)
    assert r["status"] == "stopped" and {c["up_bytes"] for c in r["closed"]} == {15}
    assert addresses(ops, "bob") == []
    assert [w["subscriber"] for w in ops.who_had("100.64.7.9", 150 * S)] == ["bob"]
    assert ops.who_had("100.64.7.9", 200 * S) == []  # [start, end): at the end it is nobody's
    assert ops.who_had("100.64.7.9", 99 * S) == []
    assert [w["network"] for w in ops.who_had("2001:db8:100:7::42", 199 * S)] == ["2001:db8:100:7::/64"]
    assert audit_actions(ops)[-2:] == ["session.start", "session.stop"]  # the interim wrote none
    assert ops.ledger.check_invariants() == []


def test_duplicates_are_idempotent(ops):
    first = ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.9/32"], now=100 * S)
    audits = len(audit_actions(ops))
    again = ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.9/32"], now=101 * S)
    assert again["status"] == "duplicate" and len(audit_actions(ops)) == audits
    assert [s["id"] for s in again["sessions"]] == [s["id"] for s in first["sessions"]]
    ops.session_stop("radius", "nas1", "A1", now=200 * S)
    assert ops.session_stop("radius", "nas1", "A1", now=201 * S)["status"] == "unknown"
    assert len(ops.sessions()) == 1 and ops.ledger.check_invariants() == []


def test_the_same_source_and_client_replace_another_source_is_refused(ops):
    ops.session_start("dnsmasq", "dhcp1", "52:54:00:00:00:01", "bob", ["100.64.7.9/32"], now=100 * S)
    # the same server gives the address to another device (its del was lost): the newer claim wins
    r = ops.session_start("dnsmasq", "dhcp1", "52:54:00:00:00:02", "alice", ["100.64.7.9/32"], now=110 * S)
    assert [c["end_reason"] for c in ops.sessions(live=False)] == ["replaced"] and r["closed"][0]["subscriber"] == "bob"
    assert "100.64.7.9/32" in addresses(ops, "alice") and addresses(ops, "bob") == []
    # another source, or another server of the same kind: refused, nothing written
    before = list(ops.ledger.db.dump())
    for source, client in (("radius", "nas1"), ("dnsmasq", "dhcp2")):
        with pytest.raises(OperationError, match="held by dnsmasq session") as exc:
            ops.session_start(source, client, "X", "bob", ["100.64.7.9/32"], now=120 * S)
        assert exc.value.status == 409
    assert list(ops.ledger.db.dump()) == before
    assert [w["subscriber"] for w in ops.who_had("100.64.7.9", 105 * S)] == ["bob"]
    assert [w["subscriber"] for w in ops.who_had("100.64.7.9", 110 * S)] == ["alice"]


def test_a_static_address_is_never_taken_over(ops):
    with pytest.raises(OperationError, match="static address of subscriber") as exc:
        ops.session_start("radius", "nas1", "A1", "bob", ["100.64.1.2/32"])
    assert exc.value.status == 409
    with pytest.raises(OperationError, match="overlaps 100.64.3.0/24"):  # inside carol's /24
        ops.session_start("radius", "nas1", "A1", "bob", ["100.64.3.7/32"])
    with pytest.raises(OperationError, match="overlaps"):  # a prefix around alice's /32
        ops.session_start("radius", "nas1", "A1", "bob", ["100.64.1.0/24"])
    assert ops.sessions() == [] and addresses(ops, "bob") == []
    # the subscriber's own static address: recorded, the static row stays static through the stop
    ops.session_start("radius", "nas1", "A2", "alice", ["100.64.1.2/32"])
    ops.session_stop("radius", "nas1", "A2")
    assert addresses(ops, "alice") == ["100.64.1.2/32"] and ops.ledger.check_invariants() == []
    # and a static address cannot be given where a session lives
    ops.session_start("radius", "nas1", "A3", "bob", ["100.64.7.9/32"])
    with pytest.raises(OperationError, match="belongs to subscriber"):
        ops.update("alice", addresses=["100.64.1.2/32", "100.64.7.9/32"])
    # an admin replacing bob's static addresses leaves his session's address alone
    ops.update("bob", addresses=["100.64.8.1/32"])
    assert addresses(ops, "bob") == ["100.64.7.9/32", "100.64.8.1/32"] and ops.ledger.check_invariants() == []
    exported = "".join(ops.export_subscribers())
    assert "100.64.8.1/32" in exported and "100.64.7.9" not in exported


def test_the_database_refuses_two_live_owners_whoever_writes(ops):
    ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.9/32"])
    db = ops.ledger.db  # a writer that skips Operations' checks: the unique index refuses it, on both backends
    with pytest.raises(LedgerError, match="refused by the database.*(UNIQUE|already exists)"), ops.ledger.transaction():
        db.execute("INSERT INTO sessions (network, subscriber_id, source, session_key, client, started_ns, "
                   "last_seen_ns) VALUES ('100.64.7.9/32', 1, 'kea', 'k', 'kea1', 1, 1)")


def test_concurrent_claims_of_one_address_give_one_owner(ops, tmp_path):
    """Eight connections (as eight processes would) claim one address for different subscribers at once."""
    names = [f"p{i}" for i in range(8)]
    for n in names:
        ops.add(n, "basic")
    barrier = threading.Barrier(len(names))
    results = {}

    def claim(name: str) -> None:
        ledger = Ledger.open(ops.ledger.path)
        try:
            o = Operations(ledger, ops.config, "test")
            barrier.wait()
            try:
                results[name] = o.session_start("kea", f"kea-{name}", name, name, ["100.64.9.9/32"])["status"]
            except OperationError as exc:
                results[name] = exc.status
        finally:
            ledger.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results.values(), key=str) == [409] * 7 + ["started"]
    assert len(ops.sessions(live=True)) == 1 and ops.ledger.check_invariants() == []


def test_moved_networks_and_interim_after_a_lost_start(ops):
    ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.9/32"], now=100 * S)
    r = ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.10/32"], now=110 * S)
    assert r["status"] == "started" and [c["end_reason"] for c in r["closed"]] == ["moved"]
    assert addresses(ops, "bob") == ["100.64.7.10/32"]
    # an Interim-Update of a session whose Start never came opens it; without addresses it is unknown
    assert ops.session_update("radius", "nas1", "B1", now=120 * S)["status"] == "unknown"
    r = ops.session_update("radius", "nas1", "B1", "alice", ["100.64.7.11/32"], now=120 * S)
    assert r["status"] == "started" and "100.64.7.11/32" in addresses(ops, "alice")
    assert ops.ledger.check_invariants() == []


def test_ttl_expiry_and_a_clients_restart(ops):
    ops.session_start("radius", "nas1", "A1", "bob", ["100.64.7.9/32"], expires_ns=200 * S, now=100 * S)
    ops.session_start("radius", "nas1", "A2", "alice", ["100.64.7.10/32"], now=100 * S)
    ops.session_start("radius", "nas2", "A3", "alice", ["100.64.7.11/32"], now=100 * S)
    assert ops.expire_sessions(now=150 * S)["status"] == "none"
    ops.session_update("radius", "nas1", "A1", expires_ns=300 * S, now=190 * S)  # an interim keeps it alive
    assert ops.expire_sessions(now=250 * S)["status"] == "none"
    r = ops.expire_sessions(now=301 * S)
    assert [c["session_key"] for c in r["closed"]] == ["A1"] and addresses(ops, "bob") == []
    # nas1 restarted (Accounting-On): its sessions end, nas2's stay
    r = ops.close_sessions_of_client("radius", "nas1", "accounting-on", now=400 * S)
    assert [c["session_key"] for c in r["closed"]] == ["A2"]
    assert addresses(ops, "alice") == ["100.64.1.2/32", "100.64.7.11/32"]
    assert {c["end_reason"] for c in ops.sessions(live=False)} == {"expired", "accounting-on"}
    acts = audit_actions(ops)
    assert "session.expire" in acts and "session.close_client" in acts
    assert ops.ledger.check_invariants() == []


def test_session_starts_and_stops_reach_the_change_feed(ops):
    last = ops.ledger.last_change_id()
    ops.session_start("dnsmasq", "dhcp1", "52:54:00:00:00:01", "bob", ["100.64.7.9/32"])
    last, changed = ops.ledger.changes_since(last)
    bob = ops.ledger.get_subscriber("bob")["id"]
    assert changed == {bob: {"addresses"}}
    ops.session_stop("dnsmasq", "dhcp1", "52:54:00:00:00:01")
    assert ops.ledger.changes_since(last)[1] == {bob: {"addresses"}}


def test_history_gives_one_answer_after_many_handovers(ops):
    t = 100 * S
    for i in range(20):
        who = ("alice", "bob")[i % 2]
        ops.session_start("kea", "kea1", f"k{i}", who, ["100.64.7.9/32"], now=t + i * S)
    for i in range(20):
        found = ops.who_had("100.64.7.9", t + i * S + S // 2)
        assert [w["subscriber"] for w in found] == [("alice", "bob")[i % 2]]
    # a clock that stepped back: the new row starts where the last one ended, never before
    ops.session_stop("kea", "kea1", "k19", now=t + 30 * S)
    ops.session_start("kea", "kea1", "late", "alice", ["100.64.7.9/32"], now=t + 10 * S)
    assert ops.ledger.check_invariants() == []


def test_bindings_and_bad_input(ops):
    ops.bind("bob", "mac", "52-54-00-AB-CD-EF")
    assert ops.binding_owner("mac", "52:54:00:ab:cd:ef") == ops.ledger.get_subscriber("bob")["id"]
    assert ops.bind("bob", "mac", "5254.00ab.cdef")["replayed"]
    with pytest.raises(OperationError, match="bound to subscriber"):
        ops.bind("alice", "mac", "52:54:00:ab:cd:ef")
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "", None, "52:54:00:ab:cd:ef:00", "5254:00ab:cdef"):
        with pytest.raises(OperationError):
            ops.bind("bob", "mac", bad)
    for call in (lambda: ops.session_start("ldap", "x", "k", "bob", ["100.64.7.9/32"]),
                 lambda: ops.session_start("radius", "", "k", "bob", ["100.64.7.9/32"]),
                 lambda: ops.session_start("radius", "n", "k", "bob", []),
                 lambda: ops.session_start("radius", "n", "k", "bob", ["100.64.7.9/24"]),
                 lambda: ops.session_start("radius", "n", "k", "nobody", ["100.64.7.9/32"]),
                 lambda: ops.session_start("radius", "n", "k\x00", "bob", ["100.64.7.9/32"]),
                 lambda: ops.session_start("radius", "n", "k", "bob", ["100.64.7.9/32"], up_bytes=-1),
                 lambda: ops.who_had("not-an-address")):
        with pytest.raises(OperationError):
            call()
    assert ops.sessions() == []
    ops.unbind("mac", "52:54:00:ab:cd:ef")
    assert ops.binding_owner("mac", "52:54:00:ab:cd:ef") is None
    assert audit_actions(ops)[-2:] == ["binding.add", "binding.remove"]
