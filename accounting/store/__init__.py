"""Where the ledger is kept: one SQLite file (the embedded default) or a
PostgreSQL database shared by many gateways. :func:`open_backend` picks the
backend from the target; :mod:`accounting.store.backend` says what every
backend gives the ledger."""

from __future__ import annotations

from .backend import Backend

__all__ = ["Backend", "is_conninfo", "ledger_exists", "open_backend"]


def is_conninfo(target: str) -> bool:
    """True if ``target`` names a PostgreSQL database rather than a file."""
    return target.startswith(("postgresql://", "postgres://")) or "dbname=" in target


def ledger_exists(target) -> bool:
    """True if opening ``target`` would open a ledger rather than create a file: a conninfo names a
    database (which must exist already), a path exists or not."""
    import os

    return is_conninfo(str(target)) or os.path.exists(target)


def open_backend(target) -> Backend:
    """A connection to the ledger at ``target``: a file path, or a PostgreSQL
    conninfo (``postgresql://...`` or ``dbname=... host=...``)."""
    target = str(target)
    if is_conninfo(target):
        from .postgres import PostgresBackend

        return PostgresBackend.open(target)
    from .sqlite import SqliteBackend

    return SqliteBackend.open(target)
