"""The ledger on a PostgreSQL server: the shared ledger of many gateways.

One :class:`PostgresBackend` is one psycopg 3 connection in autocommit mode,
with transactions begun and ended explicitly as on SQLite, so the ledger's
transaction code is the same on both. Write transactions run under READ
COMMITTED; a read :meth:`~Backend.snapshot` is REPEATABLE READ (one
moment of the database, never blocking a writer).

What the ledger's SQL assumes, made true here:

- ``?`` placeholders: rewritten to psycopg's ``%s`` (and a literal ``%`` to
  ``%%``) once per statement text, outside quoted strings;
- integers in, integers out: every integer column is ``bigint``; ``sum()``
  of a bigint is a ``numeric`` in PostgreSQL, loaded back as a Python int
  when it is whole (amounts never have fractions); Python's ``bool`` is
  stored as 0/1, as SQLite stores it;
- no lock for the whole database: writers hold their invariants in the
  schema and in the rows they change (the list in
  :mod:`accounting.store.backend`); :meth:`lock` and :meth:`exclusive` are
  advisory locks keyed by a name.

A database is a Tollgate ledger when its ``schema_version`` table carries
the comment :data:`MARK`; a database with other tables and no mark is refused.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.types.numeric import Int8Dumper, NumericLoader

from ext.errors import LedgerError

from .backend import Backend

__all__ = ["MARK", "PooledPostgresBackend", "PostgresBackend", "pg_sql"]

MARK = "Tollgate ledger"
MIGRATION_LOCK = 0x546F6C6C_4D494752  # "TollMIGR"
# what the database rolled back whole because another transaction of the same moment needed the same rows
# (SQLSTATE class 40; psycopg maps each code to its own class, not below TransactionRollback)
ROLLED_BACK = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, pg_errors.TransactionRollback)


@functools.lru_cache(maxsize=4096)
def pg_sql(sql: str) -> str:
    """The ledger's ``?``-placeholder SQL in psycopg's spelling."""
    out, quote = [], None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        if ch == "%":
            out.append("%%")  # psycopg reads % everywhere in a statement with parameters, strings included
            continue
        out.append(ch)
    return "".join(out)


class _WholeNumeric(NumericLoader):
    """numeric -> int when whole (sum() of bigint amounts), else Decimal."""

    def load(self, data):
        value = super().load(data)
        return int(value) if value.is_finite() and value == value.to_integral_value() else value


class _BoolAsInt(Int8Dumper):
    """True/False -> 1/0: the ledger's flags are integer columns on both backends."""

    def dump(self, obj):
        return b"1" if obj else b"0"


def _configure(conn: psycopg.Connection) -> None:
    """What every connection to a ledger loads and dumps its own way (the module doc)."""
    conn.adapters.register_loader("numeric", _WholeNumeric)
    conn.adapters.register_dumper(bool, _BoolAsInt)


def _target(conn: psycopg.Connection) -> str:
    """The database as messages name it (no password)."""
    info = conn.info
    return f"postgresql database {info.dbname!r} on {info.host}:{info.port}"


