"""The ledger in one SQLite file: the embedded default, no server.

Durability. WAL mode, so readers (portal, CLI, API) never block the flusher
and the flusher never blocks them. ``synchronous=FULL``: in WAL mode NORMAL
keeps the file consistent but may lose the last commits on a power cut, and
a lost commit here is a payment the customer was told about, or a flush the
engine has already forgotten (traffic never charged). FULL costs one fsync
per commit; the gateway commits about once a second, so that is nothing.

Writers queue at ``BEGIN IMMEDIATE`` (a busy timeout of 30 s) instead of
failing half-way: one writer at a time for the whole file, which holds
every row lock and named lock the PostgreSQL backend takes. A file that is not a Tollgate ledger (SQLite's
``application_id``) is refused.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3

from ext.errors import LedgerError

from .backend import Backend

__all__ = ["APPLICATION_ID", "SqliteBackend", "statements"]

APPLICATION_ID = 0x546F6C6C  # "Toll": marks a SQLite file as a Tollgate ledger


class SqliteBackend(Backend):
    dialect = "sqlite"
    errors = (sqlite3.DatabaseError,)
    GREATEST = "max"
    LEAST = "min"
    FOR_UPDATE = ""
    LOCK_ROW = ""
    SKIP_LOCKED = ""
    ILIKE = "LIKE"

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        # recursive triggers, as sqlite_utils.Database(conn) turns them on: every ledger connection has had
        # them, so that the schema's triggers fire the same way they always did
        conn.execute("PRAGMA recursive_triggers = ON")
        self.conn = conn
        self.target = path

    @classmethod
    def open(cls, path: str, read_only: bool = False) -> SqliteBackend:
        """Connect to ``path`` (created if missing). ``read_only`` opens an
        existing file as it is (``tollgate ledger check`` changes nothing,
        not even the journal mode or an older schema)."""
        conn = None
        try:
            if read_only:
                conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, timeout=30,
                                       isolation_level=None, check_same_thread=False)
            else:  # autocommit; transactions are explicit (BEGIN IMMEDIATE / DEFERRED below)
                conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
            backend = cls(conn, path)
            app_id, has_tables = cls._identity(conn)
            if (read_only or has_tables) and app_id != APPLICATION_ID:
                raise LedgerError(f"{path} is not a Tollgate ledger" if read_only else
                                  f"{path} is an SQLite database but not a Tollgate ledger")
            # A ledger opened before is in WAL mode already: one pragma. A file seen for the first time (new,
            # or not yet WAL) goes through sqlite-utils, imported only then (click, pluggy and dateutil with
            # it: 60 ms of every CLI command if imported at the top)
            if not read_only and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                import sqlite_utils

                sqlite_utils.Database(conn).enable_wal()  # outside a transaction: autocommit, as connected
        except sqlite3.DatabaseError as exc:  # not even the header reads: damaged, or not SQLite
            if conn is not None:
                conn.close()
            raise LedgerError(f"{path}: not a {'readable' if read_only else 'usable'} SQLite database ({exc})") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return backend

    @staticmethod
    def _identity(conn: sqlite3.Connection) -> tuple[int, bool]:
        """The file's application id and whether it has tables, read in one snapshot. Read apart, another
        process (or thread) creating the same new ledger could commit its first migration in between, and
        a file with tables but no id yet would look foreign: it is both or neither at every commit."""
        conn.execute("BEGIN DEFERRED")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            has_tables = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1").fetchone()
        finally:
            conn.execute("COMMIT")
        return app_id, has_tables is not None

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows) -> None:
        self.conn.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def _begin_read(self) -> None:
        self.conn.execute("BEGIN DEFERRED")

    def _commit(self) -> None:
        self.conn.execute("COMMIT")

    def _rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    def _refused(self, exc: BaseException) -> bool:
        # (and a number no column holds: a parameter past 2^63-1 (sqlite3's OverflowError), a sum() past it)
        return isinstance(exc, (sqlite3.IntegrityError, OverflowError)) or self._overflowed(exc)

    def _conflicted(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and str(exc).startswith("UNIQUE constraint failed")

    def table_names(self) -> list[str]:
        return [r[0] for r in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]

    def _mark_new(self) -> None:
        self.execute("CREATE TABLE IF NOT EXISTS schema_version "
                     "(version INTEGER PRIMARY KEY, applied_ns INTEGER NOT NULL)")
        self.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _run_script(self, script: str, name: str) -> None:
        try:
            for statement in statements(script):
                self.execute(statement)
        except sqlite3.Error as exc:
            raise LedgerError(f"migration {name} failed on {self.target}: {exc}") from None

    def bulk_cache(self, rows: int):
        """A page cache for a transaction writing ``rows`` subscribers (~250 B of pages each, up to 256 MiB),
        so that a large import does not spill its uncommitted pages to the WAL half-way (measured: 4.1 s
        for 100k subscribers with the default 2 MiB, 3.4 s with this); the usual size again afterwards."""
        return self.page_cache(min(256 << 10, max(2 << 10, rows // 4)))

    def index_hint(self, index: str) -> str:
        return f" INDEXED BY {index}"

    def joined_in_order(self, key: str, column: str, table: str) -> str:
        # group_concat takes ORDER BY from SQLite 3.44 (Debian 12's is 3.40); before, it joins the rows in
        # the order they come, which a GROUP BY walking an index of the key alone leaves to their rowids.
        # One or two rows (nearly every subscriber) are min, or min and max: in order by definition, no
        # sort. More are read again, from an ordered subquery, which SQLite keeps in its order (it
        # flattens no subquery with an ORDER BY into an aggregate, and with no GROUP BY no sorter stands
        # between them). tests/unit/test_start_rows.py holds it to ORDER BY on the SQLite that runs it.
        return (f"SELECT {key}, CASE count(*) WHEN 1 THEN min({column})"
                f" WHEN 2 THEN min({column}) || ' ' || max({column})"
                f" ELSE (SELECT group_concat({column}, ' ') FROM (SELECT {column} FROM {table} AS t"
                f" WHERE t.{key} = {table}.{key} ORDER BY {column})) END"
                f" FROM {table} GROUP BY {key} ORDER BY {key}")

    @contextlib.contextmanager
    def page_cache(self, kib: int):
        before = self.scalar("PRAGMA cache_size")
        self.execute(f"PRAGMA cache_size = {-int(kib)}")  # negative: KiB, not pages
        try:
            yield
        finally:
            self.execute(f"PRAGMA cache_size = {int(before)}")

    def _overflowed(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and str(exc) == "integer overflow"

    def integrity_problems(self) -> list[str]:
        """``PRAGMA integrity_check`` (pages, indexes, NOT NULL) and ``foreign_key_check`` (a row whose
        subscriber, flush or payment is gone: SQLite checks foreign keys only on connections that ask)."""
        rows = [r[0] for r in self.execute("PRAGMA integrity_check")]
        problems = [] if rows == ["ok"] else [f"SQLite integrity: {r}" for r in rows]
        return problems + [f"{table} row {rowid} refers to a missing {parent} row"
                           for table, rowid, parent, _fk in self.execute("PRAGMA foreign_key_check")]

    def dump(self) -> list[tuple]:
        return list(self.conn.iterdump())  # the schema too: a refused call must not have changed it either

    def close(self) -> None:
        self.conn.close()


def statements(script: str):
    """Split a migration into statements (sqlite3 runs one per execute)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()
