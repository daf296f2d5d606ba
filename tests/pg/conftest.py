"""Fixtures for the tests on a real PostgreSQL server: one throwaway cluster
per test session (accounting/credit/pgcluster.py: its own directory, Unix
socket and port, nothing on TCP), stopped and removed at the end whatever
happens. A test that wants a clean database takes ``pg_db`` (a fresh
database, migrated, dropped after the test).

Where the PostgreSQL binaries are missing the tests here skip, and the guard
(test_pg_guard.py) fails unless ``TOLLGATE_NO_PG=1`` says so on purpose. A
cluster that is installed but does not start is an error, never a skip.
"""

from __future__ import annotations

import itertools
import os

import pytest

from accounting.credit.pgcluster import PgCluster, find_bindir

NO_PG = os.environ.get("TOLLGATE_NO_PG", "") not in ("", "0")
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster():
    if NO_PG:
        pytest.skip("TOLLGATE_NO_PG=1: PostgreSQL tests not run on purpose")
    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (the guard test fails for this): `make system-deps`")
    cluster = PgCluster()
    try:
        cluster.start()  # a PgClusterError here is an error of every test that needs it, not a skip
        yield cluster
    finally:
        cluster.close()


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
