"""The ledger on a real SQLite file: migrations, idempotency, invariants, crashes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting.ledger import Ledger
from ext.errors import LedgerError

REPO = Path(__file__).resolve().parents[2]


def test_new_ledger_is_migrated_wal_and_reopens(tmp_path):
    path = tmp_path / "l.db"
    with Ledger.open(path) as led:
        assert led.schema_version == 1
        assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        sid = led.add_subscriber("alice", "basic", "EUR", opening_balance=500, addresses=["100.64.1.2/32"])
    with Ledger.open(path) as led:
        assert led.db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1  # not applied twice
        assert led.get_subscriber("alice")["id"] == sid
        assert led.get_subscriber(sid)["addresses"] == ["100.64.1.2/32"]


def test_foreign_and_newer_databases_are_refused(tmp_path):
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="not a Tollgate ledger"):
        Ledger.open(other)
    newer = tmp_path / "newer.db"
    Ledger.open(newer).close()
    con = sqlite3.connect(newer)
    con.execute("INSERT INTO schema_version VALUES (99, 0)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="schema version 99"):
        Ledger.open(newer)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError):
        Ledger.open(junk)


def test_flush_is_idempotent(tmp_path):
    with Ledger.open(tmp_path / "l.db") as led:
        sid = led.add_subscriber("a", "t", "EUR", opening_balance=1000)
        rows = [(sid, 1, 0, 60, 500, 5, 120), (sid, 2, 1, 60, 100, 1, 30)]
        assert led.apply_flush("boot:1", rows, 1) is True
        assert led.apply_flush("boot:1", rows, 2) is False
        assert led.balance(sid) == 1000 - 150
        assert led.db.execute("SELECT sum(bytes), sum(amount) FROM usage").fetchone() == (600, 150)
        assert led.check_invariants() == []


def test_payments_with_idempotency_keys(tmp_path):
    with Ledger.open(tmp_path / "l.db") as led:
        sid = led.add_subscriber("a", "t", "EUR")
        first = led.add_payment(sid, 700, idempotency_key="k1")
        assert led.add_payment(sid, 700, idempotency_key="k1") == first
        with pytest.raises(LedgerError, match="another payment"):
            led.add_payment(sid, 701, idempotency_key="k1")
        assert led.balance(sid) == 700
        assert [p["id"] for p in led.payments_since(0)] == [first]


def test_bad_input_changes_nothing(tmp_path):
    with Ledger.open(tmp_path / "l.db") as led:
        sid = led.add_subscriber("a", "t", "EUR", addresses=["100.64.0.1/32"])
        with pytest.raises(LedgerError):
            led.add_payment(sid, 1.5)
        with pytest.raises(LedgerError):
            led.add_payment("nobody", 1)
        with pytest.raises(LedgerError, match="already belongs"):
            led.add_subscriber("b", "t", "EUR", addresses=["100.64.0.1/32"])
        assert led.get_subscriber("b") is None  # the whole add was rolled back
        with pytest.raises(LedgerError):
            led.apply_flush("f", [(sid, 0, 0, 0, 1, 1)], 0)
        with pytest.raises(LedgerError):
            led.add_address(sid, "100.64.0.1/24")
        assert not led.has_flush("f")
        assert led.balance(sid) == 0


operations = st.lists(st.one_of(
    st.tuples(st.just("sub"), st.integers(-1000, 1000)),
    st.tuples(st.just("pay"), st.integers(0, 5), st.integers(1, 10_000), st.sampled_from([None, "k1", "k2", "k3"])),
    st.tuples(st.just("adjust"), st.integers(0, 5), st.integers(-500, 500)),
    st.tuples(st.just("flush"), st.integers(0, 8), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3),
                                                                          st.integers(0, 1), st.integers(0, 3),
                                                                          st.integers(0, 10 ** 6),
                                                                          st.integers(0, 5000)), max_size=6)),
), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
def test_balance_invariant_after_random_operations(tmp_path, ops):
    path = tmp_path / f"inv-{time.monotonic_ns()}.db"
    expected: dict[int, int] = {}  # worked out here, from what was fed in
    keys: dict[str, tuple] = {}
    flushes: set[int] = set()
    with Ledger.open(path) as led:
        subs: list[int] = []
        for op in ops:
            if op[0] == "sub":
                sid = led.add_subscriber(f"s{len(subs)}", "t", "EUR", opening_balance=op[1])
                subs.append(sid)
                expected[sid] = op[1]
            elif not subs:
                continue
            elif op[0] == "pay":
                sid = subs[op[1] % len(subs)]
                key = op[3]
                if key in keys and keys[key] != (sid, op[2]):
                    with pytest.raises(LedgerError):
                        led.add_payment(sid, op[2], idempotency_key=key)
                    continue
                led.add_payment(sid, op[2], idempotency_key=key)
                if key is None or key not in keys:
                    expected[sid] += op[2]
                if key is not None:
                    keys[key] = (sid, op[2])
            elif op[0] == "adjust":
                sid = subs[op[1] % len(subs)]
                led.add_adjustment(sid, op[2], "test", "hypothesis")
                expected[sid] += op[2]
            else:
                rows = {}
                for s, zone, d, minute, nbytes, charged in op[2]:
                    rows[(subs[s % len(subs)], zone, d, minute)] = (nbytes, 1, charged)
                led.apply_flush(f"f{op[1]}", [k + v for k, v in rows.items()], 0)
                if op[1] not in flushes:  # a replayed flush id charges nothing
                    flushes.add(op[1])
                    for (sid, *_), (_b, _p, charged) in rows.items():
                        expected[sid] -= charged
        assert led.check_invariants() == []
        assert {s["id"]: s["balance"] for s in led.subscribers()} == expected


CRASHER = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from accounting.ledger import Ledger
led = Ledger.open(sys.argv[1])
sid = led.get_subscriber("victim")["id"]
i = 0
print("ready", flush=True)
while True:
    i += 1
    rows = [(sid, z, d, i, 1000, 10, 7) for z in range(4) for d in (0, 1)]
    led.apply_flush(f"crash:{i}", rows, i)
"""


def test_sigkill_mid_flush_leaves_whole_flushes(tmp_path):
    path = tmp_path / "crash.db"
    with Ledger.open(path) as led:
        led.add_subscriber("victim", "t", "EUR", opening_balance=10 ** 9)
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(path), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    with Ledger.open(path) as led:
        n_flushes = led.db.execute("SELECT count(*) FROM flushes").fetchone()[0]
        assert n_flushes > 0
        # every flush applied has all of its 8 rows and its charge; nothing half-written
        assert led.db.execute("SELECT count(*), sum(amount) FROM usage").fetchone() == (8 * n_flushes, 56 * n_flushes)
        assert led.db.execute("SELECT count(*) FROM charges").fetchone()[0] == n_flushes
        assert led.check_invariants() == []
        assert led.balance("victim") == 10 ** 9 - 56 * n_flushes
