"""The ledger's storage boundary: what a database gives :class:`accounting.ledger.Ledger`.

The ledger speaks one SQL to every backend, written with ``?`` placeholders
in the syntax SQLite (3.35 or newer) and PostgreSQL (15) share: ``RETURNING``,
``ON CONFLICT``, partial indexes, CTEs. A backend adds what differs:

- how to connect, and how a database is recognised as a Tollgate ledger;
- how a transaction starts: :meth:`Backend.transaction` for writes (nested
  calls join the outer one, which commits or rolls back all of it) and
  :meth:`Backend.snapshot` for several reads that must see one moment;
- its migrations (``migrations/<dialect>/NNNN_*.sql``: the same numbers and
  names on every backend, so a schema version means the same tables
  everywhere; ``tests/pg/test_ledger_schema.py`` holds them equal);
- the few spellings SQL does not share (:attr:`Backend.GREATEST`,
  :attr:`Backend.ILIKE`, :meth:`Backend.index_hint`), what it does with
  integers past 2^63-1 (:meth:`Backend.sums`), and how its errors become
  :class:`LedgerError`.

Writers. SQLite has one writer at a time for the whole file (``BEGIN
IMMEDIATE``). PostgreSQL runs writers side by side under READ COMMITTED, and
the ledger takes no lock for the whole database there: each invariant is held
by the schema or by the rows a writer changes, so that two writers wait for
each other only when they write the same thing:

- one of a kind: primary and unique keys (a subscriber's name, an address, a
  payment's idempotency key, a tariff's version, a card's serial), partial
  unique indexes (one live session per network, one pending tariff change per
  subscriber), ``ON CONFLICT`` where a second writer should change nothing;
- one owner per address, any prefix overlapping it: an exclusion constraint
  on PostgreSQL (schema 24); the check of ``accounting.operations`` is what
  says so in words, on both;
- check, then write, on one subscriber (an update and its audit row's
  "before", a block that must not be there yet, a device limit): the
  subscriber's row is read with :attr:`Backend.LOCK_ROW`, so writers of one
  subscriber take turns and writers of others do not wait;
- numbers taken from what is there (a batch of card serials, the next tariff
  version): :meth:`Backend.lock` for that one name, until commit;
- jobs that should run once at a time across gateways (a rollup):
  :meth:`Backend.exclusive`, skipped where another process holds it.

Lock order, on PostgreSQL, so that writers never deadlock: a subscriber's row
first (the feed's trigger takes it before ``feed_head`` too, migration 1),
then named locks, ``feed_head``, and ``audit_head`` last (an audit row is the
end of every change).
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path

from ext.errors import LedgerConflict, LedgerError

__all__ = ["Backend", "MIGRATIONS", "migrations"]

MIGRATIONS = Path(__file__).with_name("migrations")


def migrations(dialect: str, folder: Path | None = None) -> list[tuple[int, Path]]:
    """The migrations of ``dialect`` (or those in ``folder``, for tests) as
    ``(version, path)``, checked to be numbered 1, 2, 3..."""
    folder = folder or MIGRATIONS / dialect
    found = [(int(p.name[:4]), p) for p in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))]
    versions = [v for v, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise LedgerError(f"migrations in {folder} are not numbered 1, 2, 3...: {versions}")
    return found


class Backend(abc.ABC):
    """One connection to one ledger database. Not shared between threads."""

    dialect: str  # "sqlite" or "postgres": the folder of its migrations
    target: str  # the file or the database, as messages name it (no password)
    errors: tuple[type[BaseException], ...]  # what a query on this database raises when it fails
    GREATEST: str  # the scalar maximum of two values: max(a, b) in SQLite, greatest(a, b) in PostgreSQL
    LEAST: str  # the scalar minimum: min(a, b) in SQLite, least(a, b) in PostgreSQL
    FOR_UPDATE: str  # after a SELECT: lock the rows read until commit (PostgreSQL); SQLite's writer holds the file
    LOCK_ROW: str  # the same for a row about to change (FOR NO KEY UPDATE: inserts that refer to it do not wait)
    SKIP_LOCKED: str  # the same, passing over rows another transaction holds (a queue shared by gateways)
    ILIKE: str  # LIKE ignoring ASCII case: SQLite's LIKE does already, PostgreSQL's ILIKE
    INT_MAX = (1 << 63) - 1  # the largest integer a column holds on every backend (SQLite INTEGER, bigint)

    def index_hint(self, index: str) -> str:
        """The clause after a table name that makes the query read ``index``: SQLite's
        `` INDEXED BY index`` (its planner would take a wider index for some of the ledger's partial
        ones, accounting/rollup.py), nothing where the planner takes no hints (PostgreSQL, which
        picks a partial index by its WHERE and the statistics)."""
        return ""

    @abc.abstractmethod
    def joined_in_order(self, key: str, column: str, table: str) -> str:
        """A query: each ``key`` of ``table`` (ascending) and the texts of ``column`` of its rows in their
        ascending order (``ORDER BY column``), joined by single spaces. A subscriber's networks as one text
        for a start's scan (``Ledger.subscriber_rows``): a million rows, not 1.8M walked in Python."""

    # ---- statements ------------------------------------------------------------------------

    @abc.abstractmethod
    def execute(self, sql: str, params=()):
        """Run one statement; returns a cursor (``fetchone``, ``fetchall``,
        iteration, ``rowcount``). No ``lastrowid``: write ``RETURNING id``."""

    @abc.abstractmethod
    def executemany(self, sql: str, rows) -> None:
        """Run one statement for each row of parameters."""

    def scalar(self, sql: str, params=()):
        """The first column of the first row, or None."""
        row = self.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # ---- transactions ----------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool:
        """True inside a transaction of this connection."""

    @abc.abstractmethod
    def _begin(self) -> None: ...

    @abc.abstractmethod
    def _begin_read(self) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _rollback(self) -> None: ...

    @abc.abstractmethod
    def _refused(self, exc: BaseException) -> bool:
        """True if ``exc`` is the database refusing a row (a constraint): bad input, not a fault."""

    def _conflicted(self, exc: BaseException) -> bool:
        """True if the refusal is a key or an exclusion that another row holds (:class:`LedgerConflict`)."""
        return False

    def _describe(self, exc: BaseException) -> str:
        """What a refusal says to the person who asked."""
        return str(exc)

    def _refusal(self, exc: BaseException) -> LedgerError:
        kind = LedgerConflict if self._conflicted(exc) else LedgerError
        return kind(f"refused by the database: {self._describe(exc)}")

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction: all of it or, on any error (the commit's
        included), nothing. Inside another transaction of this connection it
        is part of that one. A constraint the database enforces that the
        code's checks missed is still bad input: :class:`LedgerError`."""
        if self.in_transaction:
            try:
                yield self
            except Exception as exc:
                if self._refused(exc):
                    raise self._refusal(exc) from exc
                raise
            return
        self._begin()
        try:
            yield self
        except BaseException as exc:
            if self.in_transaction:
                self._rollback()
            if self._refused(exc):
                raise self._refusal(exc) from exc
            raise
        try:
            self._commit()
        except BaseException as exc:
            if self.in_transaction:
                self._rollback()
            if self._refused(exc):  # PostgreSQL checks deferred constraints at COMMIT
                raise self._refusal(exc) from exc
            raise

    @contextlib.contextmanager
    def snapshot(self):
        """A read transaction: several SELECTs see one moment, without
        blocking writers or waiting for them. Inside a transaction of this
        connection: part of it."""
        if self.in_transaction:
            yield self
            return
        self._begin_read()
        try:
            yield self
        finally:
            if self.in_transaction:
                self._commit()  # nothing written: ends the read

    def lock(self, name: str) -> None:
        """Inside a write transaction: wait until no other transaction holds ``name``, and hold it to
        the end of this one (PostgreSQL: a transaction-level advisory lock keyed by the name). For
        writers that number what they add from what is there, where no row exists yet to lock.
        SQLite's one writer holds every name already."""

    @contextlib.contextmanager
    def exclusive(self, name: str):
        """Outside a transaction: yields True while this connection alone runs the job ``name`` (a
        session-level advisory lock on PostgreSQL, released at the end), False at once if another
        connection runs it (the caller skips its turn). SQLite: always True, its writer takes turns."""
        yield True

    # ---- schema ----------------------------------------------------------------------------

    @abc.abstractmethod
    def table_names(self) -> list[str]:
        """The ledger's tables (not the database's own)."""

    @abc.abstractmethod
    def _mark_new(self) -> None:
        """Create ``schema_version (version, applied_ns)`` and mark an empty
        database as a Tollgate ledger, inside the first migration's transaction."""

    @abc.abstractmethod
    def _run_script(self, script: str, name: str) -> None: ...

    def _migration_lock(self) -> None:
        """Inside a migration's transaction: keep other processes from migrating at the same time."""

    def schema_version(self) -> int:
        if "schema_version" not in self.table_names():
            return 0
        return self.scalar("SELECT coalesce(max(version), 0) FROM schema_version")

    def migrate(self, known: list[tuple[int, Path]], now_ns: int) -> None:
        """Bring the schema to the newest of ``known``, one transaction per
        migration, each re-reading the version inside (another process may be
        migrating the same database); a schema newer than ``known`` is refused."""
        newest = known[-1][0] if known else 0
        if self.schema_version() == newest:
            return  # the usual open: no write lock taken
        for version, script in known:
            with self.transaction():
                self._migration_lock()
                current = self.schema_version()
                if current > newest:
                    break
                if version <= current:
                    continue
                if current == 0:
                    self._mark_new()
                self._run_script(script.read_text(), script.name)
                self.execute("INSERT INTO schema_version VALUES (?, ?)", (version, now_ns))
        current = self.schema_version()
        if current > newest:
            raise LedgerError(f"{self.target} has schema version {current}; this Tollgate knows up to {newest}: "
                              f"upgrade Tollgate")

    # ---- tools -----------------------------------------------------------------------------

    def listener(self):
        """Something whose ``wait(timeout)`` returns True soon after another connection commits a payment,
        an adjustment or a change-feed row (PostgreSQL: LISTEN/NOTIFY, schema 23), so a gateway reads the
        feed at once; None where the database cannot tell (SQLite: poll)."""
        return None

    def integrity_problems(self) -> list[str]:
        """What the database itself finds wrong with its pages, indexes and keys, one line each."""
        return []

    def bulk_cache(self, rows: int):
        """A context for writing ``rows`` rows at once (SQLite: a page cache that holds their indexes)."""
        return contextlib.nullcontext()

    def page_cache(self, kib: int):
        """A context in which this connection caches ``kib`` KiB of pages, the usual size again after
        (SQLite's ``cache_size``; nothing on a server, whose shared buffers are its own)."""
        return contextlib.nullcontext()

    def _overflowed(self, exc: BaseException) -> bool:
        """True if ``exc`` is an integer result beyond :attr:`INT_MAX` (SQLite's ``sum()``)."""
        return False

    def sums(self, sql: str, params=(), what: str = "a sum"):
        """Every row of a query whose columns sum integers: exact integers (PostgreSQL's ``sum()`` of a
        bigint is a numeric, loaded back as an int however large), or a :class:`LedgerError` naming
        ``what`` where the database cannot sum beyond :attr:`INT_MAX` (SQLite's ``integer overflow``),
        never a rounded or wrapped number."""
        try:
            return self.execute(sql, params).fetchall()
        except self.errors as exc:
            if self._overflowed(exc):
                raise LedgerError(f"{what} passes 2^63-1, more than {self.target} can sum exactly ({exc})") from None
            raise

    def dump(self) -> list[tuple]:
        """Every row of every ledger table, in a stable order: tests compare two
        dumps to show that a refused call wrote nothing."""
        out = []
        for table in sorted(self.table_names()):
            rows = self.execute(f"SELECT * FROM {table}").fetchall()
            out.extend((table, *r) for r in sorted(rows, key=repr))
        return out

    @property
    def lost(self) -> bool:
        """True once the server dropped this connection for good (a file is never lost)."""
        return False

    @abc.abstractmethod
    def close(self) -> None: ...
