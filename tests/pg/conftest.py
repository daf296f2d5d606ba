"""Fixtures of the credit-control tests: a test that wants a clean database
takes ``pg_db`` (a fresh database with the credit schema, dropped after the
test). The cluster itself (``pg_cluster``) is tests/conftest.py's.
"""

from __future__ import annotations

import itertools
import os

import pytest

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_template(pg_cluster):
    """A database with the credit schema, used as the template of ``pg_db``."""
    from accounting.credit.pg import CreditStore

    pg_cluster.create_database("credit_template")
    store = CreditStore.open(pg_cluster.conninfo_for("credit_template"), pool_size=1)
    store.close()  # a template must have no connections when it is copied
    return "credit_template"


@pytest.fixture
def pg_db(pg_cluster, pg_template):
    """conninfo of a fresh database with the credit schema, dropped after the test."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    conninfo = pg_cluster.create_database(name, template=pg_template)
    try:
        yield conninfo
    finally:
        if pg_cluster.running:
            with psycopg.connect(pg_cluster.conninfo, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
