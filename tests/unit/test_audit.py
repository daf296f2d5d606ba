"""The audit log's hash chain on a real SQLite ledger: appending, verifying, tampering by hand, redaction,
one transaction with the change it records, and `tollgate audit`."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import threading

import pytest

from accounting.audit import GENESIS, AuditLog, _row_hash, redact
from accounting.ledger import Ledger
from api.auth import TokenStore
from ext.errors import LedgerError


@pytest.fixture
def ledger(ledger_target):
    with Ledger.open(ledger_target()) as ledger:
        ledger.add_subscriber("alice", "basic", "EUR")
        yield ledger


def fill(audit: AuditLog, n: int) -> list[int]:
    return [audit.append("token:desk", "subscriber.update", f"subscriber:{k}", before={"credit_limit": k},
                         after={"credit_limit": k + 1}, ts_ns=1_000 + k) for k in range(n)]


def test_rows_chain_from_zeros_and_verify(ledger):
    audit = AuditLog(ledger)
    assert audit.verify() == (True, None) and audit.head() is None and audit.rows() == []
    assert fill(audit, 5) == [1, 2, 3, 4, 5]
    rows = audit.rows()
    assert rows[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    assert audit.verify() == (True, None) and audit.head() == (5, rows[-1]["hash"]) and audit.count() == 5
    assert rows[2] | {"prev_hash": None, "hash": None} == {
        "id": 3, "ts_ns": 1002, "actor": "token:desk", "action": "subscriber.update", "target": "subscriber:2",
        "before": {"credit_limit": 2}, "after": {"credit_limit": 3}, "prev_hash": None, "hash": None}


def test_the_hash_is_the_documented_one(ledger):
    """Anyone can check the chain without Tollgate: sha256(prev_hash + canonical JSON of the row)."""
    audit = AuditLog(ledger)
    audit.append("cli:root", "token.create", "token:desk", after={"role": "admin", "name": "desk"}, ts_ns=42)
    (row,) = audit.rows()
    body = json.dumps([1, 42, "cli:root", "token.create", "token:desk", None, {"name": "desk", "role": "admin"}],
                      sort_keys=True, separators=(",", ":"))
    assert row["hash"] == hashlib.sha256((GENESIS + body).encode()).hexdigest()


def test_an_edited_row_is_found(ledger):
    audit = AuditLog(ledger)
    fill(audit, 6)
    for column, value in (("after", '{"credit_limit":1000}'), ("actor", "token:someone-else"), ("ts_ns", 7),
                          ("before", None), ("target", "subscriber:99")):
        (original,) = ledger.db.execute(f"SELECT {column} FROM audit_log WHERE id = 4").fetchone()
        ledger.db.execute(f"UPDATE audit_log SET {column} = ? WHERE id = 4", (value,))
        assert audit.verify() == (False, 4), column
        ledger.db.execute(f"UPDATE audit_log SET {column} = ? WHERE id = 4", (original,))
        assert audit.verify() == (True, None)


def test_a_row_rehashed_after_editing_breaks_the_next_link(ledger):
    audit = AuditLog(ledger)
    fill(audit, 4)
    ledger.db.execute("UPDATE audit_log SET after = '{\"credit_limit\":1000}' WHERE id = 2")
    ledger.db.execute("UPDATE audit_log SET hash = ? WHERE id = 2", ("f" * 64,))
    assert audit.verify() == (False, 2)
    (prev,) = ledger.db.execute("SELECT prev_hash FROM audit_log WHERE id = 2").fetchone()
    # what a forger who knows the scheme computes: row 2 then matches its own hash
    forged = _row_hash(prev, 2, 1001, "token:desk", "subscriber.update", "subscriber:1", {"credit_limit": 1},
                       {"credit_limit": 1000})
    ledger.db.execute("UPDATE audit_log SET hash = ? WHERE id = 2", (forged,))
    assert audit.verify() == (False, 3)  # row 2 is self-consistent now; row 3 still points at the old hash


def test_a_deleted_middle_row_is_found(ledger):
    audit = AuditLog(ledger)
    fill(audit, 5)
    ledger.db.execute("DELETE FROM audit_log WHERE id = 3")
    assert audit.verify() == (False, 4)


def test_a_deleted_first_row_is_found(ledger):
    audit = AuditLog(ledger)
    fill(audit, 3)
    ledger.db.execute("DELETE FROM audit_log WHERE id = 1")
    assert audit.verify() == (False, 2)


def test_rows_cut_off_the_end_show_in_the_head(ledger):
    audit = AuditLog(ledger)
    fill(audit, 5)
    head = audit.head()
    ledger.db.execute("DELETE FROM audit_log WHERE id = 5")
    assert audit.verify() == (True, None)  # what a chain alone cannot tell...
    assert audit.head() != head  # ...the head noted elsewhere does


def test_secrets_are_redacted_at_any_depth(ledger):
    audit = AuditLog(ledger)
    before = {"name": "alice", "Password": "hunter22", "portal": {"password_hash": "scrypt$...", "login": "a"},
              "tokens": ["tg_abc"], "items": [{"api_token": "tg_x", "ok": 1}, {"client_secret": {"deep": 1}}],
              "DIGEST": "ab", "hash": None, "role": "admin"}
    audit.append("cli:root", "test", "x", before=before, after={"nested": {"deeper": {"SessionSecret": b"k".hex()}}})
    (row,) = audit.rows()
    assert row["before"] == {"name": "alice", "Password": "[redacted]", "portal": {"password_hash": "[redacted]",
                             "login": "a"}, "tokens": "[redacted]", "items": [{"api_token": "[redacted]", "ok": 1},
                             {"client_secret": "[redacted]"}], "DIGEST": "[redacted]", "hash": "[redacted]",
                             "role": "admin"}
    assert row["after"] == {"nested": {"deeper": {"SessionSecret": "[redacted]"}}}
    (raw,) = ledger.db.execute("SELECT before || after FROM audit_log").fetchone()
    assert "hunter22" not in raw and "tg_" not in raw and "scrypt" not in raw
    assert before["Password"] == "hunter22"  # the caller's dict is left alone
    assert audit.verify() == (True, None)
    assert redact([{"token": 1}, ("a", {"b": 2})]) == [{"token": "[redacted]"}, ["a", {"b": 2}]]


def test_bad_rows_are_refused_and_nothing_is_written(ledger):
    audit = AuditLog(ledger)
    for kwargs in ({"actor": ""}, {"action": " "}, {"target": None}, {"before": ["not", "a", "dict"]},
                   {"after": {"x": object()}}, {"after": {"x": float("nan")}}, {"ts_ns": -1}, {"ts_ns": 1.5}):
        args = {"actor": "cli:root", "action": "a", "target": "t"} | kwargs
        with pytest.raises(LedgerError):
            audit.append(**args)
    assert audit.count() == 0
    with pytest.raises(LedgerError):
        audit.rows(limit=0)


def test_values_are_stored_as_json_would_read_them_back(ledger):
    audit = AuditLog(ledger)
    audit.append("cli:root", "a", "t", after={"tuple": (1, 2), 3: "int key", "text": "Zoë"})
    assert audit.rows()[0]["after"] == {"tuple": [1, 2], "3": "int key", "text": "Zoë"}
    assert audit.verify() == (True, None)


def test_paging(ledger):
    audit = AuditLog(ledger)
    fill(audit, 25)
    first = audit.rows(limit=10)
    second = audit.rows(limit=10, after_id=first[-1]["id"])
    rest = audit.rows(limit=10, after_id=second[-1]["id"])
    assert [r["id"] for r in first + second + rest] == list(range(1, 26))


def test_the_change_and_its_row_commit_together_or_not_at_all(ledger):
    audit, tokens = AuditLog(ledger), TokenStore(ledger)
    with ledger.transaction():
        tokens.create("desk", "admin")
        audit.append("token:root", "token.create", "token:desk", after={"role": "admin"})
    assert len(tokens.list()) == 1 and audit.count() == 1
    with pytest.raises(RuntimeError), ledger.transaction():
        tokens.create("other", "admin")
        audit.append("token:root", "token.create", "token:other", after={"role": "admin"})
        raise RuntimeError("the handler failed after both writes")
    assert [t["name"] for t in tokens.list()] == ["desk"] and audit.count() == 1
    with pytest.raises(LedgerError), ledger.transaction():
        tokens.create("third", "admin")
        audit.append("token:root", "", "token:third")  # the audit row is refused: so is the change
    assert [t["name"] for t in tokens.list()] == ["desk"] and audit.verify() == (True, None)


def test_two_connections_appending_keep_one_chain(ledger_target):
    path = ledger_target()
    Ledger.open(path).close()

    def append_many(who):
        with Ledger.open(path) as own:
            for k in range(30):
                AuditLog(own).append(who, "a", f"t{k}")

    threads = [threading.Thread(target=append_many, args=(f"cli:{w}",)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with Ledger.open(path) as ledger:
        assert AuditLog(ledger).count() == 120 and AuditLog(ledger).verify() == (True, None)


# ---- the commands ----------------------------------------------------------------------------------

def tollgate(*args):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True)


def test_audit_verify_command(ledger):
    out = tollgate("audit", "verify", "--db", ledger.path)
    assert out.returncode == 0 and "audit chain intact: 0 rows" in out.stdout
    fill(AuditLog(ledger), 3)
    out = tollgate("audit", "verify", "--db", ledger.path)
    assert out.returncode == 0 and "audit chain intact: 3 rows" in out.stdout
    assert AuditLog(ledger).head()[1] in out.stdout
    ledger.db.execute("UPDATE audit_log SET actor = 'cli:nobody' WHERE id = 2")
    out = tollgate("audit", "verify", "--db", ledger.path)
    assert out.returncode == 1 and "broken at row 2" in out.stdout
    assert AuditLog(ledger).count() == 3  # verifying writes nothing


def test_audit_show_command(ledger):
    fill(AuditLog(ledger), 30)
    out = tollgate("audit", "show", "--db", ledger.path, "--limit", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["28", "29", "30"]
    assert "token:desk  subscriber.update  subscriber:29" in lines[-1]
    assert 'before {"credit_limit": 29} after {"credit_limit": 30}' in lines[-1]
    assert len(tollgate("audit", "show", "--db", ledger.path).stdout.splitlines()) == 20
    assert tollgate("audit", "show", "--db", ledger.path, "--limit", "0").returncode == 2
    assert AuditLog(ledger).count() == 30


def test_audit_show_on_an_empty_log(ledger):
    out = tollgate("audit", "show", "--db", ledger.path)
    assert out.returncode == 0 and "empty" in out.stdout
