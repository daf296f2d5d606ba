"""The ledger of each thread of a front end: the admin API's and the portal's request threads, the
gateway daemon's helper threads, a ledger-only ``tollgate api``.

A :class:`~accounting.ledger.Ledger` is one connection and is not shared between threads, except
on PostgreSQL through a pool. So :meth:`ThreadLedgers.get` gives

- on SQLite, each thread its own connection, opened at its first call and kept (a file connection
  costs nothing to keep, and SQLite serialises writers itself);
- on PostgreSQL, every thread the same ledger over one pool of at most ``pool_size`` connections
  (:class:`accounting.store.postgres.PooledPostgresBackend`): a web server's forty request threads
  hold a few of the server's connections instead of forty, in every gateway sharing the ledger.
"""

from __future__ import annotations

import threading

from .ledger import Ledger
from .store import is_conninfo

__all__ = ["POOL_SIZE", "ThreadLedgers"]

POOL_SIZE = 8  # connections per process: a request holds one only while its transaction or statement runs


class ThreadLedgers:
    """``get()``: the calling thread's ledger at ``target``; ``prepare(ledger)`` is run once on each
    new one (the gateway names itself there: kernel state and grants are written per gateway)."""

    def __init__(self, target, prepare=None, pool_size: int = POOL_SIZE) -> None:
        self.target = str(target)
        self.prepare = prepare
        self.pool_size = pool_size
        self.local = threading.local()
        self.shared: Ledger | None = None
        self.lock = threading.Lock()  # the first threads at once make one pool, not one each

    def get(self) -> Ledger:
        if is_conninfo(self.target):
            if self.shared is None:
                with self.lock:
                    if self.shared is None:
                        self.shared = self._prepared(Ledger.open_pooled(self.target, self.pool_size))
            return self.shared
        ledger = getattr(self.local, "ledger", None)
        if ledger is None:
            ledger = self.local.ledger = self._prepared(Ledger.open(self.target))
        return ledger

    def _prepared(self, ledger: Ledger) -> Ledger:
        if self.prepare is not None:
            self.prepare(ledger)
        return ledger

    def close(self) -> None:
        """Close the pool (PostgreSQL); each thread's SQLite connection closes with its thread."""
        if self.shared is not None:
            self.shared.close()
            self.shared = None
