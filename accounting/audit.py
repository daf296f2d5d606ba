"""The audit log: who changed what, as a hash chain in the ledger.

Every change made through the admin API or the CLI appends one row: the
actor (``token:<name>``, ``cli:<unix user>``, ``portal:<subscriber id>``),
the action (``token.create``, ``subscriber.update``...), the target and the
state before and after, as JSON.

Tamper evidence. Each row stores ``prev_hash``, the hash of the row before it
(64 zeros for the first), and ``hash`` = SHA-256 of ``prev_hash`` followed by
the canonical JSON of ``[id, ts_ns, actor, action, target, before, after]``.
:meth:`AuditLog.verify` recomputes the chain: a row edited afterwards no
longer matches its hash, and a row deleted from the middle leaves the next
row pointing at a hash that is not there. Rows cut off at the end leave a
shorter chain that is still consistent; to catch that, keep the head
(:meth:`AuditLog.head`, printed by ``tollgate audit verify``) somewhere else.

Secrets never reach the log: in ``before`` and ``after``, the value of any
key whose name contains password, token, secret, digest or hash, at any
depth, is replaced by ``"[redacted]"`` before it is stored and hashed.

Atomicity. :meth:`AuditLog.append` writes inside the ledger's transaction
helper, which nests: a caller that opens ``ledger.transaction()``, makes its change
and appends the audit row commits both or neither.
"""

from __future__ import annotations

import hashlib
import json
import time

from ext.errors import LedgerError

from .ledger import Ledger

__all__ = ["GENESIS", "REDACTED", "SECRET_WORDS", "AuditLog", "redact"]

GENESIS = "0" * 64
REDACTED = "[redacted]"
SECRET_WORDS = ("password", "token", "secret", "digest", "hash")
_COLS = ("id", "ts_ns", "actor", "action", "target", "before", "after", "prev_hash", "hash")


def redact(value):
    """A copy of ``value`` (dicts, lists, scalars) with the values of secret-looking keys replaced, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if any(w in str(k).lower() for w in SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def _canonical(value) -> str:
    # allow_nan=False: NaN is not JSON, and SQLite's json_valid() would refuse the row anyway
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _row_hash(prev_hash: str, row_id: int, ts_ns: int, actor: str, action: str, target: str, before, after) -> str:
    body = _canonical([row_id, ts_ns, actor, action, target, before, after])
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _stored(state, what: str) -> tuple[str | None, object]:
    """``before``/``after`` -> (the JSON text to store, the value hashed).

    The value hashed is the stored text parsed back, not the caller's object,
    so that verify() (which only has the text) computes the same hash even
    when the caller gave tuples or non-string keys.
    """
    if state is None:
        return None, None
    if not isinstance(state, dict):
        raise LedgerError(f"audit {what} must be a dict or None, not {type(state).__name__}")
    try:
        # through JSON once unsorted first: keys become strings as JSON makes them (1 -> "1", True -> "true"),
        # so sort_keys never has to order an int against a str
        text = _canonical(json.loads(json.dumps(redact(state), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"audit {what} is not JSON-able: {exc}") from None
    return text, json.loads(text)


def _label(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"audit {what} must be a non-empty string, not {value!r}")
    return value


class AuditLog:
    """The audit chain of one ledger (one connection: give each thread its own ledger)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def append(self, actor: str, action: str, target: str, before: dict | None = None, after: dict | None = None,
               ts_ns: int | None = None) -> int:
        """Append one row and return its id.

        Runs in ``ledger.transaction()``: inside a caller's transaction it is part of
        it; alone it is its own. The id and the previous hash come from the
        one row of ``audit_head`` (schema 21), updated in the same statement
        that reads it: its row lock, held to commit, keeps two writers from
        chaining onto the same previous row on any backend.
        """
        _label(actor, "actor")
        _label(action, "action")
        _label(target, "target")
        if ts_ns is None:
            ts_ns = time.time_ns()
        elif isinstance(ts_ns, bool) or not isinstance(ts_ns, int) or ts_ns < 0:
            raise LedgerError(f"audit ts_ns must be integer nanoseconds since the epoch, not {ts_ns!r}")
        before_text, before_value = _stored(before, "before")
        after_text, after_value = _stored(after, "after")
        db = self.ledger.db
        with self.ledger.transaction():
            row_id, prev_hash = db.execute("UPDATE audit_head SET id = id + 1 WHERE one = 1 RETURNING id, hash"
                                           ).fetchone()
            digest = _row_hash(prev_hash, row_id, ts_ns, actor, action, target, before_value, after_value)
            db.execute("INSERT INTO audit_log (id, ts_ns, actor, action, target, before, after, prev_hash, hash)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (row_id, ts_ns, actor, action, target, before_text, after_text, prev_hash, digest))
            db.execute("UPDATE audit_head SET hash = ? WHERE one = 1", (digest,))
        return row_id

    def verify(self) -> tuple[bool, int | None]:
        """``(True, None)`` if every row's hash and link match; else
        ``(False, id)`` of the first row that does not."""
        expected_prev = GENESIS
        for row_id, ts_ns, actor, action, target, before, after, prev_hash, digest in self.ledger.db.execute(
                f"SELECT {', '.join(_COLS)} FROM audit_log ORDER BY id"):
            if prev_hash != expected_prev:
                return False, row_id
            try:
                values = [None if text is None else json.loads(text) for text in (before, after)]
                computed = _row_hash(prev_hash, row_id, ts_ns, actor, action, target, *values)
            except (TypeError, ValueError):  # a column edited to a value of another type
                return False, row_id
            if computed != digest:
                return False, row_id
            expected_prev = digest
        return True, None

    def head(self) -> tuple[int, str] | None:
        """``(id, hash)`` of the last row, or None when the log is empty: note
        it elsewhere to detect later that rows were cut off at the end."""
        row = self.ledger.db.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (row[0], row[1])

    def count(self) -> int:
        """How many rows the log holds."""
        return self.ledger.db.execute("SELECT count(*) FROM audit_log").fetchone()[0]

    def rows(self, limit: int = 100, after_id: int = 0) -> list[dict]:
        """Up to ``limit`` rows with ``id > after_id``, oldest first (page on
        with the last id seen); ``before`` and ``after`` as dicts."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise LedgerError(f"audit rows: limit is 1..10000, not {limit!r}")
        if isinstance(after_id, bool) or not isinstance(after_id, int):
            raise LedgerError(f"audit rows: after_id must be an integer, not {after_id!r}")
        out = []
        for row in self.ledger.db.execute(f"SELECT {', '.join(_COLS)} FROM audit_log WHERE id > ? ORDER BY id LIMIT ?",
                                          (after_id, limit)):
            d = dict(zip(_COLS, row))
            for key in ("before", "after"):
                d[key] = None if d[key] is None else json.loads(d[key])
            out.append(d)
        return out
