"""The ledger: subscribers, payments, charges and usage in SQLite.

One writer per fact: the engine owns live balances, the ledger owns history.
The engine's counters arrive as *flushes*, each with an id; a flush is applied
in one transaction or not at all, and a flush whose id is known changes
nothing, so a crash between "drained" and "written" never charges twice when
the same flush is written again, and replaying a capture is idempotent.

The database runs in WAL mode with ``synchronous=FULL``: a committed flush
survives a crash of the process and of the machine; readers (the portal, the
CLI) never block the flusher. The schema is versioned; ``Ledger.open``
applies pending ``migrations/NNNN_*.sql`` in order, each in a transaction.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from pathlib import Path

import sqlite_utils

from ext.errors import LedgerError

MIGRATIONS = Path(__file__).with_name("migrations")
APPLICATION_ID = 0x546F6C6C  # "Toll": marks a SQLite file as a Tollgate ledger


def _migrations() -> list[tuple[int, Path]]:
    found = []
    for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path))
    return found


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerError(f"{what} must be an integer number of internal units, not {value!r}")
    return value


class Ledger:
    """A Tollgate ledger in one SQLite file. Use ``Ledger.open(path)``."""

    def __init__(self, db: sqlite_utils.Database, path: str) -> None:
        self.db = db
        self.path = path

    # ---- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path) -> "Ledger":
        """Open (creating if needed) and migrate the ledger at ``path``."""
        path = str(path)
        try:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            db = sqlite_utils.Database(conn)
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = FULL")
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.table_names()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{path}: not a usable SQLite database ({exc})") from None
        if tables and app_id != APPLICATION_ID:
            raise LedgerError(f"{path} is an SQLite database but not a Tollgate ledger")
        db.enable_wal()
        ledger = cls(db, path)
        ledger._migrate()
        return ledger

    def _migrate(self) -> None:
        db = self.db
        if "schema_version" not in db.table_names():
            db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_ns INTEGER NOT NULL)")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        current = db.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        known = _migrations()
        newest = known[-1][0] if known else 0
        if current > newest:
            raise LedgerError(f"{self.path} has schema version {current}; this Tollgate knows up to {newest}: "
                              f"upgrade Tollgate")
        for version, path in known:
            if version <= current:
                continue
            script = path.read_text()
            with self._tx():
                for statement in _statements(script):
                    self.db.execute(statement)
                self.db.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time_ns()))

    def _tx(self):
        return _Transaction(self.db.conn)

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    # ---- subscribers -----------------------------------------------------

    def add_subscriber(self, name: str, tariff: str, currency: str, opening_balance: int = 0,
                       credit_limit: int = 0, contract: str | None = None, addresses=()) -> int:
        """Create a subscriber; returns its id. Addresses are CIDR strings."""
        if not isinstance(name, str) or not name:
            raise LedgerError("a subscriber needs a name")
        _int(opening_balance, "opening balance")
        if _int(credit_limit, "credit limit") < 0:
            raise LedgerError("credit limit must not be negative")
        nets = [_network(a) for a in addresses]
        with self._tx():
            if self.db.execute("SELECT 1 FROM subscribers WHERE name = ?", (name,)).fetchone():
                raise LedgerError(f"subscriber {name!r} exists")
            cur = self.db.execute(
                "INSERT INTO subscribers (name, contract, tariff, currency, opening_balance, balance, credit_limit,"
                " created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, contract, tariff, currency, opening_balance, opening_balance, credit_limit, time.time_ns()))
            sid = cur.lastrowid
            for net in nets:
                self._insert_address(sid, net)
        return sid

    def _insert_address(self, sid: int, network: str) -> None:
        owner = self.db.execute("SELECT subscriber_id FROM addresses WHERE network = ?", (network,)).fetchone()
        if owner:
            raise LedgerError(f"{network} already belongs to subscriber {owner[0]}")
        self.db.execute("INSERT INTO addresses (network, subscriber_id) VALUES (?, ?)", (network, sid))

    def add_address(self, subscriber, network: str) -> None:
        sid = self._sid(subscriber)
        with self._tx():
            self._insert_address(sid, _network(network))

    def remove_address(self, network: str) -> None:
        with self._tx():
            cur = self.db.execute("DELETE FROM addresses WHERE network = ?", (_network(network),))
            if cur.rowcount == 0:
                raise LedgerError(f"{network} belongs to no subscriber")

    def _row(self, row: sqlite3.Row | tuple, cols) -> dict:
        d = dict(zip(cols, row))
        d["addresses"] = [n for (n,) in self.db.execute(
            "SELECT network FROM addresses WHERE subscriber_id = ? ORDER BY network", (d["id"],))]
        return d

    _COLS = ("id", "name", "contract", "tariff", "currency", "opening_balance", "balance", "credit_limit", "active")

    def get_subscriber(self, key) -> dict | None:
        """By id (int) or name (str); None if there is no such subscriber."""
        col = "id" if isinstance(key, int) else "name"
        if isinstance(key, str) and key.isdigit():
            row = self.db.execute(f"SELECT {', '.join(self._COLS)} FROM subscribers WHERE name = ? OR id = ?",
                                  (key, int(key))).fetchone()
        else:
            row = self.db.execute(f"SELECT {', '.join(self._COLS)} FROM subscribers WHERE {col} = ?", (key,)).fetchone()
        return None if row is None else self._row(row, self._COLS)

    def subscribers(self) -> list[dict]:
        rows = self.db.execute(f"SELECT {', '.join(self._COLS)} FROM subscribers ORDER BY id").fetchall()
        return [self._row(r, self._COLS) for r in rows]

    def _sid(self, subscriber) -> int:
        sub = self.get_subscriber(subscriber)
        if sub is None:
            raise LedgerError(f"no subscriber {subscriber!r}")
        return sub["id"]

    def balance(self, subscriber) -> int:
        return self.get_subscriber(self._sid(subscriber))["balance"]

    # ---- money ---------------------------------------------------------------

    def add_payment(self, subscriber, amount: int, ts_ns: int | None = None, method: str = "manual",
                    comment: str | None = None, idempotency_key: str | None = None) -> int:
        """Record a payment; returns its id.

        The same ``idempotency_key`` again returns the first payment's id and
        changes nothing; with a different subscriber or amount it is an error.
        """
        sid = self._sid(subscriber)
        _int(amount, "amount")
        with self._tx():
            if idempotency_key is not None:
                prior = self.db.execute("SELECT id, subscriber_id, amount FROM payments WHERE idempotency_key = ?",
                                        (idempotency_key,)).fetchone()
                if prior:
                    if (prior[1], prior[2]) != (sid, amount):
                        raise LedgerError(f"idempotency key {idempotency_key!r} was used for another payment")
                    return prior[0]
            cur = self.db.execute(
                "INSERT INTO payments (subscriber_id, amount, ts_ns, method, comment, idempotency_key)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (sid, amount, ts_ns or time.time_ns(), method, comment, idempotency_key))
            self.db.execute("UPDATE subscribers SET balance = balance + ? WHERE id = ?", (amount, sid))
            return cur.lastrowid

    def add_adjustment(self, subscriber, amount: int, reason: str, author: str) -> int:
        """A correction by an operator, with a reason (positive or negative)."""
        sid = self._sid(subscriber)
        _int(amount, "amount")
        if not reason:
            raise LedgerError("an adjustment needs a reason")
        with self._tx():
            cur = self.db.execute("INSERT INTO adjustments (subscriber_id, amount, ts_ns, reason, author)"
                                  " VALUES (?, ?, ?, ?, ?)", (sid, amount, time.time_ns(), reason, author))
            self.db.execute("UPDATE subscribers SET balance = balance + ? WHERE id = ?", (amount, sid))
            return cur.lastrowid

    def last_payment_id(self) -> int:
        return self.db.execute("SELECT coalesce(max(id), 0) FROM payments").fetchone()[0]

    def payments_since(self, payment_id: int) -> list[dict]:
        """Payments with an id above ``payment_id``, oldest first (the daemon applies them live)."""
        cols = ("id", "subscriber_id", "amount", "ts_ns", "method")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM payments WHERE id > ? ORDER BY id", (payment_id,))
        return [dict(zip(cols, r)) for r in rows]

    def payments(self, subscriber) -> list[dict]:
        cols = ("id", "amount", "ts_ns", "method", "comment")
        rows = self.db.execute(f"SELECT {', '.join(cols)} FROM payments WHERE subscriber_id = ? ORDER BY id",
                               (self._sid(subscriber),))
        return [dict(zip(cols, r)) for r in rows]

    # ---- flushes -------------------------------------------------------------

    def apply_flush(self, flush_id: str, rows, ts_ns: int, source: str = "engine") -> bool:
        """Write the engine's counters: ``rows`` of (subscriber, zone, direction,
        minute, bytes, packets, charged). One transaction; False (and nothing
        changed) if ``flush_id`` was applied before."""
        rows = list(rows)
        for r in rows:
            if len(r) != 7 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                raise LedgerError(f"bad flush row {r!r}: expected 7 integers")
        with self._tx():
            try:
                self.db.execute("INSERT INTO flushes (id, ts_ns, rows, source) VALUES (?, ?, ?, ?)",
                                (flush_id, ts_ns, len(rows), source))
            except sqlite3.IntegrityError:
                return False
            per_sub: dict[int, int] = {}
            self.db.conn.executemany(
                "INSERT INTO usage (subscriber_id, zone, direction, minute, bytes, packets, amount)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber_id, zone, direction, minute) DO UPDATE SET"
                " bytes = bytes + excluded.bytes, packets = packets + excluded.packets,"
                " amount = amount + excluded.amount", rows)
            for r in rows:
                per_sub[r[0]] = per_sub.get(r[0], 0) + r[6]
            for sid, amount in per_sub.items():
                if amount:
                    self.db.execute("INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns) VALUES (?, ?, ?, ?)",
                                    (sid, flush_id, amount, ts_ns))
                    self.db.execute("UPDATE subscribers SET balance = balance - ? WHERE id = ?", (amount, sid))
        return True

    def has_flush(self, flush_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM flushes WHERE id = ?", (flush_id,)).fetchone() is not None

    def record_block(self, subscriber, kind: str, reason: str, ts_ns: int) -> None:
        with self._tx():
            self.db.execute("INSERT INTO blocks (subscriber_id, kind, reason, ts_ns) VALUES (?, ?, ?, ?)",
                            (self._sid(subscriber), kind, reason, ts_ns))

    def usage_by_zone(self, subscriber, since_minute: int = 0) -> list[dict]:
        cols = ("zone", "direction", "bytes", "packets", "amount")
        rows = self.db.execute(
            "SELECT zone, direction, sum(bytes), sum(packets), sum(amount) FROM usage"
            " WHERE subscriber_id = ? AND minute >= ? GROUP BY zone, direction ORDER BY zone, direction",
            (self._sid(subscriber), since_minute))
        return [dict(zip(cols, r)) for r in rows]

    # ---- imports ---------------------------------------------------------------

    def has_import(self, digest: str) -> bool:
        return self.db.execute("SELECT 1 FROM imports WHERE digest = ?", (digest,)).fetchone() is not None

    def record_import(self, digest: str, path: str, packets: int) -> bool:
        with self._tx():
            cur = self.db.execute("INSERT OR IGNORE INTO imports (digest, path, packets, ts_ns) VALUES (?, ?, ?, ?)",
                                  (digest, path, packets, time.time_ns()))
            return cur.rowcount == 1

    # ---- checks ------------------------------------------------------------------

    def check_invariants(self) -> list[str]:
        """Problems found; empty when every balance is opening + payments +
        adjustments - charges and usage amounts add up to the charges."""
        problems = []
        rows = self.db.execute("""
            SELECT s.id, s.name, s.balance, s.opening_balance,
                   (SELECT coalesce(sum(amount), 0) FROM payments p WHERE p.subscriber_id = s.id),
                   (SELECT coalesce(sum(amount), 0) FROM adjustments a WHERE a.subscriber_id = s.id),
                   (SELECT coalesce(sum(amount), 0) FROM charges c WHERE c.subscriber_id = s.id),
                   (SELECT coalesce(sum(amount), 0) FROM usage u WHERE u.subscriber_id = s.id)
            FROM subscribers s ORDER BY s.id""").fetchall()
        for sid, name, balance, opening, paid, adjusted, charged, used in rows:
            expected = opening + paid + adjusted - charged
            if balance != expected:
                problems.append(f"subscriber {sid} ({name}): balance {balance} != opening {opening} + payments "
                                f"{paid} + adjustments {adjusted} - charges {charged} = {expected}")
            if used != charged:
                problems.append(f"subscriber {sid} ({name}): usage amounts {used} != charges {charged}")
        return problems


class _Transaction:
    """BEGIN IMMEDIATE .. COMMIT/ROLLBACK on an autocommit connection: writers
    queue up at BEGIN (busy timeout) instead of failing half-way."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def _network(text) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"bad address {text!r}: {exc}") from None


def _statements(script: str):
    """Split a migration into statements (sqlite3 runs one per execute)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()