class PostgresBackend(Backend):
    dialect = "postgres"
    errors = (psycopg.DatabaseError,)
    GREATEST = "greatest"
    LEAST = "least"
    FOR_UPDATE = " FOR UPDATE"
    LOCK_ROW = " FOR NO KEY UPDATE"
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    ILIKE = "ILIKE"

    def __init__(self, conn: psycopg.Connection, target: str, conninfo: str = "") -> None:
        self.conn = conn
        self.target = target
        self.conninfo = conninfo

    @classmethod
    def open(cls, conninfo: str, connect_timeout: float = 10.0) -> PostgresBackend:
        try:
            conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=int(connect_timeout))
        except psycopg.Error as exc:
            raise LedgerError(f"cannot connect to the PostgreSQL ledger: {exc}".strip()) from None
        _configure(conn)
        backend = cls(conn, _target(conn), conninfo)
        try:
            tables = backend.table_names()
            if tables:
                mark = backend.scalar("SELECT obj_description(to_regclass('schema_version'), 'pg_class')")
                if mark != MARK:
                    raise LedgerError(f"{backend.target} has tables but is not a Tollgate ledger")
        except BaseException:
            conn.close()
            raise
        return backend

    def joined_in_order(self, key: str, column: str, table: str) -> str:
        return f"SELECT {key}, string_agg({column}, ' ' ORDER BY {column}) FROM {table} GROUP BY {key} ORDER BY {key}"

    def execute(self, sql: str, params=()):
        return self.conn.execute(pg_sql(sql), tuple(params))

    def executemany(self, sql: str, rows) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(pg_sql(sql), [tuple(r) for r in rows])

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != TransactionStatus.IDLE

    def _begin(self) -> None:
        self.conn.execute("BEGIN")

    def lock(self, name: str) -> None:
        # hashtextextended: the name's 64-bit hash, so names of different jobs do not share a key by accident
        self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("tollgate:" + name,))

    @contextlib.contextmanager
    def exclusive(self, name: str):
        key = "tollgate:" + name
        got = self.scalar("SELECT pg_try_advisory_lock(hashtextextended(?, 0))", (key,))
        try:
            yield bool(got)
        finally:
            if got and not self.lost:
                self.execute("SELECT pg_advisory_unlock(hashtextextended(?, 0))", (key,))

    def _begin_read(self) -> None:
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")  # not READ ONLY: reads may fill a TEMP table

    def _commit(self) -> None:
        self.conn.execute("COMMIT")

    def _rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    def _refused(self, exc: BaseException) -> bool:
        # (and a number no column holds: a parameter or a result past 2^63-1 for a bigint)
        return isinstance(exc, (pg_errors.IntegrityError, *ROLLED_BACK)) or self._overflowed(exc)

    def _conflicted(self, exc: BaseException) -> bool:
        # ROLLED_BACK (SQLSTATE class 40: a deadlock, a serialization failure): two writers side by side each
        # waiting for the other, e.g. both inserting overlapping addresses, each one's exclusion check waiting
        # on the other's uncommitted row; the database rolled this one back whole. A conflict with a write of
        # the same moment, as a key the other holds is: nothing was written (409 at the front ends)
        return isinstance(exc, (pg_errors.UniqueViolation, pg_errors.ExclusionViolation, *ROLLED_BACK))

    def _describe(self, exc: BaseException) -> str:
        # Two writers side by side can both pass a check that the second's write then breaks: these are
        # that case, said in the words the checks use (and the front ends answer 409 to).
        detail = getattr(getattr(exc, "diag", None), "message_detail", None) or str(exc)
        if isinstance(exc, pg_errors.ExclusionViolation):
            return (f"{detail}: the address overlaps one that belongs to another subscriber (written at the same "
                    "moment); an address has one owner")
        if isinstance(exc, pg_errors.UniqueViolation):
            return f"{detail}: it exists already (written at the same moment)"
        if isinstance(exc, ROLLED_BACK):
            return (f"{exc.diag.message_primary or exc}: another write at the same moment needed the same rows; "
                    "nothing of this one was written: try again")
        return str(exc)

    def _overflowed(self, exc: BaseException) -> bool:
        return isinstance(exc, pg_errors.NumericValueOutOfRange)  # a bigint result out of range

    def table_names(self) -> list[str]:
        return [t for (t,) in self.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename")]

    def _mark_new(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                          "(version BIGINT PRIMARY KEY, applied_ns BIGINT NOT NULL)")
        self.conn.execute(f"COMMENT ON TABLE schema_version IS '{MARK}'")

    def _migration_lock(self) -> None:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

    def _run_script(self, script: str, name: str) -> None:
        try:
            self.conn.execute(script)  # no parameters: several statements in one call, % left alone
        except psycopg.Error as exc:
            raise LedgerError(f"migration {name} failed on {self.target}: {exc}") from None

    def listener(self) -> FeedListener:
        return FeedListener(self.conninfo)

    def integrity_problems(self) -> list[str]:
        """Nothing to ask: PostgreSQL enforces foreign keys and NOT NULL on every write, and a damaged
        page is an error of the query that reads it."""
        return []

    @property
    def lost(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.close()


class PooledPostgresBackend(PostgresBackend):
    """One ledger for the many threads of a front end (the admin API's and the portal's request
    threads, the daemon's helpers), over a psycopg pool of at most ``size`` connections instead of
    a connection per thread: a gateway's API serves any number of threads on a few connections, and
    ten gateways do not each hold dozens of the server's ``max_connections``.

    A transaction, a snapshot or an :meth:`exclusive` job holds one connection of the pool from its
    start to its end (the thread's own meanwhile: nested ones join it); a statement outside them
    borrows one for itself. psycopg reads a statement's whole result into memory before the
    connection goes back, so the cursor it returns is read afterwards as any other. A connection
    the server dropped is discarded by the pool when it comes back, and a new one is made: nothing
    to reconnect by hand (:attr:`lost` stays False)."""

    def __init__(self, pool, target: str, conninfo: str) -> None:  # noqa: D107 - no base __init__: no one connection
        self.pool = pool
        self.target = target
        self.conninfo = conninfo
        self._local = threading.local()

    @classmethod
    def open_pool(cls, conninfo: str, size: int, connect_timeout: float = 10.0) -> PooledPostgresBackend:
        """The pool, opened with its first connection (``Ledger.open_pooled`` has checked and migrated
        the ledger on a connection of its own before)."""
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(conninfo, min_size=1, max_size=size, kwargs={"autocommit": True}, configure=_configure,
                              timeout=connect_timeout, name="tollgate-ledger", open=False)
        try:
            pool.open(wait=True, timeout=connect_timeout)
        except Exception as exc:  # noqa: BLE001 - psycopg_pool's PoolTimeout and the connection's errors
            pool.close()
            raise LedgerError(f"cannot open a pool of connections to the PostgreSQL ledger: {exc}") from None
        with pool.connection() as conn:
            target = _target(conn)
        return cls(pool, target, conninfo)

    @property
    def conn(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # every caller below holds one; a path that does not is a bug, said so
            raise LedgerError("a pooled ledger used a connection outside a transaction or a statement")
        return conn

    @contextlib.contextmanager
    def _held(self):
        """This thread's connection: the one it holds already, or one of the pool until the block ends."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self.pool.connection() as conn:  # back to the pool at the end; rolled back if left in a transaction
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    def execute(self, sql: str, params=()):
        with self._held():
            return super().execute(sql, params)

    def executemany(self, sql: str, rows) -> None:
        with self._held():
            super().executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        conn = getattr(self._local, "conn", None)
        return conn is not None and conn.info.transaction_status != TransactionStatus.IDLE

    @contextlib.contextmanager
    def transaction(self):
        with self._held(), super().transaction():
            yield self

    @contextlib.contextmanager
    def snapshot(self):
        with self._held(), super().snapshot():
            yield self

    @contextlib.contextmanager
    def exclusive(self, name: str):
        with self._held(), super().exclusive(name) as got:  # a session lock: taken and given back on one connection
            yield got

    @property
    def lost(self) -> bool:
        return False

    def close(self) -> None:
        self.pool.close()


class FeedListener:
    """``LISTEN tollgate_ledger`` on a connection of its own. ``wait(timeout)``: True if a notification
    came (the feed moved), False on timeout. A lost connection is opened again at the next wait, after
    ``timeout`` (the feed is the truth: a missed notification only delays the read to the next poll)."""

    CHANNEL = "tollgate_ledger"

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.conn: psycopg.Connection | None = None

    def wait(self, timeout: float) -> bool:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=max(1, int(timeout)))
                self.conn.execute(f"LISTEN {self.CHANNEL}")
            return any(True for _ in self.conn.notifies(timeout=timeout, stop_after=1))
        except psycopg.Error:
            self.close()
            time.sleep(timeout)
            return False

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            self.conn = None
