"""``tollgate ledger check`` (accounting/checks.py) on real ledger files: a sound one passes, and each kind of
damage, made with sqlite3 directly as a bug or a hand edit would, makes it exit 1 naming what is wrong.

The checks themselves run on both backends (``[sqlite]``, ``[pg]``: tests/conftest.py's ledger_target). The
command opens a file read only, so what goes through it (exit codes, the file left as it was, files that are
no ledger, an older schema, SQLite's own integrity check) is SQLite's."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import psycopg
import pytest

from accounting.checks import check_ledger, summary
from accounting.ledger import Ledger
from accounting.operations import Operations
from gateway.config import load_config

EUR = 10 ** 9
CONFIG = """
[gateway]
currency = "EUR"
timezone = "UTC"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "1"
"""


def write_usual(ledger, tmp_path) -> None:
    """Two subscribers, payments, an adjustment, a flush and audit rows, written the usual way."""
    (tmp_path / "t.toml").write_text(CONFIG)
    ops = Operations(ledger, load_config(tmp_path / "t.toml"), "cli:test")
    ops.add("alice", "basic", ["100.64.0.2/32", "2001:db8:100:2::/64"], balance="10.00")
    ops.add("bob", "basic", ["100.64.0.16/28"], balance="1.00")
    ops.topup("alice", "5.00", "k1")
    ops.adjust("bob", "-0.50", "refund of a fee")
    ledger.apply_flush("f1", [(1, 1, 1, 60, 1_000_000, 700, 12_345), (2, 1, 0, 60, 5_000, 9, 77)], 10**18)
    ledger.apply_flush("f2", [(1, 1, 1, 120, 10, 1, 1)], 10**18 + 1)


@pytest.fixture
def db(tmp_path):
    """The usual ledger in a file, for the command."""
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as ledger:
        write_usual(ledger, tmp_path)
    return path


@pytest.fixture
def ledger(tmp_path, ledger_target):
    """The usual ledger on each backend, open."""
    with Ledger.open(ledger_target()) as ledger:
        write_usual(ledger, tmp_path)
        yield ledger


def check(path):
    return subprocess.run([sys.executable, "-m", "gateway.cli", "ledger", "check", "--db", str(path)],
                          check=False, capture_output=True, text=True)


def tamper(path, *statements, foreign_keys: bool = False):
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
    for sql in statements:
        con.execute(sql)
    con.commit()
    con.close()


def test_a_sound_ledger_passes(db):
    out = check(db)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ledger ok (2 subscribers, 3 addresses, 1 payments, 2 flushes, 4 audit rows)"
    with Ledger.open(db) as ledger:
        assert check_ledger(ledger) == [] == ledger.check_invariants()


DAMAGE = [
    (["UPDATE subscribers SET balance = balance + 1 WHERE id = 2"],
     "subscriber 2 (bob): balance 499999924 != opening 1000000000 + payments 0 + adjustments -500000000 - charges 77"
     " - fees and settlements 0 = 499999923"),
    (["UPDATE usage SET amount = amount + 5 WHERE subscriber_id = 1 AND minute = 60"],
     "subscriber 1 (alice): usage amounts 12351 != charges 12346"),
    (["INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns) VALUES (1, 'f1', 3, 0)"],
     "flush 'f1' charged subscriber 1 2 times"),
    (["INSERT INTO payments (subscriber_id, amount, ts_ns, method) VALUES (9, 100, 0, 'cash')"],
     "payments row 2 refers to a missing subscribers row"),
    (["DELETE FROM flushes WHERE id = 'f2'"], "charges row 3 refers to a missing flushes row"),
    (["UPDATE payments SET amount = 0"], "payment 1 (subscriber 1) has amount 0"),
    (["INSERT INTO addresses (network, subscriber_id) VALUES ('100.64.0.0/24', 2)"],
     "100.64.0.2/32 of subscriber 1 overlaps 100.64.0.0/24 of subscriber 2"),
    # (inside subscriber 1's own prefixes: on PostgreSQL another subscriber's would be refused as an overlap)
    (["INSERT INTO addresses (network, subscriber_id) VALUES ('2001:db8:100:2:0:0:0:1/128', 1)"],
     "address '2001:db8:100:2:0:0:0:1/128' of subscriber 1 is not written canonically (2001:db8:100:2::1/128)"),
    (["INSERT INTO addresses (network, subscriber_id) VALUES ('100.64.0.3/31', 1)"],
     "address '100.64.0.3/31' of subscriber 1 is not a prefix with its host bits zero"),
    (["UPDATE audit_log SET actor = 'someone else' WHERE id = 2"], "audit log: the hash chain breaks at row 2"),
    (["DELETE FROM audit_log WHERE id = 2"], "audit log: the hash chain breaks at row 3"),
]


@pytest.mark.parametrize("statements, says", DAMAGE)
def test_each_kind_of_damage_is_named(db, statements, says):
    tamper(db, *statements)
    out = check(db)
    assert out.returncode == 1, out.stdout
    assert says in out.stdout, out.stdout
    assert "problem" in out.stderr and out.stderr.startswith("tollgate: error: ")


def test_the_checks_pass_a_sound_ledger_and_name_each_damage_on_both_backends(ledger):
    assert check_ledger(ledger) == [] == ledger.check_invariants()
    assert summary(ledger) == "2 subscribers, 3 addresses, 1 payments, 2 flushes, 4 audit rows"
    refused = 0  # damage PostgreSQL refuses to write at all
    for statements, says in DAMAGE:
        if ledger.db.dialect == "sqlite":  # a connection of its own without foreign keys, as a hand edit may be
            tamper(ledger.path, *statements)
        elif "refers to a missing" in says or "overlaps" in says:
            # PostgreSQL checks every foreign key and the one owner of an address (schema 24) on every write
            with pytest.raises((psycopg.errors.ForeignKeyViolation, psycopg.errors.ExclusionViolation)):
                ledger.db.execute(*statements)
            refused += 1
            continue
        else:
            for sql in statements:
                ledger.db.execute(sql)
        problems = check_ledger(ledger)  # (the damage adds up: each finding is looked for as it is made)
        assert any(says in p for p in problems), (says, problems)
        assert not ledger.db.in_transaction  # a check holds no snapshot open after it (PostgreSQL: nor a lock)
    # every problem of every kind at once, each listed
    assert refused == (3 if ledger.db.dialect == "postgres" else 0)
    assert len(check_ledger(ledger)) >= len(DAMAGE) - refused


def test_the_command_checks_a_postgresql_ledger_too(pg_cluster, pg_ledger_template, tmp_path):
    """``tollgate ledger check --db CONNINFO``: the command of the file tests above, on PostgreSQL."""
    import uuid

    ledger = Ledger.open(pg_cluster.create_database(f"check_{uuid.uuid4().hex[:12]}", template=pg_ledger_template))
    write_usual(ledger, tmp_path)
    out = check(ledger.path)
    assert out.returncode == 0 and out.stdout.startswith("ledger ok (2 subscribers"), (out.stdout, out.stderr)
    ledger.db.execute("UPDATE subscribers SET balance = balance + 1 WHERE id = 1")
    out = check(ledger.path)
    assert out.returncode == 1 and "balance" in out.stdout and "1 problem" in out.stderr, (out.stdout, out.stderr)
    ledger.close()


def test_sqlite_integrity(db):
    """A NOT NULL column holding NULL, as a damaged file may: only PRAGMA integrity_check sees it."""
    con = sqlite3.connect(db)
    sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'zones'").fetchone()[0]
    con.execute("PRAGMA writable_schema = ON")
    con.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'zones'", (sql.replace("NOT NULL", ""),))
    con.commit()
    con.close()
    tamper(db, "INSERT INTO zones (id, name) VALUES (7, NULL)")
    con = sqlite3.connect(db)
    con.execute("PRAGMA writable_schema = ON")
    con.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'zones'", (sql,))
    con.commit()
    con.close()
    out = check(db)
    assert out.returncode == 1 and "SQLite integrity: NULL value in zones.name" in out.stdout, out.stdout


def test_every_problem_is_listed(db):
    tamper(db, "UPDATE subscribers SET balance = 0", "UPDATE audit_log SET target = 'x' WHERE id = 1")
    out = check(db)
    lines = out.stdout.splitlines()
    assert out.returncode == 1 and len(lines) == 3 and "3 problems" in out.stderr
    assert [line.split(":")[0] for line in lines] == ["subscriber 1 (alice)", "subscriber 2 (bob)", "audit log"]


def test_the_check_reads_only(db, tmp_path):
    tamper(db, "UPDATE subscribers SET balance = 0 WHERE id = 1")
    before = db.read_bytes()  # (SQLite may make the -shm and an empty -wal beside it: WAL readers need them)
    assert check(db).returncode == 1
    assert db.read_bytes() == before
    assert not (tmp_path / "ledger.db-wal").exists() or (tmp_path / "ledger.db-wal").read_bytes() == b""


def test_files_that_are_no_ledger(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not SQLite at all" * 100)
    out = check(garbage)
    assert out.returncode == 1 and "not a readable SQLite database" in out.stderr, out.stderr
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    out = check(other)
    assert out.returncode == 2 and "is not a Tollgate ledger" in out.stderr, out.stderr


def test_an_older_schema_is_checked_as_it_is_not_migrated(tmp_path):
    """Opening a ledger the usual way migrates it; a check must not change what it checks."""
    import shutil
    from pathlib import Path

    import accounting

    old = tmp_path / "migrations"
    old.mkdir()
    for script in sorted((Path(accounting.__file__).parent / "store" / "migrations" / "sqlite").glob("00*.sql"))[:11]:  # before auth/audit
        shutil.copy(script, old)
    path = tmp_path / "old.db"
    with Ledger.open(path, migrations=old) as ledger:
        ledger.add_subscriber("a", "t", "EUR", 5)
        version = ledger.schema_version
    before = path.read_bytes()
    out = check(path)
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("SELECT max(version) FROM schema_version").fetchone() == (version,)
    assert out.returncode == 1 and "audit log: cannot be read (no such table: audit_log)" in out.stdout, out.stdout
