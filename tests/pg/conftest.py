"""Fixtures of the PostgreSQL-only tests: ``pg_ledger`` is the conninfo of a fresh ledger database
(copied from tests/conftest.py's migrated ``pg_ledger_template``), dropped after the test. The
cluster itself (``pg_cluster``) is tests/conftest.py's.
"""

from __future__ import annotations

import itertools
import os

import pytest

_counter = itertools.count(1)


@pytest.fixture
def pg_ledger(pg_cluster, pg_ledger_template):
    """conninfo of a fresh, migrated ledger database, dropped after the test."""
    import psycopg

    name = f"pgl{os.getpid()}_{next(_counter)}"
    conninfo = pg_cluster.create_database(name, template=pg_ledger_template)
    try:
        yield conninfo
    finally:
        if pg_cluster.running:
            with psycopg.connect(pg_cluster.conninfo, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
