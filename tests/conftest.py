"""Fixtures every suite shares: a throwaway PostgreSQL cluster, and the
ledger on each backend.

``pg_cluster``: one cluster per test session (accounting/store/pgcluster.py:
its own directory, Unix socket and port, nothing on TCP), stopped and removed
at the end whatever happens. Where the PostgreSQL binaries are missing the
tests that need it skip, and the guard (tests/pg/test_pg_guard.py) fails
unless ``TOLLGATE_NO_PG=1`` says so on purpose. A cluster that is installed
but does not start is an error, never a skip.

``ledger_target``: the ledger suite runs on both backends, ``[sqlite]`` and
``[pg]`` in the test ids (as the engine's ``[c]`` and ``[py]``): a callable
giving the target of a fresh, empty ledger each time it is called, a file
path or a conninfo, for ``Ledger.open``.
"""

from __future__ import annotations

import itertools
import os

import pytest

from accounting.store.pgcluster import PgCluster, find_bindir

NO_PG = os.environ.get("TOLLGATE_NO_PG", "") not in ("", "0")
_databases = itertools.count(1)


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
def pg_ledger_template(pg_cluster):
    """A database migrated to the newest ledger schema, copied for each fresh ledger (a copy takes
    milliseconds; 20 migrations take a second)."""
    from accounting.ledger import Ledger

    pg_cluster.create_database("ledger_template")
    Ledger.open(pg_cluster.conninfo_for("ledger_template")).close()  # no connection may stay on a template
    return "ledger_template"


@pytest.fixture(scope="session")
def sqlite_ledger_template(tmp_path_factory):
    """A SQLite ledger file migrated to the newest schema and closed (no WAL left), for tests that make
    many fresh ledgers (one per hypothesis example): ``shutil.copyfile`` of it is a fresh empty ledger
    in a millisecond, where creating one runs every migration (~0.2 s). The PostgreSQL side's
    ``pg_ledger_template`` does the same with ``CREATE DATABASE ... TEMPLATE``."""
    from accounting.ledger import Ledger

    path = tmp_path_factory.mktemp("sqlite_ledger_template") / "ledger.db"
    Ledger.open(str(path)).close()
    assert not os.path.exists(f"{path}-wal") or os.path.getsize(f"{path}-wal") == 0
    return path


@pytest.fixture(params=["sqlite", "pg"])
def ledger_target(request, tmp_path):
    """A callable: ``ledger_target()`` -> the target of a new empty ledger on this test's backend."""
    if request.param == "sqlite":
        files = itertools.count(1)
        yield lambda: str(tmp_path / f"ledger{next(files)}.db")
        return
    cluster = request.getfixturevalue("pg_cluster")
    template = request.getfixturevalue("pg_ledger_template")
    made = []

    def new() -> str:
        name = f"l{os.getpid()}_{next(_databases)}"
        made.append(name)
        return cluster.create_database(name, template=template)

    yield new
    if cluster.running:
        import psycopg

        with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
            for name in made:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
