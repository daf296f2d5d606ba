"""The guard: a test run must not pass by silently skipping PostgreSQL.

Unless ``TOLLGATE_NO_PG=1`` asks for it, PostgreSQL must be installed (`make
system-deps` installs Debian's `postgresql`) and the throwaway cluster must
start: an installed server that does not come up fails here, with its log.
"""

from __future__ import annotations

import os
import stat

import pytest

from accounting.store.pgcluster import find_bindir

NO_PG = os.environ.get("TOLLGATE_NO_PG", "") not in ("", "0")


def test_postgres_is_installed_unless_asked_not_to():
    if NO_PG:
        return
    assert find_bindir() is not None, "PostgreSQL is not installed (no initdb): run `make system-deps`"


def test_the_throwaway_cluster_runs_on_its_own_socket_only(request):
    if NO_PG:
        pytest.skip("TOLLGATE_NO_PG=1")
    import psycopg

    cluster = request.getfixturevalue("pg_cluster")  # raises (an error, not a skip) if it could not start
    assert cluster.running and cluster.port != 5432
    with psycopg.connect(cluster.conninfo) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)  # nothing on TCP
        assert conn.execute("SHOW unix_socket_directories").fetchone() == (str(cluster.dir),)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)  # the fault tests rely on it
    sock = cluster.dir / f".s.PGSQL.{cluster.port}"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(cluster.dir).st_mode) == 0o700
